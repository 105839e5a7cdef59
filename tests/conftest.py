"""Fixtures every test file may ask for. Nothing here is imported: a test names what it needs as an argument."""

import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The models under test are tiny: one thread avoids spin-waiting against other work on a 2-core
# machine (a training run beside the tests made them 50x slower with two threads).
torch.set_num_threads(1)


def _perturb(module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return module.eval()


@pytest.fixture(scope="session")
def root() -> Path:
    """The checkout the tests run from."""
    return ROOT


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare as the project ships it (the trainer's default --data)."""
    return ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def perturb():
    """perturb(module, seed=0): noise added to every parameter, so biases and layer-norm weights are not their
    zero / one initial values: a weight mapped to the wrong name or orientation then changes the logits."""
    return _perturb


@pytest.fixture(scope="session")
def wait_until():
    """wait_until(condition, seconds=1.0): whether condition() holds within `seconds` (polled every 5 ms)."""

    def wait(condition, seconds: float = 1.0) -> bool:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        return condition()

    return wait


@pytest.fixture
def slow_steps(monkeypatch):
    """slow_steps(seconds): every batched decoding step takes at least `seconds`, so that a request runs long
    enough to be seen leaving early (a reader closing it) rather than running out of tokens."""
    from serve.decoding import DecodeBatch

    def slow(seconds: float) -> None:
        original = DecodeBatch.advance
        monkeypatch.setattr(DecodeBatch, "advance", lambda self: (time.sleep(seconds), original(self)))

    return slow


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 30,000 characters of Tiny Shakespeare: about 30 steps per pass at 8 x 32."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:30_000])
    return path


@pytest.fixture
def tiny_config():
    """GPT-2's vocabulary (so the end-of-text token exists) in a 2-layer, 32-wide model whose
    16-token context a short generation crosses."""
    from model import GPTConfig

    return GPTConfig.from_preset("tiny", block_size=16)


@pytest.fixture
def tiny_model(tiny_config):
    from model import GPT

    torch.manual_seed(0)
    return _perturb(GPT(tiny_config))


@pytest.fixture
def hf_gpt2():
    """hf_gpt2(config, seed=0, std=0.02): a random transformers.GPT2LMHeadModel with a GPTConfig's shape. Its
    weights come from this seed alone (normal(0, std), GPT-2's initialisation at 0.02, drawn here), not from the
    installed transformers' own initialisation, which changes between its releases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(config, seed: int = 0, std: float = 0.02):
        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
        )
        model = GPT2LMHeadModel(hf_config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):  # by name: the same draws in every release
                if ".ln_" in name or name.startswith("transformer.ln_f"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        return _perturb(model, seed)

    return build


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random model saved as a complete model folder (weights, config, tokenizer files, card, curve),
    for the app to serve."""
    from app_server import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _make_varied(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "transformer.ln_f.weight":
                param.mul_(10)
    return model


@pytest.fixture(scope="session")
def make_varied():
    """make_varied(model): the residual projections and the final norm scaled, so a tiny random model's greedy
    output depends on context and position instead of repeating one token (and its top logits are far enough
    apart that float rounding never flips an argmax). Works on GPT and GPT2LMHeadModel."""
    return _make_varied


@pytest.fixture(scope="session")
def greedy_by_recomputation():
    """greedy_by_recomputation(model, prompt, max_new_tokens): the reference for cached decoding, without a
    cache: the visible window through forward() at every step. The window is the prompt's last block_size
    tokens; when a new token would overflow it, it restarts from the last half of the context (the newest
    token included)."""

    def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
        block_size, tokens = model.config.block_size, list(prompt)
        start = max(0, len(tokens) - block_size)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits, _ = model(torch.tensor([tokens[start:]]))
                tokens.append(int(logits[0, -1].argmax()))
                if len(tokens) - start > block_size:
                    start = len(tokens) - block_size // 2
        return tokens[len(prompt) :]

    return greedy


# -- the trainer's tests (train/): fixtures shared by test_train.py, test_train_faults.py, test_semantics_train.py

TINY_TRAINER_FLAGS = (
    "--device cpu --n-layer 2 --n-head 2 --n-embd 32 --block-size 32 --batch-size 8 --lr 3e-3 --min-lr 3e-4 "
    "--warmup-steps 5 --log-interval 5 --eval-interval 1000 --checkpoint-interval 1000 --sample-tokens 4 "
    "--eval-batches 2"
).split()


@pytest.fixture(scope="session")
def train_script() -> str:
    """train/train.py, the trainer's command line."""
    return str(ROOT / "train" / "train.py")


@pytest.fixture(scope="session")
def tiny_flags():
    """tiny_flags(out_dir, data, cache_dir, *extra): the trainer's flags for a 2-layer, 32-wide model with a
    32-token context on the CPU, batches of 8 x 32, a log row every 5 steps and checkpoints only at the end;
    extra flags come last, so they win. data None leaves --data out (the shipped text)."""

    def build(out_dir, data, cache_dir, *extra) -> list[str]:
        source = [] if data is None else ["--data", str(data)]
        folders = ["--out-dir", str(out_dir), "--cache-dir", str(cache_dir)]
        return [*source, *folders, *TINY_TRAINER_FLAGS, *map(str, extra)]

    return build


@pytest.fixture(scope="session")
def run_train():
    """run_train(command, env=None, **kwargs): a trainer command (train/train.py, a script wrapping it, torchrun)
    run to its end with one thread per process and `env` added to this one's; its CompletedProcess, as text."""
    import os
    import subprocess

    def run(command, env=None, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=300, env=env, **kwargs)

    return run


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(out_dir): the rows of a run's metrics.jsonl."""
    import json

    def read(out_dir) -> list[dict]:
        return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]

    return read
