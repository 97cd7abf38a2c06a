"""Pick the torch device (and CPU thread count) from the ``device`` config group, and the precision the
device can run."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from lmlab.config.schema import NonNegativeInt, Rule
from lmlab.errors import ConfigError
from lmlab.runtime.cpu_load import free_threads

# More threads than this is a typo, not a choice (100,000 of them crashed the process); 4 a core still allows
# oversubscribing on purpose.
MAX_THREADS = 4 * (os.cpu_count() or 1)
ThreadCount = Annotated[int, Rule(lambda v: 0 < v <= MAX_THREADS, f"a positive integer up to {MAX_THREADS}")]
thread_choice: str | None = None  # why the last select_device took fewer threads than torch's default, if it did


def select_device(
    name: Literal["auto", "cpu", "cuda", "mps"] = "auto",
    num_threads: ThreadCount | None = None,
    cpu_heap: Literal["reuse", "release"] | None = "reuse",
    index: NonNegativeInt | None = None,
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto",
) -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; an explicit name must be available. ``index``
    picks one of several GPUs (null: the current one; a multirun spreads its jobs over them,
    :func:`place_sweep_job`). ``matmul_precision``: see :func:`resolve_matmul_precision`.

    ``num_threads``: torch's CPU threads; null: torch's default (one per core) less the cores other work kept busy
    while the command started (:mod:`lmlab.runtime.cpu_load`), so that a run beside other work does not
    slow itself down; the choice is in :data:`thread_choice` (the start banner prints it).
    ``cpu_heap`` (CPU only): see :func:`tune_cpu_heap`."""
    global thread_choice
    thread_choice = None
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    else:
        default = torch.get_num_threads()
        threads, busy = free_threads(default)
        if threads < default:
            torch.set_num_threads(threads)
            thread_choice = (
                f"{busy:.1f} of {default} cores busy with other work: {threads} thread{'s' * (threads > 1)} "
                "(device.num_threads=N to choose)"
            )
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ConfigError(
            f"device={name} was asked for but this machine has no {name.upper()} device; use device=auto or device=cpu"
        )
    device = torch.device(("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name)
    if index is not None and device.type == "cuda":
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device.index={index} but this machine has {torch.cuda.device_count()} GPU(s); give 0 to "
                f"{torch.cuda.device_count() - 1}, or null"
            )
        device = torch.device("cuda", index)
    if device.type == "cpu" and cpu_heap is not None:
        tune_cpu_heap(cpu_heap)
    apply_matmul_precision(resolve_matmul_precision(matmul_precision, device))
    return device


def resolve_matmul_precision(setting: str, device: torch.device) -> str:
    """``auto``: ``high`` (TF32 tensor cores for fp32 matmuls and cuDNN: 10-bit mantissa inputs, fp32
    accumulation) on GPUs that have TF32 (compute capability 8.0+: A100, H100, ...), ``highest`` (full
    fp32) everywhere else, CPUs included."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "high"
    return "highest"


def apply_matmul_precision(precision: str) -> None:
    """Process-wide: fp32 matmuls (``torch.set_float32_matmul_precision``) and cuDNN (its RNNs and
    convolutions) use TF32 unless ``highest``."""
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"


def place_sweep_job(job_num: int, device_count: int) -> int | None:
    """The GPU a multirun's job ``job_num`` runs on: ``job_num mod device_count`` (jobs started together
    by a parallel launcher are consecutive, so they spread evenly; with ``hydra.launcher.n_jobs=k*m``,
    m jobs share each of k GPUs). None on a machine with fewer than two GPUs."""
    return job_num % device_count if device_count > 1 else None


# glibc malloc thresholds (bytes) per mode: (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
CPU_HEAP_MODES = {"reuse": (32 << 20, 64 << 20), "release": (256 << 10, 512 << 10), None: None}


def tune_cpu_heap(mode: str) -> bool:
    """Set how glibc's malloc (which PyTorch's CPU tensors use) treats freed buffers; False where the
    C library is not glibc.

    glibc's default adapts its thresholds as it goes: buffers of a few MB are sometimes handed back to
    the kernel when freed and page-faulted in afresh at the next step (a large share of a small model's
    step time), and sometimes kept in heap fragments that count as resident. ``reuse`` keeps buffers under
    32 MiB in the heap (fastest: each step reuses the last one's); ``release`` returns every buffer over
    256 KiB at once (lowest peak RSS, for a little speed). The figures: experiments/bench.md.
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device, in MiB; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def bf16_support(device: torch.device) -> str | None:
    """``"fast"`` where bf16 matmuls run natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX),
    ``"emulated"`` where oneDNN runs bf16 through fp32 units (AVX-512 without BF16: correct, not
    faster), None where it cannot run at all (AVX2-only CPUs: oneDNN's bf16 LSTM kernel is missing)."""
    if device.type == "cuda":
        return "fast" if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu" or not (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return None
    return "fast" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "emulated"


def cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use here (``AVX2``, ``AVX512``, ...; torch's own probe), with
    ``+bf16`` where the CPU has native bf16 dot products: the figures of a CPU benchmark depend on both."""
    isa = torch.backends.cpu.get_cpu_capability()
    return isa + ("+bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision -> autocast dtype


def recorded_precision(config: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run evaluated in, from its stored config (a checkpoint's ``config``, a file: only
    the known names are read), on ``device``: what scores the same model the same way again. fp32 (None)
    where the record names none, or a precision this device cannot run."""
    trainer = config.get("trainer") if isinstance(config, dict) else None
    precision = trainer.get("precision") if isinstance(trainer, dict) else None
    if precision not in PRECISIONS and precision != "auto":
        return None
    try:
        return PRECISIONS[resolve_precision(precision, device)]
    except ConfigError:
        return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` is bf16 where the device has fast bf16 on the CPU (measured
    faster there, experiments/bench.md) and fp32 elsewhere (on GPUs at batch 20 bf16 autocast measured
    slower than fp32); an explicit choice the device cannot run is refused before any work."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and bf16_support(device) == "fast" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a CUDA device (this run is on {device.type}); "
            "use trainer.precision=auto (bf16 where the CPU has it) or fp32"
        )
    if precision == "bf16" and bf16_support(device) is None:
        raise ConfigError(
            f"trainer.precision=bf16 needs bf16 support, which this {device.type} lacks (CPUs need AVX-512); "
            "use trainer.precision=auto or trainer.precision=fp32"
        )
    return precision
