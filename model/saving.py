"""Saving a model folder in the Hugging Face GPT-2 layout (weights, config, tokenizer files, model card),
each file written whole or not at all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import hub, tokenizer
from .card import CARD_NAME, render_model_card
from .layout import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, config_to_hf, to_hf_tensors
from .loading import check_state_dict


def atomic_write(path: str | Path, write) -> Path:
    """Write a file through write(tmp_path), then rename it over path: a kill or a full disk never
    leaves a half-written file, and two processes writing the same file (the token cache under torchrun)
    each rename a whole one. The file gets the usual mode (0644 under the default umask)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # processes may write at once
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_tokenizer_files(folder: str | Path, model_max_length: int) -> None:
    """The Hugging Face GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json), so `AutoTokenizer.from_pretrained(folder)` and
    `pipeline("text-generation", model=folder)` work offline, and load_tokenizer(folder) reads them."""
    folder = Path(folder)
    for name in (tokenizer.VOCAB_NAME, tokenizer.MERGES_NAME, tokenizer.TOKENIZER_JSON_NAME):
        atomic_write(folder / name, lambda p, name=name: shutil.copyfile(tokenizer.PACKAGED / name, p))
    eot = tokenizer.EOT_TEXT
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    added = {"content": eot, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode exactly as tiktoken does
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {str(tokenizer.EOT_TOKEN): {**added, "special": True}},
    }
    for name, content in ((tokenizer.TOKENIZER_CONFIG_NAME, config), (tokenizer.SPECIAL_TOKENS_NAME, special)):
        text = json.dumps(content, indent=2) + "\n"
        atomic_write(folder / name, lambda p, text=text: p.write_text(text))


def save_folder(model, folder: str | Path, model_card: str | None = None) -> Path:
    """The Hugging Face GPT-2 layout: model.safetensors and config.json first, then the tokenizer files
    and the model card."""
    if not model.config.bias:
        raise ValueError("the Hugging Face GPT-2 layout needs bias=True")
    state = model.state_dict()
    with torch.device("meta"):
        expected = type(model)(model.config).state_dict()
    try:  # a model from load_for_inference has int8 or prepacked layers in place of its Linear weights
        check_state_dict(state, expected)
    except CheckpointError as err:
        raise ValueError(
            f"cannot save: {err}\nLayers replaced for serving (int8, packed bf16) cannot be saved: "
            "save the model GPT.from_pretrained returns"
        ) from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(state)
    dtype = model.transformer.wte.weight.dtype
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config_text = json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(config_text))
    save_tokenizer_files(folder, model.config.block_size)
    card = model_card if model_card is not None else render_model_card(model.config)
    atomic_write(folder / CARD_NAME, lambda p: p.write_text(card))
    return folder


def push_to_hub(model, repo_id: str, private: bool = False, token: str | None = None, model_card: str | None = None):
    """Save model into a temporary folder and upload it (hub.upload_folder); returns the commit URL."""
    with tempfile.TemporaryDirectory() as folder:
        save_folder(model, folder, model_card)
        return hub.upload_folder(folder, repo_id, private=private, token=token)
