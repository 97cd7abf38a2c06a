"""Training: the loop (:mod:`~lmlab.training.trainer`), the hooks around it that own their options
(checkpointing, stop signals, time budget, non-finite policy, weight averaging, progress), the checkpoint
file format, resuming, RNG state, and optimizers/schedules."""

from lmlab.training.trainer import FitResult, Trainer

__all__ = ["FitResult", "Trainer"]
