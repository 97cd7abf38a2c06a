"""The errors lmlab raises for bad input and failed runs: each message names the value and the fix, and
each kind has its own exit code, so scripts and schedulers can tell them apart.

| exit | error |
|---|---|
| 2 | :class:`ConfigError`, :class:`DataError`, :class:`UnsafeRunFile` (bad input: nothing was done) |
| 3 | :class:`NonFiniteLoss` (the loss or weights diverged) |
| 4 | :class:`CheckpointError` (a file is missing, damaged, unsafe or does not fit) |
| 5 | :class:`DiskFull` (no space left; the previous files are intact) |
| 6 | :class:`RunFolderBusy` (another live run writes to that folder) |
| 130 / 143 | interrupted by SIGINT / SIGTERM (``lmlab.runtime.signals``) |
"""

from typing import Any


def printable(value: Any, limit: int = 200) -> str:
    """A value read from a file, safe to put in a message: escapes instead of control characters (a
    crafted file must not drive the terminal), at most ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


class LmlabError(Exception):
    """Base class: entry points print these as one clear line instead of a traceback."""

    exit_code = 2


class ConfigError(LmlabError, ValueError):
    """A config value is invalid (names the key, the value and the fix). Raised by the schema checks with
    the parts as fields too, so that a caller can say it its own way without parsing the message:
    ``problem`` ("model.dropout=1.5 is invalid: it must be a number in [0, 1)") and ``fix``."""

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.key = key
        self.problem = problem or message
        self.fix = fix


class DataError(LmlabError):
    """A data file is missing, unreadable or could not be downloaded."""


class UnsafeRunFile(LmlabError):
    """A file a run appends to is a symbolic link planted in its folder (lmlab never writes through one)."""


class NonFiniteLoss(LmlabError, RuntimeError):
    """Training produced a NaN/inf loss or weights and ``on_nan=stop`` (or too many batches were skipped)."""

    exit_code = 3


class CheckpointError(LmlabError):
    """A checkpoint file is missing, damaged, unsafe or does not fit the model/vocabulary."""

    exit_code = 4


class DiskFull(LmlabError, OSError):
    """A write failed for lack of space (or quota); what was there before is intact."""

    exit_code = 5


class RunFolderBusy(LmlabError):
    """Another live run holds the run folder's lock."""

    exit_code = 6
