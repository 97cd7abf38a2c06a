"""Where metrics go: the :class:`~lmlab.loggers.base.Logger` contract, the console + ``metrics.jsonl``
logger every run has, and the optional backends chosen with ``logger=...``."""

from lmlab.loggers.base import ConsoleLogger, Logger, MultiLogger, perplexity

__all__ = ["ConsoleLogger", "Logger", "MultiLogger", "perplexity"]
