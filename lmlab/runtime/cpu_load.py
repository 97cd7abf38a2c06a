"""How many of this process's cores other work keeps busy, measured from ``/proc/stat`` since the command started.

Why: torch's threads spin while they wait for each other; on a 2-core machine with other work running, two
threads ran a step 1.3-3x *slower* than one (experiments/threads.md). A run's default thread count
(``device.num_threads: null``) is therefore the cores the other work leaves free. The measurement costs nothing:
it spans the command's own start (Hydra, ``import torch``), less this process's own CPU time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_STAT = Path("/proc/stat")
MIN_SAMPLE_S = 0.25  # below this the kernel's 10 ms ticks say too little: the sample is waited out


def _cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _snapshot() -> tuple[float, int, int, float] | None:
    """(time, busy ticks, all ticks) over this process's CPUs, and this process's CPU seconds; None off Linux."""
    try:
        lines = _STAT.read_text().splitlines()
    except OSError:
        return None
    cpus, busy, total = _cpus(), 0, 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return time.monotonic(), busy, total, time.process_time()


_start = _snapshot()  # taken when an entry point imports this module, as it starts


def restart() -> None:
    """Measure from now (a process forked from a warm interpreter starts its command here)."""
    global _start
    _start = _snapshot()


def busy_cores() -> float:
    """Cores of this process's CPU set kept busy by other processes since the command started (0.0 where it
    cannot be measured)."""
    if _start is None:
        return 0.0
    waited = time.monotonic() - _start[0]
    if waited < MIN_SAMPLE_S:
        time.sleep(MIN_SAMPLE_S - waited)
    now = _snapshot()
    if now is None or now[2] <= _start[2]:
        return 0.0
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    own = (now[3] - _start[3]) * ticks_per_s  # this process's own work (its start) is not other work
    busy = max(0.0, now[1] - _start[1] - own)
    return busy / (now[2] - _start[2]) * len(_cpus())


def free_threads(default: int) -> tuple[int, float]:
    """(threads to use: ``default`` less the cores other work keeps busy, at least 1; those busy cores)."""
    busy = busy_cores()
    return max(1, min(default, round(default - busy))), busy
