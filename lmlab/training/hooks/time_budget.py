"""``hooks.time_budget``: end training after the step that crosses ``max_time_s``."""

from __future__ import annotations

import time

from lmlab.config.schema import PositiveFloat
from lmlab.runtime import distributed
from lmlab.training.hooks.base import FitContext, Hook


class TimeBudget(Hook):
    """End training after the step that crosses ``max_time_s``; that epoch is validated as usual.

    Its clock is ``state.elapsed_s``, kept whether or not a budget is set and saved in checkpoints (a
    resumed run spends only what is left). With a budget it is the slowest rank's on every rank, so a
    schedule over the budget (:class:`~lmlab.training.hooks.lr_schedule.WarmupDecay`) sets the same LR
    everywhere."""

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
