"""Pick the torch device (and CPU thread count) from the ``device`` config group."""

from __future__ import annotations

import torch

from lmlab.errors import ConfigError

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto", num_threads: int | None = None) -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; an explicit name must be available."""
    if name not in DEVICE_NAMES:
        raise ConfigError(f"device.name={name!r} is unknown; choose one of {DEVICE_NAMES}")
    if num_threads is not None:
        if not isinstance(num_threads, int) or num_threads <= 0:
            raise ConfigError(f"device.num_threads={num_threads!r} must be a positive integer or null")
        torch.set_num_threads(num_threads)
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ConfigError(
            f"device={name} was asked for but this machine has no {name.upper()} device; use device=auto or device=cpu"
        )
    return torch.device(name)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device, in MiB; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
