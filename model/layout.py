"""The Hugging Face GPT-2 layout that every model folder uses: its file names, its tensor names and
orientation, and its config.json. Loading, saving and the Hub all speak it."""

from __future__ import annotations

import torch

from .config import GPTConfig
from .tokenizer import EOT_TOKEN


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to the model."""


WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LOSS_CURVE_NAME = "loss_curve.png"
# Hugging Face stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old transformers versions saved with the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
TIED_NAME, EMBEDDING_NAME = "lm_head.weight", "transformer.wte.weight"  # GPT-2 ties the output head to the embedding
# Bounds for a shape read from a file: far above any GPT-2 (XL: 48 layers, 25 heads, n_embd 1600,
# context 1024), far below what would exhaust a machine before a single tensor is checked.
CONFIG_LIMITS = {"n_layer": 512, "n_head": 1024, "n_embd": 65536, "block_size": 1 << 20, "vocab_size": 1 << 22}


def model_name(name: str) -> str | None:
    """This package's name for a tensor name of any supported layout (None: a buffer to drop): strip
    torch.compile / DDP prefixes, add the `transformer.` prefix that GPT2Model checkpoints lack."""
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    if name.endswith(IGNORED_SUFFIXES):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def from_hf_tensors(state_dict: dict) -> dict:
    """Any supported layout mapped onto this package's names (model_name) and nn.Linear orientation
    (Conv1D weights transposed)."""
    out = {new: tensor for name, tensor in state_dict.items() if (new := model_name(name)) is not None}
    c_attn = out.get("transformer.h.0.attn.c_attn.weight")
    if c_attn is not None and c_attn.shape[1] == 3 * c_attn.shape[0]:  # Conv1D (C, 3C)
        out = {k: v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v for k, v in out.items()}
    return out


def to_hf_tensors(state_dict: dict) -> dict:
    """A model's state dict in the Hugging Face layout, on the CPU: Conv1D orientation, the tied output head
    left out (transformers ties it again on load)."""
    return {
        name: (t.t() if name.endswith(CONV1D_SUFFIXES) else t).detach().to("cpu").contiguous()
        for name, t in state_dict.items()
        if name != TIED_NAME
    }


def config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config.json (a missing size is GPT-2 small's), each size within
    CONFIG_LIMITS."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json holds a {type(hf).__name__}, not a GPT-2 config object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' is supported")
    gpt2 = GPTConfig()
    fields = dict(
        block_size=hf.get("n_positions", hf.get("n_ctx", gpt2.block_size)),
        vocab_size=hf.get("vocab_size", gpt2.vocab_size),
        n_layer=hf.get("n_layer", gpt2.n_layer),
        n_head=hf.get("n_head", gpt2.n_head),
        n_embd=hf.get("n_embd", gpt2.n_embd),
    )
    for name, value in fields.items():
        limit = CONFIG_LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise CheckpointError(f"config.json: {name} must be a whole number from 1 to {limit:,}, got {value!r:.40}")
    dropout = hf.get("resid_pdrop", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"config.json: resid_pdrop must be a number in [0, 1), got {dropout!r:.40}")
    try:
        return GPTConfig(**fields, dropout=dropout, bias=bool(hf.get("bias", True)))
    except ValueError as err:
        raise CheckpointError(f"config.json: {err}") from None


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict:
    """The Hugging Face GPT2Config (as config.json holds it) of a GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
