"""The trainer through its command line, on a tiny model and a slice of Tiny Shakespeare."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import GPT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def train_args(tiny_flags, train_script):
    """train_args(tmp_path, data, *extra): python train/train.py with the tiny flags, writing under tmp_path."""

    def build(tmp_path, data, *extra) -> list[str]:
        return [sys.executable, train_script, *tiny_flags(tmp_path / "out", data, tmp_path / "cache", *extra)]

    return build


# Both branches of --dtype auto on any CPU: bf16 where the CPU computes it natively (emulated where it does not, so
# slower), fp32 where it does not (SHAKESPEARE_MACHINE reaches the trainer's process).
BF16_BRANCHES = {
    "bf16=avx512": "precision: bf16 (--dtype auto: this CPU computes bf16 natively (AVX-512 BF16))",
    "bf16=none": "precision: fp32 (--dtype auto: this CPU has neither AMX nor AVX-512 BF16",
}


@pytest.mark.slow
@pytest.mark.parametrize("machine", BF16_BRANCHES)
def test_loss_falls_and_folder_loads_in_transformers(
    tmp_path, small_text, train_args, run_train, read_metrics, machine
):
    result = run_train(train_args(tmp_path, small_text, "--max-steps", "40"), env={"SHAKESPEARE_MACHINE": machine})
    assert result.returncode == 0, result.stderr
    assert BF16_BRANCHES[machine] in result.stderr  # what autocast runs, and why
    rows = [r for r in read_metrics(tmp_path / "out") if "lr" in r]
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
sys.path.insert(0, {root!r})
import train.train as train
from train.trainer import Trainer
original = Trainer.optimizer_step
def step_then_signal(self, inputs, targets):
    result = original(self, inputs, targets)
    if self.progress.step == {step} - 1:  # the step being taken is number {step}: SIGTERM arrives during it
        os.kill(os.getpid(), signal.SIGTERM)
    return result
Trainer.optimizer_step = step_then_signal
sys.exit(train.main())
"""


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path, small_text, train_args, run_train):
    steps = ["--max-steps", "30", "--dropout", "0.1", "--log-interval", "1"]
    straight = run_train(train_args(tmp_path / "a", small_text, *steps))
    assert straight.returncode == 0, straight.stderr

    script = tmp_path / "sigterm.py"
    # a signal at a known step: no race with a fast machine
    script.write_text(SIGTERM_AT_STEP.format(root=str(ROOT), step=12))
    args = train_args(tmp_path / "b", small_text, *steps)
    interrupted = run_train([sys.executable, script, *args[2:]])
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr
    assert torch.load(tmp_path / "b" / "out" / "latest" / "train_state.pt", weights_only=True)["step"] == 12
    assert f"resume:    python train/train.py --resume --out-dir {tmp_path / 'b' / 'out'}" in interrupted.stdout

    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "a" / "out" / "latest" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "latest" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
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


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, small_text, train_args, run_train):
    script = tmp_path / "dying.py"
    script.write_text(KILL_DURING_SECOND_SAVE.format(root=str(ROOT)))
    args = train_args(tmp_path, small_text, "--max-steps", "20", "--checkpoint-interval", "5")
    result = run_train([sys.executable, script, *args[2:]])
    assert result.returncode == -signal.SIGKILL
    latest = tmp_path / "out" / "latest"
    model = GPT.from_pretrained(latest)
    assert model.config.n_embd == 32
    assert torch.load(latest / "train_state.pt", weights_only=True)["step"] == 5
    resumed = run_train(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 20


@pytest.mark.slow
def test_target_loss_stops_on_a_full_pass_and_saves(tmp_path, small_text, train_args, run_train):
    result = run_train(train_args(tmp_path, small_text, "--max-steps", "500", "--target-loss", "50"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reached_target"] is True
    # judged on the mean over the first whole pass, not on one batch
    assert 20 <= summary["steps"] <= 40
    assert "target loss reached" in result.stdout
    assert GPT.from_pretrained(tmp_path / "out" / "latest").config.n_layer == 2


@pytest.mark.slow
def test_two_process_gloo_torchrun_only_rank0_writes(tmp_path, small_text, train_args, run_train, read_metrics):
    args = train_args(tmp_path, small_text, "--max-steps", "10")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args[1:]]
    result = run_train(command)
    assert result.returncode == 0, result.stderr
    rows = [r for r in read_metrics(tmp_path / "out") if "lr" in r]
    assert [r["step"] for r in rows] == [5, 10]  # one writer: no duplicated rows
    assert result.stderr.count("parameters;") == 1
    assert GPT.from_pretrained(tmp_path / "out" / "latest").config.n_head == 2


@pytest.mark.slow
def test_push_to_hub_uploads_the_best_checkpoint_and_only_model_files(
    tmp_path, small_text, train_args, monkeypatch, capsys, caplog
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


def test_push_to_hub_without_token_fails_before_training(tmp_path, small_text, train_args):
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
        (["--model-preset", "nope"], "unknown --model-preset 'nope'"),
        (["--micro-batch-size", "-1"], "--micro-batch-size must be 0 or more"),
        (["--micro-batch-size", "3"], "--batch-size must be a multiple of --micro-batch-size"),
        (["--grad-clip", "-1"], "--grad-clip must be greater than 0, or 0 for no clipping"),
        (["--sample-tokens", "-1"], "--sample-tokens must be 0 or more"),
        (["--seq-len", "64"], "--seq-len must be at most the model's context (32)"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--compile", "maybe"], "expected true or false"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, small_text, train_args, capsys, extra, message):
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


def test_old_preset_and_model_flag_names_still_work_saying_so_in_one_line(caplog, monkeypatch):
    from train.config import parse_args, parse_config

    caplog.set_level("WARNING", logger="train")
    config, explicit = parse_args(["--preset", "recipe-a", "--model", "tiny"])
    assert (config.preset, config.model_preset) == ("gpt2-4x1024", "tiny")
    assert explicit["preset"] == "gpt2-4x1024" and explicit["model_preset"] == "tiny"
    assert config.batch_size == 4 and config.gpt_config().n_embd == 32  # the preset's settings, the shape's size
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "--preset recipe-a is deprecated: use --preset gpt2-4x1024",
        "--model is deprecated: use --model-preset",
    ]
    caplog.clear()
    assert parse_config(["--preset", "recipe-b"]).preset == "gpt2-32x256" == parse_config([]).preset
    assert [r.getMessage() for r in caplog.records] == ["--preset recipe-b is deprecated: use --preset gpt2-32x256"]
    caplog.clear()
    assert parse_config(["--preset", "gpt2-4x1024", "--model-preset", "tiny"]).model_preset == "tiny"
    monkeypatch.setenv("RANK", "1")  # under torchrun only the main process says it
    assert parse_config(["--model", "cpu-small"]).model_preset == "cpu-small"
    assert not caplog.records


def test_the_shipped_text_is_the_default_data_and_needs_no_network(
    tmp_path, shakespeare, tiny_flags, monkeypatch, caplog
):
    """No --data and no SageMaker channel: data/tinyshakespeare.txt is read, nothing is downloaded."""
    from train import data, train

    def no_network(*args, **kwargs):
        raise AssertionError("the trainer used the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.delenv("SM_CHANNEL_TRAINING", raising=False)
    caplog.set_level("INFO", logger="train")
    assert data.SHIPPED_DATA == shakespeare
    assert train.main(tiny_flags(tmp_path / "out", None, tmp_path / "cache", "--max-steps", "2")) == 0
    assert f"{shakespeare}: 338,025 tokens" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    saved = torch.load(tmp_path / "out" / "latest" / "train_state.pt", weights_only=True)
    assert summary["steps"] == 2 and saved["config"]["data"] == ""  # a resume reads the shipped text too


def test_data_comes_from_the_flag_then_sagemakers_channel_then_the_shipped_file(tmp_path, shakespeare, monkeypatch):
    from train.data import find_texts

    mine, channel = tmp_path / "mine.txt", tmp_path / "channel"
    mine.write_text("mine")
    channel.mkdir()
    (channel / "a.txt").write_text("channel")
    monkeypatch.delenv("SM_CHANNEL_TRAINING", raising=False)
    assert find_texts("", str(tmp_path)) == [shakespeare]
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(channel))
    assert find_texts("", str(tmp_path)) == [channel / "a.txt"]
    assert find_texts(str(mine), str(tmp_path)) == [mine]


def test_a_url_given_to_data_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    from train import data

    fetched = []

    class Response:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def read(self) -> bytes:
            return self.body

    def urlopen(url, timeout):
        fetched.append(url)
        return Response(f"text of {url}".encode())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    url, other = "https://example.org/texts/sonnets.txt", "http://example.org/other/sonnets.txt"
    [path] = data.find_texts(url, str(tmp_path))
    assert path.read_text() == f"text of {url}" and path.is_relative_to(tmp_path) and path.name.endswith("sonnets.txt")
    assert data.find_texts(url, str(tmp_path)) == [path] and fetched == [url]  # the second time from the cache
    [other_path] = data.find_texts(other, str(tmp_path))
    assert other_path != path and other_path.read_text() == f"text of {other}"
    # the known Tiny Shakespeare URL is checked against its size
    with pytest.raises(data.DataError, match=f"expected {data.DATA_SIZE}"):
        data.find_texts(data.DATA_URL, str(tmp_path))

    def unreachable(url, timeout):
        raise OSError("no route to host")

    monkeypatch.setattr(data.urllib.request, "urlopen", unreachable)
    with pytest.raises(data.DataError, match="could not download .* pass --data PATH"):
        data.find_texts("https://example.org/new.txt", str(tmp_path))


@pytest.mark.slow
def test_missing_and_too_short_data_fail_clearly(tmp_path, train_args, run_train):
    missing = run_train(train_args(tmp_path, tmp_path / "nope.txt"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    short = tmp_path / "short.txt"
    short.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    result = run_train(train_args(tmp_path, short))
    assert result.returncode != 0 and "too short for one batch" in result.stderr and "Traceback" not in result.stderr


def test_a_failing_card_or_curve_never_loses_the_checkpoint(tmp_path, small_text, train_args, monkeypatch, caplog):
    """Samples and the loss curve are extras: when they fail, the weights and state are still written."""
    from train import outputs, publish, train

    def broken(*args, **kwargs):
        raise RuntimeError("no sampling today")

    monkeypatch.setattr(publish, "samples", broken)
    monkeypatch.setattr(outputs, "plot", broken)
    caplog.set_level("WARNING")
    assert train.main(train_args(tmp_path, small_text, "--max-steps", "6")[2:]) == 0
    latest = tmp_path / "out" / "latest"
    assert GPT.from_pretrained(latest).config.n_embd == 32 and (latest / "train_state.pt").is_file()
    assert "could not write sample text" in caplog.text and "could not draw the loss curve" in caplog.text
    assert "## Samples" not in (latest / "README.md").read_text()


def test_a_resumed_run_never_replaces_best_with_a_worse_held_out_loss(tmp_path, small_text, train_args, monkeypatch):
    """best/ holds the lowest held-out loss of the whole run: after --resume, evaluations that score worse
    write latest/ but leave best/ byte-identical, and the summary still names the step best/ came from."""
    from train import train
    from train.trainer import Trainer

    args = train_args(tmp_path, small_text, "--eval-interval", "3", "--checkpoint-interval", "3")[2:]
    assert train.main([*args, "--max-steps", "6"]) == 0
    best = tmp_path / "out" / "best"
    before = {path.name: path.read_bytes() for path in best.iterdir()}
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    monkeypatch.setattr(Trainer, "val_loss", lambda self: first["best_val_loss"] + 1.0)  # every later score worse
    assert train.main([*args, "--max-steps", "12", "--resume"]) == 0
    assert {path.name: path.read_bytes() for path in best.iterdir()} == before
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["best_step"], summary["best_val_loss"]) == (first["best_step"], first["best_val_loss"])
    assert summary["steps"] == 12 and summary["val_loss"] == round(first["best_val_loss"] + 1.0, 4)


def test_sagemaker_checkpoints_survive_a_spot_restart(
    tmp_path, small_text, train_args, read_metrics, monkeypatch, caplog
):
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

    caplog.clear()
    assert train.main([*args, "--max-steps", "10"]) == 0  # the restarted job, with no --resume
    assert "SageMaker restarted the job: resuming from" in caplog.text
    assert re.search(r"resumed from \S+ at step 6\b", caplog.text)  # step numbers go on, not from 0
    assert json.loads((model_dir / "summary.json").read_text())["steps"] == 10
    assert (model_dir / "latest" / "model.safetensors").is_file() and (model_dir / "best" / "vocab.json").is_file()
    assert not (model_dir / "latest" / "train_state.pt").exists()
    rows = [r["step"] for r in read_metrics(model_dir) if "lr" in r]
    assert rows == sorted(set(rows)) and rows[-1] == 10


@pytest.mark.slow
def test_label_smoothing_keeps_probability_for_tokens_the_text_never_uses(tmp_path, small_text, train_args, run_train):
    from model.tokenizer import load_tokenizer

    used = torch.tensor(sorted(set(load_tokenizer().encode(small_text.read_text()))))
    probe = torch.tensor([load_tokenizer().encode("ROMEO:\nWhat say you, my lord?")])
    unused_mass = {}
    for smoothing in ("0", "0.1"):
        # fp32 pinned: the figures below are fp32's (bf16, auto's choice where native, gives a ratio of 2.3)
        flags = ["--max-steps", "50", "--lr", "3e-2", "--label-smoothing", smoothing, "--dtype", "float32"]
        result = run_train(train_args(tmp_path / smoothing, small_text, *flags))
        assert result.returncode == 0, result.stderr
        model = GPT.from_pretrained(tmp_path / smoothing / "out" / "latest")
        with torch.no_grad():
            probs = model(probe)[0].softmax(-1)
        unused_mass[smoothing] = 1 - float(probs[..., used].sum(-1).mean())
    # the smoothed targets give the unused tokens 0.1 x their share of the vocabulary (96%) as training goes on;
    # plain targets push them towards nothing (about 0.04 and 0.13 after these 50 steps; 0.01 and 0.2 after
    # 150 at 1e-2, in 2.5 times the time)
    assert unused_mass["0.1"] > 0.1 and unused_mass["0.1"] > 2.5 * unused_mass["0"]


def test_the_loss_with_label_smoothing_mixes_in_the_uniform_distribution(tiny_model):
    idx, targets = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        logits, plain = tiny_model(idx, targets)
        _, smoothed = tiny_model(idx, targets, label_smoothing=0.2)
    uniform = -logits.float().log_softmax(-1).mean(-1).mean()
    assert torch.allclose(smoothed, 0.8 * plain + 0.2 * uniform, atol=1e-5)
    assert float(smoothed) != pytest.approx(float(plain), abs=1e-3)


@pytest.mark.parametrize("feature, override", [(None, "none"), ("AMX", "amx"), ("AVX-512 BF16", "avx512")])
def test_on_a_cpu_auto_picks_bf16_only_where_the_cpu_computes_it_natively(feature, override, monkeypatch):
    import train.machine
    from train.config import parse_config

    monkeypatch.setenv("SHAKESPEARE_MACHINE", f"bf16={override}")
    machine = train.machine.setup_machine(parse_config(["--preset", "cpu", "--device", "cpu"]))
    assert machine.autocast_dtype == (torch.bfloat16 if feature else None) and machine.compile
    assert (f"natively ({feature})" if feature else "neither AMX nor AVX-512 BF16") in machine.why
    assert machine.precision() == ("bf16" if feature else "fp32") + " + torch.compile"
    # an explicit --dtype is kept, and said to be slow where the CPU only emulates bf16
    machine = train.machine.setup_machine(parse_config(["--device", "cpu", "--dtype", "bfloat16"]))
    assert machine.autocast_dtype == torch.bfloat16 and machine.precision() == "bf16"
    assert ("slower than fp32" in machine.why) == (feature is None)
