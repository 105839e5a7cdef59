"""Train ShakespeareGPT: `python train/train.py [--preset NAME] [--flag value ...]`.

One settings dataclass (TrainConfig) defines every flag; presets fill it, explicit flags win.
Runs on one CPU or GPU, or under `torchrun` with DDP; only rank 0 logs, saves and uploads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python train/train.py` from anywhere

from model import GPT, GPTConfig, generate, load_tokenizer, render_model_card, stream_text  # noqa: E402
from model import PRESETS as MODEL_PRESETS  # noqa: E402
from model.checkpoint import CheckpointError, upload_folder  # noqa: E402

log = logging.getLogger("train")

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SIZE = 1_115_394
SAMPLE_PROMPTS = ("First Citizen:", "ROMEO:", "To be or not")
STATE_NAME = "train_state.pt"
# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU, by a substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


@dataclass
class TrainConfig:
    """Every training setting; each field is a command-line flag (`--batch-size` or `--batch_size`)."""

    preset: str = "recipe-b"
    data: str = ""  # text file or folder of .txt; default: $SM_CHANNEL_TRAINING, else download
    out_dir: str = ""  # default: $SM_MODEL_DIR, else out/
    cache_dir: str = "~/.cache/shakespeare-gpt"
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 256
    dropout: float = 0.0
    init: str = ""  # start from any GPT.from_pretrained source (fine-tuning)
    # optimisation
    batch_size: int = 32  # sequences per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 0  # sequences per forward pass; 0 = batch_size / processes
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    max_steps: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    target_loss: float = 0.099999  # stop when the mean training loss over one full pass is below
    max_minutes: float = 0.0  # stop (and save) after this long; 0 = no limit
    # data
    val_fraction: float = 0.1
    seed: int = 1337
    # machine
    device: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto, float32, bfloat16, float16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), true, false
    # logging and checkpoints
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 250
    sample_tokens: int = 48
    resume: bool = False
    push_to_hub: str = ""  # user/repo
    private: bool = False


PRESETS: dict[str, dict] = {
    "recipe-b": {},  # TSAI-S12: 32 x 256 on a T4
    "recipe-a": dict(batch_size=4, block_size=1024, lr=3e-4, max_steps=12000, target_loss=0.1),
    "t4": dict(dtype="float16", compile="true"),
    "h100": dict(dtype="bfloat16", compile="true", micro_batch_size=32),
    # The model shipped in assets/: 2 CPU cores, under an hour, a file under 32 MiB.
    "cpu": dict(
        **MODEL_PRESETS["cpu-small"],
        batch_size=16,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        max_steps=1200,
        max_minutes=55,
        dropout=0.1,
        eval_interval=100,
        checkpoint_interval=100,
        log_interval=10,
        # 2.1x the tokens/s of eager fp32 on a 2-core CPU (bench/train_throughput.py)
        dtype="bfloat16",
        compile="true",
    ),
}


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train GPT-2 on Tiny Shakespeare. Flags may use dashes or underscores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in fields(TrainConfig):
        names = [f"--{field.name.replace('_', '-')}"] + (["--" + field.name] if "_" in field.name else [])
        kwargs = dict(dest=field.name, default=None, help=f"default: {field.default!r}")
        if field.type == "bool":
            kwargs.update(type=_bool, nargs="?", const=True)
        else:
            kwargs["type"] = {"int": int, "float": float}.get(field.type, str)
        if field.name == "preset":
            kwargs["choices"] = sorted(PRESETS)
        parser.add_argument(*names, **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", TrainConfig.preset)
    try:
        config = TrainConfig(**{**PRESETS[preset], **args})
        validate(config)
    except ValueError as err:
        parser.error(str(err))
    return config


def validate(config: TrainConfig) -> None:
    positive = (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "batch_size",
        "max_steps",
        "log_interval",
        "eval_interval",
        "eval_batches",
        "checkpoint_interval",
    )
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if config.n_embd % config.n_head:
        raise ValueError("--n-embd must be divisible by --n-head")
    if not 0 <= config.val_fraction < 1:
        raise ValueError("--val-fraction must be in [0, 1)")
    if config.lr <= 0 or config.min_lr < 0 or config.min_lr > config.lr:
        raise ValueError("--lr must be > 0 and --min-lr in [0, lr]")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError("--dtype must be auto, float32, bfloat16 or float16")
    if config.compile not in ("auto", "true", "false"):
        raise ValueError("--compile must be auto, true or false")
    if config.push_to_hub and config.push_to_hub.count("/") != 1:
        raise ValueError("--push-to-hub must be a repo id like user/repo")


# ---------------------------------------------------------------- data


def find_text(config: TrainConfig) -> Path:
    """The training text: --data, else SageMaker's training channel, else a downloaded copy."""
    source = config.data or os.environ.get("SM_CHANNEL_TRAINING", "")
    if source:
        path = Path(source).expanduser()
        if path.is_dir():
            texts = sorted(path.glob("*.txt"))
            if not texts:
                raise SystemExit(f"error: data folder {path} holds no .txt file")
            return texts[0]
        if not path.is_file():
            raise SystemExit(f"error: data file {path} does not exist; pass --data PATH to a text file")
        return path
    path = Path(config.cache_dir).expanduser() / "input.txt"
    if not (path.is_file() and path.stat().st_size == DATA_SIZE):
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading Tiny Shakespeare from %s", DATA_URL)
        try:
            with urllib.request.urlopen(DATA_URL, timeout=60) as response:
                body = response.read()
        except OSError as err:
            raise SystemExit(f"error: could not download {DATA_URL} ({err}); pass --data PATH") from err
        if len(body) != DATA_SIZE:
            raise SystemExit(f"error: downloaded {len(body)} bytes, expected {DATA_SIZE}; pass --data PATH")
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
    return path


