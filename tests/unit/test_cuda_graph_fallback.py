"""``trainer.cuda_graph=auto`` falls back to the eager step, with one line, when the captured step fails:
checked on the CPU with a stand-in for the graphed step that fails the way a GPU capture could."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmlab.models import RNNLanguageModel
from lmlab.training.step import EagerStep, GuardedGraphStep, TrainingStep


class StandInGraph:
    """Behaves like GraphedStep (eager warm-up steps, then a capture + first replay) but fails as told."""

    def __init__(self, eager: EagerStep, failure: str | None, warmup: int = 2) -> None:
        self.eager, self.failure, self.warmup, self.steps_run = eager, failure, warmup, 0
        self.captured = False

    @property
    def captures_next(self) -> bool:
        return not self.captured and self.steps_run >= self.warmup

    def forward(self, inputs, targets, carry):
        capture = self.captures_next
        loss, state, pending = self.eager.forward(inputs, targets, carry)
        if capture:
            self.captured = True
            if self.failure == "raises":
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
            if self.failure == "nan":
                loss = torch.tensor(float("nan"))
            if self.failure == "wrong":
                loss = loss * 3
        return loss, state, pending

    def update(self, pending, lr_scale):
        self.steps_run += 1
        self.eager.update(pending, lr_scale)

    def skipped(self):
        self.steps_run += 1


def _train(failure: str | None, steps: int = 5):
    torch.manual_seed(0)
    model = RNNLanguageModel(30, embed_dim=8, hidden_dim=8, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    eager = EagerStep(TrainingStep(model), model, optimizer, scaler, 0.25, lambda cache=True: contextlib.nullcontext())
    said: list[str] = []
    step = eager if failure == "eager only" else GuardedGraphStep(StandInGraph(eager, failure), eager, said.append)
    tokens = torch.randint(0, 30, (steps * 6 + 1, 3), generator=torch.Generator().manual_seed(1))
    carry = model.init_state(3)
    for i in range(steps):
        inputs, targets = tokens[i * 6 : i * 6 + 6], tokens[i * 6 + 1 : i * 6 + 7]
        loss, carry, pending = step.forward(inputs, targets, carry)
        assert torch.isfinite(loss)
        step.update(pending, 1.0)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), said, step


@pytest.mark.parametrize("failure", ["raises", "nan", "wrong"])
def test_a_failed_capture_falls_back_to_the_eager_step_with_one_line(failure):
    weights, said, step = _train(failure)
    reference, _, _ = _train("eager only")
    assert len(said) == 1 and said[0].startswith("note: trainer.cuda_graph=auto: the captured step failed (")
    assert said[0].endswith("; running eagerly") and "\n" not in said[0]
    assert step.active is step.eager and step.fallback_reason
    assert torch.equal(weights, reference)  # the failed capture changed nothing: every update is the eager one's


def test_a_sound_capture_is_kept():
    weights, said, step = _train(None)
    reference, _, _ = _train("eager only")
    assert said == [] and step.active is step.graphed and step.fallback_reason is None
    assert torch.equal(weights, reference)
