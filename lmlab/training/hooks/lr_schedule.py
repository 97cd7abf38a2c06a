"""A learning rate that follows the run's horizon — its steps, epochs or time budget — whatever the corpus size.

:class:`WarmupDecay` is a hook (``hooks.lr_schedule``), not a torch scheduler, because its horizon may be
wall-clock time: it reads the time budget's clock (``state.elapsed_s``, kept by
:class:`~lmlab.training.hooks.time_budget.TimeBudget`, saved in checkpoints, the same on every rank) and the step
and epoch counts, which only the loop knows. Its LR is a pure function of those, all saved in checkpoints,
so a resumed run picks up the curve where it left it. The shape over the horizon (``progress`` 0 → 1)::

    lr
    │   ╭──────────╮                 warmup_steps: linear ramp from lr / warmup_steps
    │  ╱            ╲                decay_start:  fraction of the horizon held at lr (0: decay at once)
    │ ╱              ╲___            decay:        cosine | linear, down to final_lr_ratio × lr
    └─────────────────────── progress
      warm-up  hold   decay

Set ``scheduler=null`` with it (``scheduler`` steps on validation loss; two schedules would fight):
the recipes in ``conf/experiment/`` do. On a GPU it keeps the optimizer out of a CUDA graph (the LR moves
at every step), see :mod:`lmlab.training.cuda_graph`.
"""

from __future__ import annotations

import math
from typing import Literal

from lmlab.config.schema import NonNegativeInt, PositiveFloat, PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.training.hooks.base import FitContext, Hook

DECAYS = {
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "linear": lambda q: 1.0 - q,
}


class WarmupDecay(Hook):
    """Warm up, hold, then decay the LR of every parameter group to ``final_lr_ratio`` of its configured
    value by the end of the horizon: ``total_steps`` optimizer steps, ``epochs`` passes over the training
    split or ``max_time_s`` seconds of training, whichever comes first (the recipes tie the last to
    ``hooks.time_budget.max_time_s``, and ``cpu_transformer`` the epochs to ``trainer.epochs``: on a
    faster machine it ends after the epochs it was tuned for, its LR at 0, instead of over-fitting)."""

    def __init__(
        self,
        warmup_steps: NonNegativeInt = 0,
        decay: Literal["cosine", "linear"] = "cosine",
        decay_start: Probability = 0.0,
        final_lr_ratio: Probability = 0.0,
        total_steps: PositiveInt | None = None,
        max_time_s: PositiveFloat | None = None,
        epochs: PositiveInt | None = None,
    ) -> None:
        if total_steps is None and max_time_s is None and epochs is None:
            raise ConfigError(
                "hooks.lr_schedule has no horizon; set hooks.time_budget.max_time_s (a time budget), "
                "hooks.lr_schedule.total_steps or hooks.lr_schedule.epochs"
            )
        if decay not in DECAYS:
            raise ConfigError(f"hooks.lr_schedule.decay={decay!r} is unknown; choose one of {sorted(DECAYS)}")
        self.warmup_steps, self.decay, self.decay_start = warmup_steps, decay, decay_start
        self.final_lr_ratio, self.total_steps, self.max_time_s = final_lr_ratio, total_steps, max_time_s
        self.epochs = epochs

    def progress(self, global_step: int, elapsed_s: float, epochs_done: float = 0.0) -> float:
        """How much of the horizon is spent (0 → 1)."""
        spent = [global_step / self.total_steps] if self.total_steps else []
        spent += [elapsed_s / self.max_time_s] if self.max_time_s else []
        spent += [epochs_done / self.epochs] if self.epochs else []
        return min(1.0, max(spent))

    def factor(self, global_step: int, elapsed_s: float, epochs_done: float = 0.0) -> float:
        """The LR of the next step, as a fraction of the configured LR."""
        if global_step < self.warmup_steps:
            return (global_step + 1) / self.warmup_steps
        past_hold = (self.progress(global_step, elapsed_s, epochs_done) - self.decay_start) / (1.0 - self.decay_start)
        shape = DECAYS[self.decay](min(1.0, max(0.0, past_hold)))
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * shape

    def on_epoch_start(self, ctx: FitContext) -> None:
        self._set(ctx)  # also the first step of a fresh or resumed run

    def on_step_end(self, ctx: FitContext) -> None:
        self._set(ctx)

    def _set(self, ctx: FitContext) -> None:
        factor = self.factor(ctx.state.global_step, ctx.state.elapsed_s, ctx.epochs_done)
        for group in ctx.optimizer.param_groups:  # a resumed optimizer brings its saved initial_lr back
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
