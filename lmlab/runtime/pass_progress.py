"""Progress of one pass of known length — a validation or test pass, an evaluation method's scoring, a weight
search: a bar on a terminal; elsewhere (output redirected) a plain line ``first_line_s`` after the pass began,
then every ``every_s``, with what is done and the ETA. A pass shorter than ``first_line_s`` says nothing.

    for window in reported(stream.windows(), stream.num_windows(), "validation"):
        ...
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
FIRST_LINE_S, EVERY_S = 10.0, 30.0


def reported(
    items: Iterable[T], total: int, label: str, unit: str = "windows", quiet: bool = False,
    first_line_s: float = FIRST_LINE_S, every_s: float = EVERY_S,
) -> Iterator[T]:  # fmt: skip
    """Yield ``items`` (``total`` of them), reporting progress as the module says (``quiet``: not at all, as on
    every process but the first of a multi-process run)."""
    if quiet:
        yield from items
        return
    with tqdm(total=total, desc=label, unit=unit[:-1], leave=False, disable=None, dynamic_ncols=True) as bar:
        started = time.perf_counter()
        next_line_at = started + first_line_s
        for done, item in enumerate(items, start=1):
            yield item
            bar.update(1)
            now = time.perf_counter()
            if bar.disable and now >= next_line_at and done < total:
                eta = (now - started) / done * (total - done)
                print(f"{label}: {done:,}/{total:,} {unit} | {now - started:.0f} s | ETA {duration(eta)}", flush=True)
                next_line_at = now + every_s


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
