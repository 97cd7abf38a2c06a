"""The errors lmlab raises for bad input: each message names the bad value and the fix."""


class LmlabError(Exception):
    """Base class: entry points print these as one clear line instead of a traceback."""


class ConfigError(LmlabError, ValueError):
    """A config value is invalid (names the key, the value and the fix)."""


class DataError(LmlabError):
    """A data file is missing, unreadable or could not be downloaded."""


class CheckpointError(LmlabError):
    """A checkpoint file is missing, damaged, unsafe or does not fit the model/vocabulary."""
