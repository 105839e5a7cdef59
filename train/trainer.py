"""The training loop: build the model and optimizer, then step, log, evaluate-and-save, stop."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, generate, load_tokenizer, render_model_card, stream_text
from model.hub import upload_folder
from model.layout import CheckpointError
from model.loading import load_checkpoint, load_weights
from model.saving import atomic_write
from serve.policy import EXAMPLE_PROMPTS, default_params

from . import outputs
from .config import TrainConfig
from .data import Batches, DataError, load_tokens, split_held_out, windows
from .machine import Machine

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


def build_model(config: TrainConfig) -> GPT:
    """A fresh GPT of config's shape, or the --init weights with config's dropout."""
    if not config.init:
        return GPT(config.gpt_config())
    try:
        shape, state_dict = load_checkpoint(config.init)
    except CheckpointError as err:
        raise DataError(f"--init {config.init}: {err}") from err
    model = GPT(dataclasses.replace(shape, dropout=config.dropout))
    load_weights(model, state_dict)
    return model


class Trainer:
    def __init__(self, config: TrainConfig, machine: Machine) -> None:
        c = self.config = config
        self.machine = machine
        self.out_dir, self.checkpoint_dir, _ = outputs.out_dirs(c.out_dir, c.checkpoint_dir)
        self.tokenizer = load_tokenizer()  # the samples need it at the end: load it before the first step
        tokens = torch.from_numpy(load_tokens(c.data, c.cache_dir).astype(np.int32))
        train_tokens, val_tokens = split_held_out(tokens, c.val_fraction)
        self.train_tokens, self.val_tokens = train_tokens.to(machine.device), val_tokens.to(machine.device)

        torch.manual_seed(c.seed)  # the same initial weights on every process
        self.model = build_model(c).to(machine.device)
        self.model.train()
        self.seq_len = c.seq_len or self.model.config.block_size
        if self.seq_len > self.model.config.block_size:
            raise DataError(
                f"--seq-len {self.seq_len} is longer than the model's context ({self.model.config.block_size})"
            )
        torch.manual_seed(c.seed + machine.rank)  # dropout masks differ between processes

        self.micro_batch = c.micro_batch_size or max(1, c.batch_size // machine.world_size)
        self.accum_steps = c.batch_size // (self.micro_batch * machine.world_size)
        if self.accum_steps < 1 or self.accum_steps * self.micro_batch * machine.world_size != c.batch_size:
            raise DataError(
                f"--batch-size {c.batch_size} must be a multiple of --micro-batch-size {self.micro_batch} x "
                f"{machine.world_size} processes; change --micro-batch-size (0 = batch size / processes)"
            )
        self.batches = Batches(self.train_tokens, self.seq_len, c.batch_size, c.seed)
        # checked after the training split, so a file too short for anything says "too short for one batch"
        if len(self.val_tokens) and len(self.val_tokens) <= self.seq_len:
            raise DataError(
                f"the held-out split has only {len(self.val_tokens)} tokens, fewer than --seq-len "
                f"{self.seq_len} + 1; use more data or --val-fraction 0"
            )

        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr,
            betas=(c.beta1, c.beta2),
            fused=machine.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(enabled=machine.autocast_dtype == torch.float16)
        network = torch.compile(self.model) if machine.compile else self.model
        if machine.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [machine.device.index] if machine.device.type == "cuda" else None
            network = DistributedDataParallel(network, device_ids=ids)
        self.network = network

        self.step, self.best_val, self.best_step, self.history = 0, float("inf"), None, []
        self.elapsed = 0.0  # training seconds, carried over on resume
        self.stop_signal = 0
        # the running pass: summed step losses (kept on the device: no sync per step) and count
        self.pass_sum = torch.zeros((), device=machine.device, dtype=torch.float64)
        self.pass_steps, self.pass_loss = 0, None
        # since the last log row: summed losses, and whether any loss or gradient was not finite
        self.log_sum = torch.zeros((), device=machine.device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=machine.device, dtype=torch.bool)
        self.steps_since_log = 0
        if c.resume:
            self.resume()

    # -- state

    def state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "history": self.history,
            "data": self.batches.state(),
            "pass": [float(self.pass_sum), self.pass_steps, self.pass_loss],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.machine.device) if self.machine.device.type == "cuda" else None,
        }

    def resume(self) -> None:
        folder = outputs.latest_checkpoint(self.checkpoint_dir)
        if folder is None:
            raise outputs.OutputError(
                f"--resume: no checkpoint in {self.checkpoint_dir / 'latest'}; drop --resume to start a new run"
            )
        state = torch.load(folder / outputs.STATE_NAME, map_location="cpu", weights_only=True)
        loaded = GPT.from_pretrained(folder)
        with torch.no_grad():
            for mine, theirs in zip(self.model.parameters(), loaded.parameters(), strict=True):
                mine.copy_(theirs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["data"])
        self.step, self.best_val, self.best_step = state["step"], state["best_val"], state.get("best_step")
        self.elapsed, self.history = state["elapsed"], state["history"]
        pass_sum, self.pass_steps, self.pass_loss = state["pass"]
        self.pass_sum.fill_(pass_sum)
        if self.machine.is_main:  # the saved RNG is rank 0's; the others keep their own seeds
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] is not None and self.machine.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng_cuda"], self.machine.device)
            outputs.write_metrics(self.out_dir, self.history)  # rows after the checkpoint are dropped
            log.info("resumed from %s at step %d", folder, self.step)

    # -- one step

    def optimizer_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a whole batch (this process's share, in micro-batches); returns the
        mean loss over all processes and the gradient norm, as device tensors (no host sync)."""
        machine = self.machine
        share = self.micro_batch * self.accum_steps
        mine = slice(machine.rank * share, (machine.rank + 1) * share)
        inputs, targets = inputs[mine], targets[mine]
        step_loss = torch.zeros((), device=machine.device)
        for micro in range(self.accum_steps):
            part = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            sync = micro == self.accum_steps - 1 or machine.world_size == 1
            with nullcontext() if sync else self.network.no_sync(), machine.autocast():
                _, loss = self.network(inputs[part], targets[part])
                loss = loss / self.accum_steps
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

    # -- evaluation and outputs

    @torch.no_grad()
    def val_loss(self) -> float | None:
        """Mean loss over the first eval_batches x batch_size windows of the held-out split (the same
        windows whatever the number of processes), scored in micro-batches."""
        if not len(self.val_tokens):
            return None
        self.model.eval()
        count = min((len(self.val_tokens) - 1) // self.seq_len, self.config.eval_batches * self.config.batch_size)
        starts = torch.arange(count, device=self.machine.device) * self.seq_len
        total = 0.0
        for chunk in starts.split(self.micro_batch):
            window = windows(self.val_tokens, chunk, self.seq_len)
            with self.machine.autocast():
                _, loss = self.model(window[:, :-1], window[:, 1:])
            total += float(loss) * len(chunk)
        self.model.train()
        return total / count

    def samples(self) -> dict[str, str]:
        out = {}
        params = default_params(seed=self.config.seed)  # what the app starts from
        for prompt in EXAMPLE_PROMPTS:
            ids = generate(self.model, self.tokenizer.encode(prompt), self.config.sample_tokens, params=params)
            out[prompt] = prompt + "".join(stream_text(ids, self.tokenizer))
        return out

    def summary(self, val: float | None) -> dict:
        c = self.config
        if self.pass_loss is not None:
            train_loss, basis = self.pass_loss, "mean over the last whole pass over the training split"
        elif self.pass_steps:  # a run shorter than one pass
            train_loss = float(self.pass_sum) / self.pass_steps
            basis = f"mean over the {self.pass_steps} steps run (less than one pass over the training split)"
        else:
            train_loss, basis = None, "no step run"
        return {
            "train_loss": None if train_loss is None else round(train_loss, 4),
            "train_loss_basis": basis,
            "val_loss": None if val is None else round(val, 4),
            "steps": self.step,
            "tokens": self.step * c.batch_size * self.seq_len,
            "train_minutes": round(self.elapsed / 60, 1),
            "hardware": self.machine.hardware(),
            "preset": c.preset,
            "batch": f"{c.batch_size} x {self.seq_len}",
            "val_fraction": c.val_fraction,
        }

    def extras(self, val: float | None) -> tuple[str, list]:
        """The model card (with samples) and the loss curve: a failure here is a warning, never a lost checkpoint."""
        summary = self.summary(val)
        try:
            curve = [outputs.plot(self.out_dir, self.history)]
        except Exception as err:  # matplotlib missing or failing
            log.warning(
                "could not draw the loss curve (%s: %s); the checkpoint is saved without it", type(err).__name__, err
            )
            curve = []
        try:
            samples = self.samples() if self.config.sample_tokens else {}
        except Exception as err:
            log.warning(
                "could not write sample text (%s: %s); the checkpoint is saved without it", type(err).__name__, err
            )
            samples = {}
        body = "## Samples\n\n" + "".join(f"```text\n{text}\n```\n\n" for text in samples.values()) if samples else ""
        body += "![loss curve](loss_curve.png)\n" if curve else ""
        model_id = self.config.push_to_hub or "path/to/this/folder"
        return render_model_card(self.model.config, summary, body, model_id=model_id), curve

    def diverged(self) -> Diverged:
        lr = lr_at(self.step - 1, self.config)
        return Diverged(
            f"the loss, the gradients or the weights are not finite numbers by step {self.step} (lr {lr:.2e}): "
            "training diverged. Nothing was saved after the last good checkpoint; start a new run with a lower --lr "
            "(or more --warmup-steps)"
        )

    def evaluate_and_save(self, evaluate: bool) -> float | None:
        """Score the held-out split (when asked) and write latest/, and best/ when the score is the best yet.
        Weights an update left non-finite (or that score no number) are neither logged nor saved."""
        val = self.val_loss() if evaluate and self.machine.is_main else None
        broken = not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())
        broken = broken or bool(self.nonfinite) or (val is not None and not math.isfinite(val))
        if self.machine.all_agree([float(broken)])[0]:  # every process stops, not only the one that scored
            raise self.diverged()
        if not self.machine.is_main:
            return None
        if val is not None:
            self.history.append({"step": self.step, "loss": self.pass_loss, "val_loss": val})
            outputs.append_metrics(self.out_dir, self.history[-1])
            tqdm.write(f"step {self.step}: pass loss {self.pass_loss}, held-out loss {val:.4f}")
        best = val is not None and val < self.best_val
        if best:
            self.best_val, self.best_step = val, self.step
        card, curve = self.extras(val)
        state = self.state()
        outputs.save_checkpoint(self.checkpoint_dir, "latest", self.model, state, card, curve)
        if best:
            outputs.save_checkpoint(self.checkpoint_dir, "best", self.model, state, card, curve)
        return val

    # -- the loop

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def log_row(self, lr: float, grad_norm: torch.Tensor, seconds: float, flops_per_token: float) -> dict:
        tokens_per_second = self.steps_since_log * self.config.batch_size * self.seq_len / seconds
        peak = self.machine.peak_flops()
        cuda = self.machine.device.type == "cuda"
        return {
            "step": self.step,
            "loss": round(float(self.log_sum) / self.steps_since_log, 5),
            "pass_loss": None if self.pass_loss is None else round(self.pass_loss, 5),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 4),
            "tokens_per_second": round(tokens_per_second),
            # per device: this process's share of the tokens against one device's peak
            "mfu": None
            if peak is None
            else round(flops_per_token * tokens_per_second / self.machine.world_size / peak, 4),
            "gpu_memory_gb": round(torch.cuda.max_memory_allocated(self.machine.device) / 2**30, 2) if cuda else None,
        }

    def train(self) -> dict:
        c, machine = self.config, self.machine
        main = machine.is_main
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        shape = self.model.config
        n_params = self.model.num_parameters()
        flops_per_token = 6 * n_params + 12 * shape.n_layer * shape.n_embd * self.seq_len
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not main, dynamic_ncols=True, desc="train")
        if main:
            log.info(
                "%s parameters; %s train / %s held-out tokens; %d steps per pass of %d x %d; %s",
                f"{n_params:,}", f"{len(self.train_tokens):,}", f"{len(self.val_tokens):,}",
                self.batches.per_epoch, c.batch_size, self.seq_len, machine.hardware(),
            )  # fmt: skip
        reached, reason = False, "max steps"
        t_log, t_start = time.perf_counter(), time.perf_counter() - self.elapsed
        try:
            while self.step < c.max_steps:
                lr = lr_at(self.step, c)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                inputs, targets, ends_pass = self.batches.next()
                step_loss, grad_norm = self.optimizer_step(inputs, targets)
                self.step += 1
                bar.update(1)
                self.pass_sum += step_loss
                self.log_sum += step_loss
                self.nonfinite |= ~torch.isfinite(step_loss)
                if not self.scaler.is_enabled():  # with fp16 an inf gradient is a skipped step, not a failure
                    self.nonfinite |= ~torch.isfinite(grad_norm)
                self.pass_steps += 1
                self.steps_since_log += 1
                self.elapsed = time.perf_counter() - t_start
                if ends_pass:  # the target is judged on a whole pass over the training split
                    self.pass_loss = float(self.pass_sum) / self.pass_steps
                    self.pass_sum.zero_()
                    self.pass_steps = 0
                    if self.pass_loss < c.target_loss:
                        reached, reason = (
                            True,
                            f"target loss reached: mean loss over the last pass {self.pass_loss:.4f}",
                        )

                evaluate = self.step % c.eval_interval == 0
                save = evaluate or self.step % c.checkpoint_interval == 0
                last = reached or self.step == c.max_steps
                # Every process decides to stop at the same step, from the same all-reduced flags; a single
                # process checks signals and time every step, and the loss (a device sync) only here.
                decide = self.step % c.log_interval == 0 or save or last
                if decide or machine.world_size == 1:
                    time_up = bool(c.max_minutes) and self.elapsed > c.max_minutes * 60
                    nonfinite = float(self.nonfinite) if decide else 0.0
                    diverged, signum, time_up = machine.all_agree([nonfinite, float(self.stop_signal), float(time_up)])
                    if diverged:
                        raise self.diverged()
                    if self.step % c.log_interval == 0 or last:
                        now = time.perf_counter()
                        row = self.log_row(lr, grad_norm, now - t_log, flops_per_token)
                        if main:
                            self.history.append(row)
                            outputs.append_metrics(self.out_dir, row)
                            bar.set_postfix(loss=row["loss"], lr=f"{lr:.2e}", tok_s=row["tokens_per_second"])
                        self.log_sum.zero_()
                        t_log, self.steps_since_log = now, 0
                    if signum:
                        reason = f"stopped by signal {signal.Signals(int(signum)).name}"
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
        best_val = None if self.best_step is None else round(self.best_val, 4)
        return {**self.summary(val), "reached_target": reached, "reason": reason, "best_val_loss": best_val,
                "best_step": self.best_step}  # fmt: skip

    def finish(self, summary: dict) -> None:
        """On the main process: summary.json, the final model where SageMaker collects it, the upload."""
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(self.out_dir / "summary.json", lambda p: p.write_text(text))
        best = self.checkpoint_dir / "best"
        chosen = best if (best / "model.safetensors").is_file() else self.checkpoint_dir / "latest"
        if self.checkpoint_dir != self.out_dir:  # SageMaker: the model tarball is made from SM_MODEL_DIR
            for name in outputs.CHECKPOINTS:
                if (self.checkpoint_dir / name).is_dir():
                    outputs.copy_model(self.checkpoint_dir / name, self.out_dir / name)
        if self.config.push_to_hub and not self.stop_signal:
            what = (
                f"best/ (held-out loss {self.best_val:.4f} at step {self.best_step})" if chosen == best else "latest/"
            )
            log.info("uploading %s to %s", what, self.config.push_to_hub)
            url = upload_folder(chosen, self.config.push_to_hub, private=self.config.private)
            log.info("uploaded to https://huggingface.co/%s (%s)", self.config.push_to_hub, url)
