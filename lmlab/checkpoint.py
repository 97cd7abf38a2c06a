"""Checkpoints: atomic writes and safe (``weights_only``) reads.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
``torch.load(path, weights_only=True)`` and never runs code. It carries the vocabulary and the model's
config, so generation and evaluation need nothing but the file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import CheckpointError

FORMAT = "lmlab-checkpoint"
VERSION = 1
# Checkpoints name the model class to build; only classes from this module are ever instantiated.
MODEL_TARGET_PREFIX = "lmlab.models."


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint, refusing anything that is not a plain lmlab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain data "
            f"(weights_only=True blocked them, nothing was executed). Detail: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # torch raises many types for damaged files; all mean "unreadable"
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file): {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not an lmlab checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this lmlab reads {VERSION}")
    target = state.get("model_config", {}).get("_target_", "")
    if not str(target).startswith(MODEL_TARGET_PREFIX):
        raise CheckpointError(f"{path} names model class {target!r}; only {MODEL_TARGET_PREFIX}* classes are built")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch, CUDA, numpy, python), as weights_only-safe values."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
