"""``python -m lmlab.compare PATH [PATH ...] [--format table|md|csv] [--plot FILE.png]``.

Reads run folders (a multirun folder is searched for them) and prints one row per run: the overrides
that differ between runs, best validation and test perplexity, parameters, tokens/s and wall time,
sorted by validation perplexity. ``--plot`` draws every run's validation-perplexity curve (matplotlib,
the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.runtime.run_table import Run, differing, find_runs, render, rows


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    keys = differing(runs)
    for r in (r for r in runs if not r.failed):
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
        try:
            import matplotlib  # noqa: F401 - the optional plot extra
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'lmlab[plot]' (the table above is complete)",
                  file=sys.stderr)  # fmt: skip
            return 2
        plot(runs, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
