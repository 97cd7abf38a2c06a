"""``python -m lmlab.compare PATH [PATH ...] [--format table|md|csv] [--plot FILE.png]``.

Reads run folders (a multirun folder is searched for them) and prints one row per run: the overrides
that differ between runs, best validation and test perplexity, parameters, tokens/s and wall time,
sorted by validation perplexity. ``--plot`` draws every run's validation-perplexity curve (matplotlib,
the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("run", "overrides", "best_val_ppl", "test_ppl", "num_params", "tokens_per_sec", "wall_s")


@dataclass
class Run:
    folder: Path
    overrides: dict[str, str]
    results: dict[str, Any]
    curve: list[float]  # validation perplexity per epoch


def find_runs(paths: list[Path]) -> list[Run]:
    """Every folder at or under ``paths`` holding a finished run (``results.json``)."""
    folders = sorted({p.parent for path in paths for p in Path(path).rglob("results.json")})
    runs = []
    for folder in folders:
        overrides_file = folder / ".hydra" / "overrides.yaml"
        items = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in items or [])
        metrics = folder / "metrics.jsonl"
        curve = [json.loads(line)["val_ppl"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        runs.append(Run(folder, overrides, json.loads((folder / "results.json").read_text()), curve))
    return sorted(runs, key=lambda r: r.results["best_val_ppl"])


def differing(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    keys = differing(runs)
    return [
        {
            "run": r.folder.name,
            "overrides": " ".join(f"{k}={r.overrides.get(k, '-')}" for k in keys),
            "best_val_ppl": round(r.results["best_val_ppl"], 2),
            "test_ppl": round(r.results["test_ppl"], 2),
            "num_params": r.results["num_params"],
            "tokens_per_sec": round(r.results["train_tokens_per_sec"]),
            "wall_s": round(r.results["wall_s"], 1),
        }
        for r in runs
    ]


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


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    keys = differing(runs)
    for r in runs:
        label = " ".join(f"{k}={r.overrides.get(k, '-')}" for k in keys) or r.folder.name
        ax.plot(range(1, len(r.curve) + 1), r.curve, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="validation perplexity", yscale="log", title="lmlab runs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlab.compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or multirun folders")
    parser.add_argument("--format", choices=("table", "md", "csv"), default="table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="write validation curves to a PNG")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no finished runs (results.json) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    sys.stdout.write(render(rows(runs), args.format))
    if args.plot:
        plot(runs, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
