"""The trainer through its command line, on a tiny model and a slice of Tiny Shakespeare."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from model import GPT

TRAIN = str(ROOT / "train" / "train.py")
TINY = [
    "--device",
    "cpu",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--warmup-steps",
    "5",
    "--log-interval",
    "5",
    "--eval-interval",
    "1000",
    "--checkpoint-interval",
    "1000",
    "--sample-tokens",
    "4",
    "--eval-batches",
    "2",
]


def train_args(tmp_path, data, *extra):
    return [
        sys.executable,
        TRAIN,
        "--data",
        str(data),
        "--out-dir",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *TINY,
        *extra,
    ]


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_folder_loads_in_transformers(tmp_path, small_text):
    result = run(train_args(tmp_path, small_text, "--max-steps", "40"))
    assert result.returncode == 0, result.stderr
    rows = [r for r in metrics(tmp_path / "out") if "lr" in r]
    assert [r["step"] for r in rows] == list(range(5, 45, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 2.0
    folder = tmp_path / "out" / "latest"
    assert {"config.json", "model.safetensors", "README.md", "loss_curve.png", "train_state.pt"} <= {
        p.name for p in folder.iterdir()
    }
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = GPT.from_pretrained(folder)
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, ours(idx)[0], atol=1e-5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["val_loss"] is not None


SIGTERM_AT_STEP = """
import os, signal, sys
import train.train as train
from train.trainer import Trainer
original = Trainer.optimizer_step
def step_then_signal(self, inputs, targets):
    result = original(self, inputs, targets)
    if self.step == {step} - 1:  # the step being taken is number {step}: SIGTERM arrives during it
        os.kill(os.getpid(), signal.SIGTERM)
    return result
