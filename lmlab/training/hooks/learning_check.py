"""``hooks.learning_check``: one line when validation is no better than a uniform guess."""

from __future__ import annotations

from typing import Any

from lmlab.config.schema import PositiveInt
from lmlab.metrics import no_better_than_uniform, uniform_guess_warning
from lmlab.training.hooks.base import FitContext, Hook


class LearningCheck(Hook):
    """After ``after_epochs`` epochs, a validation loss no better than a uniform guess over the vocabulary
    (:func:`~lmlab.metrics.no_better_than_uniform`) is said in one line, on the console and in
    that epoch's record (``warning``), while the run goes on: the user can stop it and fix the learning
    rate instead of waiting for a figure that means nothing. The final verdict is ``results.json``'s
    ``learned``."""

    def __init__(self, after_epochs: PositiveInt = 1) -> None:
        self.after_epochs = after_epochs

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        if metrics["epoch"] == self.after_epochs and no_better_than_uniform(metrics["val_loss"], ctx.model.vocab_size):
            epochs = "epoch" if self.after_epochs == 1 else "epochs"
            when = f"after {self.after_epochs} {epochs}"
            lr = float(ctx.optimizer.param_groups[0]["lr"])  # optimizer.lr as set (or as a schedule lowered it)
            metrics["warning"] = uniform_guess_warning(metrics["val_loss"], ctx.model.vocab_size, when, lr)
