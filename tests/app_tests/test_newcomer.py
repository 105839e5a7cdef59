"""A newcomer's machine: a fresh checkout, an empty home, no tokenizer or Hub cache, no network.
The README's app command and a short training run work there, and transformers reads what the trainer wrote."""

import subprocess
import sys

import pytest
import torch
from app_server import ROOT, newcomer_env, running_app
from gradio_client import Client

from model import GPT, generate, load_tokenizer, stream_text

pytestmark = pytest.mark.slow  # an app and a trainer, started as a newcomer would


def test_the_network_really_is_blocked(tmp_path):
    probe = "import socket; socket.create_connection(('93.184.215.14', 443), timeout=5)"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=newcomer_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "network use blocked" in result.stderr


@pytest.mark.timeout(300)
def test_the_app_serves_the_shipped_model_offline_from_an_empty_home(tmp_path):
    env = newcomer_env(tmp_path / "home")
    with running_app("--quantize", "none", env=env) as app:  # python app.py: serves assets/
        text = Client(app.url, verbose=False).predict("ROMEO:", 16, 0, 0, 1.0, -1, api_name="/generate")
    model = GPT.from_pretrained(ROOT / "assets")
    tokenizer = load_tokenizer(ROOT / "assets")
    ids = generate(model, tokenizer.encode("ROMEO:"), 16, temperature=0)
    assert text == "ROMEO:" + "".join(stream_text(ids, tokenizer)) and len(text) > len("ROMEO:")
    assert not (tmp_path / "home" / ".cache" / "huggingface").exists()  # nothing downloaded or cached


@pytest.mark.timeout(300)
def test_a_short_training_run_offline_loads_in_transformers(tmp_path):
    """With no --data the trainer reads the Tiny Shakespeare the project ships: nothing is downloaded."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    env = newcomer_env(tmp_path / "home")
    command = [sys.executable, str(ROOT / "train" / "train.py"), "--out-dir", str(tmp_path / "out")]
    command += [
        "--model",
        "tiny",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--sample-tokens",
        "4",
    ]
    command += ["--eval-interval", "3", "--log-interval", "3", "--warmup-steps", "2", "--eval-batches", "1"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "338,025 tokens" in result.stderr  # the whole shipped text
    latest = tmp_path / "out" / "latest"
    assert f"python app.py --model {tmp_path / 'out' / 'best'}" in result.stdout

    hf_tokenizer = AutoTokenizer.from_pretrained(latest)
    hf_model = GPT2LMHeadModel.from_pretrained(latest).eval()
    ours = GPT.from_pretrained(latest)
    ids = hf_tokenizer("ROMEO: what light")["input_ids"]
    assert ids == load_tokenizer(latest).encode("ROMEO: what light")
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, ours(torch.tensor([ids]))[0])
    assert "## Samples" in (latest / "README.md").read_text()  # the card's extras were written too
