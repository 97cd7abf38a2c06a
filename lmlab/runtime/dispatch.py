"""How much work a step hands the device's queue: operators dispatched and values read back to the host.

On a GPU every operator is a kernel launch (microseconds of CPU time whether or not it has work) and
every read of a value (``.item()``, ``bool(tensor)``) makes the host wait for the device; at small
batches these, not FLOPs, bound a step. Both are counted on any device with ``torch.profiler``, so the
budget is checked on a CPU too.
"""

from __future__ import annotations

import contextlib
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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if not _inside_aten(e)]
    reads = [e for e in aten if e.name == HOST_READ]
    return DispatchCount(len(top), len(aten), len(reads))


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
