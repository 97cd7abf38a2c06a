"""hooks.dropout_budget: the model's dropout scaled by the epochs the run will get (no training loop)."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import LanguageModel, build_model
from lmlab.training.hooks import FitContext
from lmlab.training.hooks.dropout_budget import DropoutForBudget

AWD = dict(dropout=0.4, dropout_input=0.4, dropout_hidden=0.2, dropout_embedding=0.1, weight_drop=0.2)


def fit_context(model: LanguageModel | None = None) -> FitContext:
    model = model or build_model("rnn", 10, embed_dim=4, hidden_dim=4, num_layers=2, **AWD)
    ctx = FitContext(model, torch.optim.SGD(model.parameters(), lr=1.0), None, torch.device("cpu"))
    ctx.num_windows = 20
    return ctx


def rates(model: LanguageModel) -> dict[str, float]:
    return {name: getattr(model, name) for name in type(model).dropout_rates}


def run_steps(ctx: FitContext, hook: DropoutForBudget, steps: int, seconds_per_step: float) -> None:
    """Steps of an epoch of 20 windows, each taking ``seconds_per_step`` on the budget's clock."""
    for _ in range(steps):
        ctx.state.global_step += 1
        ctx.state.step += 1
        ctx.state.elapsed_s += seconds_per_step
        hook.on_step_end(ctx)


def test_the_dropout_is_scaled_by_the_epochs_the_budget_buys():
    ctx, hook = fit_context(), DropoutForBudget(full_at_epochs=12, measure_steps=5, max_time_s=100.0)
    hook.on_fit_start(ctx)
    run_steps(ctx, hook, 5, seconds_per_step=1.0)  # the first step starts the clock: 4 of 5 timed so far
    assert ctx.state.dropout_scale is None and rates(ctx.model) == AWD
    run_steps(ctx, hook, 1, seconds_per_step=1.0)  # 20 s an epoch, 100 s: 5 epochs of the 12 that get it all
    assert ctx.state.dropout_scale == pytest.approx(5 / 12)
    assert rates(ctx.model) == pytest.approx({k: v * 5 / 12 for k, v in AWD.items()})
    assert ctx.model_changed  # a captured CUDA graph must be captured anew
    run_steps(ctx, hook, 20, seconds_per_step=0.1)  # decided once: a later speed-up changes nothing
    assert ctx.state.dropout_scale == pytest.approx(5 / 12)


@pytest.mark.parametrize("seconds_per_step, scale", [(0.01, 1.0), (100.0, 0.25)])
def test_the_scale_never_passes_the_configured_dropout_nor_falls_below_min_scale(seconds_per_step, scale):
    ctx, hook = fit_context(), DropoutForBudget(full_at_epochs=12, min_scale=0.25, measure_steps=2, max_time_s=900.0)
    hook.on_fit_start(ctx)
    run_steps(ctx, hook, 3, seconds_per_step)
    assert ctx.state.dropout_scale == scale
    assert rates(ctx.model) == pytest.approx({k: v * scale for k, v in AWD.items()})


def test_a_resumed_run_keeps_its_scale_from_the_first_step_and_epochs_alone_decide_at_once():
    ctx, hook = fit_context(), DropoutForBudget(full_at_epochs=12, measure_steps=2, max_time_s=900.0)
    ctx.state.dropout_scale = 0.5  # as restored from last.pt
    hook.on_fit_start(ctx)
    assert rates(ctx.model) == pytest.approx({k: v / 2 for k, v in AWD.items()})
    run_steps(ctx, hook, 5, seconds_per_step=0.001)  # a faster machine: no re-measuring
    assert ctx.state.dropout_scale == 0.5
    ctx = fit_context()
    DropoutForBudget(full_at_epochs=12, epochs=3).on_fit_start(ctx)  # no time budget: trainer.epochs is the horizon
    assert ctx.state.dropout_scale == 0.25 and ctx.model.dropout == pytest.approx(0.1)
    ctx = fit_context()
    DropoutForBudget(full_at_epochs=12, none_at_epochs=4, epochs=6).on_fit_start(ctx)  # a quarter of 4 → 12
    assert ctx.state.dropout_scale == 0.25
    ctx = fit_context()
    DropoutForBudget(full_at_epochs=12, none_at_epochs=4, epochs=3).on_fit_start(ctx)
    assert ctx.state.dropout_scale == 0.0 and rates(ctx.model) == {k: 0.0 for k in AWD}


def test_off_changes_nothing_and_bad_settings_are_one_line():
    ctx, hook = fit_context(), DropoutForBudget(max_time_s=100.0)
    hook.on_fit_start(ctx)
    run_steps(ctx, hook, 100, seconds_per_step=1.0)
    assert ctx.state.dropout_scale is None and rates(ctx.model) == AWD
    with pytest.raises(ConfigError, match="full_at_epochs=12 needs a horizon; set hooks.time_budget.max_time_s"):
        DropoutForBudget(full_at_epochs=12)
    with pytest.raises(ConfigError, match="none_at_epochs=12 must be below full_at_epochs=12"):
        DropoutForBudget(full_at_epochs=12, none_at_epochs=12, epochs=3)

    class NoDropout(LanguageModel):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size, self.weight = 10, torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ConfigError, match="model NoDropout declares no dropout rates"):
        DropoutForBudget(full_at_epochs=12, epochs=3).on_fit_start(fit_context(NoDropout()))


def test_a_transformer_scales_the_rates_of_its_blocks_too():
    model = build_model("transformer", 10, d_model=8, num_heads=2, num_layers=2, ff_dim=16, context=8, dropout=0.2,
                        dropout_attention=0.1, dropout_embedding=0.1)  # fmt: skip
    assert model.scale_dropout(0.5) == 2 + 2 * 2
    assert model.dropout_input == pytest.approx(0.1) and model.dropout_embedding == pytest.approx(0.05)
    assert all(
        b.dropout_attention == pytest.approx(0.05) and b.dropout_residual == pytest.approx(0.1) for b in model.blocks
    )
    model.scale_dropout(1.0)  # from the rates it was built with, not compounded
    assert model.dropout_input == pytest.approx(0.2)
