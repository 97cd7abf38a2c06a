"""Optimizers and schedules: NT-ASGD (whose averaged weights
:class:`~lmlab.training.hooks.weight_averaging.WeightAveraging` validates with), sparse-aware gradient
clipping, and :class:`Schedule`.

NT-ASGD (Merity et al. 2017): SGD that switches to averaged SGD once validation stops improving.

Averaging starts when the validation loss is worse than the best of all but the last ``nonmono``
checks; from then on every step updates a running mean of the weights, and evaluation (and best.pt)
use that mean. The averages live in the optimizer state, so checkpoints and resume carry them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from lmlab.config.schema import NonNegativeInt, PositiveInt
from lmlab.training.hooks.weight_averaging import swap


class NTASGD(torch.optim.SGD):
    """``torch.optim.SGD`` plus non-monotonically triggered iterate averaging."""

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float = 0.0,
        nonmono: PositiveInt = 5,
        start_averaging: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
        self.nonmono = nonmono
        self.val_history: list[float] = []
        self.averaging = start_averaging  # True: plain ASGD from the first step (AWD-LSTM's fine-tuning)
        self.n_averaged = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        if self.averaging:
            self.n_averaged += 1
            params = [p for group in self.param_groups for p in group["params"]]
            averages = [self.state[p].setdefault("average", p.detach().clone()) for p in params]
            if self.n_averaged > 1:  # the first averaged step starts the mean at the current weights
                torch._foreach_lerp_(averages, params, 1.0 / self.n_averaged)
        return loss

    def observe(self, val_loss: float) -> bool:
        """Record a validation loss; returns True when this call switched averaging on."""
        trigger = (
            not self.averaging
            and len(self.val_history) > self.nonmono
            and val_loss > min(self.val_history[: -self.nonmono])
        )
        self.val_history.append(val_loss)
        if trigger:
            self.averaging = True
        return trigger

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the model (no-op before averaging starts)."""
        pairs = [
            (p, self.state[p]["average"]) for g in self.param_groups for p in g["params"] if "average" in self.state[p]
        ]
        swap(pairs)
        try:
            yield
        finally:
            swap(pairs)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["nt_asgd"] = {
            "val_history": list(self.val_history),
            "averaging": self.averaging,
            "n_averaged": self.n_averaged,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("nt_asgd")
        super().load_state_dict(state_dict)
        self.val_history, self.averaging, self.n_averaged = (
            extra["val_history"],
            extra["averaging"],
            extra["n_averaged"],
        )


# Optimizers that take sparse and dense gradients together (``model.sparse_embedding``); NTASGD is an SGD.
SPARSE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adagrad)


@torch.no_grad()
def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm over all gradients) that also takes sparse ones, in a
    fixed handful of operators whatever the number of parameters (``torch._foreach_*``): no value is
    read back to the host.

    A sparse embedding gradient holds one row per token, repeats included; it is coalesced (repeats
    summed) before its norm is taken, and stays coalesced for the optimizer."""
    dense, sparse = [], []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sparse.append(p.grad)
        else:
            dense.append(p.grad)
    if not dense and not sparse:
        return torch.zeros(())
    norms = list(torch._foreach_norm(dense)) if dense else []
    norms += [torch.linalg.vector_norm(g.values()) for g in sparse]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    if dense:
        torch._foreach_mul_(dense, scale)
    for g in sparse:
        g.mul_(scale)
    return total


@contextlib.contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Every group's lr times ``scale`` for one update (a short variable-BPTT window takes a proportionally
    smaller step), the schedule's value back right after: hooks and checkpoints only ever see that."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    if scale != 1.0:
        for group in optimizer.param_groups:
            group["lr"] *= scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr


def takes_sparse_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, SPARSE_OPTIMIZERS)


class Schedule:
    """An LR scheduler plus when it steps, so the loop never asks what kind of scheduler it has.

    ``interval``: ``step`` (after every optimizer step), ``epoch`` (after every epoch) or ``val``
    (after every epoch with the validation loss, as ``ReduceLROnPlateau`` wants). ``warmup_steps``: the
    first optimizer steps take a share of the LR that grows linearly to all of it (step k of N: k/N), on top
    of whatever the scheduler set; a pure function of the run's step count, so a resumed run picks it up
    where it was. High SGD rates need it: a model's first steps are its largest (experiments/defaults.md)."""

    def __init__(
        self, scheduler: Any, interval: Literal["step", "epoch", "val"] = "epoch", warmup_steps: NonNegativeInt = 0
    ) -> None:
        self.scheduler, self.interval, self.warmup_steps = scheduler, interval, warmup_steps

    def lr_factor(self, global_step: int) -> float:
        """The share of the LR the optimizer step after ``global_step`` steps takes."""
        return min(1.0, (global_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def after_step(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.interval == "val":
            self.scheduler.step(val_loss)
        elif self.interval == "epoch":
            self.scheduler.step()
