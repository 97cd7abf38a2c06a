"""Validating with averaged weights instead of the last ones (``hooks.weight_averaging``).

At a high learning rate the weights after any one step are a noisy point around where training is heading;
a mean of recent weights sits nearer the middle and validates better, at the cost of one copy of the
weights and one fused update per step. The training weights themselves never change: the mean is swapped
in for validation (so ``best.pt`` holds it) and swapped out again. Two sources::

    optimizer's own   NT-ASGD (optimizer=nt_asgd) keeps its average in the optimizer state, and starts it
                      when validation stops improving (observe(val_loss))
    start: 0.5        from half the run's horizon on, every step's weights enter a mean kept here:
                      uniform (Polyak averaging), or with ema_steps: N an exponential moving average
                      over about the last N steps

             weights ──●──●──●──●──●──●──●──●──●──●──●──●──●──●──●──●──▶ steps
    horizon  0 ───────────────────── start ────────────────────────── 1  (time budget or trainer.epochs)
    mean                               └─────── every step from here ──┘

The mean is part of the run's progress (``TrainState.weight_average``, saved in ``last.pt``), so a resumed
run continues it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lmlab.config.schema import PositiveFloat, PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.training.hooks.base import FitContext, Hook


class WeightAveraging(Hook):
    """Validate (and keep as ``best.pt``) averaged weights: the optimizer's own if it keeps an average
    (``averaged_weights()`` / ``observe(val_loss)``, as NT-ASGD does), or, with ``start``, a mean of every
    step's weights from that fraction of the run's horizon on — its time budget ``max_time_s`` or its
    ``epochs``, whichever is spent first. ``ema_steps``: an exponential moving average over about that many
    steps instead of a uniform mean (the first ``ema_steps`` steps are a uniform mean)."""

    def __init__(
        self,
        start: Probability | None = None,
        ema_steps: PositiveInt | None = None,
        max_time_s: PositiveFloat | None = None,
        epochs: PositiveInt | None = None,
    ) -> None:
        if ema_steps is not None and start is None:
            raise ConfigError(
                f"hooks.weight_averaging.ema_steps={ema_steps} needs hooks.weight_averaging.start (the fraction of "
                "the run after which weights are averaged, e.g. 0)"
            )
        if start is not None and max_time_s is None and epochs is None:
            raise ConfigError(
                f"hooks.weight_averaging.start={start} has no horizon; set hooks.time_budget.max_time_s or "
                "trainer.epochs"
            )
        self.start, self.ema_steps, self.max_time_s, self.epochs = start, ema_steps, max_time_s, epochs

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.start is not None and hasattr(ctx.optimizer, "averaged_weights"):
            raise ConfigError(
                f"hooks.weight_averaging.start={self.start} would average on top of {type(ctx.optimizer).__name__}'s "
                "own average; use optimizer=sgd with it, or hooks.weight_averaging.start=null"
            )

    def progress(self, ctx: FitContext) -> float:
        """How much of the run's horizon is spent (0 → 1)."""
        state, spent = ctx.state, []
        if self.max_time_s:
            spent.append(state.elapsed_s / self.max_time_s)
        if self.epochs:
            spent.append(ctx.epochs_done / self.epochs)
        return min(1.0, max(spent))

    @torch.no_grad()
    def on_step_end(self, ctx: FitContext) -> None:
        if self.start is None:
            return
        state, named = ctx.state, dict(ctx.model.named_parameters())
        if state.weight_average is None:
            if self.progress(ctx) >= self.start:
                state.weight_average = {name: p.detach().clone() for name, p in named.items()}
                state.averaged_steps = 1
            return
        state.averaged_steps += 1
        weight = 1.0 / state.averaged_steps
        if self.ema_steps is not None:
            weight = max(weight, 1.0 / self.ema_steps)
        means = list(state.weight_average.values())
        torch._foreach_lerp_(means, [named[name].detach() for name in state.weight_average], weight)

    def evaluation_weights(self, ctx: FitContext) -> contextlib.AbstractContextManager:
        own = getattr(ctx.optimizer, "averaged_weights", None)
        if own is not None:
            return own()
        if ctx.state.weight_average is None:
            return contextlib.nullcontext()
        return _swapped_in(ctx.model, ctx.state.weight_average)

    def on_validation_end(self, ctx: FitContext, val_loss: float) -> None:
        observe = getattr(ctx.optimizer, "observe", None)
        if observe and observe(val_loss):
            print(f"NT-ASGD: validation stopped improving; averaging weights from epoch {ctx.state.epoch + 1}")


@contextlib.contextmanager
def _swapped_in(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    named = dict(model.named_parameters())
    pairs = [(named[name], mean) for name, mean in weights.items()]
    swap(pairs)
    try:
        yield
    finally:
        swap(pairs)


@torch.no_grad()
def swap(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exchange each parameter's values with its mean's, one tensor at a time (one tensor of scratch memory,
    not a copy of the model)."""
    for param, mean in pairs:
        scratch = param.detach().clone()
        param.copy_(mean)
        mean.copy_(scratch)
