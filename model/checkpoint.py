"""Checkpoint I/O: the Hugging Face GPT-2 layout, nanoGPT-style `.pt` state dicts, and the Hub."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import card as card_module
from . import tokenizer
from .card import CARD_NAME
from .config import GPTConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Hugging Face stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that old transformers versions saved with the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to the model."""


# Bounds for a shape read from a file: far above any GPT-2 (XL: 48 layers, 25 heads, n_embd 1600,
# context 1024), far below what would exhaust a machine before a single tensor is checked.
CONFIG_LIMITS = {"n_layer": 512, "n_head": 1024, "n_embd": 65536, "block_size": 1 << 20, "vocab_size": 1 << 22}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def normalized_name(name: str) -> str | None:
    """This package's name for a tensor name of any supported layout (None: a buffer to drop): strip
    torch.compile / DDP prefixes, add the `transformer.` prefix that GPT2Model checkpoints lack."""
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    if name.endswith(IGNORED_SUFFIXES):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def normalize_state_dict(state_dict: dict) -> dict:
    """Map any supported layout onto this package's names (normalized_name) and nn.Linear orientation
    (Conv1D weights transposed)."""
    out = {new: tensor for name, tensor in state_dict.items() if (new := normalized_name(name)) is not None}
    c_attn = out.get("transformer.h.0.attn.c_attn.weight")
    if c_attn is not None and c_attn.shape[1] == 3 * c_attn.shape[0]:  # Conv1D (C, 3C)
        out = {k: v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v for k, v in out.items()}
    return out


