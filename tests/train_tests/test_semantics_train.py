"""train/ semantics in-process: the learning-rate schedule, gradient accumulation, the held-out split,
the batches' passes and resume, and the batch split over two gloo processes."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig
from train.data import Batches, DataError, split_held_out, windows
from train.machine import Machine
from train.trainer import Trainer, lr_at

ROOT = Path(__file__).resolve().parents[2]
CPU_MACHINE = Machine(torch.device("cpu"), None, False)


def tiny_train_config(text, out, **changes) -> TrainConfig:
    fields = dict(
        data=str(text),
        out_dir=str(out),
        cache_dir=str(out.parent / "cache"),
        model_preset="tiny",
        block_size=32,
        batch_size=8,
        micro_batch_size=0,
        max_steps=5,
        dropout=0.0,
        device="cpu",
        dtype="float32",
        compile="false",
        sample_tokens=0,
        lr=1e-3,
    )
    return TrainConfig(**(fields | changes))


# -- the learning-rate schedule


SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-4),  # lr / warmup_steps: the first step already moves
        (4, 5e-4),
        (9, 1e-3),  # the last warm-up step reaches lr
        (10, 1e-3),  # the cosine starts at lr
        (60, 5.5e-4),  # half-way: (lr + min_lr) / 2
        (35, 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4),
        (110, 1e-4),  # max_steps: min_lr
        (500, 1e-4),  # and it stays there
    ],
)
def test_lr_schedule_values(step, expected):
    """Linear warm-up from lr/warmup_steps to lr, then cosine to min_lr at max_steps, exactly."""
    assert lr_at(step, TrainConfig(**SCHEDULE)) == pytest.approx(expected, rel=1e-12, abs=0)


def test_lr_schedule_without_warm_up_or_decay_room():
    """warmup_steps 0 starts at lr; max_steps == warmup_steps decays straight to min_lr without dividing by 0."""
    assert lr_at(0, TrainConfig(**(SCHEDULE | dict(warmup_steps=0)))) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(55, TrainConfig(**(SCHEDULE | dict(warmup_steps=0)))) == pytest.approx(5.5e-4, rel=1e-12)
    same = TrainConfig(**(SCHEDULE | dict(warmup_steps=10, max_steps=10)))
    assert lr_at(9, same) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(10, same) == pytest.approx(1e-3, rel=1e-12)  # progress 0 at the (empty) decay's start
    assert lr_at(11, same) == pytest.approx(1e-4, rel=1e-12)


def test_lr_schedule_is_monotonic():
    """The schedule rises through the warm-up, then never rises again."""
    config = TrainConfig(**SCHEDULE)
    rates = [lr_at(step, config) for step in range(120)]
    assert all(a < b for a, b in zip(rates[:9], rates[1:10], strict=True))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))


# -- one optimizer step


def one_step(config: TrainConfig, machine: Machine = CPU_MACHINE, batch=None):
    """A Trainer's optimizer step on its first batch (or the one given): loss, grad norm, parameters, batch."""
    trainer = Trainer(config, machine)
    inputs, targets, _ = batch or trainer.batches.next()
    loss, grad_norm = trainer.optimizer_step(inputs, targets)
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return float(loss), float(grad_norm), params, (inputs, targets, False)


