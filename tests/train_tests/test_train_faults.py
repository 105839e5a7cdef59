"""The trainer under faults: an earlier run in the folder, --resume with the run's own settings, divergence,
bad data and tiny_flags, a second writer, a swap cut short, a full disk, kills at random moments, and the
arithmetic of several processes. A tiny model on a slice of Tiny Shakespeare, on the CPU."""

import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import GPT, GPTConfig
from train import outputs
from train import train as train_main
from train.config import TrainConfig, parse_args
from train.data import DataError
from train.machine import Machine
from train.plan import ConfigError, make_plan
from train.trainer import Trainer, build_model, prepare

ROOT = Path(__file__).resolve().parents[2]

# Runs train/train.py's main() with hooks set by environment variables: LATE_RANK sleeps LATE_SECONDS before
# starting on that rank; STEPPING gets a + as each step starts; AFTER_STEP then sends SIGTERM to itself once
# that optimizer step is done, or (THEN=pause) touches READY and waits for GO to exist. Deterministic: no racing
# a fast machine.
WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
if os.environ.get("LATE_RANK") and os.environ.get("RANK") == os.environ["LATE_RANK"]:
    time.sleep(float(os.environ["LATE_SECONDS"]))
import train.train
from train.trainer import Trainer
after, original = int(os.environ.get("AFTER_STEP", "0")), Trainer.optimizer_step
def optimizer_step(self, inputs, targets):
    if os.environ.get("STEPPING"):
        with open(os.environ["STEPPING"], "a") as f:
            f.write("+")
    result = original(self, inputs, targets)
    if self.progress.step + 1 == after:  # the step counter moves on after this returns
        if os.environ.get("THEN") == "pause":
            open(os.environ["READY"], "w").close()
            while not os.path.exists(os.environ["GO"]):
                time.sleep(0.02)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    return result
Trainer.optimizer_step = optimizer_step
sys.exit(train.train.main())
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One token cache for the module: the slice is tokenised once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapper") / "hooked_train.py"
    path.write_text(WRAPPER.format(root=str(ROOT)))
    return str(path)


def main(argv) -> int:
    """train.train.main in this process; an error exit comes back as its message."""
    try:
        return train_main.main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code


def assert_no_repeated_rows(rows: list[dict]) -> None:
    """Train rows (with lr) and held-out rows each strictly increasing in step: nothing logged twice."""
    for kind in (lambda r: "lr" in r, lambda r: "val_loss" in r):
        steps = [r["step"] for r in rows if kind(r)]
        assert steps == sorted(set(steps)), steps


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def state_step(folder: Path) -> int:
    return torch.load(folder / outputs.STATE_NAME, weights_only=True)["step"]


# -- 1. an earlier run in the folder


