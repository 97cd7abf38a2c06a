"""Reading finished (and failed) runs back from their folders, and tabulating them.

Used by ``lmlab.compare`` and by the end-of-sweep summary.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import printable

COLUMNS = ("run", "overrides", "best_val_ppl", "test_ppl", "num_params", "tokens_per_sec", "wall_s", "note")
NOT_LEARNED = "NO BETTER THAN UNIFORM"  # the note of a run whose results.json says learned: false


@dataclass
class Run:
    folder: Path
    overrides: dict[str, str]
    results: dict[str, Any]
    curve: list[float]  # validation perplexity per epoch

    @property
    def failed(self) -> bool:
        return self.results.get("status") == "failed"


def find_runs(paths: list[Path]) -> list[Run]:
    """Every folder at or under ``paths`` holding a run's ``results.json``: finished runs sorted by
    validation perplexity, then failed jobs (``status: failed``). A folder whose files cannot be read
    (truncated, not JSON, missing figures) is listed as failed with the reason, never dropping the table."""
    folders = sorted({p.parent for path in paths for p in Path(path).rglob("results.json")})
    runs = [_read_run(folder) for folder in folders]
    return sorted(runs, key=lambda r: (r.failed, r.results.get("best_val_ppl", 0.0)))


FIGURES = ("best_val_ppl", "test_ppl", "num_params", "train_tokens_per_sec", "wall_s")  # numbers in a finished run


def _read_run(folder: Path) -> Run:
    try:
        results = json.loads((folder / "results.json").read_text())
        if not isinstance(results, dict):
            raise ValueError("results.json is not a JSON object")
        if results.get("status") != "failed":
            bad = [k for k in FIGURES if type(results.get(k)) not in (int, float)]  # bool is no figure
            if bad:
                raise ValueError(f"results.json lacks {', '.join(bad)}")
        overrides_file = folder / ".hydra" / "overrides.yaml"
        items = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        overrides = dict(str(item).split("=", 1) if "=" in str(item) else (str(item), "") for item in items or [])
        metrics = folder / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        curve = [float(json.loads(line)["val_ppl"]) for line in lines]
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as err:
        reason = f"unreadable run files ({type(err).__name__}: {printable(str(err), 120)})"
        return Run(folder, {}, {"status": "failed", "error": reason}, [])
    return Run(folder, overrides, results, curve)


def differing(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    keys = differing(runs)
    return [_failed_row(r, keys) if r.failed else _row(r, keys) for r in runs]


def _failed_row(r: Run, keys: list[str]) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, "-")
    row.update(run=r.folder.name, overrides=" ".join(f"{k}={r.overrides.get(k, '-')}" for k in keys))
    row["best_val_ppl"] = "FAILED"
    row["note"] = ""
    return row


def _row(r: Run, keys: list[str]) -> dict[str, Any]:
    return {
        "run": r.folder.name,
        "overrides": " ".join(f"{k}={r.overrides.get(k, '-')}" for k in keys),
        "best_val_ppl": round(r.results["best_val_ppl"], 2),
        "test_ppl": round(r.results["test_ppl"], 2),
        "num_params": r.results["num_params"],
        "tokens_per_sec": round(r.results["train_tokens_per_sec"]),
        "wall_s": round(r.results["wall_s"], 1),
        "note": NOT_LEARNED if r.results.get("learned") is False else "",
    }


def render(table: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return out.getvalue()
    cells = [list(COLUMNS)] + [
        [f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in COLUMNS] for row in table
    ]
    if fmt == "md":
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells) + "\n"