def gradients(config: TrainConfig, batch) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss of the whole batch for the weights one_step(config) starts from."""
    trainer = Trainer(config, CPU_MACHINE)
    inputs, targets, _ = batch
    _, loss = trainer.model(inputs, targets)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_step(a, b, grads: dict[str, torch.Tensor]):
    """The same loss, gradient norm and update. Adam's first step moves a weight by lr * g / (|g| + eps): the
    same gradient summed in another order (micro-batches, processes) can come out another size or sign where
    it is within float32 rounding of zero, and move its weight anywhere in [-lr, lr]. Those weights (|g| below
    ROUNDING) are left out; every other one must move alike to a hundredth of lr."""
    loss_a, norm_a, params_a, _ = a
    loss_b, norm_b, params_b, _ = b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert params_a.keys() == params_b.keys() == grads.keys()
    lr = lr_at(0, tiny_train_config(".", Path("out")))
    for name in params_a:
        compared = grads[name].abs() > ROUNDING
        apart = (params_a[name] - params_b[name]).abs()[compared]
        assert apart.numel() == 0 or float(apart.max()) <= 0.01 * lr, name


ROUNDING = 1e-6  # float32 error of a gradient summed from terms up to ~1 in another order, with room to spare


@pytest.mark.parametrize("micro_batch_size", [2, 4])
def test_micro_batch_accumulation_equals_one_big_batch(tmp_path, small_text, micro_batch_size):
    """--micro-batch-size accumulation gives the whole batch's mean loss, gradient norm and update."""
    whole = one_step(tiny_train_config(small_text, tmp_path / "whole", grad_clip=0.0))
    micro = tiny_train_config(small_text, tmp_path / "micro", grad_clip=0.0, micro_batch_size=micro_batch_size)
    accumulated = one_step(micro, batch=whole[3])
    assert_same_step(accumulated, whole, gradients(micro, whole[3]))
    inputs, targets, _ = whole[3]
    torch.manual_seed(0)
    trainer = Trainer(micro, CPU_MACHINE)
    with torch.no_grad():
        _, mean_loss = trainer.model(inputs, targets)
    assert whole[0] == pytest.approx(float(mean_loss), rel=1e-5)  # the mean over the batch, before the update
    assert trainer.plan.accum_steps == 8 // micro_batch_size and trainer.plan.micro_batch == micro_batch_size


def test_grad_norm_is_taken_before_clipping_and_clipping_applies(tmp_path, small_text):
    """--grad-clip 0 is no clipping (as a huge clip); a small clip changes the update, not the reported norm."""
    off = one_step(tiny_train_config(small_text, tmp_path / "off", grad_clip=0.0))
    huge = one_step(tiny_train_config(small_text, tmp_path / "huge", grad_clip=1e9), batch=off[3])
    assert_same_step(off, huge, gradients(tiny_train_config(small_text, tmp_path / "grads"), off[3]))
    clipped = one_step(tiny_train_config(small_text, tmp_path / "clip", grad_clip=0.01), batch=off[3])
    assert off[0] == pytest.approx(clipped[0], rel=1e-6) and off[1] == pytest.approx(clipped[1], rel=1e-5)
    assert off[1] > 0.01  # so the clip is active
    moved = [(off[2][n] - clipped[2][n]).abs().max() for n in off[2]]
    assert max(moved) > 1e-6  # Adam's first step still sees the clipped gradient's size through its epsilon


def test_a_step_moves_every_parameter_by_about_lr(tmp_path, small_text):
    """Adam's first step moves each weight by at most lr (plus weight decay): the lr set is the one used."""
    config = tiny_train_config(small_text, tmp_path / "a", lr=1e-3, weight_decay=0.0)
    trainer = Trainer(config, CPU_MACHINE)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    inputs, targets, _ = trainer.batches.next()
    trainer.optimizer_step(inputs, targets)
    steps = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in trainer.model.named_parameters()])
    assert steps.max() <= 1e-3 * 1.001 and steps.max() > 0.9e-3
    assert all(p.grad is None for p in trainer.model.parameters())  # gradients cleared for the next step


# -- the held-out split and the batches


@pytest.mark.parametrize("length, fraction", [(1000, 0.1), (1001, 0.15), (997, 0.333), (50, 0.0), (10, 0.99)])
def test_split_held_out_is_the_last_fraction(length, fraction):
    """The held-out split is exactly the last int(len * fraction) tokens; training has the rest, in order."""
    tokens = torch.arange(length)
    train, held_out = split_held_out(tokens, fraction)
    n_val = int(length * fraction)
    assert torch.equal(held_out, torch.arange(length - n_val, length))
    assert torch.equal(train, torch.arange(length - n_val))


def test_the_trainer_trains_only_on_the_training_split(tmp_path, small_text):
    """The Trainer's batches read the training split only; its held-out split is the text's last tenth."""
    trainer = Trainer(tiny_train_config(small_text, tmp_path / "a", val_fraction=0.1), CPU_MACHINE)
    total = len(trainer.train_tokens) + len(trainer.val_tokens)
    assert len(trainer.val_tokens) == int(total * 0.1) > 0
    assert trainer.batches.tokens is trainer.train_tokens
    assert trainer.batches.seq_len == 32 and trainer.batches.batch_size == 8


