"""What every ``python -m lmlab.*`` entry point shares: the config folder and error reporting."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from lmlab.errors import LmlabError

T = TypeVar("T")


def _find_conf_dir() -> str:
    """``conf/`` ships inside the installed package; in a source checkout it sits beside ``lmlab/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"lmlab's conf/ folder is missing (looked in {here / 'conf'} and {here.parent / 'conf'})")


CONF_DIR = _find_conf_dir()


def exit_on_lmlab_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print lmlab's input errors as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except LmlabError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with plain Python containers, surfacing lmlab's own errors as they are."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, LmlabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
