"""Every random-number generator a run draws from (torch, CUDA, numpy, Python), as values that survive
``torch.load(weights_only=True)``: saved in ``last.pt`` so that a resumed run draws what an
uninterrupted one would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from lmlab.runtime import distributed


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch, CUDA, numpy, python), as weights_only-safe values."""
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
        if distributed.place().world_size > 1:  # this rank's GPU only: reading the others opens a context on each
            state["cuda_current"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])
