"""Configuration: where the YAML groups live (:data:`CONF_DIR`), the typed settings every group is
checked against (:mod:`lmlab.config.schema`) and the validation of a composed config
(:mod:`lmlab.validation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _find_conf_dir() -> str:
    """``conf/`` ships inside the installed package (``lmlab/conf``); in a source checkout it sits beside
    ``lmlab/``."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "run.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"lmlab's conf/ folder is missing (looked in {package / 'conf'} and {package.parent / 'conf'})")


CONF_DIR = _find_conf_dir()


def flatten(config: dict[str, Any], prefix: str = "", private: bool = True) -> dict[str, Any]:
    """``{"model": {"hidden_dim": 650}}`` → ``{"model.hidden_dim": 650}``: a composed config under the dotted keys
    the command line, the dashboards' filters and ``lmlab.compare``'s columns name. ``private=False`` leaves out
    the keys that build objects rather than set them (``_target_``, ``_partial_``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if not private and str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}.", private))
        else:
            flat[name] = value
    return flat


# Keys that moved when the hooks took over their own options: old name -> new name.
MOVED_KEYS = {
    "trainer.resume": "hooks.checkpoint.resume",
    "trainer.save_every_steps": "hooks.checkpoint.save_every_steps",
    "trainer.init_from": "hooks.checkpoint.init_from",
    "trainer.max_time_s": "hooks.time_budget.max_time_s",
    "trainer.on_nan": "hooks.non_finite.on_nan",
    "trainer.max_skipped_fraction": "hooks.non_finite.max_skipped_fraction",
    "trainer.log_interval": "hooks.progress.log_interval",
    "trainer.progress": "hooks.progress.bar",
}


def moved_key(arguments: list[str]) -> str | None:
    """One line for the first command-line override that uses a key's old name (else None), naming the
    new one: Hydra would only say the key is not in the config."""
    for argument in arguments:
        key, sep, value = argument.lstrip("+~").partition("=")
        if sep and key in MOVED_KEYS:
            return f"{key} is now {MOVED_KEYS[key]} (the hooks own their options): use {MOVED_KEYS[key]}={value}"
    return None
