"""The training step captured in CUDA graphs and replayed (``trainer.cuda_graph``).

At batch 20 a GPU step is bound by kernel launches, not FLOPs: replaying a captured graph launches the
whole step at once. Two graphs, so that hooks keep their place between the loss and the update::

    window ──copy──▶ static inputs ─┐
    carry  ──copy──▶ static state ──┴─▶ graph A: forward, loss, backward, clipping ──▶ static loss
                                                 (the next state is copied back into the static state)
    hooks.before_backward(loss)  ── all True ──▶ graph B: optimizer step (re-captured when the lr changes;
                                 │                   eager while it moves every step: hooks.lr_schedule)
                                 └─ a False ───▶ no update; the state restarts (as in eager mode)

The first ``WARMUP_STEPS`` steps run eagerly on a side stream (real steps, as the CUDA graph recipe
asks before a capture); graph A is captured on the next window and replayed to run it. A window of
another shape (an epoch's short last one) runs eagerly. Where capture cannot apply, :func:`graph_plan`
says why: ``auto`` then runs eagerly, ``true`` refuses in one line before any step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmlab.models import LanguageModel, map_tensors
from lmlab.runtime import distributed
from lmlab.training.optim import scaled_lr

WARMUP_STEPS = 3
CAPTURABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)  # exact types: no subclasses


def graph_plan(
    device: torch.device,
    model: LanguageModel,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    *,
    variable_bptt: bool,
    loss_scaling: bool,
    compiled: bool,
) -> str | None:
    """None when the step can be captured; else why not (one clause, for a one-line message)."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    if distributed.place().world_size > 1:
        return "several processes are not captured (DDP's bucketed all-reduce)"
    if compiled:
        return "trainer.compile=true (torch.compile does its own capture)"
    if variable_bptt:
        return "dataset.variable_bptt=true changes the window shape every step"
    if not model.static_shapes:
        return "the adaptive softmax (model.softmax=adaptive) picks rows by target word, so shapes change every step"
    if model.sparse_gradients:
        return "sparse gradients (model.sparse_embedding=true) change shape every step"
    if loss_scaling:
        return "fp16 loss scaling reads the gradients back every step"
    if not model.static_state:
        return f"the state of model {type(model).__name__} changes shape from window to window"
    if type(optimizer) not in CAPTURABLE_OPTIMIZERS:
        return f"optimizer {type(optimizer).__name__} is not known to be capturable (SGD, Adam and AdamW are)"
    if schedule is not None and getattr(schedule, "interval", None) == "step":
        return "scheduler.interval=step would re-capture the optimizer at every step"
    return None


def copy_state(destination: Any, source: Any) -> None:
    """Copy a model state (tensors nested in lists/tuples) into buffers of the same structure."""
    if isinstance(destination, torch.Tensor):
        destination.copy_(source)
    elif isinstance(destination, (list, tuple)):
        for d, s in zip(destination, source, strict=True):
            copy_state(d, s)


class GraphedStep:
    """Runs training steps through two CUDA graphs (see the module docstring); falls back to the eager
    ``step`` for windows of another shape."""

    def __init__(
        self,
        step: torch.nn.Module,
        model: LanguageModel,
        optimizer: torch.optim.Optimizer,
        clip: Callable[[], None],
        autocast: Callable[[], Any],
    ) -> None:
        self.step, self.model, self.optimizer, self.clip, self.autocast = step, model, optimizer, clip, autocast
        self.side = torch.cuda.Stream()
        self.steps_run = 0
        self.forward_graph: torch.cuda.CUDAGraph | None = None
        self.update_graph: torch.cuda.CUDAGraph | None = None
        self.update_lrs: tuple[float, ...] | None = None  # the LRs graph B was captured with
        self.previous_lrs: tuple[float, ...] | None = None  # the last step's
        for group in optimizer.param_groups:
            if "capturable" in group:  # Adam/AdamW keep their step count on the device
                group["capturable"] = True

    @property
    def captures_next(self) -> bool:
        """The next :meth:`forward` captures graph A and replays it for the first time."""
        return self.forward_graph is None and self.steps_run >= WARMUP_STEPS

    # -------------------------------------------------------------------------------- forward
    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, carry: Any) -> tuple[torch.Tensor, Any, bool]:
        """(loss, next state, graphed): with ``graphed`` the backward has run too (graph A)."""
        if self.forward_graph is None and self.steps_run >= WARMUP_STEPS:
            self._capture_forward(inputs, targets, carry)
        if self.forward_graph is not None and inputs.shape == self.inputs.shape:
            if carry is not self.state:
                copy_state(self.state, carry)
            self.inputs.copy_(inputs)
            self.targets.copy_(targets)
            self.forward_graph.replay()
            return self.loss, self.state, True
        self._detach_gradients()  # an eager step makes gradients of its own (the graphs keep theirs)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side), self.autocast():
            loss, objective, carry = self.step(inputs, self.model.detach_state(carry), targets)
            objective.backward()
            self.clip()
        torch.cuda.current_stream().wait_stream(self.side)
        return loss.detach(), carry, False

    def _capture_forward(self, inputs: torch.Tensor, targets: torch.Tensor, carry: Any) -> None:
        self.inputs, self.targets = inputs.clone(), targets.clone()
        self.state = map_tensors(carry, lambda t: t.detach().clone())
        self._detach_gradients()  # backward inside the graph makes the gradients: its own buffers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self.autocast():
            loss, objective, next_state = self.step(self.inputs, self.state, self.targets)
            objective.backward()
            self.clip()
            copy_state(self.state, self.model.detach_state(next_state))
        self.loss, self.forward_graph = loss.detach(), graph
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.grads = [p.grad for p in self.params]  # what graph B reads; eager steps must not touch them

    # --------------------------------------------------------------------------------- update
    def update(self, graphed: bool, lr_scale: float) -> None:
        """The optimizer step (graph B when the forward was graphed)."""
        self.steps_run += 1
        if not graphed:
            with torch.cuda.stream(self.side), scaled_lr(self.optimizer, lr_scale):
                self.optimizer.step()
            torch.cuda.current_stream().wait_stream(self.side)
            self._detach_gradients()
            return
        self._attach_gradients()
        lrs = tuple(group["lr"] * lr_scale for group in self.optimizer.param_groups)
        moving, self.previous_lrs = lrs != self.previous_lrs, lrs
        if lrs != self.update_lrs and moving:  # an LR schedule per step (hooks.lr_schedule): no capture pays off
            with scaled_lr(self.optimizer, lr_scale):
                self.optimizer.step()
            return
        if self.update_graph is None or lrs != self.update_lrs:  # captured once the LR holds for two steps
            self.update_graph, self.update_lrs = None, lrs
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), scaled_lr(self.optimizer, lr_scale):
                self.optimizer.step()
            self.update_graph = graph
        self.update_graph.replay()

    def skipped(self) -> None:
        """A batch the hooks skipped: no update (graph A overwrites its gradients at the next replay)."""
        self.steps_run += 1
        self._detach_gradients()

    def _detach_gradients(self) -> None:
        """Eager gradients are dropped; graph A's stay alive in ``self.grads`` for graph B."""
        self.optimizer.zero_grad(set_to_none=True)

    def _attach_gradients(self) -> None:
        """Point the parameters at graph A's gradients (an optimizer step skips a parameter without one)."""
        for p, grad in zip(self.params, self.grads, strict=True):
            p.grad = grad