@pytest.mark.slow
def test_new_run_into_an_earlier_run_is_refused_and_restart_keeps_user_files(
    tmp_path, small_text, cache, tiny_flags, read_metrics
):
    out = tmp_path / "out"
    args = tiny_flags(out, small_text, cache, "--max-steps", "5", "--eval-interval", "5")
    assert main(args) == 0
    before = files_of(out)
    assert (out / "best" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()

    message = main(args)
    assert isinstance(message, str) and "--resume" in message and "--restart" in message, message
    assert files_of(out) == before  # best/ weights, metrics.jsonl, everything: byte-identical

    (out / "latest" / "NOTES.txt").write_text("mine")
    (out / "data-notes.md").write_text("also mine")
    assert main([*args, "--restart", "--max-steps", "10"]) == 0
    assert (out / "latest" / "NOTES.txt").read_text() == "mine"
    assert (out / "data-notes.md").read_text() == "also mine"
    assert state_step(out / "latest") == 10
    assert [r["step"] for r in read_metrics(out) if "lr" in r] == [5, 10]  # the earlier run's rows are gone
    # a run started with --restart resumes like any other
    assert main(["--resume", "--out-dir", out, "--max-steps", "12"]) == 0
    assert state_step(out / "latest") == 12 and (out / "latest" / "NOTES.txt").read_text() == "mine"


# -- 2. --resume restores the run's own settings


@pytest.mark.slow
def test_resume_restores_the_runs_own_configuration(
    tmp_path, small_text, cache, wrapper, tiny_flags, run_train, read_metrics, shakespeare
):
    own = ["--n-embd", "32", "--lr", "3e-3", "--dropout", "0.1", "--max-steps", "20", "--log-interval", "1"]
    assert main(tiny_flags(tmp_path / "a", small_text, cache, *own)) == 0

    out = tmp_path / "b"
    stopped = run_train([sys.executable, wrapper, *tiny_flags(out, small_text, cache, *own)], env={"AFTER_STEP": "8"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by signal SIGTERM after 8 steps" in stopped.stdout
    assert state_step(out / "latest") == 8
    command = next(line for line in stopped.stdout.splitlines() if line.startswith("resume:"))
    words = shlex.split(command.removeprefix("resume:"))
    assert words[:2] == ["python", "train/train.py"] and words[2:] == ["--resume", "--out-dir", str(out)]

    # flags that would change the run are refused, naming them; nothing is written
    before = files_of(out)
    for flag, value in (("--lr", "1e-2"), ("--n-layer", "3"), ("--data", str(shakespeare)), ("--preset", "cpu")):
        message = main([*words[2:], flag, value])
        assert isinstance(message, str) and f"{flag} " in message and "--resume" in message, message
    assert files_of(out) == before

    # only --resume --out-dir, as printed: the shape, lr, data, dropout and schedule come from the checkpoint
    assert main(words[2:]) == 0
    assert_same_weights(tmp_path / "a" / "latest", out / "latest")
    saved = torch.load(out / "latest" / outputs.STATE_NAME, weights_only=True)["config"]
    assert (saved["n_embd"], saved["lr"], saved["dropout"], saved["data"]) == (32, 3e-3, 0.1, str(small_text))
    assert_no_repeated_rows(read_metrics(out))
    assert [r["step"] for r in read_metrics(out) if "lr" in r] == list(range(1, 21))

    # --max-steps may change: the run goes on
    assert main([*words[2:], "--max-steps", "23"]) == 0
    assert state_step(out / "latest") == 23
    assert_no_repeated_rows(read_metrics(out))


@pytest.mark.slow
def test_a_checkpoint_saved_under_the_old_names_resumes(tmp_path, small_text, cache, tiny_flags):
    """train_state.pt written before the renames (the `model` field, the recipe-b preset, the data position's
    `epoch`) resumes, and is saved again under today's names."""
    out = tmp_path / "out"
    assert main(tiny_flags(out, small_text, cache, "--max-steps", "33", "--preset", "gpt2-32x256")) == 0
    path = out / "latest" / outputs.STATE_NAME
    saved = torch.load(path, weights_only=True)
    assert saved["data"] == {"pass": 1, "index": 2}  # 31 batches per pass
    saved["config"]["model"] = saved["config"].pop("model_preset")
    saved["config"]["preset"] = "recipe-b"
    saved["data"] = {"epoch": 1, "index": 2}
    torch.save(saved, path)
    assert main(["--resume", "--out-dir", out, "--max-steps", "35"]) == 0
    resumed = torch.load(path, weights_only=True)
    assert resumed["step"] == 35 and resumed["data"] == {"pass": 1, "index": 4}
    assert (resumed["config"]["preset"], resumed["config"]["model_preset"]) == ("gpt2-32x256", "gpt2")
    assert "model" not in resumed["config"]


# -- 3. divergence


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, small_text, cache, tiny_flags, run_train, train_script
):
    out = tmp_path / "out"
    # warm-up of 1e5 steps: lr 10, 20, 30, ... a few finite steps (and checkpoints), then no numbers at all
    args = ["--lr", "1e6", "--grad-clip", "0", "--warmup-steps", "100000", "--checkpoint-interval", "2"]
    result = run_train([sys.executable, train_script, *tiny_flags(out, small_text, cache, *args, "--max-steps", "40")])
    assert result.returncode != 0
    assert "diverged" in result.stderr and "lower --lr" in result.stderr and "Traceback" not in result.stderr
    diverged_at = int(result.stderr.split("not finite numbers by step ")[1].split()[0])
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    latest = outputs.latest_checkpoint(out)
    assert 2 <= state_step(latest) < diverged_at
    model = GPT.from_pretrained(latest)  # the loader refuses non-finite tensors
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_broken_by_an_update_are_never_scored_or_saved(tmp_path, small_text, cache, monkeypatch, tiny_flags):
    """An update can leave non-finite weights after a step whose loss and gradients were finite: the
    held-out score of those weights must not reach metrics.jsonl, nor the weights latest/."""
    original, saved = Trainer.optimizer_step, {}

    def breaking_step(self, inputs, targets):
        result = original(self, inputs, targets)
        if self.progress.step + 1 == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return result

    def recording_save(folder, name, *args, **kwargs):
        final = save(folder, name, *args, **kwargs)
        saved[name] = files_of(final)
        return final

    save = outputs.save_checkpoint
    monkeypatch.setattr(Trainer, "optimizer_step", breaking_step)
    monkeypatch.setattr(outputs, "save_checkpoint", recording_save)
    out = tmp_path / "out"
    args = ["--checkpoint-interval", "1", "--eval-interval", "3", "--max-steps", "10"]
    message = main(tiny_flags(out, small_text, cache, *args))
    assert isinstance(message, str) and "diverged" in message and "lower --lr" in message, message
    text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    assert "NaN" not in text and "Infinity" not in text
    assert files_of(out / "latest") == saved["latest"] and state_step(out / "latest") == 2
    GPT.from_pretrained(out / "latest")


# -- 4. data


def test_data_folder_reads_every_txt_file_in_name_order(tmp_path, cache, caplog, shakespeare):
    from model import EOT_TOKEN, load_tokenizer
    from train.data import load_tokens

    folder = tmp_path / "texts"
    folder.mkdir()
    text = shakespeare.read_text()
    parts = {"b.txt": text[:3000], "a.txt": text[3000:5000], "c.txt": text[5000:6000], "notes.md": "not text"}
    for name, part in parts.items():
        (folder / name).write_text(part)
    caplog.set_level("INFO", logger="train")
    tokens = load_tokens(str(folder), str(tmp_path / "cache"))
    encode = load_tokenizer().encode_ordinary
    expected = [*encode(parts["a.txt"]), EOT_TOKEN, *encode(parts["b.txt"]), EOT_TOKEN, *encode(parts["c.txt"])]
    assert tokens.tolist() == expected
    logged = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == [str(folder / n) for n in ("a.txt", "b.txt", "c.txt")]
    assert logged[0].endswith(f"{len(encode(parts['a.txt'])):,} tokens")


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path, small_text, cache, tiny_flags):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(small_text.read_text())
    (folder / "b.txt").write_bytes("Ros\u00e9 and Juliet".encode("latin-1"))
    message = main(tiny_flags(tmp_path / "out", folder, cache))
    assert isinstance(message, str) and str(folder / "b.txt") in message and "UTF-8" in message, message
    assert not (tmp_path / "out" / "latest").exists()


# -- 5. flags refused before training


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--sample-tokens", "-1"], "--sample-tokens"),
        (["--micro-batch-size", "-1"], "--micro-batch-size"),
        (["--dropout", "1"], "--dropout"),
        (["--resume", "--restart"], "--restart"),
    ],
)
def test_bad_flags_are_refused_before_training_naming_the_flag(
    tmp_path, small_text, cache, capsys, extra, named, tiny_flags
):
    args = tiny_flags(tmp_path / "out", small_text, cache, *extra)
    with pytest.raises(SystemExit) as exit:
        parse_args(args)
    assert exit.value.code == 2 and named in capsys.readouterr().err
    assert main(args) == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--micro-batch-size", "3"], ["--batch-size", "--micro-batch-size"]),
        (["--seq-len", "64"], ["--seq-len must be at most the model's context (32), got 64"]),
        (["--batch-size", "6", "--micro-batch-size", "4", "--seq-len", "33"], ["--batch-size", "--seq-len"]),
    ],
)
def test_flags_that_cannot_run_together_are_refused_in_one_error_before_anything_is_written(
    tmp_path, small_text, cache, capsys, tiny_flags, extra, named
):
    """The run plan (sequence length, batch split) is checked once, every problem in the same message."""
    args = tiny_flags(tmp_path / "out", small_text, cache, *extra)
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(name in errors[0] for name in named), errors
    assert not (tmp_path / "out").exists()