@pytest.mark.parametrize("length, seq_len, batch_size", [(1000, 8, 4), (1000, 7, 3), (161, 16, 3), (200, 10, 19)])
def test_batches_never_read_past_the_training_split(length, seq_len, batch_size):
    """Over several passes every window lies inside the tokens given, and targets are inputs shifted by one."""
    tokens = torch.arange(length)
    batches = Batches(tokens, seq_len, batch_size, seed=5)
    highest = -1
    for _ in range(3 * batches.per_pass):
        inputs, targets, _ = batches.next()
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        assert torch.equal(targets, inputs + 1)  # contiguous windows of the text
        assert inputs.dtype == torch.int64
        highest = max(highest, int(targets.max()))
        assert int(inputs.min()) >= 0
    assert highest < length
    assert highest >= length - 1 - seq_len  # the end of the split is reached, not left out wholesale


def test_a_pass_reads_distinct_aligned_windows_and_flags_its_end():
    """Within a pass the windows are distinct, one offset apart by multiples of seq_len; the last batch says so."""
    seq_len, batch_size = 8, 4
    batches = Batches(torch.arange(1000), seq_len, batch_size, seed=3)
    assert batches.windows == (1000 - seq_len) // seq_len
    assert batches.per_pass == batches.windows // batch_size
    for _ in range(2):
        starts, flags = [], []
        for _ in range(batches.per_pass):
            inputs, _, ends_pass = batches.next()
            starts += inputs[:, 0].tolist()
            flags.append(ends_pass)
        assert flags == [False] * (batches.per_pass - 1) + [True]
        assert len(set(starts)) == len(starts) == batches.per_pass * batch_size
        assert len({s % seq_len for s in starts}) == 1
    offsets = set()
    for seed in range(40):  # the offset varies over [0, seq_len)
        batches = Batches(torch.arange(1000), seq_len, batch_size, seed=seed)
        offsets.add(int(batches.next()[0][0, 0]) % seq_len)
    assert offsets == set(range(seq_len))


def test_batches_refuse_a_split_too_short_for_one_batch():
    """A split with fewer windows than batch_size raises DataError naming the sizes."""
    with pytest.raises(DataError, match="too short for one batch of 4 x 8"):
        Batches(torch.arange(8 * 4), 8, 4, seed=0)  # (32 - 8) // 8 = 3 windows
    assert Batches(torch.arange(8 * 5), 8, 4, seed=0).windows == 4


def test_windows_reads_seq_len_plus_one_tokens():
    """windows() gives rows of seq_len + 1 tokens starting at each start, as int64."""
    rows = windows(torch.arange(100, dtype=torch.int32), torch.tensor([0, 10, 90]), 9)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [list(range(s, s + 10)) for s in (0, 10, 90)]


def take(batches: Batches, count: int):
    return [batches.next() for _ in range(count)]


def test_resume_across_a_pass_boundary_gives_the_same_batches():
    """A Batches saved in pass 1 and loaded into a fresh one continues with the same batches, into pass 2."""
    tokens = torch.arange(200)
    original = Batches(tokens, 8, 4, seed=3)
    per_pass = original.per_pass
    assert per_pass == 6
    first_pass = take(original, per_pass)
    take(original, 2)
    state = original.state()
    assert state == {"pass": 1, "index": 2}
    restored = Batches(tokens, 8, 4, seed=3)
    restored.load_state(json.loads(json.dumps(state)))  # as saved in a checkpoint
    for (a_in, a_out, a_end), (b_in, b_out, b_end) in zip(take(original, 12), take(restored, 12), strict=True):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out) and a_end == b_end
    second_pass = take(Batches(tokens, 8, 4, seed=3), 2 * per_pass)[per_pass:]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first_pass, second_pass, strict=True))
    other_seed = take(Batches(tokens, 8, 4, seed=4), per_pass)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first_pass, other_seed, strict=True))


