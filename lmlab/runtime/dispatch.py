"""How much work a step hands the device's queue: operators dispatched and values read back to the host.

On a GPU every operator is a kernel launch (microseconds of CPU time whether or not it has work) and
every read of a value (``.item()``, ``bool(tensor)``) makes the host wait for the device; at small
batches these, not FLOPs, bound a step. Both are counted on any device with ``torch.profiler``, so the
budget is checked on a CPU too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

HOST_READ = "aten::_local_scalar_dense"  # what .item(), float(t), bool(t) and t.tolist() dispatch


@dataclass
class DispatchCount:
    """Operators called from Python (top-level ``aten::`` calls), all ``aten::`` calls counting those
    nested inside others, and reads of a value back to the host."""

    operators: float
    nested: float
    host_reads: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def count_dispatch(run: Callable[[], object]) -> DispatchCount:
    """Profile ``run()`` and count what it dispatched (per step: the difference of two runs of different
    length, divided by the difference, leaves out what a run does once)."""
    with _profiler_chatter_dropped(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if not _inside_aten(e)]
    reads = [e for e in aten if e.name == HOST_READ]
    return DispatchCount(len(top), len(aten), len(reads))


# What the profiler's engine (Kineto) writes to the process's stderr at each profiled region whatever its log
# level: "USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start", and "STAGE:" lines.
_PROFILER_CHATTER = re.compile(rb"^(USDT|STAGE):\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _profiler_chatter_dropped() -> Iterator[None]:
    """While inside, the process's stderr (file descriptor 2, where C++ writes) goes to a temp file; after, every
    line of it but the profiler's own chatter is passed on: a command's stderr carries only what matters."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not _PROFILER_CHATTER.match(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()


def _inside_aten(event: object) -> bool:
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = getattr(parent, "cpu_parent", None)
    return False


_accelerator_policy = False  # set by as_on_an_accelerator()


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value back to the host costs nothing on ``device``: on a CPU there is no queue
    to wait for; on an accelerator every read stalls it. Code that may read a value in a training step
    asks this first (the fused loss, the non-finite check), so a step on a GPU reads nothing between
    log lines. :func:`as_on_an_accelerator` makes a CPU answer as a GPU would, to check that policy."""
    return device.type == "cpu" and not _accelerator_policy


@contextlib.contextmanager
def as_on_an_accelerator() -> Iterator[None]:
    """Run the accelerator's no-read policy on a CPU (tests and ``lmlab.bench`` count its host reads)."""
    global _accelerator_policy
    previous, _accelerator_policy = _accelerator_policy, True
    try:
        yield
    finally:
        _accelerator_policy = previous
