"""The training loop: epochs of windowed training, validation, and the LR schedule — nothing else.

The trainer takes plain objects (a :class:`~lmlab.models.LanguageModel`, a data object that hands out
:class:`~lmlab.data.batching.TokenStream` splits, optimizer, schedule, device, logger) and knows nothing
about Hydra. Its options are the loop's own; checkpoints, the time budget, stop signals, the non-finite
policy, weight averaging and progress are hooks (:mod:`lmlab.training.hooks`), each with its own options,
handed to it ready-made.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmlab.config.schema import PositiveFloat, PositiveInt
from lmlab.data.batching import TokenStream
from lmlab.loggers.base import Logger
from lmlab.metrics import perplexity
from lmlab.models import LanguageModel
from lmlab.runtime import distributed
from lmlab.runtime.devices import PRECISIONS, resolve_precision
from lmlab.runtime.pass_progress import reported
from lmlab.runtime.signals import TrainingInterrupted
from lmlab.training.checkpoint_format import damaged
from lmlab.training.cuda_graph import GraphedStep
from lmlab.training.hooks import FitContext, Hook, evaluation_weights
from lmlab.training.optim import Schedule
from lmlab.training.step import EagerStep, GuardedGraphStep, make_step

__all__ = ["EvaluationStopped", "FitResult", "Trainer"]


@dataclass
class FitResult:
    best_val_loss: float
    epochs_run: int
    train_tokens_per_sec: float
    best_checkpoint: Path
    last_checkpoint: Path


class EvaluationStopped(Exception):
    """An evaluation pass was stopped between two windows by a stop signal (its figure is not known)."""


class Trainer:
    """Runs ``epochs`` of training with gradient clipping, validating after each epoch."""

    def __init__(
        self,
        epochs: PositiveInt = 20,
        clip_grad_norm: PositiveFloat | None = 0.25,
        limit_train_batches: PositiveInt | None = None,
        limit_eval_batches: PositiveInt | None = None,
        precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32",
        compile: bool = False,
        cuda_graph: Literal["auto"] | bool = "auto",
        hooks: list[Hook] | None = None,
    ) -> None:
        self.cuda_graph = cuda_graph  # lmlab.training.cuda_graph: auto = where it applies
        self.graph_off_reason: str | None = None  # why the last fit ran eagerly (None: it was graphed)
        self._step: EagerStep | GraphedStep | GuardedGraphStep | None = None
        self.epochs = epochs
        self.clip_grad_norm = clip_grad_norm
        self.precision = precision
        self.compile = compile
        self.limit_train_batches, self.limit_eval_batches = limit_train_batches, limit_eval_batches
        self.hooks = list(hooks or [])  # run in this order (lmlab.factory.build_hooks: conf/hooks/)
        self._dtype: torch.dtype | None = None

    # ----------------------------------------------------------------------------------------- fit
    def fit(
        self,
        model: LanguageModel,
        data: Any,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | None,
        device: torch.device,
        out_dir: Path,
        logger: Logger,
        checkpoint_meta: dict[str, Any],
        on_started: Callable[[], None] | None = None,
    ) -> FitResult:
        """Train, validating after each epoch; returns the best validation loss and where it is saved.
        ``on_started`` is called once the hooks have started (a ``last.pt`` resumed), before the first step."""
        hooks = self.hooks
        ctx = self._context(model, optimizer, schedule, device, logger)
        ctx.out_dir, ctx.checkpoint_meta = Path(out_dir), checkpoint_meta
        where = distributed.place()
        train = data.stream("train").shard(where.rank, where.world_size).to(device)
        valid = data.stream("valid").to(device)
        tokens_seen, train_seconds = 0, 0.0
        self._call(hooks, "on_fit_start", ctx)
        if on_started is not None:
            on_started()
        self._step = self._make_step(ctx, train)  # after a resume loaded the weights
        ctx.model_changed = False  # what on_fit_start changed is in the step just made
        try:
            logger.start()  # a slow remote logger (W&B) connects before any step is timed
            while ctx.state.epoch <= self.epochs and not ctx.stop_training:
                started = time.perf_counter()
                tokens = self.train_epoch(ctx, train, hooks)
                seconds = time.perf_counter() - started
                tokens_seen, train_seconds = tokens_seen + tokens, train_seconds + seconds
                self._end_epoch(ctx, hooks, valid, tokens, seconds)
                if ctx.interrupt:  # a signal arrived during validation; last.pt was just saved
                    raise TrainingInterrupted(ctx.interrupt, str(ctx.last_saved))
        finally:
            self._call(hooks, "on_fit_end", ctx)
        speed = tokens_seen / train_seconds if train_seconds else 0.0
        return FitResult(
            ctx.state.best_val_loss, len(ctx.state.history), speed, ctx.best_checkpoint, ctx.last_checkpoint
        )

    def train_steps(
        self,
        model: LanguageModel,
        stream: TokenStream,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        steps: int,
        hooks: list[Hook] = (),
    ) -> int:
        """``steps`` training steps outside :meth:`fit` (benchmarks): the same step code, with only the
        given ``hooks`` (e.g. the non-finite policy; no checkpoints or logging). Returns the tokens trained on."""
        ctx = self._context(model, optimizer, None, device, Logger())
        if self._step is None or self._step.model is not model:  # a graphed step is captured once
            self._step = self._make_step(ctx, stream)
        return self.train_epoch(ctx, stream, list(hooks), limit=steps)

    def _context(self, model, optimizer, schedule, device, logger) -> FitContext:
        self._dtype = PRECISIONS[resolve_precision(self.precision, device)]
        scaler = torch.amp.GradScaler(device.type, enabled=self._dtype == torch.float16)
        return FitContext(model, optimizer, schedule, device, logger, scaler)

    def release_step(self) -> None:
        """Drop the step made for the last fit (and with it a DistributedDataParallel wrapper or CUDA graphs)."""
        self._step = None

    @property
    def cuda_graph_status(self) -> str:
        """How the last fit ran its steps: "on" (graphed), why not, or why the graphed step was given up."""
        fallback = getattr(self._step, "fallback_reason", None)
        return self.graph_off_reason or (f"eager after a failed capture ({fallback})" if fallback else "on")

    def _make_step(self, ctx: FitContext, stream: TokenStream) -> EagerStep | GraphedStep | GuardedGraphStep:
        step, self.graph_off_reason = make_step(
            ctx.model,
            ctx.optimizer,
            ctx.schedule,
            ctx.scaler,
            ctx.device,
            clip=self.clip_grad_norm,
            autocast=lambda cache=True: self._autocast(ctx.device, cache),
            compile=self.compile,
            cuda_graph=self.cuda_graph,
            variable_bptt=stream.variable_bptt,
        )
        return step

    # ------------------------------------------------------------------------------------- epochs
    def train_epoch(self, ctx: FitContext, stream: TokenStream, hooks: list[Hook], limit: int | None = None) -> int:
        """One pass over ``stream`` (resuming after ``ctx.state.step``; at most ``limit`` windows, default
        ``limit_train_batches``); returns the tokens trained on."""
        limit = limit or self.limit_train_batches
        model, state = ctx.model, ctx.state
        model.train()
        if state.hidden is not None and not model.state_fits(state.hidden, stream.batch_size):
            raise damaged(ctx.last_saved, "hidden", f"does not fit {stream.batch_size} columns of this model")
        carry = state.hidden if state.hidden is not None else model.init_state(stream.batch_size, ctx.device)
        ctx.loss_sum = torch.tensor(state.loss_sum, device=ctx.device)
        ctx.num_windows = stream.num_windows(limit)
        if state.step > ctx.num_windows:  # a last.pt's own count: more steps than an epoch has
            raise damaged(ctx.last_saved, "step", f"is {state.step}, past the {ctx.num_windows} steps of an epoch")
        self._call(hooks, "on_epoch_start", ctx)
        tokens, world = 0, distributed.place().world_size
        for step, window in enumerate(stream.windows(state.epoch, limit), start=1):
            if step <= state.step:
                continue  # resumed mid-epoch: these steps are already in the checkpoint
            loss, carry, pending = self._step.forward(window.inputs, window.targets, carry)
            if all(hook.before_backward(ctx, loss) for hook in hooks):
                warmup = ctx.schedule.lr_factor(state.global_step) if ctx.schedule is not None else 1.0
                self._step.update(pending, window.lr_scale * warmup)
                if ctx.schedule is not None:
                    ctx.schedule.after_step()
                with torch.no_grad():
                    ctx.loss_sum += loss
            else:  # a skipped batch: its state is not trusted either
                self._step.skipped()
                carry = model.init_state(stream.batch_size, ctx.device)
            state.step, state.global_step = step, state.global_step + 1
            step_tokens = window.inputs.numel() * world  # all ranks' tokens: the run's speed, not one rank's
            tokens += step_tokens
            ctx.carry, ctx.tokens_this_step = carry, step_tokens
            self._call(hooks, "on_step_end", ctx)
            if ctx.model_changed:  # a hook changed what a captured CUDA graph baked in: capture anew
                ctx.model_changed = False
                if self.graph_off_reason is None and getattr(self._step, "fallback_reason", None) is None:
                    self._step = self._make_step(ctx, stream)
            if ctx.interrupt:
                raise TrainingInterrupted(ctx.interrupt, str(ctx.last_saved))
            if ctx.stop_training:
                break
        state.loss_sum = ctx.loss_sum.item()
        return tokens

    def _end_epoch(self, ctx: FitContext, hooks: list[Hook], valid: TokenStream, tokens: int, seconds: float) -> None:
        state = ctx.state
        try:
            with evaluation_weights(hooks, ctx):  # the training weights are back after it, even on a stop
                stop = lambda: ctx.poll_interrupt() is not None  # noqa: E731
                val_loss = self.evaluate(ctx.model, valid, ctx.device, stop=stop, label="validation")
        except EvaluationStopped:
            ctx.interrupt = ctx.poll_interrupt()
            self._call(hooks, "on_interrupt", ctx)
            raise TrainingInterrupted(ctx.interrupt, str(ctx.last_saved)) from None
        with evaluation_weights(hooks, ctx):
            ctx.improved = val_loss < state.best_val_loss
            state.best_val_loss = min(state.best_val_loss, val_loss)
            self._call(hooks, "on_validation_end", ctx, val_loss)
        trained = state.step - state.skipped_batches
        metrics = {
            "epoch": state.epoch,
            "train_loss": state.loss_sum / trained if trained else None,  # never a 0 for work not done
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "lr": ctx.lr,
            "tokens_per_sec": tokens / seconds if seconds else 0.0,
            "elapsed_s": seconds,
        }
        if state.skipped_batches:
            metrics["skipped_batches"] = state.skipped_batches
        if state.dropout_scale is not None:  # hooks.dropout_budget's decision, in the record of every epoch
            metrics["dropout_scale"] = state.dropout_scale
        if ctx.schedule is not None:
            ctx.schedule.after_epoch(val_loss)
        state.history.append(metrics)
        state.start_next_epoch()
        self._call(hooks, "on_epoch_end", ctx, metrics)

    # -------------------------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(
        self,
        model: LanguageModel,
        stream: TokenStream,
        device: torch.device,
        stop: Callable[[], bool] | None = None,
        limit: int | None = None,
        label: str = "evaluation",
    ) -> float:
        """Mean loss per token over ``stream`` (at most ``limit`` windows, default ``limit_eval_batches``).
        Under several processes each evaluates its share of the columns and the sums are added up: the exact figure
        one process would get. ``stop`` is asked before each window (a stop signal: every rank must
        give the same answer); True raises :class:`EvaluationStopped`. A long pass reports its progress as ``label``."""
        if self._dtype is None:
            self._dtype = PRECISIONS[resolve_precision(self.precision, device)]
        where = distributed.place()
        stream = stream.shard(where.rank, where.world_size)
        model.eval()
        state = model.init_state(stream.batch_size, device)
        total = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        count = 0
        limit = limit or self.limit_eval_batches
        windows = reported(stream.windows(limit=limit), stream.num_windows(limit), label, quiet=not where.is_main)
        for window in windows:
            if stop is not None and stop():
                raise EvaluationStopped
            with self._autocast(device):
                features, state = model(window.inputs, state)
                total += model.loss(features, window.targets).to(total.dtype) * window.targets.numel()
            count += window.targets.numel()
        totals = distributed.all_reduce_sum(torch.stack([total, total.new_tensor(count)]))
        return (totals[0] / totals[1]).item()

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype this trainer's precision evaluates in on ``device`` (None: fp32)."""
        return PRECISIONS[resolve_precision(self.precision, device)]

    # ------------------------------------------------------------------------------------ helpers
    def _autocast(self, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
        """Mixed precision, if asked (``cache=False`` inside a CUDA graph capture, as autocast requires)."""
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self._dtype, cache_enabled=cache)

    @staticmethod
    def _call(hooks: list[Hook], event: str, *args: Any) -> None:
        for hook in hooks:
            getattr(hook, event)(*args)