def test_the_plan_names_every_flag_that_does_not_fit_in_one_error():
    config = TrainConfig(model_preset="tiny", block_size=32, batch_size=8, micro_batch_size=3, seq_len=64)
    with pytest.raises(ConfigError) as error:
        make_plan(config, 1, config.gpt_config())
    message = str(error.value)
    assert isinstance(error.value, ValueError) and not isinstance(error.value, DataError)
    assert message == (
        "--seq-len must be at most the model's context (32), got 64; --batch-size must be a multiple of "
        "--micro-batch-size x processes (3 x 1 process), got 8; change --batch-size or --micro-batch-size "
        "(0 = --batch-size / processes)"
    )
    # the number of processes is part of the split: 8 rows cannot be shared by 3 processes, nor 2 by 4
    for batch, world_size, micro in ((8, 3, 2), (2, 4, 1)):
        config = TrainConfig(model_preset="tiny", batch_size=batch)
        with pytest.raises(ConfigError, match=rf"--batch-size .* --micro-batch-size x processes \({micro} x "
                                              rf"{world_size} processes\), got {batch}"):  # fmt: skip
            make_plan(config, world_size, config.gpt_config())
    plan = make_plan(TrainConfig(model_preset="tiny", batch_size=12, micro_batch_size=2), 3, GPTConfig(block_size=48))
    assert (plan.seq_len, plan.micro_batch, plan.accum_steps, plan.rows_per_process) == (48, 2, 2, 4)
    assert (plan.world_size, plan.context, plan.tokens_per_step) == (3, 48, 12 * 48)


