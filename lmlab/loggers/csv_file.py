"""One CSV file per run for people who plot in pandas (``logger=csv``): ``<run dir>/metrics.csv``.

A row per progress report (``kind=step``) and per epoch (``kind=epoch``), in the order they happened, with
the same columns throughout (:data:`COLUMNS`; a figure a row does not have is empty)::

    pandas.read_csv("metrics.csv").query("kind == 'epoch'").plot(x="epoch", y="val_ppl")

Like ``steps.jsonl`` it is the checkpoint's view of the run: a resumed run cuts it back to the rows its
checkpoint had seen, then appends, so no row is lost or written twice.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lmlab.loggers.base import STEP_FIELDS, Logger, register_logger, restored_step
from lmlab.runtime.files import atomic_write_text, open_append

COLUMNS = (
    "kind",
    "step",
    "epoch",
    "loss",
    "ppl",
    "lr",
    "tokens_per_sec",
    "train_loss",
    "val_loss",
    "val_ppl",
    "elapsed_s",
)


@register_logger("csv")
class CsvLogger(Logger):
    """Per-step and per-epoch rows in ``<run dir>/metrics.csv`` (no options)."""

    def __init__(self, out_dir: str, run_config: dict[str, Any], group: str | None = None, name: str | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        self.step = 0  # the global step of the last row written

    def _append(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        with open_append(self.path) as f:  # (lineterminator below: the rows' own newlines)
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self._append(
            {"kind": "step", "step": step, **{STEP_FIELDS[k]: v for k, v in metrics.items() if k in STEP_FIELDS}}
        )

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        self._append({"kind": "epoch", "step": self.step, **metrics})

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        self.step = restored_step(state, "step", "CSV logger's step", ", or without logger=csv") or 0
        if not self.path.is_file():
            return
        epochs = len(history)
        kept = []
        for row in csv.DictReader(io.StringIO(self.path.read_text(errors="replace"))):
            if row.get("kind") == "epoch" and epochs > 0:
                kept.append(row)
                epochs -= 1
            elif row.get("kind") == "step" and row.get("step", "").isdigit() and int(row["step"]) <= self.step:
                kept.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, out.getvalue())

    def state(self) -> dict[str, Any]:
        return {"step": self.step}
