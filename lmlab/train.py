"""The training loop: epochs of truncated BPTT, validation, LR schedule, checkpoints, resume.

The trainer takes plain objects (model, data, optimizer, scheduler, device, logger) and knows nothing
about Hydra. Checkpoints: ``checkpoints/last.pt`` (everything needed to resume, written every
``save_every_steps`` steps and at each epoch end) and ``checkpoints/best.pt`` (best validation loss).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmlab.checkpoint import TrainState, atomic_save, restore_training, training_checkpoint
from lmlab.data import LanguageModelData, bptt_batches, num_bptt_batches, variable_bptt_batches
from lmlab.errors import ConfigError
from lmlab.interrupt import StopSignals, TrainingInterrupted
from lmlab.loggers import Logger
from lmlab.models import RNNLanguageModel, detach_hidden
from lmlab.optim import NTASGD, SPARSE_OPTIMIZERS, clip_grad_norm

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss and ``on_nan=stop``."""


@dataclass
class FitResult:
    best_val_loss: float
    epochs_run: int
    train_tokens_per_sec: float
    best_checkpoint: Path


class Trainer:
    """Runs ``epochs`` of training with gradient clipping, plateau LR schedule and checkpoints."""

    def __init__(
        self,
        epochs: int = 20,
        clip_grad_norm: float | None = 0.25,
        limit_train_batches: int | None = None,
        limit_eval_batches: int | None = None,
        log_interval: int = 200,
        progress: bool | None = None,
        precision: str = "fp32",
        save_every_steps: int | None = None,
        resume: str | None = "auto",
        on_nan: str = "stop",
        variable_bptt: bool = False,
        compile: bool = False,
        max_time_s: float | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={precision!r} is unknown; choose one of {list(PRECISIONS)}")
        if on_nan not in ("stop", "skip_batch"):
            raise ConfigError(f"trainer.on_nan={on_nan!r} is unknown; choose 'stop' or 'skip_batch'")
        self.epochs, self.clip_grad_norm = epochs, clip_grad_norm
        self.limit_train_batches, self.limit_eval_batches = limit_train_batches, limit_eval_batches
        self.log_interval, self.progress, self.precision = log_interval, progress, precision
        self.save_every_steps, self.resume, self.on_nan = save_every_steps, resume, on_nan
        self.variable_bptt, self.compile, self.max_time_s = variable_bptt, compile, max_time_s
        self._deadline = math.inf

    # ----------------------------------------------------------------------------------------- fit
    def fit(
        self,
        model: RNNLanguageModel,
        data: LanguageModelData,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        device: torch.device,
        out_dir: Path,
        logger: Logger,
        checkpoint_meta: dict[str, Any],
    ) -> FitResult:
        """Train, validating after each epoch; returns the best validation loss and where it is saved."""
        ckpt_dir = Path(out_dir) / "checkpoints"
        self._logger = logger
        self._meta, self._last, self._best = checkpoint_meta, ckpt_dir / "last.pt", ckpt_dir / "best.pt"
        self._setup(model, optimizer, scheduler, device)
        state = self._restore(model, optimizer, scheduler, logger)
        train_columns, valid_columns = data.columns("train").to(device), data.columns("valid").to(device)
        tokens_seen, train_seconds = 0, 0.0
        # A time budget ends training after the step that crosses it; that epoch is validated as usual.
        self._deadline = time.perf_counter() + self.max_time_s if self.max_time_s else math.inf
        with StopSignals() as signals:
            while state.epoch <= self.epochs and time.perf_counter() < self._deadline:
                started = time.perf_counter()
                tokens = self._train_epoch(model, train_columns, data.bptt, optimizer, device, state, logger, signals)
                seconds = time.perf_counter() - started
                tokens_seen, train_seconds = tokens_seen + tokens, train_seconds + seconds
                self._end_epoch(
                    state, model, optimizer, scheduler, logger, (valid_columns, data.bptt, device), tokens, seconds
                )
        speed = tokens_seen / train_seconds if train_seconds else 0.0
        return FitResult(state.best_val_loss, len(state.history), speed, self._best)

    def train_steps(
        self,
        model: RNNLanguageModel,
        columns: torch.Tensor,
        bptt: int,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> int:
        """Up to ``limit_train_batches`` training steps outside :meth:`fit` (benchmarks): the same step
        code, no logging, no checkpoints. Returns the number of tokens trained on."""
        self._setup(model, optimizer, None, device)
        return self._train_epoch(model, columns, bptt, optimizer, device, TrainState(), Logger(), StopSignals())

    def _setup(self, model: RNNLanguageModel, optimizer: Any, scheduler: Any, device: torch.device) -> None:
        if model.embedding.sparse and not model.decoder_is_tied and not isinstance(optimizer, SPARSE_OPTIMIZERS):
            raise ConfigError(
                f"model.sparse_embedding=true makes sparse gradients, which {type(optimizer).__name__} cannot "
                "take; use optimizer=sgd or optimizer=nt_asgd, or set model.sparse_embedding=false"
            )
        if self.precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"trainer.precision=fp16 needs a CUDA device (this run is on {device.type}); "
                "use trainer.precision=bf16 on CPUs with bf16 support, or fp32"
            )
        self._scheduler = scheduler
        self._scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        # Compiled forward for speed; the plain module stays the one whose state is saved.
        self._forward = torch.compile(model) if self.compile else model

    def _train_epoch(self, model, columns, bptt, optimizer, device, state, logger, signals) -> int:
        model.train()
        n_batches = num_bptt_batches(columns, bptt, self.limit_train_batches)
        hidden = state.hidden if state.hidden is not None else model.init_hidden(columns.size(1), device)
        loss_sum = torch.tensor(state.loss_sum, device=device)
        check_each_step = self.on_nan == "skip_batch" or device.type == "cpu"  # .item() is free on CPU
        tokens = 0
        bar = tqdm(
            total=n_batches,
            initial=state.step,
            desc=f"epoch {state.epoch}",
            leave=False,
            disable=None if self.progress is None else not self.progress,
            dynamic_ncols=True,
        )
        if self.variable_bptt:  # lengths drawn from a per-epoch seed, so a resumed epoch sees the same ones
            batches = variable_bptt_batches(columns, bptt, seed=state.epoch, limit=self.limit_train_batches)
        else:
            batches = bptt_batches(columns, bptt, self.limit_train_batches)
        base_lr = _lr(optimizer)
        for step, (inputs, targets) in enumerate(batches, start=1):
            if step <= state.step:
                continue  # resumed mid-epoch: these steps are already in the checkpoint
            if time.perf_counter() > self._deadline:
                break
            hidden = detach_hidden(hidden)
            if self.variable_bptt:  # AWD-LSTM: shorter windows get a proportionally smaller step
                _set_lr(optimizer, base_lr * len(inputs) / bptt)
            with self._autocast(device):
                features, hidden = self._forward(inputs, hidden)
                loss = model.loss(features, targets)
                objective = loss + model.regularization(features)
            finite = bool(torch.isfinite(loss)) if check_each_step else True
            if not finite and self.on_nan == "skip_batch":
                state.skipped_batches += 1
                hidden = model.init_hidden(columns.size(1), device)
            else:
                if not finite:
                    self._raise_non_finite(state.epoch, step)
                self._backward_and_step(model, objective, optimizer)
                loss_sum += loss.detach()
            state.step, state.global_step = step, state.global_step + 1
            tokens += inputs.numel()
            bar.update(1)
            if step % self.log_interval == 0 or step == n_batches:
                running = (loss_sum / max(step - state.skipped_batches, 1)).item()
                if not math.isfinite(running):
                    self._raise_non_finite(state.epoch, step, window=self.log_interval)
                bar.set_postfix(loss=f"{running:.3f}")
                logger.log_step(state.global_step, {"train/loss": running, "lr": _lr(optimizer)})
            if signals.received or (self.save_every_steps and state.global_step % self.save_every_steps == 0):
                state.hidden, state.loss_sum = detach_hidden(hidden), loss_sum.item()
                _set_lr(optimizer, base_lr)  # save the schedule's lr, not this window's scaled one
                self._save_last(model, optimizer, state)
                if signals.received:
                    bar.close()
                    raise TrainingInterrupted(signals.received, str(self._last))
        bar.close()
        _set_lr(optimizer, base_lr)
        state.loss_sum = loss_sum.item()
        return tokens

    def _backward_and_step(self, model, loss, optimizer) -> None:
        self._scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self._scaler.unscale_(optimizer)
            clip_grad_norm(model.parameters(), self.clip_grad_norm)
        self._scaler.step(optimizer)
        self._scaler.update()
        # Free the gradients now rather than before the next backward: the next forward (whose fused
        # loss makes its gradients early) then never holds two sets at once (~100 MB at vocab 33k).
        optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, state, model, optimizer, scheduler, logger, validation, tokens, seconds) -> None:
        averaging = isinstance(optimizer, NTASGD)
        with optimizer.averaged_weights() if averaging else contextlib.nullcontext():
            val_loss = self.evaluate(model, *validation)
            if val_loss < state.best_val_loss:  # best.pt holds the weights that were evaluated
                state.best_val_loss = val_loss
                atomic_save(training_checkpoint(self._meta, model, state), self._best)
        if averaging and optimizer.observe(val_loss):
            print(f"NT-ASGD: validation stopped improving; averaging weights from epoch {state.epoch + 1}")
        done = max(state.step - state.skipped_batches, 1)
        metrics = {
            "epoch": state.epoch,
            "train_loss": state.loss_sum / done,
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "lr": _lr(optimizer),
            "tokens_per_sec": tokens / seconds if seconds else 0.0,
            "elapsed_s": seconds,
        }
        if state.skipped_batches:
            metrics["skipped_batches"] = state.skipped_batches
        if scheduler is not None:
            is_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            scheduler.step(val_loss) if is_plateau else scheduler.step()
        state.history.append(metrics)
        state.epoch, state.step, state.hidden, state.loss_sum, state.skipped_batches = state.epoch + 1, 0, None, 0.0, 0
        self._save_last(model, optimizer, state)
        logger.log_epoch(metrics)

    # -------------------------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, model: RNNLanguageModel, columns: torch.Tensor, bptt: int, device: torch.device) -> float:
        """Mean loss per token over ``columns`` (at most ``limit_eval_batches`` windows)."""
        model.eval()
        hidden = model.init_hidden(columns.size(1), device)
        total, count = torch.zeros((), device=device), 0
        for inputs, targets in bptt_batches(columns, bptt, self.limit_eval_batches):
            with self._autocast(device):
                features, hidden = model(inputs, hidden)
                total += model.loss(features, targets).float() * targets.numel()
            count += targets.numel()
        return total.item() / count

    # ------------------------------------------------------------------------------- checkpoints
    def _save_last(self, model, optimizer, state: TrainState) -> None:
        ckpt = training_checkpoint(
            self._meta, model, state, optimizer, self._scheduler, self._scaler, self._logger.state()
        )
        atomic_save(ckpt, self._last)

    def _restore(self, model, optimizer, scheduler, logger) -> TrainState:
        source = self._resume_source()
        if source is None:
            return TrainState()
        state, logger_state = restore_training(source, self._meta, model, optimizer, scheduler, self._scaler)
        logger.restore(state.history, logger_state)
        print(f"Resuming from {source}: epoch {state.epoch}, step {state.step}")
        return state

    def _resume_source(self) -> Path | None:
        if self.resume in (None, "never", False):
            return None
        if self.resume == "auto":
            return self._last if self._last.is_file() else None
        path = Path(self.resume)
        if not path.is_file():
            raise ConfigError(f"trainer.resume={self.resume} does not exist; give a last.pt path, 'auto' or null")
        return path

    # ------------------------------------------------------------------------------------ helpers
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _raise_non_finite(self, epoch: int, step: int, window: int = 1) -> None:
        where = f"step {step}" if window == 1 else f"the {window} steps up to step {step}"
        raise NonFiniteLoss(
            f"non-finite training loss in epoch {epoch}, {where}. The last good checkpoint "
            f"is {self._last if self._last.exists() else 'not written yet'}. Try a lower "
            "optimizer.lr, a smaller trainer.clip_grad_norm, trainer.precision=fp32, "
            "or trainer.on_nan=skip_batch"
        )


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; such a model is diverged anyway
