"""What hangs on the training loop: checkpoints, time budget, stop signals, non-finite policy, weight
averaging — each a :class:`Hook` (progress reports: :mod:`lmlab.progress`), so :mod:`lmlab.train` keeps only the loop.

The loop calls, in order: ``on_fit_start`` → per epoch ``on_epoch_start``, per step ``before_backward``
and ``on_step_end``, then validation inside every hook's ``evaluation_weights`` followed by
``on_validation_end`` → ``on_epoch_end`` → ``on_fit_end`` (always, also after an error). Hooks talk
back through the :class:`FitContext` (``stop_training``, ``interrupt``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab import distributed
from lmlab.checkpoint import TrainState, training_checkpoint
from lmlab.errors import ConfigError, NonFiniteLoss
from lmlab.files import atomic_save, remove_stale_temp_files
from lmlab.interrupt import StopSignals
from lmlab.loggers import Logger
from lmlab.models import LanguageModel, State, diverged, map_tensors
from lmlab.resume import initial_weights, restore_training
from lmlab.rng import rng_state


@dataclass
class FitContext:
    """The objects of one fit and where it stands; shared by the loop and its hooks."""

    model: LanguageModel
    optimizer: torch.optim.Optimizer
    schedule: Any  # lmlab.optim.Schedule or None
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
    interrupt: int | None = None  # a stop signal: save, then stop now
    last_saved: Path | None = None
    # The stop signal every rank agrees on (None: none), polled between evaluation windows.
    poll_interrupt: Callable[[], int | None] = lambda: None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def diverged(self, loss: float) -> bool:
        return diverged(loss, self.model.vocab_size)

    def running_loss(self) -> float:
        """Mean training loss of this epoch's steps so far (skipped batches excluded)."""
        done = self.state.step - self.state.skipped_batches
        return (self.loss_sum / max(done, 1)).item()


class Hook:
    """A training-loop callback; every method is optional. ``trainer`` is the running Trainer."""

    def on_fit_start(self, trainer: Any, ctx: FitContext) -> None: ...

    def on_epoch_start(self, trainer: Any, ctx: FitContext) -> None: ...

    def before_backward(self, trainer: Any, ctx: FitContext, loss: torch.Tensor) -> bool:
        """Return False to skip this batch (no backward, no step)."""
        return True

    def on_step_end(self, trainer: Any, ctx: FitContext) -> None: ...

    def evaluation_weights(self, ctx: FitContext) -> contextlib.AbstractContextManager:
        """Weights to validate with (and save as best.pt): the live ones unless a hook swaps them in."""
        return contextlib.nullcontext()

    def on_validation_end(self, trainer: Any, ctx: FitContext, val_loss: float) -> None: ...

    def on_epoch_end(self, trainer: Any, ctx: FitContext, metrics: dict[str, Any]) -> None: ...

    def on_interrupt(self, trainer: Any, ctx: FitContext) -> None:
        """A stop signal arrived between steps (during validation): save what resuming needs, then stop."""

    def on_fit_end(self, trainer: Any, ctx: FitContext) -> None: ...


class StopOnSignal(Hook):
    """SIGINT/SIGTERM finish the current step; the checkpoint hook then saves and the loop stops. Under
    several processes a signal that reached any rank stops every rank after the same step."""

    def on_fit_start(self, trainer: Any, ctx: FitContext) -> None:
        self.signals = StopSignals().__enter__()
        ctx.poll_interrupt = self._agreed  # validation stops at its next window too

    def on_step_end(self, trainer: Any, ctx: FitContext) -> None:
        ctx.interrupt = self._agreed()

    def on_epoch_end(self, trainer: Any, ctx: FitContext, metrics: dict[str, Any]) -> None:
        ctx.interrupt = self._agreed()  # one after validation's last window: last.pt is saved next, then stop

    def _agreed(self) -> int | None:
        return int(distributed.agree_max(self.signals.received or 0)) or None

    def on_fit_end(self, trainer: Any, ctx: FitContext) -> None:
        self.signals.__exit__()


class TimeBudget(Hook):
    """End training after the step that crosses ``max_time_s``; that epoch is validated as usual."""

    def __init__(self, max_time_s: float) -> None:
        self.max_time_s = max_time_s

    def on_fit_start(self, trainer: Any, ctx: FitContext) -> None:
        self.deadline = time.perf_counter() + self.max_time_s

    def on_step_end(self, trainer: Any, ctx: FitContext) -> None:
        late = distributed.agree_max(float(time.perf_counter() > self.deadline))  # the slowest clock counts
        ctx.stop_training = ctx.stop_training or late > 0