def test_a_position_saved_as_epoch_by_an_older_trainer_resumes_the_same():
    """Checkpoints written before the rename to "pass" call the pass "epoch"."""
    tokens = torch.arange(200)
    original = Batches(tokens, 8, 4, seed=3)
    take(original, 8)
    restored = Batches(tokens, 8, 4, seed=3)
    restored.load_state({"epoch": 1, "index": 2})
    assert restored.state() == original.state() == {"pass": 1, "index": 2}
    for a, b in zip(take(original, 8), take(restored, 8), strict=True):
        assert torch.equal(a[0], b[0]) and a[2] == b[2]


def test_resume_at_a_pass_start_and_mid_pass():
    """Saving right after a pass ends, or mid-way through pass 0, resumes at the same batch."""
    tokens = torch.arange(300)
    for advance in (0, 3, 7, 14):
        original = Batches(tokens, 10, 3, seed=11)
        take(original, advance)
        restored = Batches(tokens, 10, 3, seed=11)
        restored.load_state(original.state())
        assert restored.state() == original.state()
        for a, b in zip(take(original, 10), take(restored, 10), strict=True):
            assert torch.equal(a[0], b[0]) and a[2] == b[2]


# -- two processes


DDP_SCRIPT = """
import json
import torch
from train.config import TrainConfig
from train.machine import setup_machine
from train.trainer import Trainer

torch.set_num_threads(1)
config = TrainConfig(**json.loads({fields!r}))
machine = setup_machine(config)
trainer = Trainer(config, machine)
batch = torch.load({batch!r})
loss, grad_norm = trainer.optimizer_step(batch["inputs"], batch["targets"])
if machine.rank == 0:
    params = {{n: p.detach() for n, p in trainer.model.named_parameters()}}
    torch.save({{"loss": float(loss), "grad_norm": float(grad_norm), "params": params}}, {result!r})
torch.distributed.barrier()  # neither process exits while the other still uses the process group
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_step_like_one_on_the_whole_batch(tmp_path, small_text):
    """Under torchrun with 2 gloo processes each takes its half; the step equals one process's on the whole batch."""
    config = tiny_train_config(small_text, tmp_path / "single", grad_clip=0.0)
    single = one_step(config)
    inputs, targets, _ = single[3]
    torch.save({"inputs": inputs, "targets": targets}, tmp_path / "batch.pt")
    # each process runs its 4 rows as 2 accumulated micro-batches of 2, the first without a gradient sync
    fields = dataclasses.asdict(dataclasses.replace(config, micro_batch_size=2))
    fields["out_dir"] = str(tmp_path / "ddp")
    script, result = tmp_path / "ddp_step.py", tmp_path / "ddp.pt"
    batch = str(tmp_path / "batch.pt")
    script.write_text(DDP_SCRIPT.format(fields=json.dumps(fields), batch=batch, result=str(result)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    run = subprocess.run(
        # PYTHONPATH: this checkout's code (under mutmut, the mutated copy), not whatever is installed
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(result)
    assert_same_step((ddp["loss"], ddp["grad_norm"], ddp["params"], None), single, gradients(config, single[3]))


def test_the_progress_bar_says_compiling_during_the_first_step_and_times_from_the_second(
    small_text, tmp_path, monkeypatch, capsys
):
    """A compiled run's first step compiles the model: the bar says "compiling" until it ends, then "train",
    with its rate counted from there (so no ETA of hours from the compile's minute)."""
    import train.trainer as trainer_module

    bars = []
    original_reset = trainer_module.tqdm.reset

    def reset(self, total=None):
        bars.append(self.n)  # what the bar counted when its clock restarted
        return original_reset(self, total)

    monkeypatch.setattr(trainer_module.tqdm, "reset", reset)
    monkeypatch.setattr(trainer_module.torch, "compile", lambda model: model)  # the bar's logic, not the compiler
    machine = Machine(torch.device("cpu"), None, True)
    for out in ("out", "plain"):
        (tmp_path / out).mkdir()
    Trainer(tiny_train_config(small_text, tmp_path / "out", max_steps=3), machine).train()
    assert bars == [1]  # once, after the first step
    shown = capsys.readouterr().err
    assert "compiling:  33%" in shown and shown.index("compiling:") < shown.index("train:") and "train: 100%" in shown
    bars.clear()
    Trainer(tiny_train_config(small_text, tmp_path / "plain", max_steps=3), CPU_MACHINE).train()
    assert bars == []
