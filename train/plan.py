"""The run plan: what a run derives from its flags, the number of processes and the model it trains (the
sequence length and how each batch is split), worked out and checked in this one place. Every problem is
reported at once, in one error naming each flag."""

from __future__ import annotations

from dataclasses import dataclass

from model import GPTConfig

from .config import TrainConfig


class ConfigError(ValueError):
    """Flags that cannot run together (on this many processes, with this model); the message names them."""


@dataclass(frozen=True)
class RunPlan:
    shape: GPTConfig  # the model trained (--dropout applied): an --init or resumed model's own, else --model-preset's
    seq_len: int  # tokens per training sequence
    batch_size: int  # sequences per optimizer step, over all processes and accumulation steps
    micro_batch: int  # sequences per forward pass and process
    accum_steps: int  # forward passes per optimizer step and process
    world_size: int  # processes

    @property
    def context(self) -> int:
        return self.shape.block_size

    @property
    def rows_per_process(self) -> int:
        """Each process's share of a batch."""
        return self.micro_batch * self.accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def make_plan(config: TrainConfig, world_size: int, shape: GPTConfig) -> RunPlan:
    """The plan for config on world_size processes training a model of this shape; a ConfigError lists every
    flag that does not fit."""
    problems = []
    seq_len = config.seq_len or shape.block_size
    if seq_len > shape.block_size:
        problems.append(f"--seq-len must be at most the model's context ({shape.block_size}), got {seq_len}")
    batch = config.batch_size
    micro = config.micro_batch_size or max(1, batch // world_size)
    accum = batch // (micro * world_size)
    if accum < 1 or accum * micro * world_size != batch:
        processes = f"{world_size} process{'es' if world_size > 1 else ''}"
        problems.append(
            f"--batch-size must be a multiple of --micro-batch-size x processes ({micro} x {processes}), got "
            f"{batch}; change --batch-size or --micro-batch-size (0 = --batch-size / processes)"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    return RunPlan(shape, seq_len, batch, micro, accum, world_size)