class NonFinitePolicy(Hook):
    """A batch whose loss diverged (:meth:`FitContext.diverged`: not finite, or exploded) is never
    stepped on. ``stop``: raise :class:`NonFiniteLoss`; ``skip_batch``: drop the batch and restart the
    state, and raise once more than ``max_skipped_fraction`` of an epoch's batches were dropped.

    On the CPU (reading a value is free) and for ``skip_batch`` every loss is checked; on a GPU the
    running loss is checked every ``check_every`` steps, so the step never waits for the device."""

    def __init__(self, on_nan: str, check_every: int, max_skipped_fraction: float = 0.1) -> None:
        self.on_nan, self.check_every, self.max_skipped_fraction = on_nan, check_every, max_skipped_fraction

    def before_backward(self, trainer: Any, ctx: FitContext, loss: torch.Tensor) -> bool:
        if not (self.on_nan == "skip_batch" or ctx.device.type == "cpu") or not ctx.diverged(loss.item()):
            return True
        if self.on_nan == "skip_batch":
            ctx.state.skipped_batches += 1
            if ctx.state.skipped_batches > self.max_skipped_fraction * ctx.num_windows:
                raise NonFiniteLoss(
                    f"skipped {ctx.state.skipped_batches} of {ctx.num_windows} batches of epoch {ctx.state.epoch} "
                    "for diverged (non-finite or exploding) losses, more than "
                    f"trainer.max_skipped_fraction={self.max_skipped_fraction}: training has diverged. "
                    f"{_good_checkpoint(ctx)} Try a lower optimizer.lr or trainer.clip_grad_norm"
                )
            return False
        self._raise(ctx, ctx.state.step + 1)

    def on_step_end(self, trainer: Any, ctx: FitContext) -> None:
        step = ctx.state.step
        if ctx.device.type != "cpu" and (step % self.check_every == 0 or step == ctx.num_windows):
            if ctx.diverged(ctx.running_loss()):
                self._raise(ctx, step, window=self.check_every)

    def _raise(self, ctx: FitContext, step: int, window: int = 1) -> None:
        where = f"step {step}" if window == 1 else f"the {window} steps up to step {step}"
        raise NonFiniteLoss(
            f"training diverged (non-finite or exploding loss) in epoch {ctx.state.epoch}, {where}. "
            f"{_good_checkpoint(ctx)} Try a lower "
            "optimizer.lr (resume applies it), a smaller trainer.clip_grad_norm, trainer.precision=fp32, "
            "or trainer.on_nan=skip_batch"
        )


def _good_checkpoint(ctx: FitContext) -> str:
    """Checkpoints are only written from finite weights after losses that did not diverge."""
    if ctx.last_saved is None:
        return "No checkpoint was written yet."
    return f"The last good checkpoint is {ctx.last_saved}; resume from it with trainer.resume={ctx.last_saved}."


class WeightAveraging(Hook):
    """Validate with an optimizer's averaged weights (NT-ASGD) and tell it each validation loss. Any
    optimizer with ``averaged_weights()`` / ``observe(val_loss)`` takes part; others are left alone."""

    def evaluation_weights(self, ctx: FitContext) -> contextlib.AbstractContextManager:
        averaged = getattr(ctx.optimizer, "averaged_weights", None)
        return averaged() if averaged else contextlib.nullcontext()

    def on_validation_end(self, trainer: Any, ctx: FitContext, val_loss: float) -> None:
        observe = getattr(ctx.optimizer, "observe", None)
        if observe and observe(val_loss):
            print(f"NT-ASGD: validation stopped improving; averaging weights from epoch {ctx.state.epoch + 1}")


