"""``python -m lmlab.compare PATH [PATH ...] [--format table|md|csv] [--plot FILE] [--html FILE]``.

Reads run folders (a multirun folder is searched for them) and prints one row per run: its status, the
settings that vary among the runs shown (a column each, by the last part of the key where that is
unambiguous), best validation and test perplexity, epochs, parameters, tokens/s and wall time; finished runs
by validation perplexity, then runs that did not finish (with how far they got), then failed jobs.
``--plot FILE.png|.svg`` draws the runs' curves and, for a sweep, one panel per swept key
(:mod:`lmlab.runtime.run_report`; matplotlib, the ``plot`` extra); ``--html FILE`` writes the table and
that figure as one self-contained page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.runtime.run_table import find_runs, render, rows

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmlab.compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or multirun folders")
    parser.add_argument("--format", choices=("table", "md", "csv"), default="table")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write the curves and per-key panels (.png, .svg)")
    parser.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained page: table and figure")
    args = parser.parse_args(argv)
    refusal = _refuse_outputs(args.plot, args.html)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no runs (results.json or .hydra/) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    sys.stdout.write(render(rows(runs), args.format))
    if args.plot or args.html:
        try:
            import matplotlib  # noqa: F401 - the optional plot extra
        except ImportError:
            print("error: --plot and --html need matplotlib: pip install 'lmlab[plot]' (the table above is complete)",
                  file=sys.stderr)  # fmt: skip
            return 2
        from lmlab.runtime import run_report

        if args.plot:
            run_report.draw(runs, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
        if args.html:
            args.html.write_text(run_report.html_page(runs, title=f"lmlab runs: {', '.join(map(str, args.paths))}"))
            print(f"page written to {args.html}", file=sys.stderr)
    return 0


def _refuse_outputs(plot: Path | None, page: Path | None) -> str | None:
    """Why an output file cannot be written, checked before any run is read (None: both can)."""
    if plot is not None and plot.suffix.lower() not in FIGURE_SUFFIXES:
        return f"--plot {plot}: the suffix names the format; use one of {', '.join(FIGURE_SUFFIXES)}"
    for flag, path in (("--plot", plot), ("--html", page)):
        if path is not None and not path.resolve().parent.is_dir():
            return f"{flag} {path}: the folder {path.resolve().parent} does not exist; create it or name another"
    return None


if __name__ == "__main__":
    sys.exit(main())
