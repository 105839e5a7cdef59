"""The training text: where it comes from, its GPT-2 tokens (cached), the held-out split and the batches."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from model import EOT_TOKEN, load_tokenizer
from model.saving import atomic_write

log = logging.getLogger("train")

# The text the project ships: the default --data, so training needs no network.
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
# Where the shipped copy came from; a download of it is checked against its known size.
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SIZE = 1_115_394


class DataError(ValueError):
    """Training text that cannot be used; the message says what to do."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def download(url: str, cache_dir: Path) -> Path:
    """The text at url, downloaded once into cache_dir (named by the URL, so two URLs never share a file)."""
    name = Path(urllib.parse.urlparse(url).path).name or "data.txt"
    path = cache_dir / "downloads" / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
    expected = DATA_SIZE if url == DATA_URL else None
    if path.is_file() and (expected is None or path.stat().st_size == expected):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
    except OSError as err:
        raise DataError(f"could not download {url} ({err}); pass --data PATH to a local text file") from err
    if expected is not None and len(body) != expected:
        raise DataError(f"downloaded {len(body)} bytes from {url}, expected {expected}; pass --data PATH")
    return atomic_write(path, lambda p: p.write_bytes(body))


def find_texts(data: str, cache_dir: str) -> list[Path]:
    """The text files to train on: --data (a file, every .txt of a folder in name order, or a URL downloaded
    once into cache_dir), else SageMaker's training channel, else the shipped Tiny Shakespeare."""
    source = data or os.environ.get("SM_CHANNEL_TRAINING", "") or str(SHIPPED_DATA)
    if is_url(source):
        return [download(source, Path(cache_dir).expanduser())]
    path = Path(source).expanduser()
    if path.is_dir():
        texts = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not texts:
            raise DataError(f"data folder {path} holds no .txt file; pass --data PATH to a text file")
        return texts
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass --data PATH to a text file")
    return [path]


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out of --data"
        ) from None


def load_tokens(data: str, cache_dir: str) -> np.ndarray:
    """The GPT-2 tokens of the training text, files joined by <|endoftext|>, cached as uint16 in
    cache_dir (keyed by the files' contents)."""
    texts = find_texts(data, cache_dir)
    digest = hashlib.sha1()
    for path in texts:
        digest.update(hashlib.sha1(path.read_bytes()).digest())
    cache = Path(cache_dir).expanduser() / f"tokens-{digest.hexdigest()[:16]}.u16"
    if cache.is_file():
        tokens = np.fromfile(cache, dtype=np.uint16)
        log.info("%s tokens from %s (cached in %s)", f"{len(tokens):,}", ", ".join(map(str, texts)), cache)
        return tokens
    tokenizer = load_tokenizer()
    parts = []
    for path in texts:
        parts.append(tokenizer.encode_ordinary(read_text(path)))
        log.info("%s: %s tokens", path, f"{len(parts[-1]):,}")
    tokens = np.array([t for i, part in enumerate(parts) for t in ([EOT_TOKEN] if i else []) + part], dtype=np.uint16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, tokens.tofile)
    return tokens


def split_held_out(tokens, val_fraction: float):
    """(training, held-out) tokens: the held-out split is the last val_fraction of the text."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class Batches:
    """Deterministic passes of non-overlapping windows: pass n shuffles the windows that start at a
    random offset, both drawn from (seed, n), so a (pass, index) position resumes exactly.
    Every process draws the same batches; each trains on its own share of the rows."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.windows = (len(tokens) - seq_len) // seq_len
        if self.windows < batch_size:
            raise DataError(
                f"the training split has {len(tokens)} tokens: too short for one batch of "
                f"{batch_size} x {seq_len}; use more data or a smaller --batch-size / --seq-len"
            )
        self.per_pass = self.windows // batch_size
        self.current_pass, self.index = 0, 0
        self._starts = self._pass_starts(0)

    def _pass_starts(self, number: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + number)
        # windows * seq_len <= len - seq_len, so any offset below seq_len leaves room for the targets
        offset = int(torch.randint(0, self.seq_len, (1,), generator=generator))
        order = torch.randperm(self.windows, generator=generator)
        return (offset + order * self.seq_len).to(self.tokens.device)

    def state(self) -> dict:
        return {"pass": self.current_pass, "index": self.index}

    def load_state(self, state: dict) -> None:
        # checkpoints written before the rename to "pass" call it "epoch"
        self.current_pass = state["pass"] if "pass" in state else state["epoch"]
        self.index = state["index"]
        self._starts = self._pass_starts(self.current_pass)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Inputs and targets (batch_size, seq_len), and whether this batch ends a pass."""
        starts = self._starts[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        window = windows(self.tokens, starts, self.seq_len)
        self.index += 1
        ends_pass = self.index == self.per_pass
        if ends_pass:
            self.current_pass, self.index = self.current_pass + 1, 0
            self._starts = self._pass_starts(self.current_pass)
        return window[:, :-1], window[:, 1:], ends_pass


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows of seq_len + 1 tokens starting at starts, as int64 on the tokens' device."""
    return tokens[starts[:, None] + torch.arange(seq_len + 1, device=starts.device)].long()