class Checkpointing(Hook):
    """``last.pt`` every ``save_every_steps`` steps, at each epoch end and on a stop signal; ``best.pt``
    whenever validation improves (with the weights that were validated); on start, resume — or, for a
    new run with ``init_from``, start from another run's weights (fine-tuning)."""

    def __init__(
        self, folder: Path, meta: dict[str, Any], save_every_steps: int | None, resume: Any, init_from: Any = None
    ) -> None:
        self.last, self.best = Path(folder) / "last.pt", Path(folder) / "best.pt"
        self.meta, self.save_every_steps, self.resume, self.init_from = meta, save_every_steps, resume, init_from
        self._pending_rng: dict[str, Any] | None = None  # a periodic save waiting for the next loss

    def on_fit_start(self, trainer: Any, ctx: FitContext) -> None:
        self._start(ctx)  # may refuse (exit 4) before anything in the folder is touched
        if distributed.place().is_main:
            remove_stale_temp_files(self.last.parent)  # what a killed writer left (the run folder lock is ours)
        if self.last.is_file():
            ctx.last_saved = self.last

    def _start(self, ctx: FitContext) -> None:
        source = self._resume_source()
        if source is None:
            if self.init_from:
                initial_weights(self.init_from, self.meta, ctx.model)
                print(f"Starting from the weights of {self.init_from}")
            return
        schedule = ctx.schedule.scheduler if ctx.schedule else None
        ctx.state, logger_state = restore_training(source, self.meta, ctx.model, ctx.optimizer, schedule, ctx.scaler)
        ctx.logger.restore(ctx.state.history, logger_state)
        print(f"Resuming from {source}: epoch {ctx.state.epoch}, step {ctx.state.step}")

    def _resume_source(self) -> Path | None:
        if self.resume in (None, "never", False):
            return None
        if self.resume == "auto":
            return self.last if self.last.is_file() else None
        path = Path(self.resume)
        if not path.is_file():
            raise ConfigError(f"trainer.resume={self.resume} does not exist; give a last.pt path, 'auto' or null")
        return path

    def on_interrupt(self, trainer: Any, ctx: FitContext) -> None:
        # Every step of the epoch is done and in the state; its validation is not, so the resumed run
        # skips the steps and validates (the state says "epoch N, all steps done").
        self._save_mid_epoch(ctx)

    def on_step_end(self, trainer: Any, ctx: FitContext) -> None:
        self._pending_rng = None  # not saved by this step's before_backward (a skipped batch): stale now
        if ctx.interrupt:  # stopping now: save what there is
            self.on_interrupt(trainer, ctx)
        elif self.save_every_steps and ctx.state.global_step % self.save_every_steps == 0:
            # Weights fresh from an update are not known good until a loss computed with them passed: the
            # save waits for the next step's loss (before_backward), so a divergence never names a
            # last.pt that diverges again at once. The RNG is taken now, as it stands after this step.
            self._pending_rng = rng_state()

    def before_backward(self, trainer: Any, ctx: FitContext, loss: torch.Tensor) -> bool:
        if self._pending_rng is not None:  # the state is still the previous step's: weights, carry, counters
            rng, self._pending_rng = self._pending_rng, None
            if not ctx.diverged(float(loss)):  # a save copies the weights to the host anyway: reading is free
                self._save_mid_epoch(ctx, rng)
        return True

    def on_epoch_start(self, trainer: Any, ctx: FitContext) -> None:
        self._pending_rng = None  # the epoch-end save (after validation) superseded it

    def on_validation_end(self, trainer: Any, ctx: FitContext, val_loss: float) -> None:
        if ctx.improved and _finite_weights(ctx.model) and distributed.place().is_main:
            atomic_save(training_checkpoint(self.meta, ctx.model, ctx.state), self.best)

    def on_epoch_end(self, trainer: Any, ctx: FitContext, metrics: dict[str, Any]) -> None:
        if ctx.diverged(metrics["val_loss"]):
            raise NonFiniteLoss(
                f"validation loss {metrics['val_loss']:.3g} after epoch {metrics['epoch']}: the weights diverged, so "
                f"no checkpoint was written. {_good_checkpoint(ctx)} Try a lower optimizer.lr"
            )
        self._save_last(ctx)

    def _save_mid_epoch(self, ctx: FitContext, rng: dict[str, Any] | None = None) -> None:
        """``last.pt`` between steps: with the model's state after the last step and the epoch's loss so far."""
        ctx.state.hidden, ctx.state.loss_sum = ctx.model.detach_state(ctx.carry), ctx.loss_sum.item()
        self._save_last(ctx, rng)

    def _save_last(self, ctx: FitContext, rng: dict[str, Any] | None = None) -> None:
        if not (_finite_weights(ctx.model) and math.isfinite(ctx.state.loss_sum)):
            raise NonFiniteLoss(
                f"the weights or the training loss of epoch {ctx.state.epoch} are not finite, so no checkpoint "
                f"was written. {_good_checkpoint(ctx)} Try a lower optimizer.lr or a smaller trainer.clip_grad_norm"
            )
        # Every rank's RNG and model state (its own columns), so that each resumes exactly.
        rng = rng or rng_state()
        ranks = distributed.gather({"rng": rng, "hidden": map_tensors(ctx.state.hidden, lambda t: t.cpu())})
        if distributed.place().is_main:
            schedule = ctx.schedule.scheduler if ctx.schedule else None
            ckpt = training_checkpoint(
                self.meta, ctx.model, ctx.state, ctx.optimizer, schedule, ctx.scaler, ctx.logger.state(), rng
            )
            atomic_save({**ckpt, "ranks": ranks} if len(ranks) > 1 else ckpt, self.last)
        distributed.barrier()  # no rank leaves (and, on a signal, exits) before the file is in place
        ctx.last_saved = self.last


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@contextlib.contextmanager
def evaluation_weights(hooks: list[Hook], ctx: FitContext) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook.evaluation_weights(ctx))
        yield
