"""A search-only hook (#21): validate with the running mean of the weights over the last part of a time budget.

Polyak/SWA-style iterate averaging, measured here before it is built into lmlab: from ``start`` (a fraction of
``max_time_s``) every step adds the weights to a uniform running mean, and validation (so best.pt) uses the mean.
Not saved in checkpoints: a resumed run restarts its mean (search runs are not resumed).

    PYTHONPATH=experiments/search python -m lmlab.run +experiment=cpu_fast \
      +hooks.tail_average._target_=tail_average.TailAverage +hooks.tail_average.start=0.75 \
      +hooks.tail_average.max_time_s=900
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lmlab.training.hooks import FitContext, Hook


class TailAverage(Hook):
    def __init__(self, start: float, max_time_s: float, ema_steps: int | None = None) -> None:
        # ema_steps: an exponential moving average over about that many steps instead of a uniform mean
        self.start, self.max_time_s, self.ema_steps = start, max_time_s, ema_steps
        self.mean: list[torch.Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def on_step_end(self, ctx: FitContext) -> None:
        if ctx.state.elapsed_s < self.start * self.max_time_s:
            return
        params = [p.detach() for p in ctx.model.parameters()]
        if self.mean is None:
            self.mean = [p.clone() for p in params]
            print(f"tail average: from step {ctx.state.global_step} (epoch {ctx.state.epoch})", flush=True)
        self.count += 1
        if self.count > 1:
            weight = 1.0 / self.count if self.ema_steps is None else max(1.0 / self.count, 1.0 / self.ema_steps)
            torch._foreach_lerp_(self.mean, params, weight)

    @contextlib.contextmanager
    def _swapped(self, ctx: FitContext) -> Iterator[None]:
        params = [p.detach() for p in ctx.model.parameters()]
        live = [p.clone() for p in params]
        torch._foreach_copy_(params, self.mean)
        try:
            yield
        finally:
            torch._foreach_copy_(params, live)

    def evaluation_weights(self, ctx: FitContext) -> contextlib.AbstractContextManager:
        return self._swapped(ctx) if self.mean is not None else contextlib.nullcontext()
