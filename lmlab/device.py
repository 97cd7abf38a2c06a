"""Pick the torch device (and CPU thread count) from the ``device`` config group."""

from __future__ import annotations

import ctypes
import sys

import torch

from lmlab.errors import ConfigError

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str = "auto", num_threads: int | None = None, cpu_heap: str | None = "reuse") -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; an explicit name must be available.

    ``cpu_heap`` (CPU only): see :func:`tune_cpu_heap`."""
    if name not in DEVICE_NAMES:
        raise ConfigError(f"device.name={name!r} is unknown; choose one of {DEVICE_NAMES}")
    if cpu_heap not in CPU_HEAP_MODES:
        raise ConfigError(f"device.cpu_heap={cpu_heap!r} is unknown; choose one of {list(CPU_HEAP_MODES)}")
    if num_threads is not None:
        if not isinstance(num_threads, int) or num_threads <= 0:
            raise ConfigError(f"device.num_threads={num_threads!r} must be a positive integer or null")
        torch.set_num_threads(num_threads)
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ConfigError(
            f"device={name} was asked for but this machine has no {name.upper()} device; use device=auto or device=cpu"
        )
    device = torch.device(("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name)
    if device.type == "cpu" and cpu_heap is not None:
        tune_cpu_heap(cpu_heap)
    return device


# glibc malloc thresholds (bytes) per mode: (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
CPU_HEAP_MODES = {"reuse": (32 << 20, 64 << 20), "release": (256 << 10, 512 << 10), None: None}


def tune_cpu_heap(mode: str) -> bool:
    """Set how glibc's malloc (which PyTorch's CPU tensors use) treats freed buffers; False where the
    C library is not glibc.

    glibc's default adapts its thresholds as it goes: buffers of a few MB are sometimes handed back to
    the kernel when freed and page-faulted in afresh at the next step (~9,400 faults, 37 MB, per step
    of the 2×200 LSTM: ~20% of its time), and sometimes kept in heap fragments that count as resident.
    ``reuse`` keeps buffers under 32 MiB in the heap (fastest: each step reuses the last one's);
    ``release`` returns every buffer over 256 KiB at once (lowest peak RSS: 140 MB less for the
    default 2×650 model at vocabulary 33k, for a few % of its speed). See experiments/bench.md.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mmap_threshold, trim_threshold = CPU_HEAP_MODES[mode]
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device, in MiB; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
