"""The training loop: build the model and optimizer, then step, log, evaluate-and-save, stop."""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, GPTConfig, load_tokenizer
from model.layout import CheckpointError
from model.loading import load_checkpoint, load_weights

from . import outputs, publish, state
from .config import TrainConfig
from .data import Batches, DataError, load_tokens, split_held_out, windows
from .machine import Machine
from .plan import RunPlan, make_plan
from .state import Progress, SavedRun

log = logging.getLogger("train")


class Diverged(RuntimeError):
    """The loss, the gradients or the weights stopped being finite numbers."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps (step 0 gets lr / warmup_steps), then cosine decay to
    min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def starting_weights(config: TrainConfig, saved: SavedRun | None = None) -> tuple[GPTConfig, dict | None]:
    """The shape (with config's dropout) and weights the model starts from: the checkpoint's when resuming,
    else the --init weights, else a new --model-preset shape (no weights: a fresh initialisation)."""
    if saved is None and not config.init:
        return config.gpt_config(), None
    try:
        shape, weights = load_checkpoint(saved.folder if saved else config.init)
    except CheckpointError as err:
        if saved is not None:
            raise
        raise CheckpointError(f"--init {config.init}: {err}") from err
    return dataclasses.replace(shape, dropout=config.dropout), weights


def prepare(config: TrainConfig, world_size: int, saved: SavedRun | None = None) -> tuple[RunPlan, dict | None]:
    """The run plan and the weights to start from: everything a configuration mistake would stop."""
    shape, weights = starting_weights(config, saved)
    return make_plan(config, world_size, shape), weights


def build_model(plan: RunPlan, weights: dict | None) -> GPT:
    model = GPT(plan.shape)
    if weights is not None:
        load_weights(model, weights)
    return model


def build_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=device.type == "cuda",
    )


def wrap_for_training(model: GPT, machine: Machine) -> torch.nn.Module:
    """The model as the steps call it: compiled when asked, under DDP with several processes."""
    network = torch.compile(model) if machine.compile else model
    if machine.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [machine.device.index] if machine.device.type == "cuda" else None
        network = DistributedDataParallel(network, device_ids=ids)
    return network


class Trainer:
    """One run: its plan, data, model, optimizer and progress. Without a plan it makes one (prepare)."""

    def __init__(
        self,
        config: TrainConfig,
        machine: Machine,
        plan: RunPlan | None = None,
        weights: dict | None = None,
        saved: SavedRun | None = None,
    ) -> None:
        c = self.config = config
        self.machine = machine
        if plan is None:
            plan, weights = prepare(config, machine.world_size, saved)
        self.plan = plan
        self.out_dir, self.checkpoint_dir, _ = outputs.out_dirs(c.out_dir, c.checkpoint_dir)
        self.tokenizer = load_tokenizer()  # the samples need it at the end: load it before the first step
        tokens = torch.from_numpy(load_tokens(c.data, c.cache_dir).astype(np.int32))
        train_tokens, val_tokens = split_held_out(tokens, c.val_fraction)
        self.train_tokens, self.val_tokens = train_tokens.to(machine.device), val_tokens.to(machine.device)

        torch.manual_seed(c.seed)  # the same initial weights on every process
        self.model = build_model(plan, weights).to(machine.device)
        self.model.train()
        torch.manual_seed(c.seed + machine.rank)  # dropout masks differ between processes
        self.batches = Batches(self.train_tokens, plan.seq_len, plan.batch_size, c.seed)
        # checked after the training split, so a file too short for anything says "too short for one batch"
        if len(self.val_tokens) and len(self.val_tokens) <= plan.seq_len:
            raise DataError(
                f"the held-out split has only {len(self.val_tokens)} tokens, fewer than --seq-len "
                f"{plan.seq_len} + 1; use more data or --val-fraction 0"
            )
        self.optimizer = build_optimizer(self.model, c, machine.device)
        self.scaler = torch.amp.GradScaler(enabled=machine.autocast_dtype == torch.float16)
        self.network = wrap_for_training(self.model, machine)
        self.progress = Progress(machine.device)
        self.stop_signal = 0
        if saved is not None:
            state.restore(saved, self.progress, self.batches, self.optimizer, self.scaler, machine, self.out_dir)

    # -- one step

    def optimizer_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a whole batch (this process's share, in micro-batches); returns the
        mean loss over all processes and the gradient norm, as device tensors (no host sync)."""
        machine, plan = self.machine, self.plan
        share = plan.rows_per_process
        mine = slice(machine.rank * share, (machine.rank + 1) * share)
        inputs, targets = inputs[mine], targets[mine]
        step_loss = torch.zeros((), device=machine.device)
        for micro in range(plan.accum_steps):
            part = slice(micro * plan.micro_batch, (micro + 1) * plan.micro_batch)
            sync = micro == plan.accum_steps - 1 or machine.world_size == 1
            with nullcontext() if sync else self.network.no_sync(), machine.autocast():
                _, loss = self.network(inputs[part], targets[part], self.config.label_smoothing)
                loss = loss / plan.accum_steps
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if machine.world_size > 1:
            dist.all_reduce(step_loss)  # gloo has no AVG
            step_loss /= machine.world_size
        return step_loss, grad_norm

    def set_lr(self) -> float:
        lr = lr_at(self.progress.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- evaluation and checkpoints

    @torch.no_grad()
    def val_loss(self) -> float | None:
        """Mean loss over the first eval_batches x batch_size windows of the held-out split (the same
        windows whatever the number of processes), scored in micro-batches."""
        if not len(self.val_tokens):
            return None
        self.model.eval()
        seq_len = self.plan.seq_len
        count = min((len(self.val_tokens) - 1) // seq_len, self.config.eval_batches * self.plan.batch_size)
        starts = torch.arange(count, device=self.machine.device) * seq_len
        total = 0.0
        for chunk in starts.split(self.plan.micro_batch):
            window = windows(self.val_tokens, chunk, seq_len)
            with self.machine.autocast():
                _, loss = self.model(window[:, :-1], window[:, 1:])
            total += float(loss) * len(chunk)
        self.model.train()
        return total / count

    def diverged(self) -> Diverged:
        step = self.progress.step
        return Diverged(
            f"the loss, the gradients or the weights are not finite numbers by step {step} "
            f"(lr {lr_at(step - 1, self.config):.2e}): training diverged. Nothing was saved after the last good "
            "checkpoint; start a new run with a lower --lr (or more --warmup-steps)"
        )

    def evaluate_and_save(self, evaluate: bool) -> float | None:
        """Score the held-out split (when asked) and write latest/, and best/ when the score is the best yet.
        Weights an update left non-finite (or that score no number) are neither logged nor saved."""
        p = self.progress
        val = self.val_loss() if evaluate and self.machine.is_main else None
        broken = not bool(torch.stack([torch.isfinite(w).all() for w in self.model.parameters()]).all())
        broken = broken or bool(p.nonfinite) or (val is not None and not math.isfinite(val))
        if self.machine.max_over_processes([float(broken)])[0]:  # every process stops, not only the one that scored
            raise self.diverged()
        if not self.machine.is_main:
            return None
        if val is not None:
            p.history.append({"step": p.step, "loss": p.pass_loss, "val_loss": val})
            outputs.append_metrics(self.out_dir, p.history[-1])
            tqdm.write(f"step {p.step}: pass loss {p.pass_loss}, held-out loss {val:.4f}")
        best = val is not None and val < p.best_val
        if best:
            p.best_val, p.best_step = val, p.step
        card, curve = publish.card_and_curve(
            self.model, self.tokenizer, self.config, self.out_dir, p.history, self.summary(val)
        )
        saved = state.training_state(self.config, p, self.batches, self.optimizer, self.scaler, self.machine.device)
        outputs.save_checkpoint(self.checkpoint_dir, outputs.LATEST, self.model, saved, card, curve)
        if best:
            outputs.save_checkpoint(self.checkpoint_dir, outputs.BEST, self.model, saved, card, curve)
        return val

    # -- logging and stopping

    def summary(self, val: float | None) -> dict:
        """The run so far (publish.summary), for the model card and summary.json."""
        return publish.summary(self.config, self.plan, self.progress, self.machine.hardware(), val)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def announce(self) -> float:
        """Log the run's size; returns the training FLOPs per token (for MFU)."""
        shape, plan, n_params = self.model.config, self.plan, self.model.num_parameters()
        if self.machine.is_main:
            log.info(
                "%s parameters; %s train / %s held-out tokens; %d steps per pass of %d x %d; %s",
                f"{n_params:,}", f"{len(self.train_tokens):,}", f"{len(self.val_tokens):,}",
                self.batches.per_pass, plan.batch_size, plan.seq_len, self.machine.hardware(),
            )  # fmt: skip
            log.info("precision: %s (%s)", self.machine.precision(), self.machine.why)
        return 6 * n_params + 12 * shape.n_layer * shape.n_embd * plan.seq_len

    def agree_to_stop(self, check_loss: bool) -> tuple[int, bool]:
        """(the signal received, whether the time budget is spent), the same on every process; Diverged when
        any process saw a loss or gradient that is not finite (checked only when check_loss: a device sync)."""
        c, p = self.config, self.progress
        time_up = float(bool(c.max_minutes) and p.elapsed > c.max_minutes * 60)
        nonfinite = float(p.nonfinite) if check_loss else 0.0
        diverged, signum, time_up = self.machine.max_over_processes([nonfinite, float(self.stop_signal), time_up])
        if diverged:
            raise self.diverged()
        return int(signum), bool(time_up)

    def log_row(self, lr: float, grad_norm: torch.Tensor, seconds: float, flops_per_token: float) -> dict:
        """The metrics row of the steps since the last one (their sums start again from zero)."""
        p, machine = self.progress, self.machine
        tokens_per_second = p.log_steps * self.plan.tokens_per_step / seconds
        peak = machine.peak_flops()
        cuda = machine.device.type == "cuda"
        return {
            "step": p.step,
            "loss": round(p.take_log_mean(), 5),
            "pass_loss": None if p.pass_loss is None else round(p.pass_loss, 5),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 4),
            "tokens_per_second": round(tokens_per_second),
            # per device: this process's share of the tokens against one device's peak
            "mfu": None if peak is None else round(flops_per_token * tokens_per_second / machine.world_size / peak, 4),
            "gpu_memory_gb": round(torch.cuda.max_memory_allocated(machine.device) / 2**30, 2) if cuda else None,
        }

    def write_log_row(self, row: dict, bar: tqdm) -> None:
        if self.machine.is_main:
            self.progress.history.append(row)
            outputs.append_metrics(self.out_dir, row)
            bar.set_postfix(loss=row["loss"], lr=f"{row['lr']:.2e}", tok_s=row["tokens_per_second"])

    # -- the loop

    def train(self) -> dict:
        """Step, log, evaluate-and-save, stop; returns the run's summary."""
        c, p, machine = self.config, self.progress, self.machine
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        flops_per_token = self.announce()
        # a compiled model's first step compiles it (about a minute on a 2-core CPU): the bar says so, and its
        # rate and ETA start after it instead of counting it as a step
        compiling = machine.compile
        bar = tqdm(total=c.max_steps, initial=p.step, disable=not machine.is_main, dynamic_ncols=True,
                   desc="compiling" if compiling else "train")  # fmt: skip
        reached, reason = False, "max steps"
        t_log, t_start = time.perf_counter(), time.perf_counter() - p.elapsed
        try:
            while p.step < c.max_steps:
                lr = self.set_lr()
                inputs, targets, ends_pass = self.batches.next()
                step_loss, grad_norm = self.optimizer_step(inputs, targets)
                p.step += 1
                bar.update(1)
                if compiling:
                    compiling = False
                    bar.set_description("train", refresh=False)
                    bar.initial = 0
                    bar.reset(total=c.max_steps)  # the clock restarts here ...
                    bar.initial = p.step  # ... and the rate counts the steps after this one
                    bar.update(p.step)
                # with fp16 an inf gradient is a skipped step, not a failure
                p.count(step_loss, grad_norm, check_grad=not self.scaler.is_enabled())
                p.elapsed = time.perf_counter() - t_start
                if ends_pass and p.end_pass() < c.target_loss:  # judged on a whole pass over the training split
                    reached, reason = True, f"target loss reached: mean loss over the last pass {p.pass_loss:.4f}"

                evaluate = p.step % c.eval_interval == 0
                save = evaluate or p.step % c.checkpoint_interval == 0
                last = reached or p.step == c.max_steps
                # Every process decides to stop at the same step, from the same all-reduced flags; a single
                # process checks signals and time every step, and the loss (a device sync) only here.
                decide = p.step % c.log_interval == 0 or save or last
                if decide or machine.world_size == 1:
                    signum, time_up = self.agree_to_stop(check_loss=decide)
                    if p.step % c.log_interval == 0 or last:
                        now = time.perf_counter()
                        self.write_log_row(self.log_row(lr, grad_norm, now - t_log, flops_per_token), bar)
                        t_log = now
                    if signum:
                        reason = f"stopped by signal {signal.Signals(signum).name}"
                    elif time_up and not reached:
                        reason = f"time budget of {c.max_minutes} minutes reached"
                    if signum or time_up:
                        break
                if save and not last:
                    self.evaluate_and_save(evaluate)
                if reached:
                    break
            bar.close()
            val = self.evaluate_and_save(evaluate=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        best_val = None if p.best_step is None else round(p.best_val, 4)
        return {**self.summary(val), "reached_target": reached, "reason": reason, "best_val_loss": best_val,
                "best_step": p.best_step}  # fmt: skip
