"""The training settings: one dataclass whose fields are the command-line flags (with their help text),
the named presets, parsing, each flag's own range, what `--resume` may change, and the old names that still
work. Checks that need several flags with the machine and the model are train/plan.py's."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields

from model import SHAPES, GPTConfig
from model.device import DTYPES

from .outputs import DEFAULT_OUT_DIR

log = logging.getLogger("train")


def flag(default, help: str, **metadata):
    """A TrainConfig field: its default and the help text its flag shows."""
    return field(default=default, metadata={"help": help, **metadata})


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text) -> bool:
    """True/False in any case, 1/0, yes/no, on/off: SageMaker passes Python's `True` / `False`."""
    value = str(text).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_switch(text) -> str:
    """auto, or a boolean written any way parse_bool accepts, as "true" / "false"."""
    if str(text).strip().lower() == "auto":
        return "auto"
    return "true" if parse_bool(text) else "false"


# Names that changed; the old ones keep working (a command line says so in one line, a checkpoint silently).
RENAMED_RECIPES = {"recipe-a": "gpt2-4x1024", "recipe-b": "gpt2-32x256"}
RENAMED_FIELDS = {"model": "model_preset"}


def deprecated(old: str, new: str) -> None:
    """One line on stderr, from the main process only (torchrun starts one process per device)."""
    if os.environ.get("RANK", "0") == "0":
        log.warning("%s is deprecated: use %s", old, new)


def parse_preset(text) -> str:
    """A --preset name, the old recipe-a / recipe-b turned into their new names."""
    if text in RENAMED_RECIPES:
        deprecated(f"--preset {text}", f"--preset {RENAMED_RECIPES[text]}")
    return RENAMED_RECIPES.get(text, text)


def parse_old_model_flag(text) -> str:
    """--model NAME, the old spelling of --model-preset NAME."""
    deprecated("--model", "--model-preset")
    return text


def upgrade_saved(saved: dict) -> dict:
    """A configuration as an older trainer saved it, in today's field and preset names."""
    upgraded = {RENAMED_FIELDS.get(name, name): value for name, value in saved.items()}
    if upgraded.get("preset") in RENAMED_RECIPES:
        upgraded["preset"] = RENAMED_RECIPES[upgraded["preset"]]
    return upgraded


# Settings a resumed run may change: how long it runs, how it reports, where it uploads. Anything else
# (shape, data, schedule, seeds, batch) must stay what the checkpoint was trained with.
RESUMABLE = frozenset(
    {
        "resume",
        "max_steps",
        "max_minutes",
        "target_loss",
        "log_interval",
        "eval_interval",
        "eval_batches",
        "checkpoint_interval",
        "sample_tokens",
        "push_to_hub",
        "private",
        "device",
        "out_dir",
        "checkpoint_dir",
        "cache_dir",
    }
)