def load_tokens(config: TrainConfig) -> np.ndarray:
    """The text's GPT-2 tokens, cached as uint16 next to other caches (keyed by content)."""
    text_path = find_text(config)
    raw = text_path.read_bytes()
    cache = Path(config.cache_dir).expanduser() / f"tokens-{hashlib.sha1(raw).hexdigest()[:16]}.u16"
    if cache.is_file():
        return np.fromfile(cache, dtype=np.uint16)
    tokens = np.array(load_tokenizer().encode_ordinary(raw.decode("utf-8", errors="replace")), dtype=np.uint16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tokens.tofile(tmp)
    os.replace(tmp, cache)
    return tokens


def split_held_out(tokens, val_fraction: float):
    """(training, held-out) tokens: the held-out split is the last val_fraction of the text."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class Batches:
    """Deterministic epochs of non-overlapping windows: epoch e shuffles the windows that start at
    a random offset, both drawn from (seed, e), so a (epoch, index) position resumes exactly."""

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.windows = (len(tokens) - 1 - (block_size - 1)) // block_size
        if self.windows < batch_size:
            raise SystemExit(
                f"error: the training split has {len(tokens)} tokens: too short for one batch of "
                f"{batch_size} x {block_size}; use more data or a smaller --batch-size / --block-size"
            )
        self.per_epoch = self.windows // batch_size
        self.epoch, self.index = 0, 0
        self._starts = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        offset = int(torch.randint(0, self.block_size, (1,), generator=generator))
        offset = min(offset, len(self.tokens) - 1 - self.windows * self.block_size)
        order = torch.randperm(self.windows, generator=generator)
        return (offset + order * self.block_size).to(self.tokens.device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._starts = self._epoch_starts(self.epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Inputs and targets (batch_size, block_size), and whether this batch ends a pass."""
        starts = self._starts[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        rows = starts[:, None] + torch.arange(self.block_size + 1, device=starts.device)
        window = self.tokens[rows].long()
        self.index += 1
        ends_pass = self.index == self.per_epoch
        if ends_pass:
            self.epoch, self.index = self.epoch + 1, 0
            self._starts = self._epoch_starts(self.epoch)
        return window[:, :-1], window[:, 1:], ends_pass


# ---------------------------------------------------------------- machine


@dataclass
class Machine:
    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_machine(config: TrainConfig) -> Machine:
    """Device, autocast dtype and process group, decided once."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = config.dtype
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    return Machine(device, autocast_dtype, rank, world_size, local_rank)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir: Path, name: str, model: GPT, state: dict, card: str, extra_files=()) -> Path:
    """Write out_dir/name atomically: into a temp folder, then renamed over the old one, so a
    kill at any moment leaves a complete checkpoint (out_dir/name, or out_dir/.name.old)."""
    final, tmp, old = out_dir / name, out_dir / f".{name}.tmp", out_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, model_card=card)
    torch.save(state, tmp / STATE_NAME)
    for path in extra_files:
        if Path(path).is_file():
            shutil.copy2(path, tmp / Path(path).name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    for candidate in (out_dir / "latest", out_dir / ".latest.old"):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# ---------------------------------------------------------------- training


class Trainer:
    def __init__(self, config: TrainConfig, machine: Machine) -> None:
        self.config, self.machine = config, machine
        self.out_dir = Path(config.out_dir or os.environ.get("SM_MODEL_DIR", "out")).expanduser()
        if config.push_to_hub and machine.is_main:
            from huggingface_hub import get_token

            if not get_token():
                raise SystemExit("error: --push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
        tokens = torch.from_numpy(load_tokens(config).astype(np.int32))
        train_tokens, val_tokens = split_held_out(tokens, config.val_fraction)
        self.train_tokens, self.val_tokens = train_tokens.to(machine.device), val_tokens.to(machine.device)
        n_val = len(val_tokens)
        self.micro_batch = config.micro_batch_size or max(1, config.batch_size // machine.world_size)
        self.accum_steps = config.batch_size // (self.micro_batch * machine.world_size)
        if self.accum_steps * self.micro_batch * machine.world_size != config.batch_size:
            raise SystemExit(
                f"error: --batch-size {config.batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch} x {machine.world_size} processes"
            )
        self.batches = Batches(self.train_tokens, config.block_size, config.batch_size, config.seed)
        # checked after the training split, so a file too short for anything says "too short for one batch"
        if n_val and len(self.val_tokens) <= config.block_size:
            raise SystemExit(
                f"error: the held-out split has only {n_val} tokens, fewer than --block-size "
                f"{config.block_size} + 1; use more data or --val-fraction 0"
            )

        torch.manual_seed(config.seed)
        if config.init:
            try:
                self.model = GPT.from_pretrained(config.init)
            except CheckpointError as err:
                raise SystemExit(f"error: --init {config.init}: {err}") from err
            if config.block_size > self.model.config.block_size:
                raise SystemExit(f"error: --block-size is larger than {config.init}'s context")
            self.model.train()
        else:
            self.model = GPT(
                GPTConfig(
                    block_size=config.block_size,
                    n_layer=config.n_layer,
                    n_head=config.n_head,
                    n_embd=config.n_embd,
                    dropout=config.dropout,
                )
            )
        self.model.to(machine.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            fused=machine.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(enabled=machine.autocast_dtype == torch.float16)
        compiled = config.compile == "true" or (config.compile == "auto" and machine.device.type == "cuda")
        network = torch.compile(self.model) if compiled else self.model
        if machine.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [machine.device.index] if machine.device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=ids)
        self.network = network
        self.step, self.best_val, self.history = 0, float("inf"), []
        self.elapsed = 0.0  # training seconds, carried over on resume
        self.stop_signal = 0
        # the running pass: summed step losses (kept on the device: no sync per step) and count
        self.pass_sum = torch.zeros((), device=machine.device, dtype=torch.float64)
        self.pass_steps, self.pass_loss = 0, None
        if config.resume:
            self._resume()

    # -- state

    def state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "best_val": self.best_val,
            "elapsed": self.elapsed,
            "history": self.history,
            "data": self.batches.state(),
            "pass": [float(self.pass_sum), self.pass_steps, self.pass_loss],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.machine.device) if self.machine.device.type == "cuda" else None,
        }

    def _resume(self) -> None:
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            raise SystemExit(f"error: --resume: no checkpoint in {self.out_dir}/latest; drop --resume to start fresh")
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        loaded = GPT.from_pretrained(folder)
        with torch.no_grad():
            for mine, theirs in zip(self.model.parameters(), loaded.parameters(), strict=True):
                mine.copy_(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["data"])
        self.step, self.best_val = state["step"], state["best_val"]
        self.elapsed, self.history = state["elapsed"], state["history"]
        pass_sum, self.pass_steps, self.pass_loss = state["pass"]
        self.pass_sum.fill_(pass_sum)
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and self.machine.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.machine.device)
        if self.machine.is_main:
            log.info("resumed from %s at step %d", folder, self.step)

    # -- evaluation

    @torch.no_grad()
    def val_loss(self) -> float | None:
        if not len(self.val_tokens):
            return None
        self.model.eval()
        block = self.config.block_size
        windows = (len(self.val_tokens) - 1) // block
        starts = torch.arange(windows, device=self.machine.device) * block
        total, count = 0.0, 0
        for chunk in starts[: self.config.eval_batches * self.micro_batch].split(self.micro_batch):
            rows = chunk[:, None] + torch.arange(block + 1, device=chunk.device)
            window = self.val_tokens[rows].long()
            with self.machine.autocast():
                _, loss = self.model(window[:, :-1], window[:, 1:])
            total, count = total + float(loss) * len(chunk), count + len(chunk)
        self.model.train()
        return total / count

    def samples(self) -> dict[str, str]:
        tokenizer = load_tokenizer()
        out = {}
        for prompt in SAMPLE_PROMPTS:
            ids = generate(
                self.model,
                tokenizer.encode(prompt),
                self.config.sample_tokens,
                temperature=0.8,
                top_k=50,
                seed=self.config.seed,
            )
            out[prompt] = prompt + "".join(stream_text(ids, tokenizer))
        self.model.train()
        return out

    # -- outputs

    def card(self, summary: dict, samples: dict[str, str]) -> str:
        body = "\n## Samples\n\n" + "".join(f"```text\n{text}\n```\n\n" for text in samples.values())
        body += "\n![loss curve](loss_curve.png)\n"
        return render_model_card(self.model.config, summary, body)

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "lr" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train (per log step)")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="held-out")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="ShakespeareGPT training")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "loss_curve.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def record(self, row: dict) -> None:
        self.history.append(row)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self, val: float | None) -> dict:
        c = self.config
        return {
            "train_loss": None if self.pass_loss is None else round(self.pass_loss, 4),
            "val_loss": None if val is None else round(val, 4),
            "steps": self.step,
            "tokens": self.step * c.batch_size * c.block_size,
            "train_minutes": round(self.elapsed / 60, 1),
            "hardware": self.hardware(),
            "preset": c.preset,
            "batch": f"{c.batch_size} x {c.block_size}",
            "val_fraction": c.val_fraction,
        }

    def hardware(self) -> str:
        device = self.machine.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        return f"{self.machine.world_size} x {name}" if self.machine.world_size > 1 else name

    def checkpoint(self, val: float | None, best: bool = False) -> None:
        if not self.machine.is_main:
            return
        curve = self.plot()
        card = self.card(self.summary(val), self.samples())
        state = self.state()
        save_checkpoint(self.out_dir, "latest", self.model, state, card, [curve])
        if best:
            save_checkpoint(self.out_dir, "best", self.model, state, card, [curve])

    # -- the loop

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def optimizer_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a whole batch (this process's share, in micro-batches); returns the
        mean loss over all processes and the gradient norm, as device tensors (no host sync)."""
        machine = self.machine
        share = self.micro_batch * self.accum_steps
        mine = slice(machine.rank * share, (machine.rank + 1) * share)
        inputs, targets = inputs[mine], targets[mine]
        step_loss = torch.zeros((), device=machine.device)
        for micro in range(self.accum_steps):
            part = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            sync = micro == self.accum_steps - 1 or machine.world_size == 1
            with nullcontext() if sync else self.network.no_sync(), machine.autocast():
                _, loss = self.network(inputs[part], targets[part])
                loss = loss / self.accum_steps
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if machine.world_size > 1:
            dist.all_reduce(step_loss)  # gloo has no AVG
            step_loss /= machine.world_size
        return step_loss, grad_norm

    def train(self) -> dict:
        c, machine = self.config, self.machine
        main = machine.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        tokens_per_step = c.batch_size * c.block_size
        n_params = self.model.num_parameters()
        flops_per_token = 6 * n_params + 12 * c.n_layer * c.n_embd * c.block_size
        peak = peak_flops(machine.device)
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not main, dynamic_ncols=True, desc="train")
        if main:
            log.info(
                "%s parameters; %d train / %d held-out tokens; %d steps per pass; %s",
                f"{n_params:,}",
                len(self.train_tokens),
                len(self.val_tokens),
                self.batches.per_epoch,
                self.hardware(),
            )
        val, reached, reason = None, False, "max steps"
        log_sum = torch.zeros((), device=machine.device)
        t_log, steps_since_log, t_start = time.perf_counter(), 0, time.perf_counter() - self.elapsed
        while self.step < c.max_steps:
            lr = lr_at(self.step, c)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            inputs, targets, ends_pass = self.batches.next()
            step_loss, grad_norm = self.optimizer_step(inputs, targets)
            self.step += 1
            bar.update(1)
            self.pass_sum += step_loss
            log_sum += step_loss
            self.pass_steps += 1
            steps_since_log += 1
            self.elapsed = time.perf_counter() - t_start

            if ends_pass:  # the target is judged on a whole pass over the training split
                self.pass_loss = float(self.pass_sum) / self.pass_steps
                self.pass_sum.zero_()
                self.pass_steps = 0
                if self.pass_loss < c.target_loss:
                    reached = True
                    reason = f"target loss reached: mean loss over the last pass {self.pass_loss:.4f}"
            if self.step % c.log_interval == 0 or reached or self.step == c.max_steps:
                now = time.perf_counter()
                tokens_per_second = steps_since_log * tokens_per_step / (now - t_log)
                row = {
                    "step": self.step,
                    "loss": round(float(log_sum) / steps_since_log, 5),
                    "pass_loss": None if self.pass_loss is None else round(self.pass_loss, 5),
                    "lr": lr,
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_second": round(tokens_per_second),
                    "mfu": None if peak is None else round(flops_per_token * tokens_per_second / peak, 4),
                    "gpu_memory_gb": round(torch.cuda.max_memory_allocated(machine.device) / 2**30, 2)
                    if machine.device.type == "cuda"
                    else None,
                }
                if main:
                    self.record(row)
                    bar.set_postfix(loss=row["loss"], lr=f"{lr:.2e}", tok_s=row["tokens_per_second"])
                log_sum.zero_()
                t_log, steps_since_log = now, 0
            if c.max_minutes and self.elapsed > c.max_minutes * 60 and not reached:
                reason = f"time budget of {c.max_minutes} minutes reached"
                break
            if self.step % c.eval_interval == 0 and not reached:
                val = self.val_loss()
                if main:
                    self.record({"step": self.step, "loss": self.pass_loss, "val_loss": val})
                    tqdm.write(f"step {self.step}: pass loss {self.pass_loss}, held-out loss {val}")
                best = val is not None and val < self.best_val
                self.best_val = min(self.best_val, val) if val is not None else self.best_val
                self.checkpoint(val, best=best)
            elif self.step % c.checkpoint_interval == 0 and not reached:
                self.checkpoint(val)
            stop = self.stop_signal
            if machine.world_size > 1 and self.step % c.log_interval == 0:  # every rank checks at the same step
                flag = torch.tensor(float(stop), device=machine.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = int(flag.item())
            elif machine.world_size > 1:
                stop = 0
            if reached or stop:
                if stop:
                    reason = f"stopped by signal {signal.Signals(stop).name}"
                break
        bar.close()
        val = self.val_loss()
        if main:
            self.record({"step": self.step, "loss": self.pass_loss, "val_loss": val})
        best = val is not None and val < self.best_val
        self.best_val = min(self.best_val, val) if val is not None else self.best_val
        self.checkpoint(val, best=best)
        summary = {**self.summary(val), "reached_target": reached, "reason": reason}
        if main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info("%s; checkpoint in %s", reason, self.out_dir / "latest")
            if c.push_to_hub and not self.stop_signal:
                url = upload_folder(self.out_dir / "latest", c.push_to_hub, private=c.private)
                log.info("uploaded to https://huggingface.co/%s (%s)", c.push_to_hub, url)
        return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = parse_config(argv)
    machine = setup_machine(config)
    if not machine.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        summary = Trainer(config, machine).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary["reason"].startswith("stopped by signal"):
        log.info("resume with: python train/train.py --resume --out-dir %s", config.out_dir or "out")
        return 128 + int(signal.Signals[summary["reason"].split()[-1]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
