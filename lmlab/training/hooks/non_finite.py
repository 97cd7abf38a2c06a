"""``hooks.non_finite``: a diverged (non-finite or exploding) loss is never stepped on."""

from __future__ import annotations

from typing import Literal

import torch

from lmlab.config.schema import PositiveInt, Probability
from lmlab.errors import NonFiniteLoss
from lmlab.runtime.dispatch import reads_are_free
from lmlab.training.hooks.base import FitContext, Hook, good_checkpoint


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
