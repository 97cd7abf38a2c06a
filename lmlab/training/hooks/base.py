"""The hook contract: what hangs on the training loop, and the :class:`FitContext` it shares with the loop.

A hook is an object with any of the methods of :class:`Hook`; the standard ones (``conf/hooks/``) are
built from config by :func:`lmlab.factory.build_hooks`, each owning its options, and run in that order
(each in the module of ``lmlab.training.hooks`` named as its key):

    stop_on_signal    stop_on_signal.StopOnSignal         SIGINT/SIGTERM: save, then stop
    time_budget       time_budget.TimeBudget              max_time_s
    non_finite        non_finite.NonFinitePolicy          on_nan, max_skipped_fraction
    learning_check    learning_check.LearningCheck        after_epochs (a run no better than uniform)
    weight_averaging  weight_averaging.WeightAveraging    start, ema_steps (or NT-ASGD's average)
    checkpoint        checkpoint.Checkpointing            resume, save_every_steps, init_from
    progress          progress.Progress                   log_interval, bar
    lr_schedule       lr_schedule.WarmupDecay             null unless hooks=warmup_decay or optimizer=adamw_warmup
    dropout_budget    dropout_budget.DropoutForBudget     full_at_epochs (off unless set)
    (yours)           +hooks.NAME._target_=module.Class   runs after these

The loop calls, in order::

    on_fit_start
    per epoch:  on_epoch_start
                per step: before_backward (all True: backward + optimizer step) -> on_step_end
                validation inside every hook's evaluation_weights -> on_validation_end
                (a stop signal during validation: on_interrupt)
                on_epoch_end
    on_fit_end  (always, also after an error)

Hooks talk back through the :class:`FitContext` (``stop_training``, ``interrupt``); they never reach into
the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.loggers.base import Logger
from lmlab.models import LanguageModel, State, diverged
from lmlab.training.checkpoint_format import TrainState


@dataclass
class FitContext:
    """The objects of one fit and where it stands; shared by the loop and its hooks."""

    model: LanguageModel
    optimizer: torch.optim.Optimizer
    schedule: Any  # lmlab.training.optim.Schedule or None
    device: torch.device
    logger: Logger = field(default_factory=Logger)
    scaler: Any = None
    state: TrainState = field(default_factory=TrainState)
    carry: State = None  # the model's state after the last step
    loss_sum: torch.Tensor | None = None  # this epoch's summed training loss, kept on the device
    num_windows: int = 0  # windows in this epoch
    tokens_this_step: int = 0
    improved: bool = False  # the last validation beat the best so far
    stop_training: bool = False  # set by a hook: finish this step, then validate and end
    model_changed: bool = False  # set by a hook that changed what a captured step bakes in (a dropout rate)
    interrupt: int | None = None  # a stop signal: save, then stop now
    last_saved: Path | None = None  # the last good last.pt written (the one a divergence message names)
    out_dir: Path | None = None  # the run folder
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # in every checkpoint: model, vocab, config
    best_checkpoint: Path | None = None  # where best.pt is kept (set by the checkpoint hook)
    last_checkpoint: Path | None = None  # where last.pt is kept
    # The stop signal every rank agrees on (None: none), polled between evaluation windows.
    poll_interrupt: Callable[[], int | None] = lambda: None

    @property
    def lr(self) -> float:
        """The LR of the last step: the optimizer's, times the schedule's warm-up share while that lasts."""
        warmup = self.schedule.lr_factor(max(self.state.global_step - 1, 0)) if self.schedule is not None else 1.0
        return float(self.optimizer.param_groups[0]["lr"]) * warmup

    @property
    def epochs_done(self) -> float:
        """Epochs trained so far, the one in progress counted by its share of windows done."""
        return self.state.epoch - 1 + self.state.step / max(self.num_windows, 1)

    def diverged(self, loss: float) -> bool:
        return diverged(loss, self.model.vocab_size)

    def running_loss(self) -> float:
        """Mean training loss of this epoch's steps so far (skipped batches excluded)."""
        done = self.state.step - self.state.skipped_batches
        return (self.loss_sum / max(done, 1)).item()


class Hook:
    """A training-loop callback; every method is optional (the base does nothing). A hook's constructor
    takes its options, annotated (:mod:`lmlab.config.schema`): they are its config node's keys, checked
    before any work starts."""

    def on_fit_start(self, ctx: FitContext) -> None: ...

    def on_epoch_start(self, ctx: FitContext) -> None: ...

    def before_backward(self, ctx: FitContext, loss: torch.Tensor) -> bool:
        """Return False to skip this batch (no backward, no step)."""
        return True

    def on_step_end(self, ctx: FitContext) -> None: ...

    def evaluation_weights(self, ctx: FitContext) -> contextlib.AbstractContextManager:
        """Weights to validate with (and save as best.pt): the live ones unless a hook swaps them in."""
        return contextlib.nullcontext()

    def on_validation_end(self, ctx: FitContext, val_loss: float) -> None: ...

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None: ...

    def on_interrupt(self, ctx: FitContext) -> None:
        """A stop signal arrived between steps (during validation): save what resuming needs, then stop."""

    def on_fit_end(self, ctx: FitContext) -> None: ...


@contextlib.contextmanager
def evaluation_weights(hooks: list[Hook], ctx: FitContext) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook.evaluation_weights(ctx))
        yield


def good_checkpoint(ctx: FitContext) -> str:
    """Checkpoints are only written from finite weights after losses that did not diverge."""
    if ctx.last_saved is None:
        return "No checkpoint was written yet."
    return (
        f"The last good checkpoint is {ctx.last_saved}; resume from it with hooks.checkpoint.resume={ctx.last_saved}."
    )
