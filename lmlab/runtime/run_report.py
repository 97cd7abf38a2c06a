"""Pictures and a page of runs read back from their folders (:mod:`lmlab.runtime.run_table`), for ``lmlab.compare``.

One figure answers a sweep's two questions::

    ┌ validation ppl per epoch ┐ ┌ training loss per step ┐   legend: one colour per run,
    └──────────────────────────┘ └────────────────────────┘   labelled by the keys that vary
    ┌ batch_size ┐ ┌ hidden_dim ┐ ┌ embed_dim ┐                one panel per swept key: each run's
    └────────────┘ └────────────┘ └───────────┘                best validation ppl at its value

A key's panel draws every run at its value of that key in the run's colour, the mean of each value as a grey
line, and the best run as a star; its title names the value best on average and the spread of the means (how much the
key matters). :func:`html_page` puts the table (sortable by any column), that figure and the runs that did
not finish on one self-contained page: no script, style or font is fetched from anywhere.
"""

from __future__ import annotations

import html
import io
import statistics
from pathlib import Path
from typing import Any

from lmlab.runtime.run_table import Run, differing, label, render, rows, short_names

PANELS_PER_ROW = 4


def swept_keys(runs: list[Run]) -> list[str]:
    """The varying keys that take at least two values among the finished runs (the ones a panel can show)."""
    finished = [r for r in runs if r.finished]
    return [k for k in differing(runs) if len({r.value(k) for r in finished if r.value(k) is not None}) > 1]


