"""What every ``python -m lmlab.*`` entry point shares: the config folder and error reporting."""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

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
MAX_DIRNAME = 120


def short_dirname(override_dirname: str) -> str:
    """A job folder name from its overrides: keys shortened to their last part (``batch_size=40``) and
    the whole capped at ~120 characters (plus a hash), since file systems refuse names over 255 bytes.
    The full overrides stay in the job's ``.hydra/overrides.yaml``."""
    parts = []
    for item in override_dirname.split(","):
        if item.startswith("+sweep="):
            continue  # the preset name says nothing about the job
        key, sep, value = item.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}{sep}{value}")
    name = ",".join(parts)
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


if not OmegaConf.has_resolver("lmlab_dirname"):
    OmegaConf.register_new_resolver("lmlab_dirname", short_dirname)


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
