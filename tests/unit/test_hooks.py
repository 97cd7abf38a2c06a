"""Hooks alone, each with a FitContext of its own (no training loop)."""

import time

import pytest
import torch

from lmlab.errors import NonFiniteLoss
from lmlab.models import build_model
from lmlab.training.hooks import FitContext
from lmlab.training.safeguards import NonFinitePolicy, TimeBudget


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