def check_state_dict(state_dict: dict, expected: dict, strict: bool = True) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    problems = []
    for name, tensor in expected.items():
        if name not in state_dict:
            if name != "lm_head.weight":  # tied to transformer.wte.weight
                problems.append(f"missing tensor {name} {tuple(tensor.shape)}")
        elif state_dict[name].shape != tensor.shape:
            problems.append(
                f"tensor {name} has shape {tuple(state_dict[name].shape)}, the model needs {tuple(tensor.shape)}"
            )
    problems += [f"unexpected tensor {name}" for name in state_dict if name not in expected]
    if "lm_head.weight" in state_dict and "transformer.wte.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]):
            problems.append("lm_head.weight differs from transformer.wte.weight, but GPT-2 ties them")
    if problems and (strict or any(not p.startswith(("missing", "unexpected")) for p in problems)):
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config.json, each size within CONFIG_LIMITS."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"config.json holds a {type(hf).__name__}, not a GPT-2 config object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' is supported")
    fields = dict(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
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


def layer_indices(names) -> set[int]:
    """The block numbers that tensor names (as normalized_name gives them) belong to."""
    return {int(m.group(1)) for name in names if (m := re.match(r"transformer\.h\.(\d+)\.", name))}


def check_shapes(config: GPTConfig, shapes: dict[str, tuple], source: Path) -> None:
    """The config agrees with the tensors' shapes (names as normalized_name gives them): the embeddings'
    sizes and the number of layers. Runs on a safetensors header before any tensor is read or any layer
    is built, so a hostile config.json cannot make the loader allocate what the file does not hold."""
    problems = []
    for name, expected in (("transformer.wte.weight", (config.vocab_size, config.n_embd)),
                           ("transformer.wpe.weight", (config.block_size, config.n_embd))):  # fmt: skip
        if name in shapes and tuple(shapes[name]) != expected:
            problems.append(f"{name} is {tuple(shapes[name])}, the config says {expected}")
    layers = layer_indices(shapes)
    if config.n_layer > len(layers):  # more layers in the file: the strict load names the unexpected tensors
        problems.append(f"the config says {config.n_layer} layers, the weights hold {len(layers)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))


def check_values(state_dict: dict, source: Path) -> None:
    """Every tensor holds finite floating-point numbers."""
    for name, tensor in state_dict.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} has dtype {tensor.dtype}; GPT-2 weights are floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values; the checkpoint is damaged")


def config_to_hf(config: GPTConfig, dtype: torch.dtype) -> dict:
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
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def infer_config(state_dict: dict, hints: dict | None = None) -> GPTConfig:
    """A config from tensor shapes (and a nanoGPT `model_args` dict when the file has one)."""
    hints = hints or {}
    try:
        vocab_size, n_embd = state_dict["transformer.wte.weight"].shape
        block_size = state_dict["transformer.wpe.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"checkpoint has no tensor {missing.args[0]}; is it a GPT-2 checkpoint?") from None
    layers = layer_indices(state_dict)
    n_head = hints.get("n_head")
    if n_head is None:  # guessing it would load and then babble
        raise CheckpointError(
            "the checkpoint has no config.json beside it and does not record n_head; put the model's "
            "config.json (Hugging Face GPT-2 format) next to the weights"
        )
    return GPTConfig(
        block_size=block_size,
        vocab_size=vocab_size,
        n_layer=len(layers),
        n_head=n_head,
        n_embd=n_embd,
        bias="transformer.ln_f.bias" in state_dict,
    )


def _read_weights(path: Path) -> tuple[dict, dict]:
    """The tensors of a .safetensors or .pt file, and any config hints stored with them."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix not in (".safetensors", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors or .pt")
    try:
        if path.suffix == ".safetensors":
            return load_file(path), {}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises almost any type (KeyError, UnpicklingError, ...)
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); re-download or re-save it"
        ) from err
    hints = {}
    if isinstance(obj, dict):
        for key in ("model_args", "config"):
            if isinstance(obj.get(key), dict):
                hints = obj[key]
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj, hints


def _find_weights(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "model.pt", "ckpt.pt", "pytorch_model.pt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
    if not found:
        raise CheckpointError(f"folder {folder} holds no model.safetensors or .pt checkpoint")
    return found[0]


def _download(repo: str) -> Path:
    """A Hub repo (`org/name` or `org/name@revision`) in the local cache, downloading if allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    patterns = ["*.json", "*.txt", "*.safetensors", "*.pt", "*.md", "*.png"]
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"could not load {repo!r}: it is not a local path, {why}, and the repo is not in the local Hub "
            "cache; connect to the internet once, or pass a local folder or .safetensors file"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"could not load {repo!r}: no such Hub repo (or it is private: set HF_TOKEN or run `hf auth login`)"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"could not load {repo!r} from the Hub: {err}") from err


def resolve(source: str | Path) -> Path:
    """A local checkpoint file or folder for source; Hub repo ids are downloaded or read from cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", text) and not text.endswith((".pt", ".safetensors"))
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint {text!r} not found: no such file or folder, and not a Hub repo id")
    return _download(text)


def _read_config(path: Path) -> GPTConfig:
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not a valid GPT-2 config: {type(err).__name__}: {str(err)[:200]}") from None
    try:
        return config_from_hf(hf)
    except CheckpointError as err:
        raise CheckpointError(f"{path} is not a valid GPT-2 config: {err}") from None


def _header_shapes(path: Path) -> dict[str, tuple] | None:
    """The tensor shapes of a .safetensors file, from its header alone (None for other formats or a
    header that cannot be read: _read_weights then reports the damage)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception:
        return None
    return {new: shape for name, shape in shapes.items() if (new := normalized_name(name)) is not None}


def load_checkpoint(source: str | Path) -> tuple[GPTConfig, dict]:
    """The config and the normalized state dict from any supported source, each checked: the config's
    sizes within CONFIG_LIMITS and agreeing with the tensor shapes (for safetensors, before any tensor is
    read), the tensors finite floating-point numbers."""
    path = resolve(source)
    weights = _find_weights(path) if path.is_dir() else path
    config_file = weights.parent / CONFIG_NAME
    config = _read_config(config_file) if config_file.is_file() else None
    shapes = _header_shapes(weights)
    if config is not None and shapes is not None:
        check_shapes(config, shapes, weights)
    state_dict, hints = _read_weights(weights)
    state_dict = normalize_state_dict(state_dict)
    if config is None:
        config = infer_config(state_dict, hints)
    elif shapes is None:  # a .pt file has no header: its shapes are known once it is read
        check_shapes(config, {name: tuple(t.shape) for name, t in state_dict.items()}, weights)
    check_values(state_dict, weights)
    return config, state_dict


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
    tensors = {
        name: (t.t() if name.endswith(CONV1D_SUFFIXES) else t).detach().to("cpu").contiguous()
        for name, t in state.items()
        if name != "lm_head.weight"  # tied: transformers re-ties it on load
    }
    dtype = model.transformer.wte.weight.dtype
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config_text = json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(config_text))
    save_tokenizer_files(folder, model.config.block_size)
    card = model_card if model_card is not None else card_module.render_model_card(model.config)
    atomic_write(folder / CARD_NAME, lambda p: p.write_text(card))
    return folder


# What a model repo on the Hub holds: never optimizer state (train_state.pt) or other files.
UPLOAD_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, *tokenizer.TOKENIZER_FILES, "loss_curve.png")


def upload_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the Hub repo if needed and upload the folder's weights, config, tokenizer files, model card
    and loss curve (UPLOAD_FILES, nothing else). The token comes from the argument, HF_TOKEN or the
    Hub login, and is never logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=list(UPLOAD_FILES),
        commit_message="Upload ShakespeareGPT",
    )
    return str(getattr(info, "commit_url", info))
