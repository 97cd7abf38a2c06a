"""How this process was launched (torchrun, a submitit SLURM task, or alone), read from the environment
before torch is imported, and how a multirun job's folder is named."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from omegaconf import OmegaConf

MAX_DIRNAME = 120
UNSAFE_IN_A_NAME = re.compile(r"[^A-Za-z0-9._,=+-]|\.{2,}")
# Set by lmlab.runtime.job_records.JobRecorder when a multirun starts (the environment reaches every launcher's jobs):
# the keys that vary between the sweep's jobs, comma-separated.
SWEPT_KEYS_ENV = "LMLAB_SWEPT_KEYS"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def under_submitit() -> bool:
    """A SLURM task started by submitit (``hydra/launcher=slurm``)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def launched_processes() -> tuple[int, int]:
    """(this process's rank, number of processes) as the launcher set them — torchrun's ``RANK``/
    ``WORLD_SIZE``, a submitit SLURM task's ``SLURM_PROCID``/``SLURM_NTASKS``, else (0, 1) — read from
    the environment so that entry points know them before torch is imported or a group is joined."""
    if under_torchrun():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if under_submitit():
        return int(os.environ.get("SLURM_PROCID") or 0), int(os.environ.get("SLURM_NTASKS") or 1)
    return 0, 1


def process_rank() -> int:
    return launched_processes()[0]


def short_dirname(override_dirname: str) -> str:
    """A job folder name from its overrides: only those that vary between the sweep's jobs (when known),
    keys shortened to their last part (``batch_size=40``), the whole capped at ~120 characters (plus a
    hash), since file systems refuse names over 255 bytes. The full overrides stay in the job's
    ``.hydra/overrides.yaml``. Only letters, digits and ``._,=+-`` stay; anything else (a ``/``, a space, a
    control character) becomes ``_``, and so does a run of dots: the name is one folder, inside the sweep's."""
    swept = set(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    parts = []
    for item in override_dirname.split(","):
        key, sep, value = item.lstrip("+").partition("=")  # +experiment=x: the group's name, not how it was added
        if item.startswith("+sweep=") or (swept and key.lstrip("~") not in swept):
            continue  # a preset name or a value every job shares says nothing about the job
        parts.append(f"{key.rsplit('.', 1)[-1]}{sep}{value}")
    name = UNSAFE_IN_A_NAME.sub("_", ",".join(parts))  # a value's "/" or ".." never makes a path of the name
    if len(name) > MAX_DIRNAME:
        name = f"{name[:MAX_DIRNAME]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


if not OmegaConf.has_resolver("lmlab_dirname"):
    OmegaConf.register_new_resolver("lmlab_dirname", short_dirname)


def task_overrides(hydra_cfg: Any) -> list[str]:
    """The command line's overrides as typed: an override whose value is an interpolation (``${oc.env:X}``) stays
    that text (iterating Hydra's own list would resolve it, and fail on one that cannot be)."""
    return [str(o) for o in OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)]
