"""One training step, two ways to run it: eagerly (:class:`EagerStep`), or captured in CUDA graphs
(:class:`~lmlab.training.cuda_graph.GraphedStep`). The trainer asks either for the same three things::

    loss, state, pending = step.forward(inputs, targets, state)   # the loss, ready for the hooks to judge
    step.update(pending, lr_scale)                                 # the hooks agreed: backward (eager) + update
    step.skipped()                                                 # a hook refused the batch: no update
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from lmlab.errors import ConfigError
from lmlab.models import LanguageModel
from lmlab.runtime import distributed
from lmlab.training.cuda_graph import GraphedStep, graph_plan
from lmlab.training.optim import clip_grad_norm, scaled_lr


class TrainingStep(torch.nn.Module):
    """One window's forward pass and losses as a module, so that DistributedDataParallel (which hooks a
    module's forward) sees the whole step: returns (loss, loss + regularization, next state)."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, inputs: torch.Tensor, state: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        features, state = self.model(inputs, state)
        loss = self.model.loss(features, targets)
        penalty = self.model.regularization(features)
        return loss, loss if penalty is None else loss + penalty, state


class EagerStep:
    """The step as plain PyTorch calls: forward, then (if the hooks agree) backward, clipping, update."""

    def __init__(
        self,
        step: torch.nn.Module,
        model: LanguageModel,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        clip: float | None,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        self.step, self.model, self.optimizer, self.scaler = step, model, optimizer, scaler
        self.clip, self.autocast = clip, autocast

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any, Any]:
        with self.autocast():
            loss, objective, state = self.step(inputs, self.model.detach_state(state), targets)
        with torch.no_grad():  # a figure to judge and log, outside the graph (nothing to detach)
            loss = distributed.mean(loss)  # every rank judges (and logs) the same loss
        return loss, state, objective

    def update(self, objective: torch.Tensor, lr_scale: float) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        scaler.scale(objective).backward()
        if self.clip:
            scaler.unscale_(optimizer)
            clip_grad_norm(self.model.parameters(), self.clip)
        with scaled_lr(optimizer, lr_scale):
            scaler.step(optimizer)
        scaler.update()
        # Free the gradients now rather than before the next backward: the next forward (whose fused
        # loss makes its gradients early) then never holds two sets at once (~100 MB at vocab 33k).
        optimizer.zero_grad(set_to_none=True)

    def skipped(self) -> None:
        pass


class GraphCheckFailed(RuntimeError):
    """The graphed step's first replay gave a loss the eager step does not (not finite, or too far off)."""


class GuardedGraphStep:
    """``trainer.cuda_graph=auto``: the graphed step, watched at its capture and first replay. If either
    raises, or the first replayed loss is not finite or differs from the eager step's loss of the same window
    by more than ``tolerance`` (relative: the two draw different dropout masks), the run goes on with the
    eager step from that window on, after one line saying why. The weights are not touched by a failed
    capture (graph A holds forward and backward only; the update comes after the check)."""

    def __init__(
        self, graphed: Any, eager: EagerStep, say: Callable[[str], None] | None = None, tolerance: float = 0.1
    ) -> None:
        self.graphed, self.eager, self.tolerance = graphed, eager, tolerance
        self.say = say or (lambda line: print(line, flush=True))
        self.model = eager.model
        self.active: Any = graphed
        self.fallback_reason: str | None = None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any, Any]:
        if self.active is self.eager:
            return self.eager.forward(inputs, targets, carry)
        checking = self.graphed.captures_next
        try:
            reference = self._eager_loss(inputs, targets, carry) if checking else None
            loss, state, graphed = self.graphed.forward(inputs, targets, carry)
            if checking and graphed:
                self._compare(float(loss.detach()), reference)
        except Exception as err:  # noqa: BLE001 - any failure of the graphed path: the eager one takes over
            self._fall_back(err)
            return self.eager.forward(inputs, targets, carry)
        return loss, state, graphed

    def update(self, pending: Any, lr_scale: float) -> None:
        self.active.update(pending, lr_scale)

    def skipped(self) -> None:
        self.active.skipped()

    def _eager_loss(self, inputs: torch.Tensor, targets: torch.Tensor, carry: Any) -> float:
        with torch.no_grad(), self.eager.autocast():
            loss, _, _ = self.eager.step(inputs, self.eager.model.detach_state(carry), targets)
        return float(loss)

    def _compare(self, graphed: float, eager: float) -> None:
        if not (abs(graphed - eager) <= self.tolerance * max(abs(eager), 1e-6)):
            raise GraphCheckFailed(f"its first replayed loss {graphed:.6g} is not the eager step's {eager:.6g}")

    def _fall_back(self, err: Exception) -> None:
        self.active = self.eager
        self.eager.optimizer.zero_grad(set_to_none=True)  # whatever a half-made capture left behind
        self.fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.say(f"note: trainer.cuda_graph=auto: the captured step failed ({self.fallback_reason}); running eagerly")


def make_step(
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    clip: float | None,
    autocast: Callable[..., contextlib.AbstractContextManager],
    compile: bool,
    cuda_graph: str | bool,
    variable_bptt: bool,
) -> tuple[EagerStep | GraphedStep | GuardedGraphStep, str | None]:
    """The step a fit runs, and why it is not graphed (None when it is). What computes the losses is
    compiled if asked and, under several processes, wrapped in DistributedDataParallel (which averages
    the gradients during backward); the plain model stays the one whose state is saved. An explicit
    ``cuda_graph=true`` that cannot apply is refused here, before any step."""
    module: torch.nn.Module = TrainingStep(model)
    if distributed.place().world_size > 1:
        module = distributed.data_parallel(module, device, sparse_gradients=model.sparse_gradients)
    module = torch.compile(module) if compile else module
    reason = graph_plan(
        device,
        model,
        optimizer,
        schedule,
        variable_bptt=variable_bptt,
        loss_scaling=scaler.is_enabled(),
        compiled=compile,
    )
    if cuda_graph is True and reason:
        raise ConfigError(
            f"trainer.cuda_graph=true cannot apply: {reason}; use trainer.cuda_graph=auto (it then runs eagerly) "
            "or false"
        )
    reason = "trainer.cuda_graph=false" if cuda_graph is False else reason
    if reason:
        return EagerStep(module, model, optimizer, scaler, clip, autocast), reason

    def clip_gradients() -> None:
        if clip:
            clip_grad_norm(model.parameters(), clip)

    graphed = GraphedStep(module, model, optimizer, clip_gradients, lambda: autocast(cache=False))
    if cuda_graph is True:  # asked for: a failure ends the run
        return graphed, None
    return GuardedGraphStep(graphed, EagerStep(module, model, optimizer, scaler, clip, autocast)), None