Trainer.optimizer_step = step_then_signal
sys.exit(train.main())
"""


def test_sigterm_then_resume_is_bit_identical(tmp_path, small_text):
    steps = ["--max-steps", "30", "--dropout", "0.1", "--log-interval", "1"]
    straight = run(train_args(tmp_path / "a", small_text, *steps))
    assert straight.returncode == 0, straight.stderr

    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_AT_STEP.format(step=12))  # a signal at a known step: no race with a fast machine
    args = train_args(tmp_path / "b", small_text, *steps)
    interrupted = run([sys.executable, str(script), *args[2:]])
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr
    assert torch.load(tmp_path / "b" / "out" / "latest" / "train_state.pt", weights_only=True)["step"] == 12
    assert f"resume:    python train/train.py --resume --out-dir {tmp_path / 'b' / 'out'}" in interrupted.stdout

    resumed = run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "a" / "out" / "latest" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "latest" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
sys.argv = [sys.argv[0], *sys.argv[1:]]
import train.train as train
from model import GPT
original, calls = GPT.save_pretrained, []
def dying_save(self, folder, model_card=None):
    calls.append(folder)
    if len(calls) == 2:  # the second checkpoint: write half a weights file, then die
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, folder, model_card)
GPT.save_pretrained = dying_save
train.main()
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, small_text):
    script = tmp_path / "dying.py"
    script.write_text(KILL_DURING_SECOND_SAVE.format(root=str(ROOT)))
    args = train_args(tmp_path, small_text, "--max-steps", "20", "--checkpoint-interval", "5")
    result = run([sys.executable, str(script), *args[2:]])
    assert result.returncode == -signal.SIGKILL
    latest = tmp_path / "out" / "latest"
    model = GPT.from_pretrained(latest)
    assert model.config.n_embd == 32
    assert torch.load(latest / "train_state.pt", weights_only=True)["step"] == 5
    resumed = run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 20


def test_target_loss_stops_on_a_full_pass_and_saves(tmp_path, small_text):
    result = run(train_args(tmp_path, small_text, "--max-steps", "500", "--target-loss", "50"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reached_target"] is True
    # judged on the mean over the first whole pass, not on one batch
    assert 20 <= summary["steps"] <= 40
    assert "target loss reached" in result.stdout
    assert GPT.from_pretrained(tmp_path / "out" / "latest").config.n_layer == 2


def test_two_process_gloo_torchrun_only_rank0_writes(tmp_path, small_text):
    args = train_args(tmp_path, small_text, "--max-steps", "10")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args[1:]]
    result = run(command)
    assert result.returncode == 0, result.stderr
    rows = [r for r in metrics(tmp_path / "out") if "lr" in r]
    assert [r["step"] for r in rows] == [5, 10]  # one writer: no duplicated rows
    assert result.stderr.count("parameters;") == 1
    assert GPT.from_pretrained(tmp_path / "out" / "latest").config.n_head == 2


def test_push_to_hub_uploads_the_best_checkpoint_and_only_model_files(
    tmp_path, small_text, monkeypatch, capsys, caplog
):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    sent = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: sent.update(repo=repo_id))

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, **kw):
        names = [p.name for p in Path(folder_path).iterdir()]  # what HfApi sends: what allow_patterns lets through
        sent["files"] = {
            n: (Path(folder_path) / n).read_bytes() for n in filter_repo_objects(names, allow_patterns=allow_patterns)
        }
        sent["folder"], sent["token"] = Path(folder_path), self.token
        return "https://huggingface.co/fake/commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    caplog.set_level("INFO")
    from train import train

    args = train_args(tmp_path, small_text, "--max-steps", "20", "--eval-interval", "10", "--lr", "3e-2")
    assert train.main([*args[2:], "--push-to-hub", "someone/shakespeare"]) == 0
    assert sent["repo"] == "someone/shakespeare" and sent["folder"] == tmp_path / "out" / "best"
    assert set(sent["files"]) == {
        "config.json",
        "model.safetensors",
        "README.md",
        "loss_curve.png",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }  # never train_state.pt
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    card = sent["files"]["README.md"].decode()
    assert "pipeline_tag: text-generation" in card and "model-index" in card
    assert f"value: {summary['best_val_loss']}" in card
    assert summary["train_loss"] is not None and "less than one pass" in summary["train_loss_basis"]
    out = capsys.readouterr()
    assert (
        f"uploading best/ (held-out loss {summary['best_val_loss']:.4f} at step {summary['best_step']})" in caplog.text
    )
    log = (tmp_path / "out" / "metrics.jsonl").read_text() + card + out.out + out.err + caplog.text
    assert "hf_secret_value" not in log


def test_push_to_hub_without_token_fails_before_training(tmp_path, small_text):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "hf")
    start = time.time()
    result = subprocess.run(
        train_args(tmp_path, small_text, "--push-to-hub", "someone/repo"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode != 0
    assert "HF_TOKEN" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "latest").exists()
    assert time.time() - start < 60


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
        (["--batch-size", "zero"], "invalid int value"),
        (["--n-embd", "31"], "--n-embd (31) must be divisible by --n-head (2)"),
        (["--preset", "nope"], "invalid choice"),
        (["--micro-batch-size", "-1"], "--micro-batch-size must be 0 or more"),
        (["--micro-batch-size", "3"], "--batch-size must be a multiple of --micro-batch-size"),
        (["--grad-clip", "-1"], "--grad-clip must be greater than 0, or 0 for no clipping"),
        (["--sample-tokens", "-1"], "--sample-tokens must be 0 or more"),
        (["--seq-len", "64"], "--seq-len must be at most the model's context (32)"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--compile", "maybe"], "expected true or false"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, small_text, capsys, extra, message):
    """Checked in-process, as the command line does it, before any data is read or anything written."""
    from train import train

    with pytest.raises(SystemExit) as exit:
        train.main(train_args(tmp_path, small_text, *extra)[2:])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_underscore_flags_are_accepted_like_sagemaker_passes_them():
    from train.config import parse_config

    config = parse_config(["--batch_size", "4", "--max_steps", "7", "--resume", "true", "--preset", "cpu"])
    assert (config.batch_size, config.max_steps, config.resume, config.gpt_config().n_embd) == (4, 7, True, 128)
    # SageMaker passes Python booleans as text: True / False, in any case
    config = parse_config(["--compile", "False", "--private", "TRUE", "--restart", "0"])
    assert (config.compile, config.private, config.restart) == ("false", True, False)
    assert parse_config(["--compile", "1"]).compile == "true" and parse_config(["--compile", "AUTO"]).compile == "auto"


def test_missing_and_too_short_data_fail_clearly(tmp_path):
    missing = run(train_args(tmp_path, tmp_path / "nope.txt"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    short = tmp_path / "short.txt"
    short.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    result = run(train_args(tmp_path, short))
    assert result.returncode != 0 and "too short for one batch" in result.stderr and "Traceback" not in result.stderr


def test_a_failing_extra_never_loses_the_checkpoint(tmp_path, small_text, monkeypatch, caplog):
    """Samples and the loss curve are extras: when they fail, the weights and state are still written."""
    from train import outputs, train
    from train.trainer import Trainer

    def broken(*args, **kwargs):
        raise RuntimeError("no sampling today")

    monkeypatch.setattr(Trainer, "samples", broken)
    monkeypatch.setattr(outputs, "plot", broken)
    caplog.set_level("WARNING")
    assert train.main(train_args(tmp_path, small_text, "--max-steps", "6")[2:]) == 0
    latest = tmp_path / "out" / "latest"
    assert GPT.from_pretrained(latest).config.n_embd == 32 and (latest / "train_state.pt").is_file()
    assert "could not write sample text" in caplog.text and "could not draw the loss curve" in caplog.text
    assert "## Samples" not in (latest / "README.md").read_text()


def test_sagemaker_checkpoints_survive_a_spot_restart(tmp_path, small_text, monkeypatch, caplog):
    """With SageMaker's checkpoint folder, checkpoints go there; a restarted job resumes from it by itself,
    and the final model (without optimizer state) lands in SM_MODEL_DIR."""
    from train import outputs, train

    checkpoints, model_dir = tmp_path / "opt-ml-checkpoints", tmp_path / "opt-ml-model"
    checkpoints.mkdir()
    monkeypatch.setattr(outputs, "SAGEMAKER_CHECKPOINTS", checkpoints)
    monkeypatch.setenv("SM_MODEL_DIR", str(model_dir))
    args = train_args(tmp_path, small_text)[2:]
    del args[args.index("--out-dir") : args.index("--out-dir") + 2]  # SageMaker passes no --out-dir
    caplog.set_level("INFO")
    assert train.main([*args, "--max-steps", "6"]) == 0  # the job, until the spot instance is taken back
    assert (checkpoints / "latest" / "train_state.pt").is_file()
    shutil.rmtree(model_dir)  # a new instance: SM_MODEL_DIR is empty, the checkpoint folder is restored

    assert train.main([*args, "--max-steps", "10"]) == 0  # the restarted job, with no --resume
    assert "SageMaker restarted the job: resuming from" in caplog.text
    assert json.loads((model_dir / "summary.json").read_text())["steps"] == 10
    assert (model_dir / "latest" / "model.safetensors").is_file() and (model_dir / "best" / "vocab.json").is_file()
    assert not (model_dir / "latest" / "train_state.pt").exists()
    rows = [r["step"] for r in metrics(model_dir) if "lr" in r]
    assert rows == sorted(set(rows)) and rows[-1] == 10
