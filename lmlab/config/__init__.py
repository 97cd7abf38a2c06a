"""Configuration: where the YAML groups live (:data:`CONF_DIR`), the typed settings every group is
checked against (:mod:`lmlab.config.schema`) and the validation of a composed config
(:mod:`lmlab.config.validation`)."""

from __future__ import annotations

from pathlib import Path


def _find_conf_dir() -> str:
    """``conf/`` ships inside the installed package (``lmlab/conf``); in a source checkout it sits beside
    ``lmlab/``."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "run.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"lmlab's conf/ folder is missing (looked in {package / 'conf'} and {package.parent / 'conf'})")


CONF_DIR = _find_conf_dir()