# -- 6. writes: the lock, a cut swap, a full disk


@pytest.mark.slow
def test_a_second_trainer_on_the_folder_is_refused_naming_the_holder(tmp_path, small_text, cache, wrapper, tiny_flags):
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AFTER_STEP": "6", "THEN": "pause", "READY": str(ready), "GO": str(go)}
    args = tiny_flags(out, small_text, cache, "--max-steps", "8")
    first = subprocess.Popen([sys.executable, wrapper, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not ready.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), first.communicate()[1]
        before = files_of(out)
        assert (out / "metrics.jsonl").is_file()  # the first has logged step 5: an earlier run, and a live one
        for extra in ([], ["--restart"], ["--resume"]):
            message = main([*args, *extra])
            assert isinstance(message, str) and f"pid {first.pid}" in message, (extra, message)
        assert files_of(out) == before  # --restart removed nothing from under the running trainer
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert state_step(out / "latest") == 8


@pytest.mark.slow
def test_a_swap_cut_between_its_renames_is_repaired_on_resume(tmp_path, small_text, cache, tiny_flags, read_metrics):
    out = tmp_path / "out"
    args = tiny_flags(out, small_text, cache, "--max-steps", "6", "--checkpoint-interval", "3")
    assert main(args) == 0
    # killed after `latest -> .latest.old`, before `.latest.tmp -> latest` (the new one half-written)
    os.replace(out / "latest", out / ".latest.old")
    (out / ".latest.tmp").mkdir()
    (out / ".latest.tmp" / "model.safetensors").write_bytes(b"half")
    message = main(args)  # still an earlier run: refused, not started over
    assert isinstance(message, str) and "--resume" in message
    assert main(["--resume", "--out-dir", out, "--max-steps", "9"]) == 0
    assert state_step(out / "latest") == 9
    assert not (out / ".latest.old").exists() and not (out / ".latest.tmp").exists()
    assert_no_repeated_rows(read_metrics(out))


def test_under_torchrun_only_the_main_process_clears_or_repairs_a_folder(tmp_path, monkeypatch):
    """Every process settles the configuration at once, before the process group exists: the others must not
    race the main one to remove files (--restart) or to finish a cut swap (--resume)."""
    out = tmp_path / "out"
    (out / "latest").mkdir(parents=True)
    (out / "latest" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    config, explicit = parse_args(["--out-dir", str(out), "--restart"])
    monkeypatch.setenv("RANK", "1")
    assert train_main.config_to_run(config, explicit) == (config, None)
    assert (out / "latest" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    monkeypatch.setenv("RANK", "0")
    train_main.config_to_run(config, explicit)
    assert not (out / "latest").exists() and not (out / "metrics.jsonl").exists()

    (out / ".latest.old").mkdir()
    real = os.replace

    def raced(source, target):  # another process renames it first
        real(source, target)
        raise FileNotFoundError(source)

    monkeypatch.setattr(outputs.os, "replace", raced)
    outputs.repair(out)
    assert (out / "latest").is_dir() and not (out / ".latest.old").exists()


def is_whole_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs: room for one checkpoint of the tiny model (weights and optimizer state, about 20 MB)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def assert_stopped_for_space_keeping(out: Path, result_stderr: str, step: int) -> None:
    assert "no space left on the device at" in result_stderr, result_stderr[-3000:]
    assert "the previous checkpoint is intact" in result_stderr and "Traceback" not in result_stderr
    assert state_step(out / "latest") == step
    GPT.from_pretrained(out / "latest")
    if (out / "loss_curve.png").exists():
        assert is_whole_png(out / "loss_curve.png")
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, small_text, cache, tiny_flags, run_train, train_script):
    out = small_disk / "out"
    args = ["--max-steps", "10", "--checkpoint-interval", "5", "--log-interval", "1"]
    result = run_train([sys.executable, train_script, *tiny_flags(out, small_text, cache, *args)])
    assert result.returncode != 0
    assert_stopped_for_space_keeping(out, result.stderr, 5)
    # a new run in the 10 MB left: its first checkpoint does not fit, and the message claims none kept
    message = main(tiny_flags(small_disk / "new", small_text, cache, "--max-steps", "2"))
    assert isinstance(message, str) and "no space left on the device at" in message, message
    assert "no checkpoint was written yet" in message and "intact" not in message


def test_a_full_disk_met_by_the_metrics_log_is_a_message_not_a_traceback(
    tmp_path, small_text, cache, monkeypatch, tiny_flags
):
    def full(folder, row):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "metrics.jsonl"))

    monkeypatch.setattr(outputs, "append_metrics", full)
    message = main(tiny_flags(tmp_path / "out", small_text, cache, "--max-steps", "5"))
    assert isinstance(message, str) and f"no space left on the device at {tmp_path / 'out'};" in message, message


