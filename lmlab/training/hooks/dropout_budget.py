"""Dropout sized to the epochs a run will actually get (``hooks.dropout_budget``).

A recipe's dropout is tuned for a number of epochs: the regularisation that pays over thirteen epochs of
a small corpus, where the model would otherwise over-fit, costs more than it saves over six epochs of a
bigger one, where it never gets the chance (experiments/cpu_fast.md). Under a time budget that number
depends on the corpus, the model and the machine, and is known only once training runs. So this hook
times the first steps, estimates the epochs the budget buys, and scales every dropout rate of the model
(:meth:`lmlab.models.LanguageModel.scale_dropout`) by::

    scale = clamp((expected_epochs - none_at_epochs) / (full_at_epochs - none_at_epochs), min_scale, 1)

    scale
    1 │                 ┌──────     full_at_epochs or more epochs: the configured dropout
      │               ╱
      │             ╱               in between: a straight line
 min  │───────────╯                 never below min_scale of it (0: none at none_at_epochs or fewer)
      └─────┴─────────┴──────── expected epochs
      none_at_epochs   full_at_epochs

The scale is decided once, ``measure_steps`` steps after the run's first step (which carries start-up
costs), from the time budget's clock — the slowest rank's, the same on every rank — and kept in the
run's progress (``TrainState.dropout_scale``, saved in ``last.pt``): a resumed run keeps it instead of
re-measuring on a machine that may be faster or slower. The estimate counts training steps, not
validation, so it errs by validation's share of an epoch towards more epochs (more dropout). Without a
time budget the horizon is ``trainer.epochs``, known before the first step.
"""

from __future__ import annotations

from lmlab.config.schema import NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.runtime import distributed
from lmlab.training.hooks.base import FitContext, Hook


class DropoutForBudget(Hook):
    """Scale the model's dropout by the epochs the run will get (see the module docstring)."""

    def __init__(
        self,
        full_at_epochs: PositiveFloat | None = None,
        none_at_epochs: NonNegativeFloat = 0.0,
        min_scale: Probability = 0.0,
        measure_steps: PositiveInt = 50,
        max_time_s: PositiveFloat | None = None,
        epochs: PositiveInt | None = None,
    ) -> None:
        if full_at_epochs is not None and max_time_s is None and epochs is None:
            raise ConfigError(
                f"hooks.dropout_budget.full_at_epochs={full_at_epochs} needs a horizon; set "
                "hooks.time_budget.max_time_s or trainer.epochs"
            )
        if full_at_epochs is not None and none_at_epochs >= full_at_epochs:
            raise ConfigError(
                f"hooks.dropout_budget.none_at_epochs={none_at_epochs} must be below full_at_epochs={full_at_epochs}"
            )
        self.full_at_epochs, self.none_at_epochs = full_at_epochs, none_at_epochs
        self.min_scale, self.measure_steps = min_scale, measure_steps
        self.max_time_s, self.epochs = max_time_s, epochs
        self._mark: tuple[int, float] | None = None  # (global_step, elapsed_s) where this process's timing starts

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.full_at_epochs is None:
            return
        if ctx.model.scale_dropout(1.0) == 0:
            raise ConfigError(
                f"hooks.dropout_budget: model {type(ctx.model).__name__} declares no dropout rates "
                "(LanguageModel.dropout_rates); set hooks.dropout_budget.full_at_epochs=null"
            )
        state = ctx.state  # restored from last.pt by now (the checkpoint hook runs first)
        if state.dropout_scale is None and self.max_time_s is None:
            state.dropout_scale = self.scale(float(self.epochs))
        if state.dropout_scale is not None:
            self._apply(ctx, state.dropout_scale)

    def on_step_end(self, ctx: FitContext) -> None:
        state = ctx.state
        if self.full_at_epochs is None or state.dropout_scale is not None:
            return
        if self._mark is None:
            self._mark = (state.global_step, state.elapsed_s)
            return
        steps = state.global_step - self._mark[0]
        if steps < self.measure_steps:
            return
        seconds_per_epoch = (state.elapsed_s - self._mark[1]) / steps * max(ctx.num_windows, 1)
        expected = ctx.epochs_done + max(self.max_time_s - state.elapsed_s, 0.0) / max(seconds_per_epoch, 1e-9)
        if self.epochs is not None:
            expected = min(expected, float(self.epochs))
        state.dropout_scale = self.scale(expected)
        self._apply(ctx, state.dropout_scale)
        if distributed.place().is_main:
            print(
                f"dropout_budget: ~{expected:.1f} epochs in the budget (all dropout at {self.full_at_epochs:g}, "
                f"none at {self.none_at_epochs:g}): "
                f"dropout × {state.dropout_scale:.2f}"
            )

    def scale(self, expected_epochs: float) -> float:
        """The factor on the configured dropout for a run of ``expected_epochs`` epochs."""
        ramp = (expected_epochs - self.none_at_epochs) / (self.full_at_epochs - self.none_at_epochs)
        return min(1.0, max(self.min_scale, ramp))

    @staticmethod
    def _apply(ctx: FitContext, scale: float) -> None:
        ctx.model.scale_dropout(scale)
        ctx.model_changed = True  # a captured CUDA graph baked the old rates in
