"""Reading finished (and failed) runs back from their folders, and tabulating them.

Used by ``lmlab.compare`` and by the end-of-sweep summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.config import flatten
from lmlab.errors import printable
from lmlab.runtime.files import plain_yaml, read_record

FIGURE_COLUMNS = ("best_val_ppl", "test_ppl", "epochs", "num_params", "tokens_per_sec", "wall_s", "note")
NOT_LEARNED = "NO BETTER THAN UNIFORM"  # the note of a run whose results.json says learned: false


@dataclass
class Run:
    folder: Path
    overrides: dict[str, str]
    results: dict[str, Any]
    curve: list[float]  # validation perplexity per epoch
    config: dict[str, Any] = field(default_factory=dict)  # the composed config (.hydra/config.yaml), flattened
    steps: list[tuple[int, float]] = field(default_factory=list)  # (global step, training loss) from steps.jsonl

    @property
    def status(self) -> str:
        """``completed``, ``failed`` (results.json says so, or the run's files cannot be read) or ``unfinished``
        (no results.json: stopped, killed, or still running)."""
        return str(self.results.get("status", "unfinished"))

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def finished(self) -> bool:
        return self.status == "completed"

    def value(self, key: str) -> str | None:
        """``key``'s value in this run: its override, else its composed config's value (None: not a setting of
        this run, as a Transformer key is not one of an LSTM run)."""
        if key in self.overrides:
            return self.overrides[key]
        return None if key not in self.config else _text(self.config[key])


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run folder at or under ``paths`` (one holding ``results.json``, or a run record ``.hydra/``
    without it: a run that did not finish): finished runs sorted by validation perplexity, then unfinished
    ones, then failed jobs (``status: failed``). A folder whose files cannot be read (truncated, not JSON,
    missing figures) is listed as failed with the reason, never dropping the table."""
    found = {p.parent for path in paths for p in Path(path).rglob("results.json")}
    found |= {p.parent.parent for path in paths for p in Path(path).rglob(".hydra/config.yaml")}
    runs = [_read_run(folder) for folder in sorted(found)]
    order = {"completed": 0, "unfinished": 1}
    return sorted(runs, key=lambda r: (order.get(r.status, 2), r.results.get("best_val_ppl", 0.0)))


FIGURES = ("best_val_ppl", "test_ppl", "num_params", "train_tokens_per_sec", "wall_s")  # numbers in a finished run


def _read_run(folder: Path) -> Run:
    try:
        results_file = folder / "results.json"
        results = json.loads(read_record(results_file)) if results_file.exists() else {"status": "unfinished"}
        if not isinstance(results, dict):
            raise ValueError("results.json is not a JSON object")
        if results.get("status") not in ("failed", "unfinished"):
            bad = [k for k in FIGURES if not _figure(results.get(k))]
            if bad:
                raise ValueError(f"results.json lacks {', '.join(bad)} (or they are not finite numbers)")
        overrides_file = folder / ".hydra" / "overrides.yaml"
        items = plain_yaml(read_record(overrides_file)) if overrides_file.exists() else []
        if not isinstance(items, list):
            raise ValueError(".hydra/overrides.yaml is not a list of overrides")
        overrides = dict(str(item).split("=", 1) if "=" in str(item) else (str(item), "") for item in items)
        config_file = folder / ".hydra" / "config.yaml"
        record = plain_yaml(read_record(config_file)) if config_file.exists() else {}
        config = flatten(record) if isinstance(record, dict) else {}
        metrics = folder / "metrics.jsonl"
        lines = read_record(metrics).splitlines() if metrics.exists() else []
        curve = [float(json.loads(line)["val_ppl"]) for line in lines]
        steps = _training_curve(folder / "steps.jsonl")
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, yaml.YAMLError) as err:
        reason = f"unreadable run files ({type(err).__name__}: {printable(str(err), 120)})"
        return Run(folder, {}, {"status": "failed", "error": reason}, [])
    return Run(folder, overrides, results, curve, config, steps)


def _training_curve(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of each line of a run's steps.jsonl; a line that is not one (cut short by a kill) is skipped."""
    if not path.exists():
        return []
    points = []
    for line in read_record(path).splitlines():
        try:
            record = json.loads(line)
            points.append((int(record["step"]), float(record["loss"])))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return points


def _figure(value: Any) -> bool:
    """A finite number (a bool is no figure; NaN and infinities sort and plot as nothing sensible)."""
    return type(value) in (int, float) and math.isfinite(value)


def _text(value: Any) -> str:
    """A config value as an override would spell it (``null``, ``true``, ``[a, b]``)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def differing(runs: list[Run]) -> list[str]:
    """The override keys whose value is not the same in every run shown that has a run record (a run where the
    key is no setting at all counts as a value of its own; a folder without a record, as a damaged one, none)."""
    recorded = [r for r in runs if r.overrides or r.config]
    keys = sorted({k for r in recorded for k in r.overrides})
    return [k for k in keys if len({r.value(k) for r in recorded}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last part where no other key shown ends the same and no column of figures has that name
    (``model.hidden_dim`` → ``hidden_dim``; ``trainer.epochs`` stays whole beside the ``epochs`` column), else
    in full."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    taken = {"run", "status", *FIGURE_COLUMNS}
    return {
        key: name if last.count(name) == 1 and name not in taken else key for key, name in zip(keys, last, strict=True)
    }


def label(run: Run, keys: list[str]) -> str:
    """The run's values of the keys that vary (``batch_size=8 hidden_dim=32``), keys where it has none left
    out; its folder's name when no key varies."""
    names = short_names(keys)
    parts = [f"{names[k]}={run.value(k)}" for k in keys if run.value(k) is not None]
    return " ".join(parts) or run.folder.name


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: its folder, status, the varying keys' values (a column each), then its figures."""
    keys = differing(runs)
    names = short_names(keys)
    table = []
    for r in runs:
        row: dict[str, Any] = {"run": r.folder.name, "status": r.status}
        row.update({names[k]: r.value(k) if r.value(k) is not None else "" for k in keys})
        row.update(_figures(r))
        table.append(row)
    return table


def _figures(r: Run) -> dict[str, Any]:
    if r.finished:
        return {
            "best_val_ppl": round(r.results["best_val_ppl"], 2),
            "test_ppl": round(r.results["test_ppl"], 2),
            "epochs": r.results.get("epochs_run", len(r.curve)),
            "num_params": r.results["num_params"],
            "tokens_per_sec": round(r.results["train_tokens_per_sec"]),
            "wall_s": round(r.results["wall_s"], 1),
            "note": NOT_LEARNED if r.results.get("learned") is False else "",
        }
    figures = dict.fromkeys(FIGURE_COLUMNS, "-")
    figures["note"] = ""
    if r.status == "failed":
        figures["best_val_ppl"] = "FAILED"
    elif r.curve:  # stopped (or running): its best epoch so far and how far it got
        figures.update(
            best_val_ppl=round(min(r.curve), 2), epochs=len(r.curve), note=f"unfinished at epoch {len(r.curve)}"
        )
    else:
        figures["note"] = "unfinished before its first epoch"
    return figures


def render(table: list[dict[str, Any]], fmt: str) -> str:
    """``table`` (rows with the same columns) as aligned text, a markdown table, or CSV."""
    columns = list(table[0]) if table else ["run", "status", *FIGURE_COLUMNS]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return out.getvalue()
    cells = [columns] + [[f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns] for row in table]
    if fmt == "md":
        lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in columns) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells) + "\n"
