"""Hooks that guard a run: stop signals, the time budget, and diverged (non-finite or exploding) losses."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch

from lmlab.config.schema import PositiveFloat, PositiveInt, Probability
from lmlab.errors import NonFiniteLoss
from lmlab.metrics import no_better_than_uniform, uniform_guess_warning
from lmlab.runtime import distributed
from lmlab.runtime.dispatch import reads_are_free
from lmlab.runtime.signals import StopSignals
from lmlab.training.hooks import FitContext, Hook


class StopOnSignal(Hook):
    """SIGINT/SIGTERM finish the current step; the checkpoint hook then saves and the loop stops. Under
    several processes a signal that reached any rank stops every rank after the same step."""

    def on_fit_start(self, ctx: FitContext) -> None:
        self.signals = StopSignals().__enter__()
        ctx.poll_interrupt = self._agreed  # validation stops at its next window too

    def on_step_end(self, ctx: FitContext) -> None:
        ctx.interrupt = self._agreed()

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        ctx.interrupt = self._agreed()  # one after validation's last window: last.pt is saved next, then stop

    def _agreed(self) -> int | None:
        return int(distributed.agree_max(self.signals.received or 0)) or None

    def on_fit_end(self, ctx: FitContext) -> None:
        self.signals.__exit__()


class TimeBudget(Hook):
    """End training after the step that crosses ``max_time_s``; that epoch is validated as usual.

    Its clock is ``state.elapsed_s``, kept whether or not a budget is set and saved in checkpoints (a
    resumed run spends only what is left). With a budget it is the slowest rank's on every rank, so a
    schedule over the budget (:class:`lmlab.training.schedules.WarmupDecay`) sets the same LR everywhere."""

    def __init__(self, max_time_s: PositiveFloat | None = None) -> None:
        self.max_time_s = max_time_s

    def on_fit_start(self, ctx: FitContext) -> None:
        self.started, self.spent_before = time.perf_counter(), None

    def on_step_end(self, ctx: FitContext) -> None:
        if self.spent_before is None:  # read at the first step: a resumed state is restored after on_fit_start
            self.spent_before = ctx.state.elapsed_s
        elapsed = self.spent_before + time.perf_counter() - self.started
        if self.max_time_s is None:  # no budget: each rank's own clock (no collective per step)
            ctx.state.elapsed_s = elapsed
            return
        ctx.state.elapsed_s = distributed.agree_max(elapsed)  # the one all-reduce per step a budget always took
        ctx.stop_training = ctx.stop_training or ctx.state.elapsed_s > self.max_time_s


class NonFinitePolicy(Hook):
    """A batch whose loss diverged (:meth:`FitContext.diverged`: not finite, or exploded) is never
    stepped on. ``stop``: raise :class:`NonFiniteLoss`; ``skip_batch``: drop the batch and restart the
    state, and raise once more than ``max_skipped_fraction`` of an epoch's batches were dropped.

    On the CPU (reading a value is free) and for ``skip_batch`` every loss is checked; on a GPU the
    running loss is checked every ``check_every`` steps, so the step never waits for the device
    (:func:`lmlab.runtime.dispatch.reads_are_free`)."""

    def __init__(
        self,
        on_nan: Literal["stop", "skip_batch"] = "stop",
        max_skipped_fraction: Probability = 0.1,
        check_every: PositiveInt = 200,
    ) -> None:
        self.on_nan = on_nan
        self.check_every = check_every
        self.max_skipped_fraction = max_skipped_fraction

    def before_backward(self, ctx: FitContext, loss: torch.Tensor) -> bool:
        if not (self.on_nan == "skip_batch" or reads_are_free(ctx.device)) or not ctx.diverged(loss.item()):
            return True
        if self.on_nan == "skip_batch":
            ctx.state.skipped_batches += 1
            if ctx.state.skipped_batches > self.max_skipped_fraction * ctx.num_windows:
                raise NonFiniteLoss(
                    f"skipped {ctx.state.skipped_batches} of {ctx.num_windows} batches of epoch {ctx.state.epoch} "
                    "for diverged (non-finite or exploding) losses, more than "
                    f"hooks.non_finite.max_skipped_fraction={self.max_skipped_fraction}: training has diverged. "
                    f"{good_checkpoint(ctx)} Try a lower optimizer.lr or trainer.clip_grad_norm"
                )
            return False
        self._raise(ctx, ctx.state.step + 1)

    def on_step_end(self, ctx: FitContext) -> None:
        step = ctx.state.step
        if not reads_are_free(ctx.device) and (step % self.check_every == 0 or step == ctx.num_windows):
            if ctx.diverged(ctx.running_loss()):
                self._raise(ctx, step, window=self.check_every)

    def _raise(self, ctx: FitContext, step: int, window: int = 1) -> None:
        where = f"step {step}" if window == 1 else f"the {window} steps up to step {step}"
        raise NonFiniteLoss(
            f"training diverged (non-finite or exploding loss) in epoch {ctx.state.epoch}, {where}. "
            f"{good_checkpoint(ctx)} Try a lower "
            "optimizer.lr (resume applies it), a smaller trainer.clip_grad_norm, trainer.precision=fp32, "
            "or hooks.non_finite.on_nan=skip_batch"
        )


class LearningCheck(Hook):
    """After ``after_epochs`` epochs, a validation loss no better than a uniform guess over the vocabulary
    (:func:`~lmlab.metrics.no_better_than_uniform`) is said in one line, on the console and in
    that epoch's record (``warning``), while the run goes on: the user can stop it and fix the learning
    rate instead of waiting for a figure that means nothing. The final verdict is ``results.json``'s
    ``learned``."""

    def __init__(self, after_epochs: PositiveInt = 1) -> None:
        self.after_epochs = after_epochs

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        if metrics["epoch"] == self.after_epochs and no_better_than_uniform(metrics["val_loss"], ctx.model.vocab_size):
            epochs = "epoch" if self.after_epochs == 1 else "epochs"
            when = f"after {self.after_epochs} {epochs}"
            metrics["warning"] = uniform_guess_warning(metrics["val_loss"], ctx.model.vocab_size, when, ctx.lr)


def good_checkpoint(ctx: FitContext) -> str:
    """Checkpoints are only written from finite weights after losses that did not diverge."""
    if ctx.last_saved is None:
        return "No checkpoint was written yet."
    return (
        f"The last good checkpoint is {ctx.last_saved}; resume from it with hooks.checkpoint.resume={ctx.last_saved}."
    )
