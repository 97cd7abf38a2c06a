"""The checkpoint hook: ``last.pt`` and ``best.pt`` of a run, resuming it, or starting from another run's
weights (the file format itself is :mod:`lmlab.training.checkpoint_format`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmlab.config.schema import PositiveInt
from lmlab.errors import ConfigError, NonFiniteLoss
from lmlab.models import map_tensors
from lmlab.runtime import distributed
from lmlab.runtime.files import atomic_save, atomic_write, remove_stale_temp_files
from lmlab.training.checkpoint_format import training_checkpoint
from lmlab.training.hooks.base import FitContext, Hook, good_checkpoint
from lmlab.training.resume import initial_weights, restore_training
from lmlab.training.rng import rng_state


class Checkpointing(Hook):
    """``last.pt`` every ``save_every_steps`` steps, at each epoch end and on a stop signal; ``best.pt``
    whenever validation improves (with the weights that were validated); on start, resume — or, for a
    new run with ``init_from``, start from another run's weights (fine-tuning). Files go to
    ``<run folder>/checkpoints/``; each carries ``ctx.checkpoint_meta`` (model, vocabulary, run config).

    ``resume``: ``auto`` (this folder's ``last.pt`` if there is one), a ``last.pt`` path, or null."""

    def __init__(
        self, resume: str | None = "auto", save_every_steps: PositiveInt | None = None, init_from: str | None = None
    ) -> None:
        self.save_every_steps = save_every_steps
        self.resume = resume
        self.init_from = init_from
        self._pending_rng: dict[str, Any] | None = None  # a periodic save waiting for the next loss
        self._carried_best: Path | None = None  # the best.pt of the folder resumed from, if not this one

    def on_fit_start(self, ctx: FitContext) -> None:
        folder = Path(ctx.out_dir) / "checkpoints"
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"{folder} is a file, where the run keeps its checkpoints; move it, or use a new hydra.run.dir"
            )
        self.last = folder / "last.pt"
        self.best = folder / "best.pt"
        self.meta = ctx.checkpoint_meta
        ctx.last_checkpoint, ctx.best_checkpoint = self.last, self.best
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
        ctx.last_saved = source  # the good checkpoint a later message names, until this run saves its own
        # Resumed from another folder: that run's best is this run's best until an epoch here beats it.
        carried = source.parent / "best.pt"
        self._carried_best = (
            carried if carried.is_file() and source.parent.resolve() != self.last.parent.resolve() else None
        )

    def on_fit_end(self, ctx: FitContext) -> None:
        if self._carried_best is not None and not self.best.exists() and distributed.place().is_main:
            atomic_write(self.best, lambda f: f.write(self._carried_best.read_bytes()))  # the folder holds its best

    def _resume_source(self) -> Path | None:
        if self.resume in (None, "never", False):
            return None
        if self.resume == "auto":
            return self.last if self.last.is_file() else None
        path = Path(self.resume)
        if not path.is_file():
            raise ConfigError(
                f"hooks.checkpoint.resume={self.resume} does not exist; give a last.pt path, 'auto' or null"
            )
        return path

    def on_interrupt(self, ctx: FitContext) -> None:
        # Every step of the epoch is done and in the state; its validation is not, so the resumed run
        # skips the steps and validates (the state says "epoch N, all steps done").
        self._save_mid_epoch(ctx)

    def on_step_end(self, ctx: FitContext) -> None:
        self._pending_rng = None  # not saved by this step's before_backward (a skipped batch): stale now
        if ctx.interrupt:  # stopping now: save what there is
            self.on_interrupt(ctx)
        elif self.save_every_steps and ctx.state.global_step % self.save_every_steps == 0:
            # Weights fresh from an update are not known good until a loss computed with them passed: the
            # save waits for the next step's loss (before_backward), so a divergence never names a
            # last.pt that diverges again at once. The RNG is taken now, as it stands after this step.
            self._pending_rng = rng_state()

    def before_backward(self, ctx: FitContext, loss: torch.Tensor) -> bool:
        if self._pending_rng is not None:  # the state is still the previous step's: weights, carry, counters
            rng, self._pending_rng = self._pending_rng, None
            if not ctx.diverged(float(loss.detach())):  # a save copies the weights to the host anyway: reading is free
                self._save_mid_epoch(ctx, rng)
        return True

    def on_epoch_start(self, ctx: FitContext) -> None:
        self._pending_rng = None  # the epoch-end save (after validation) superseded it

    def on_validation_end(self, ctx: FitContext, val_loss: float) -> None:
        if ctx.improved and _finite_weights(ctx.model) and distributed.place().is_main:
            atomic_save(training_checkpoint(self.meta, ctx.model, ctx.state), self.best)

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        if ctx.diverged(metrics["val_loss"]):
            raise NonFiniteLoss(
                f"validation loss {metrics['val_loss']:.3g} after epoch {metrics['epoch']}: the weights diverged, so "
                f"no checkpoint was written. {good_checkpoint(ctx)} Try a lower optimizer.lr"
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
                f"was written. {good_checkpoint(ctx)} Try a lower optimizer.lr or a smaller trainer.clip_grad_norm"
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