@pytest.mark.slow
def test_a_disk_filled_mid_run_keeps_the_checkpoint_and_resumes(
    small_disk, small_text, cache, wrapper, tmp_path, tiny_flags, read_metrics
):
    out, ready, go, filler = small_disk / "out", tmp_path / "ready", tmp_path / "go", small_disk / "filler"
    env = {"AFTER_STEP": "6", "THEN": "pause", "READY": str(ready), "GO": str(go)}
    args = tiny_flags(out, small_text, cache, "--max-steps", "10", "--checkpoint-interval", "5", "--log-interval", "1")
    first = subprocess.Popen([sys.executable, wrapper, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not ready.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with open(filler, "wb") as f:  # every byte left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    go.touch()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode != 0
    assert_stopped_for_space_keeping(out, stderr, 5)
    filler.unlink()  # and room for a second checkpoint beside the first
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["--resume", "--out-dir", out]) == 0
    assert state_step(out / "latest") == 10
    assert_no_repeated_rows(read_metrics(out))


# -- 7. kills at random moments


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(
    tmp_path, small_text, cache, wrapper, tiny_flags, read_metrics
):
    settings = ["--max-steps", "24", "--checkpoint-interval", "2", "--log-interval", "1", "--dropout", "0.1"]
    assert main(tiny_flags(tmp_path / "straight", small_text, cache, *settings)) == 0

    out, stepping = tmp_path / "out", tmp_path / "stepping"
    args = [sys.executable, wrapper, *tiny_flags(out, small_text, cache, *settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPPING": str(stepping)}

    def launch() -> subprocess.Popen:
        started = (out / "latest").exists() or (out / ".latest.old").exists()
        stepping.unlink(missing_ok=True)
        more = ["--resume"] if started else ["--restart"]
        return subprocess.Popen(args + more, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    moments, landed = random.Random(1234), []
    for kill in range(4):
        process = launch()
        # the third kill lands while the process starts (and resumes); the others after 2 to 8 steps of its own,
        # anywhere in a step or a checkpoint save
        lock, steps = out / outputs.LOCK_NAME, moments.randint(2, 8)
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            if kill == 2 and lock.is_file() and f"pid {process.pid} " in lock.read_text():
                break
            if kill != 2 and stepping.is_file() and len(stepping.read_text()) >= steps:
                break
            time.sleep(0.01)
        time.sleep(moments.uniform(0.0, 1.0))
        assert process.poll() is None, process.communicate()[1]  # 24 steps outlast every kill
        process.kill()
        process.wait()
        # whatever the moment, a whole checkpoint is there (or its .old copy, which --resume puts back)
        folder = out / "latest" if (out / "latest").is_dir() else out / ".latest.old"
        if folder.is_dir():
            GPT.from_pretrained(folder)
            landed.append((folder.name, torch.load(folder / outputs.STATE_NAME, weights_only=True)["step"]))
    process = launch()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert state_step(out / "latest") == 24
    assert_same_weights(tmp_path / "straight" / "latest", out / "latest")
    assert_no_repeated_rows(read_metrics(out))
    assert landed  # the checkpoints the kills left, e.g. [(latest, 8), (latest, 8), (latest, 8), (latest, 16)]


# -- 8. several processes


@pytest.fixture
def no_ddp(monkeypatch):
    """The Trainer's constructor for a simulated world size, without a process group."""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda network, device_ids=None: network)


def trainer_for(config: TrainConfig, world_size: int, rank: int = 0) -> Trainer:
    return Trainer(config, Machine(torch.device("cpu"), None, False, rank=rank, world_size=world_size))


@pytest.mark.parametrize("preset", ["h100", "t4"])
@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_presets_split_the_batch_over_processes(tmp_path, small_text, cache, preset, world_size):
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32"]
    for micro in ([], ["--micro-batch-size", "2"]):
        config, _ = parse_args(
            ["--preset", preset, *shape, *micro, "--data", str(small_text), "--cache-dir", str(cache)]
        )
        plan, _ = prepare(config, world_size)
        assert plan.micro_batch * plan.accum_steps * world_size == plan.batch_size == config.batch_size == 32
        assert plan.micro_batch == (int(micro[1]) if micro else 32 // world_size)
        assert plan.seq_len == 32 and plan.world_size == world_size


def test_a_batch_that_processes_cannot_share_is_refused(tmp_path, small_text, cache, no_ddp):
    shape = ["--block-size", "32", "--n-embd", "16", "--n-head", "2", "--n-layer", "1"]
    config, _ = parse_args([*shape, "--data", str(small_text), "--cache-dir", str(cache), "--micro-batch-size", "8"])
    with pytest.raises(ConfigError, match="--micro-batch-size x processes \\(8 x 3 processes\\), got 32"):
        trainer_for(config, 3)  # 32 is not a multiple of 8 x 3


def test_held_out_loss_and_mfu_do_not_depend_on_the_number_of_processes(
    tmp_path, small_text, cache, no_ddp, tiny_flags
):
    config, _ = parse_args(tiny_flags(tmp_path / "out", small_text, cache, "--eval-batches", "3"))
    one, two = trainer_for(config, 1), trainer_for(config, 2)
    assert (one.plan.micro_batch, two.plan.micro_batch) == (8, 4)
    assert one.val_loss() == pytest.approx(two.val_loss(), rel=1e-6)
    rows = []
    for trainer in (one, two):
        trainer.machine.peak_flops = lambda: 1e12
        trainer.progress.log_steps, trainer.progress.log_sum = 1, torch.tensor(1.0, dtype=torch.float64)
        rows.append(trainer.log_row(1e-3, torch.tensor(1.0), seconds=1.0, flops_per_token=1e6))
    assert rows[0]["tokens_per_second"] == rows[1]["tokens_per_second"] == 8 * 32
    assert rows[0]["mfu"] == round(1e6 * 8 * 32 / 1e12, 4) and rows[1]["mfu"] == round(1e6 * 8 * 32 / 2 / 1e12, 4)


@pytest.mark.slow
def test_two_gloo_processes_one_late_stop_on_the_time_budget(
    tmp_path, small_text, cache, wrapper, tiny_flags, run_train, read_metrics
):
    args = tiny_flags(tmp_path / "out", small_text, cache, "--max-steps", "100000", "--max-minutes", "0.04")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", wrapper, *args]
    result = run_train(command, env={"LATE_RANK": "1", "LATE_SECONDS": "3"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget of 0.04 minutes reached" in result.stdout and "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reason"].startswith("time budget") and 0 < summary["steps"] < 100000
    assert state_step(tmp_path / "out" / "latest") == summary["steps"]
    assert_no_repeated_rows(read_metrics(tmp_path / "out"))


# -- 9. --init


def test_init_applies_the_trainers_dropout(tmp_path, small_text, cache, tiny_flags):
    source = tmp_path / "source"
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny", block_size=32)).save_pretrained(source)
    config, _ = parse_args(tiny_flags(tmp_path / "out", small_text, cache, "--init", source, "--dropout", "0.2"))
    model = build_model(*prepare(config, 1))
    assert model.config.dropout == 0.2
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    loaded = GPT.from_pretrained(source).state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in model.state_dict().items())
    trainer = trainer_for(config, 1)
    assert trainer.model.config.dropout == 0.2 and trainer.model.config.n_embd == 32


def test_under_init_the_plan_trains_on_the_init_models_context(tmp_path, small_text, cache, capsys, tiny_flags):
    """--init brings its own shape: its context (not --block-size's or --model-preset's) bounds --seq-len and is
    the sequence length when --seq-len is not given."""
    source, out = tmp_path / "source", tmp_path / "out"
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny", block_size=16)).save_pretrained(source)
    config, _ = parse_args(tiny_flags(out, small_text, cache, "--init", source))  # the tiny flags say --block-size 32
    assert config.gpt_config().block_size == 32
    plan, _ = prepare(config, 1)
    assert plan.seq_len == plan.context == 16 and plan.shape.n_embd == 32
    trainer = trainer_for(config, 1)
    assert trainer.plan == plan and trainer.batches.next()[0].shape == (8, 16)

    message = main(tiny_flags(out, small_text, cache, "--init", source, "--seq-len", "24"))
    assert message == 2 and "--seq-len must be at most the model's context (16), got 24" in capsys.readouterr().err
    assert not out.exists()
    assert main(tiny_flags(out, small_text, cache, "--init", tmp_path / "nowhere")).startswith("error: --init ")
    assert not out.exists()
