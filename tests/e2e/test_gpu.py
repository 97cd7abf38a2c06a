"""GPU checks (``pytest -m gpu``; skipped without CUDA): the captured step gives the eager step's losses,
resumes exactly, and reads nothing back between log lines. ``experiments/gpu_check.py`` runs these
first whenever a GPU is at hand."""

import json
import os
import signal

import pytest
import torch

from lmlab.job import train_and_report
from lmlab.runtime.dispatch import count_dispatch
from lmlab.training.cuda_graph import GraphedStep
from lmlab.training.hooks import Hook
from tests.conftest import TINY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU = [o for o in TINY if not o.startswith("device")] + ["device=cuda"]
TIMING = {"train_tokens_per_sec", "wall_s", "peak_rss_mb", "peak_gpu_mb", "torch_threads", "elapsed_s",
          "tokens_per_sec"}  # fmt: skip


# An LR that moves every step (the optimizer then runs eagerly between graphed forwards).
LR_SCHEDULE = [
    "hooks=warmup_decay",
    "scheduler=null",
    "hooks.lr_schedule.total_steps=50",
    "hooks.lr_schedule.warmup_steps=5",
]


def _losses(compose_cfg, corpus_dir, tmp_path, graph: str, extra: list[str]) -> list[float]:
    """Per-step training losses of 50 steps (dropout off: the two runs draw nothing random)."""
    from lmlab.factory import build_training_objects

    cfg = compose_cfg([*GPU, f"dataset.path={corpus_dir}", f"trainer.cuda_graph={graph}", "seed=3", *extra])
    objects = build_training_objects(cfg)
    seen = []

    class Record(Hook):
        def before_backward(self, ctx, loss):
            seen.append(loss.clone())
            return True

    stream = objects.data.stream("train").to(objects.device)
    schedule = [objects.hooks["lr_schedule"]] if objects.hooks.get("lr_schedule") else []
    objects.trainer.train_steps(objects.model, stream, objects.optimizer, objects.device, 50, [Record(), *schedule])
    assert (objects.trainer.graph_off_reason is None) == (graph == "true")
    return [float(x) for x in seen]


@pytest.mark.parametrize(
    "extra", [[], LR_SCHEDULE, ["model=pointer_lstm", "model.pointer_window=20"]],
    ids=["constant-lr", "lr-schedule", "pointer"],
)  # fmt: skip
def test_fifty_graphed_steps_give_the_eager_losses(compose_cfg, corpus_dir, tmp_path, extra):
    eager = _losses(compose_cfg, corpus_dir, tmp_path, "false", extra)
    graphed = _losses(compose_cfg, corpus_dir, tmp_path, "true", extra)
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_a_graphed_run_resumes_exactly(compose_cfg, corpus_dir, tmp_path, monkeypatch):
    overrides = [*GPU, f"dataset.path={corpus_dir}", "trainer.cuda_graph=true", "trainer.epochs=2"]
    straight = train_and_report(compose_cfg(overrides), tmp_path / "straight")
    original, calls = GraphedStep.update, {"n": 0}

    def stepping(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 100:  # mid-epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(GraphedStep, "update", stepping)
        with pytest.raises(Exception) as stop:
            train_and_report(compose_cfg(overrides), tmp_path / "cut")
    assert type(stop.value).__name__ == "TrainingInterrupted"
    resumed = train_and_report(compose_cfg(overrides), tmp_path / "cut")
    same = {k: v for k, v in resumed.items() if k not in TIMING} == {
        k: v for k, v in straight.items() if k not in TIMING
    }
    a, b = ((tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("cut", "straight"))
    assert same, (resumed, straight)
    assert [json.loads(x)["val_loss"] for x in a] == [json.loads(x)["val_loss"] for x in b]


def test_a_dropout_decided_mid_run_is_captured_anew(compose_cfg, corpus_dir, tmp_path, monkeypatch):
    """hooks.dropout_budget changes the dropout rates at step 11, after graph A baked the old ones in."""
    from lmlab.training.trainer import Trainer

    original, made = Trainer._make_step, []

    def making(self, ctx, stream):
        made.append(ctx.model.dropout)
        return original(self, ctx, stream)

    monkeypatch.setattr(Trainer, "_make_step", making)
    budget = ["hooks.time_budget.max_time_s=100000", "hooks.dropout_budget.full_at_epochs=4",
              "hooks.dropout_budget.none_at_epochs=2", "hooks.dropout_budget.measure_steps=10"]  # fmt: skip
    overrides = [*GPU, f"dataset.path={corpus_dir}", "trainer.cuda_graph=true", "trainer.epochs=2",
                 "model.dropout=0.3", *budget]  # fmt: skip  # 2 epochs: none at 2 → dropout 0 from step 11
    results = train_and_report(compose_cfg(overrides), tmp_path / "run")
    assert made == [0.3, 0.0] and results["status"] == "completed"


def test_a_graphed_step_reads_nothing_back(compose_cfg, corpus_dir):
    from lmlab.factory import build_training_objects

    cfg = compose_cfg(
        [*GPU, f"dataset.path={corpus_dir}", "trainer.cuda_graph=true", "hooks.progress.log_interval=1000"]
    )
    objects = build_training_objects(cfg)
    stream = objects.data.stream("train").to(objects.device)
    args = (objects.model, stream, objects.optimizer, objects.device)
    objects.trainer.train_steps(*args, 10, [objects.hooks["non_finite"]])  # warm-up and capture
    short = count_dispatch(lambda: objects.trainer.train_steps(*args, 2, [objects.hooks["non_finite"]]))
    long = count_dispatch(lambda: objects.trainer.train_steps(*args, 22, [objects.hooks["non_finite"]]))
    assert long.host_reads == short.host_reads  # 20 more steps, not one more read
