"""Hooks alone, each with a FitContext of its own (no training loop)."""

import time

import pytest
import torch

from lmlab.errors import ConfigError, NonFiniteLoss
from lmlab.models import build_model
from lmlab.training.hooks import FitContext
from lmlab.training.hooks.non_finite import NonFinitePolicy
from lmlab.training.hooks.time_budget import TimeBudget
from lmlab.training.hooks.weight_averaging import WeightAveraging
from lmlab.training.optim import NTASGD


def fit_context(lr: float = 1.0) -> FitContext:
    """A FitContext of a tiny model and SGD, for one hook at a time (test_schedules uses it too)."""
    model = build_model("rnn", 10, embed_dim=4, hidden_dim=4, num_layers=1, dropout=0.0)
    ctx = FitContext(model, torch.optim.SGD(model.parameters(), lr=lr), None, torch.device("cpu"))
    ctx.loss_sum, ctx.num_windows = torch.tensor(0.0), 20
    return ctx


def test_the_time_budget_ends_training_after_the_step_that_crosses_it():
    ctx, budget = fit_context(), TimeBudget(max_time_s=0.05)
    budget.on_fit_start(ctx)
    budget.on_step_end(ctx)
    assert not ctx.stop_training
    time.sleep(0.06)
    budget.on_step_end(ctx)
    assert ctx.stop_training
    unlimited, ctx = TimeBudget(), fit_context()
    unlimited.on_fit_start(ctx)
    unlimited.on_step_end(ctx)
    assert not ctx.stop_training


def test_skip_batch_drops_diverged_batches_until_too_many():
    ctx, policy = fit_context(), NonFinitePolicy(on_nan="skip_batch", max_skipped_fraction=0.1)
    assert policy.before_backward(ctx, torch.tensor(2.0))
    assert not policy.before_backward(ctx, torch.tensor(float("nan")))
    assert not policy.before_backward(ctx, torch.tensor(float("inf")))
    assert ctx.state.skipped_batches == 2
    with pytest.raises(NonFiniteLoss, match="skipped 3 of 20 batches .*hooks.non_finite.max_skipped_fraction=0.1"):
        policy.before_backward(ctx, torch.tensor(1e9))  # exploded: as bad as non-finite


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path):
    ctx, policy = fit_context(), NonFinitePolicy(on_nan="stop")
    ctx.state.step, ctx.last_saved = 6, tmp_path / "last.pt"
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 7\. The last good checkpoint is .*last.pt; resume"):
        policy.before_backward(ctx, torch.tensor(float("nan")))


def _step_to(ctx: FitContext, value: float, step: int) -> None:
    """Pretend an optimizer step left every weight at ``value`` (step ``step`` of a 20-window epoch)."""
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.fill_(value)
    ctx.state.step = ctx.state.global_step = step


def test_weight_averaging_validates_the_mean_of_the_weights_from_its_start_on():
    ctx, averaging = fit_context(), WeightAveraging(start=0.5, epochs=1)  # from window 10 of 20
    averaging.on_fit_start(ctx)
    for step in range(1, 21):
        _step_to(ctx, float(step), step)
        averaging.on_step_end(ctx)
    assert ctx.state.averaged_steps == 11  # steps 10..20
    weight = next(ctx.model.parameters())
    with averaging.evaluation_weights(ctx):
        assert torch.allclose(weight, torch.full_like(weight, 15.0))  # mean of 10..20
    assert torch.equal(weight, torch.full_like(weight, 20.0))  # the training weights are back


def test_weight_averaging_with_ema_steps_follows_the_recent_weights():
    ctx, averaging = fit_context(), WeightAveraging(start=0.0, ema_steps=2, epochs=1)
    for step, value in enumerate([0.0, 4.0, 8.0], start=1):
        _step_to(ctx, value, step)
        averaging.on_step_end(ctx)
    # 0; then the uniform mean of the first two (2.0); then half way to 8 (ema over 2 steps): 5.0
    assert torch.allclose(ctx.state.weight_average["embedding.weight"], torch.full((10, 4), 5.0))


def test_weight_averaging_without_start_changes_nothing_and_bad_settings_are_one_line():
    ctx, averaging = fit_context(), WeightAveraging(epochs=1)
    _step_to(ctx, 3.0, 1)
    averaging.on_step_end(ctx)
    assert ctx.state.weight_average is None
    with pytest.raises(ConfigError, match="ema_steps=5 needs hooks.weight_averaging.start"):
        WeightAveraging(ema_steps=5, epochs=1)
    model = build_model("rnn", 10, embed_dim=4, hidden_dim=4, num_layers=1, dropout=0.0)
    nt_asgd = FitContext(model, NTASGD(model.parameters(), lr=1.0), None, torch.device("cpu"))
    with pytest.raises(ConfigError, match="on top of NTASGD's own average; use optimizer=sgd"):
        WeightAveraging(start=0.5, epochs=1).on_fit_start(nt_asgd)