@dataclass
class TrainConfig:
    """Every training setting. Each field is a flag (`--batch-size` or `--batch_size`); a preset fills
    them, explicit flags win."""

    preset: str = flag("gpt2-32x256", "named settings to start from (explicit flags override them)",
                       parse=parse_preset)  # fmt: skip
    data: str = flag("", "a text file, a folder whose .txt files are read in name order, or an http(s) URL "
                     "downloaded once into --cache-dir; default: $SM_CHANNEL_TRAINING, else the shipped "
                     "data/tinyshakespeare.txt")  # fmt: skip
    out_dir: str = flag("", "where the run's checkpoints, metrics and curve go; default: $SM_MODEL_DIR, else "
                        f"{DEFAULT_OUT_DIR}/")  # fmt: skip
    checkpoint_dir: str = flag("", "where checkpoints are written and resumed from; default: SageMaker's "
                               "/opt/ml/checkpoints when it exists, else --out-dir")  # fmt: skip
    cache_dir: str = flag("~/.cache/shakespeare-gpt", "downloaded text and token caches")
    restart: bool = flag(False, "start a new run in an --out-dir that holds an earlier one, replacing the files "
                         "the trainer wrote there (never others)")  # fmt: skip
    # model: the shape of a GPTConfig preset, any field overridden
    model_preset: str = flag("gpt2", f"model shape: a GPTConfig preset ({', '.join(SHAPES)}); gpt2 is "
                             "GPT-2 124M (--model is its old name)")  # fmt: skip
    n_layer: int = flag(0, "transformer blocks; 0 = the --model-preset's")
    n_head: int = flag(0, "attention heads; 0 = the --model-preset's")
    n_embd: int = flag(0, "embedding width; 0 = the --model-preset's")
    block_size: int = flag(0, "the model's context in tokens; 0 = the --model-preset's")
    dropout: float = flag(0.0, "dropout probability while training (also applied to an --init model)")
    init: str = flag("", "start from these weights (any GPT.from_pretrained source) to fine-tune; their shape "
                     "and context replace the --model-preset's")  # fmt: skip
    seq_len: int = flag(0, "tokens per training sequence; 0 = the model's context (also when --model-preset or "
                        "--block-size is given without --seq-len)")  # fmt: skip
    # optimisation
    batch_size: int = flag(32, "sequences per optimizer step, over all processes and accumulation steps")
    micro_batch_size: int = flag(0, "sequences per forward pass and process; 0 = batch-size / processes")
    lr: float = flag(6e-4, "peak learning rate")
    min_lr: float = flag(6e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = flag(100, "steps of linear warm-up")
    max_steps: int = flag(5000, "optimizer steps at most")
    weight_decay: float = flag(0.1, "AdamW weight decay of 2-D weights")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.95, "AdamW beta2")
    label_smoothing: float = flag(0.0, "mix this much of the uniform distribution into each training target, "
                                  "so tokens the training text never uses keep some probability (the training "
                                  "loss shown includes it; held-out scores are the plain loss)")  # fmt: skip
    grad_clip: float = flag(1.0, "clip the gradient norm to this; 0 = no clipping")
    target_loss: float = flag(0.099999, "stop when the mean training loss over one whole pass is below this")
    max_minutes: float = flag(0.0, "stop (and save) after this many minutes of training; 0 = no limit")
    # data
    val_fraction: float = flag(0.1, "the last fraction of the tokens, held out to score the model")
    seed: int = flag(1337, "seed of the initial weights, the data order and dropout")
    # machine
    device: str = flag("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = flag("auto", "autocast dtype: auto (bf16 on CUDA, fp16 where bf16 is missing; on a CPU, bf16 "
                      "where it computes bf16 natively (AMX, AVX-512 BF16), else fp32), float32, bfloat16, "
                      "float16")  # fmt: skip
    compile: str = flag("auto", "torch.compile: auto (on for CUDA), true, false", parse=parse_switch)
    # logging and checkpoints
    log_interval: int = flag(10, "steps between log rows")
    eval_interval: int = flag(250, "steps between held-out scores (and best/ checkpoints)")
    eval_batches: int = flag(20, "batches of --batch-size sequences scored per held-out evaluation")
    checkpoint_interval: int = flag(250, "steps between latest/ checkpoints")
    sample_tokens: int = flag(48, "tokens of sample text per prompt in the model card; 0 = none")
    resume: bool = flag(False, "continue the run in --out-dir with its own settings")
    push_to_hub: str = flag("", "upload the best checkpoint to this Hub repo (user/repo) at the end")
    private: bool = flag(False, "make a new Hub repo private")

    def __post_init__(self) -> None:
        self.validate()

    def gpt_config(self) -> GPTConfig:
        """The shape a new model gets: the --model-preset with the fields given here (GPTConfig validates it).
        An --init model keeps its own (train/plan.py's RunPlan.shape is the one trained)."""
        shape = dict(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size)
        try:
            return GPTConfig.from_preset(
                self.model_preset, dropout=self.dropout, **{k: v for k, v in shape.items() if v}
            )
        except ValueError as err:  # name the flag, not the GPTConfig field
            message = str(err).replace("GPTConfig.", "--").replace("_", "-")
            raise ValueError(message.replace("unknown preset", "unknown --model-preset")) from None

    def validate(self) -> None:
        """Every value in its range, each error naming its flag."""

        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")

        if self.preset not in RECIPES:
            raise ValueError(f"--preset must be one of {', '.join(RECIPES)}, got {self.preset!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "seq_len", "micro_batch_size", "warmup_steps"):
            check(getattr(self, name) >= 0, name, "0 or more")
        for name in ("batch_size", "max_steps", "log_interval", "eval_interval", "eval_batches", "checkpoint_interval"):
            check(getattr(self, name) >= 1, name, "at least 1")
        check(self.sample_tokens >= 0, "sample_tokens", "0 or more")
        check(self.seed >= 0, "seed", "0 or more")
        check(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        check(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)")
        check(self.lr > 0, "lr", "greater than 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, --lr {self.lr}]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "0 or more")
        check(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "greater than 0, or 0 for no clipping")
        check(self.target_loss >= 0, "target_loss", "0 or more")
        check(self.max_minutes >= 0, "max_minutes", "0 (no limit) or more")
        check(self.dtype in ("auto", *DTYPES), "dtype", f"auto or one of {', '.join(DTYPES)}")
        check(self.compile in ("auto", "true", "false"), "compile", "auto, true or false")
        check(not self.push_to_hub or self.push_to_hub.count("/") == 1, "push_to_hub", "a repo id like user/repo")
        check(not (self.resume and self.restart), "restart", "off with --resume")
        self.gpt_config()  # the shape flags make a model


RECIPES: dict[str, dict] = {  # training recipes by --preset name (model shapes: model.SHAPES)
    # TSAI-S12: GPT-2 124M (context 1024) on batches of 32 x 256 tokens, on a T4
    "gpt2-32x256": dict(seq_len=256),
    # the notebook recipe: batches of 4 x 1024
    "gpt2-4x1024": dict(batch_size=4, lr=3e-4, max_steps=12000, target_loss=0.1),
    "t4": dict(seq_len=256, dtype="float16", compile="true"),
    "h100": dict(seq_len=256, dtype="bfloat16", compile="true"),
    # A small model on 2 CPU cores in under an hour, in a file under 32 MiB (docs/training.md#the-shipped-model).
    "cpu": dict(
        model_preset="cpu-small",
        batch_size=16,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        max_steps=760,  # about 58 minutes on a 2-core AVX2 CPU in fp32 + compile
        max_minutes=58,
        dropout=0.1,
        label_smoothing=0.03,  # 2% of the held-out tokens never occur in the training text
        eval_interval=50,
        checkpoint_interval=50,
        log_interval=10,
        # auto: bf16 autocast only on a CPU that computes bf16 natively, where it pays off; elsewhere it is
        # slower than fp32 (bench/train_throughput.py times each variant on the machine at hand)
        dtype="auto",
        compile="true",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Flags derived from TrainConfig: one description and one default each."""
    parser = argparse.ArgumentParser(
        prog="python train/train.py",
        description="Train GPT-2 on Tiny Shakespeare. Flags may use dashes or underscores (--batch-size or "
        "--batch_size); a --preset fills them and explicit flags win. Defaults shown are without a preset "
        "(train/config.py lists what each preset sets).",
    )
    for option in fields(TrainConfig):
        names = [f"--{option.name.replace('_', '-')}"] + (["--" + option.name] if "_" in option.name else [])
        shown = option.default if option.default != "" else "none"
        text = option.metadata["help"]
        text += "" if "default:" in text else f" (default: {shown})"
        kwargs = dict(dest=option.name, default=None, help=text)
        if option.type == "bool":
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = option.metadata.get("parse") or {"int": int, "float": float}.get(option.type, str)
        if option.name == "preset":
            kwargs["choices"] = list(RECIPES)
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--model", dest="model_preset", type=parse_old_model_flag, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """The configuration, and the flags given explicitly (by field name)."""
    parser = build_parser()
    explicit = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = dict(RECIPES[explicit.get("preset", TrainConfig.preset)])
    # a shape asked for trains on its context, unless --seq-len says
    if {"block_size", "model_preset"} & explicit.keys():
        preset.pop("seq_len", None)
    try:
        config = TrainConfig(**{**preset, **explicit})
    except ValueError as err:
        parser.error(str(err))
    return config, explicit


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_args(argv)[0]


def resumed_config(saved: dict, explicit: dict) -> TrainConfig:
    """The configuration a run was saved with, changed only where explicit flags may change it
    (RESUMABLE); any other flag that differs is an error naming it."""
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in upgrade_saved(saved).items() if k in known})
    refused = sorted(
        f"--{name.replace('_', '-')} {value!r} (the run has {getattr(config, name)!r})"
        for name, value in explicit.items()
        if name not in RESUMABLE and value != getattr(config, name)
    )
    if refused:
        raise ValueError(
            "--resume continues a run with its own settings; these flags would change it: "
            + ", ".join(refused)
            + ". Drop them, or start a new run with another --out-dir (or --restart)."
        )
    # a run started with --restart is continued, not started over again
    changes = {**{k: v for k, v in explicit.items() if k in RESUMABLE}, "resume": True, "restart": False}
    return dataclasses.replace(config, **changes)