def draw(runs: list[Run], target: Path | io.IOBase, fmt: str | None = None) -> None:
    """The figure of the module docstring into ``target`` (a file: PNG, SVG or PDF by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    shown = [r for r in runs if r.curve or r.steps]
    keys, swept = differing(runs), swept_keys(runs)
    colours = _colours(len(shown))
    panel_rows = -(-len(swept) // PANELS_PER_ROW)
    fig = plt.figure(figsize=(13, 4.2 + 3.0 * panel_rows), layout="constrained")
    top, *bottom = fig.subfigures(1 + panel_rows, 1, height_ratios=[4.2] + [3.0] * panel_rows) if swept else [fig]
    val_ax, step_ax = top.subplots(1, 2)
    for run, colour in zip(shown, colours, strict=True):
        name = label(run, keys) + ("" if run.finished else f" ({run.status})")
        if run.curve:
            val_ax.plot(range(1, len(run.curve) + 1), run.curve, marker="o", color=colour, label=name)
        if run.steps:
            step_ax.plot(*zip(*run.steps, strict=True), color=colour, label=None if run.curve else name)
    val_ax.set(xlabel="epoch", ylabel="validation perplexity", yscale="log", title="validation perplexity per epoch")
    val_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    val_ax.yaxis.set_major_formatter(ScalarFormatter())  # 300, not 3 × 10²
    val_ax.yaxis.set_minor_formatter(ScalarFormatter())
    step_ax.set(xlabel="training step", ylabel="training loss (epoch mean so far)", title="training loss per step")
    step_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if shown:
        top.legend(loc="outside right upper", fontsize="small")
    colour_of = {id(r): c for r, c in zip(shown, colours, strict=True)}
    for row, subfig in enumerate(bottom):
        chunk = swept[row * PANELS_PER_ROW : (row + 1) * PANELS_PER_ROW]
        axes = subfig.subplots(1, PANELS_PER_ROW, squeeze=False)[0]
        for ax, key in zip(axes, chunk, strict=False):
            _key_panel(ax, [r for r in runs if r.finished], key, short_names(keys)[key], colour_of)
        for ax in axes[len(chunk) :]:
            ax.set_visible(False)
    fig.savefig(target, dpi=110, format=fmt)
    plt.close(fig)


def _key_panel(ax: Any, finished: list[Run], key: str, name: str, colour_of: dict[int, Any]) -> None:
    values = sorted({r.value(key) for r in finished if r.value(key) is not None}, key=_sort_key)
    position = {v: i for i, v in enumerate(values)}
    for r in finished:
        if r.value(key) is not None:
            ax.scatter(position[r.value(key)], r.results["best_val_ppl"], color=colour_of.get(id(r), "grey"), zorder=3)
    means = [statistics.mean(r.results["best_val_ppl"] for r in finished if r.value(key) == v) for v in values]
    ax.plot(range(len(values)), means, color="grey", linewidth=1.5, zorder=2)
    best = min((r for r in finished if r.value(key) is not None), key=lambda r: r.results["best_val_ppl"])
    ax.scatter(position[best.value(key)], best.results["best_val_ppl"], marker="*", s=260, color="gold",
               edgecolor="black", zorder=4)  # fmt: skip
    winner = values[means.index(min(means))]
    ax.set_xticks(range(len(values)), values)
    ax.set(
        xlabel=name,
        ylabel="best validation ppl",
        title=f"{name}: {winner} best on average (spread {max(means) - min(means):.0f})",
    )
    ax.title.set_fontsize("medium")


def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _colours(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def html_page(runs: list[Run], title: str = "lmlab runs") -> str:
    """One self-contained page: the sortable table, the figure (inline SVG), and the runs that did not finish."""
    svg = io.StringIO()
    draw(runs, svg, fmt="svg")
    table = rows(runs)
    head = "".join(f"<th onclick='sortBy({i})'>{html.escape(str(c))}</th>" for i, c in enumerate(table[0]))
    body = "".join(
        "<tr class='{}'>{}</tr>".format(
            html.escape(row["status"]), "".join(f"<td>{_cell(v)}</td>" for v in row.values())
        )
        for row in table
    )
    finished = sum(r.finished for r in runs)
    summary = f"{len(runs)} runs: {finished} finished, {sum(r.failed for r in runs)} failed, " + (
        f"{len(runs) - finished - sum(r.failed for r in runs)} unfinished"
    )
    best = next((r for r in runs if r.finished), None)
    best_line = "" if best is None else (
        f"<p>best: <b>{html.escape(label(best, differing(runs)))}</b> — validation perplexity "
        f"{best.results['best_val_ppl']:.2f}, test {best.results['test_ppl']:.2f} ({html.escape(str(best.folder))})</p>"
    )  # fmt: skip
    svg_markup = svg.getvalue()
    svg_markup = svg_markup[svg_markup.index("<svg") :]
    return _PAGE.format(
        title=html.escape(title), summary=html.escape(summary), best=best_line, head=head, body=body,
        figure=svg_markup, text=html.escape(render(table, "table")),
    )  # fmt: skip


def _cell(value: Any) -> str:
    text = f"{value:,}" if isinstance(value, int) else str(value)
    number = value if isinstance(value, (int, float)) else ""
    return f"<span data-v='{number}'>{html.escape(text)}</span>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; cursor: pointer; user-select: none; }}
th:hover {{ background: #e0e8f8; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.failed td {{ color: #b00; }} tr.unfinished td {{ color: #886; }}
figure {{ margin: 0; }} figure svg {{ max-width: 100%; height: auto; }}
details pre {{ font-size: 12px; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{summary}. Click a column's name to sort by it.</p>
{best}
<table id="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<figure>{figure}</figure>
<details><summary>the table as text</summary><pre>{text}</pre></details>
<script>
function sortBy(column) {{
  const tbody = document.querySelector('#runs tbody');
  const rows = Array.from(tbody.rows);
  const ascending = tbody.dataset.sorted !== String(column);
  const key = row => {{
    const cell = row.cells[column].firstChild;
    const number = cell.dataset.v;
    return number === '' ? cell.textContent : parseFloat(number);
  }};
  rows.sort((a, b) => {{
    const x = key(a), y = key(b);
    const order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
    return ascending ? order : -order;
  }});
  rows.forEach(row => tbody.appendChild(row));
  tbody.dataset.sorted = ascending ? String(column) : '';
}}
</script>
</body></html>
"""
