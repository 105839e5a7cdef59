import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "input.txt"

# The models under test are tiny: one thread avoids spin-waiting against other work on a 2-core
# machine (a training run beside the tests made them 50x slower with two threads).
torch.set_num_threads(1)


def slow_steps(monkeypatch, seconds: float) -> None:
    """Make every batched decoding step take at least `seconds`, so that a request runs long enough to be
    seen leaving early (a reader closing it) rather than running out of tokens."""
    from model.sampling import Batch

    original = Batch.advance
    monkeypatch.setattr(Batch, "advance", lambda self: (time.sleep(seconds), original(self)))


def wait_until(condition, seconds: float = 1.0) -> bool:
    """Whether condition() holds within `seconds` (polled every 5 ms)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def perturb(module, seed: int = 0):
    """Add noise to every parameter so biases and layer-norm weights are not their zero / one
    initial values: a weight mapped to the wrong name or orientation then changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 30,000 characters of Tiny Shakespeare: about 30 steps per pass at 8 x 32."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(DATA.read_text()[:30_000])
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
    return perturb(GPT(tiny_config))


@pytest.fixture
def hf_gpt2():
    """Build a randomly initialised transformers.GPT2LMHeadModel with a GPTConfig's shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(config, seed: int = 0):
        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
        )
        torch.manual_seed(seed)
        return perturb(GPT2LMHeadModel(hf_config), seed)

    return build
