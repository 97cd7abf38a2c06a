"""Where metrics go: the :class:`~lmlab.loggers.base.Logger` contract and registry, the console +
``metrics.jsonl`` logger every run has, and the backends chosen with ``logger=...`` (several at once:
``logger=[wandb,tensorboard]``). Each backend imports its library only when a run uses it."""

from lmlab.loggers import csv_file, mlflow_tracking, tensorboard, wandb  # noqa: F401 - the built-in backends register themselves
from lmlab.loggers.base import LOGGERS, Logger, MultiLogger, register_logger
from lmlab.loggers.console import ConsoleLogger

__all__ = ["LOGGERS", "ConsoleLogger", "Logger", "MultiLogger", "register_logger"]
