"""The LR over a run's horizon (hooks.lr_schedule) and the time budget's clock it reads."""

import math
import time

import pytest

from lmlab.errors import ConfigError
from lmlab.training.hooks.lr_schedule import WarmupDecay
from lmlab.training.hooks.time_budget import TimeBudget
from lmlab.validation import validate_config
from tests.unit.test_hooks import fit_context


def test_warm_up_then_cosine_to_the_end_of_the_step_horizon():
    schedule = WarmupDecay(warmup_steps=4, total_steps=104, final_lr_ratio=0.1)
    assert [schedule.factor(s, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.factor(52, 0.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.factor(104, 0.0) == pytest.approx(0.1)
    assert schedule.factor(10_000, 0.0) == pytest.approx(0.1)  # past the horizon: the floor


def test_hold_then_linear_decay_over_the_time_budget():
    schedule = WarmupDecay(decay="linear", decay_start=0.5, max_time_s=100.0)
    assert schedule.factor(1000, 40.0) == 1.0  # still in the hold
    assert schedule.factor(1000, 75.0) == pytest.approx(0.5)
    assert schedule.factor(1000, 100.0) == pytest.approx(0.0)


def test_the_first_horizon_reached_counts():
    schedule = WarmupDecay(total_steps=100, max_time_s=100.0)
    assert schedule.progress(50, 90.0) == pytest.approx(0.9)
    assert schedule.progress(90, 50.0) == pytest.approx(0.9)


def test_an_epoch_horizon_ends_the_decay_on_a_machine_faster_than_the_budget():
    schedule = WarmupDecay(decay="linear", decay_start=0.5, max_time_s=900.0, epochs=6)
    assert schedule.progress(10, 300.0, epochs_done=4.5) == pytest.approx(0.75)  # the epochs come first
    assert schedule.factor(10, 300.0, epochs_done=4.5) == pytest.approx(0.5)
    assert schedule.factor(10, 300.0, epochs_done=6.0) == pytest.approx(0.0)
    assert schedule.progress(10, 810.0, epochs_done=1.5) == pytest.approx(0.9)  # here the time does
    ctx = fit_context(lr=2.0)
    ctx.state.epoch, ctx.state.step, ctx.num_windows = 5, 50, 100  # 4.5 epochs done
    schedule.on_step_end(ctx)
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


def test_a_schedule_without_a_horizon_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="hooks.time_budget.max_time_s"):
        WarmupDecay()


def test_the_hook_sets_every_group_from_its_configured_lr_and_keeps_it_across_resume():
    ctx, schedule = fit_context(lr=2.0), WarmupDecay(total_steps=10)
    ctx.state.global_step = 5
    schedule.on_step_end(ctx)
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    saved = ctx.optimizer.state_dict()  # a resumed run: the optimizer comes back with lr 1.0 and initial_lr 2.0
    resumed = fit_context(lr=2.0)
    resumed.optimizer.load_state_dict(saved)
    resumed.state.global_step = 5
    schedule.on_epoch_start(resumed)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


def test_the_time_budget_clock_continues_a_resumed_runs_time():
    ctx, budget = fit_context(), TimeBudget(max_time_s=100.0)
    budget.on_fit_start(ctx)
    ctx.state.elapsed_s = 99.99  # restored from last.pt after on_fit_start
    budget.on_step_end(ctx)
    assert ctx.state.elapsed_s >= 99.99
    time.sleep(0.02)
    budget.on_step_end(ctx)
    assert ctx.stop_training  # only what was left of the budget
    fresh = fit_context()
    budget = TimeBudget()  # no budget: the clock still runs (a schedule may read it)
    budget.on_fit_start(fresh)
    budget.on_step_end(fresh)
    assert 0 < fresh.state.elapsed_s < 5 and not fresh.stop_training


def test_a_plateau_scheduler_beside_the_lr_schedule_is_refused_in_one_line(compose_cfg):
    cfg = compose_cfg(["hooks=warmup_decay", "hooks.time_budget.max_time_s=60"])
    with pytest.raises(ConfigError, match="scheduler=null"):
        validate_config(cfg, "run")
    validate_config(compose_cfg(["hooks=warmup_decay", "hooks.time_budget.max_time_s=60", "scheduler=null"]), "run")


def test_a_schedules_warm_up_ramps_the_lr_over_its_first_steps():
    from lmlab.training.optim import Schedule

    assert [Schedule(None, "val", warmup_steps=4).lr_factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert Schedule(None, "val").lr_factor(0) == 1.0
