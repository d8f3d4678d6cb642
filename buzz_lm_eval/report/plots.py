"""PNG plots for ``buzz-lm-eval leaderboard`` (needs the optional ``plots`` extra: matplotlib).

Per model, task, metric and comparison (same settings; see the leaderboard): (a) the metric
against the KV budget, one line per policy, with the full cache as a dashed horizontal line; (b)
relative quality against the measured compression ratio, one marker per policy; (c), (d) the
metric against the KV bytes held per sequence, at peak and on average. Figures are drawn
with the Agg canvas and returned as PNG bytes; ``render_plots`` raises ImportError when matplotlib
is missing; ``write_plots`` says so instead.
"""

from __future__ import annotations

import functools
import io
import itertools
import re
import textwrap
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

MARKERS = {
    "local": "s",
    "streaming": "^",
    "h2o": "v",
    "buzz": "o",
    "buzz_fast": "D",
    "buzz_nomax": "P",
    "snapkv": "X",
    "pyramidkv": "*",
    "tova": "h",
    "knorm": "<",
    "random": ">",
}
SPARE_MARKERS = ("p", "d", "8", "H", "1", "2")
PLOT_KEY = ("model", "task", "metric", "filter", "comparison")
DIRECTIONS = {True: "higher is better", False: "lower is better"}

Row = dict[str, Any]


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def file_stem(row: Row) -> str:
    """``task__metric[-filter]__model`` for a group's plots (filter ``none`` omitted)."""
    metric = row["metric"] if row["filter"] == "none" else f"{row['metric']}-{row['filter']}"
    return "__".join(slug(part) for part in (row["task"], metric, row["model"]))


def marker(policy: str) -> str:
    """The marker style of ``policy`` (a stable spare one for unknown policies)."""
    return MARKERS.get(policy) or SPARE_MARKERS[sum(map(ord, policy)) % len(SPARE_MARKERS)]


def direction(row: Row) -> str:
    """``higher is better`` / ``lower is better`` / ``direction unknown``."""
    return DIRECTIONS.get(row["higher_is_better"], "direction unknown")


def series(rows: list[Row], *fields: str) -> dict[str, list[Row]]:
    """Compressed (non-full) rows having a value and all ``fields``, by policy, sorted by budget."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row["policy"] != "full" and all(row[field] is not None for field in ("value", *fields)):
            groups.setdefault(row["policy"], []).append(row)
    return {policy: sorted(g, key=lambda r: r["budget"] or 0) for policy, g in groups.items()}


def new_axes() -> Any:
    """Axes on a Figure bound to the Agg canvas, independent of pyplot's global state."""
    from cycler import cycler
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_prop_cycle(cycler(color=colormaps["tab20"].colors[::2] + colormaps["tab20"].colors[1::2]))
    return axes  # 20 distinct colours: one per policy, more than the default 10


def finish(axes: Any, title: str, xlabel: str, ylabel: str) -> bytes:
    """Label the axes, add grid and legend, and encode the figure as PNG (a long title wraps)."""
    axes.set_title("\n".join(textwrap.wrap(title, 72)), fontsize=9)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(title="policy")
    buffer = io.BytesIO()
    axes.figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def budget_axis(axes: Any, budgets: list[int]) -> None:
    """Log2 x axis with a tick at every measured budget."""
    ticks = sorted(set(budgets))
    if ticks[0] > 0:
        axes.set_xscale("log", base=2)
        axes.minorticks_off()
    axes.set_xticks(ticks, [str(tick) for tick in ticks])


def plot_vs_budget(rows: list[Row]) -> bytes | None:
    """Metric against KV budget, a line per policy, full cache dashed; None if nothing to plot."""
    lines = series(rows, "budget")
    if not lines:
        return None
    axes = new_axes()
    for policy, points in lines.items():
        xs, ys = [p["budget"] for p in points], [p["value"] for p in points]
        errors = [p["stderr"] or 0.0 for p in points]
        axes.errorbar(xs, ys, yerr=errors, marker=marker(policy), capsize=3, label=policy)
    for full in (row for row in rows if row["policy"] == "full" and row["value"] is not None):
        axes.axhline(full["value"], linestyle="--", color="black", label="full cache")
    budget_axis(axes, [p["budget"] for points in lines.values() for p in points])
    first = rows[0]
    return finish(
        axes,
        f"{first['task']}: {first['metric']} vs KV budget — {first['model']}",
        "KV-cache budget (tokens kept)",
        f"{first['metric']} ({direction(first)})",
    )


def plot_vs_compression(rows: list[Row]) -> bytes | None:
    """Relative quality against compression ratio, a marker per policy; None if nothing to plot."""
    points_by_policy = series(rows, "relative_quality", "compression_ratio")
    if not points_by_policy:
        return None
    axes = new_axes()
    for policy, points in points_by_policy.items():
        xs, ys = [p["compression_ratio"] for p in points], [p["relative_quality"] for p in points]
        axes.scatter(xs, ys, marker=marker(policy), s=50, label=policy)
        for x, y, point in zip(xs, ys, points, strict=True):
            axes.annotate(str(point["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.axhline(1.0, linestyle="--", color="black", label="full cache")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter("{x:g}×")
    first = rows[0]
    title = f"{first['task']}: quality vs compression — {first['model']} (labels: budget)"
    return finish(
        axes,
        title,
        "measured KV compression ratio (log scale, higher = smaller cache)",
        f"relative {first['metric']} (full cache = 1, above is better)",
    )


KV_BYTES = {"kv_bytes_peak": "peak", "kv_bytes_mean": "mean"}


def plot_vs_kv_bytes(rows: list[Row], field: str) -> bytes | None:
    """Metric against the KV bytes held per sequence (``field``: peak or mean), a line per policy;
    the full cache is a dashed line at its value and a star at its own bytes. None if nothing to plot."""
    lines = series(rows, field)
    if not lines:
        return None
    axes = new_axes()
    mib = 1 / 2**20
    for policy, points in lines.items():
        points = sorted(points, key=lambda p: p[field])
        xs, ys = [p[field] * mib for p in points], [p["value"] for p in points]
        axes.errorbar(xs, ys, yerr=[p["stderr"] or 0.0 for p in points], marker=marker(policy), capsize=3, label=policy)
    for full in (row for row in rows if row["policy"] == "full" and row["value"] is not None):
        axes.axhline(full["value"], linestyle="--", color="black", label="full cache")
        if full.get(field):
            axes.plot([full[field] * mib], [full["value"]], marker="*", markersize=12, color="black")
    first = rows[0]
    return finish(
        axes,
        f"{first['task']}: {first['metric']} vs {KV_BYTES[field]} KV memory — {first['model']}",
        f"{KV_BYTES[field]} KV cache per sequence (MiB, keys + values, all layers)",
        f"{first['metric']} ({direction(first)})",
    )


def render_plots(rows: list[Row]) -> dict[str, bytes]:
    """PNG file name -> bytes for every model/task/metric group of the leaderboard rows."""
    import matplotlib  # noqa: F401  (fail early and clearly when the extra is missing)

    images: dict[str, bytes] = {}
    ordered = sorted(rows, key=itemgetter(*PLOT_KEY))
    groups = [list(group) for _, group in itertools.groupby(ordered, itemgetter(*PLOT_KEY))]
    stems = [file_stem(group[0]) for group in groups]
    for group_rows, stem in zip(groups, stems, strict=True):
        if stems.count(stem) > 1:  # the same model and task under other settings: name the comparison
            stem = f"{stem}__{group_rows[0]['comparison']}"
        drawings = {"vs_budget": plot_vs_budget, "vs_compression": plot_vs_compression}
        drawings |= {f"vs_{field}": functools.partial(plot_vs_kv_bytes, field=field) for field in KV_BYTES}
        for kind, draw in drawings.items():
            png = draw(group_rows)
            if png is not None:
                images[f"{stem}__{kind}.png"] = png
    return images


def write_plots(rows: list[Row], out_dir: Path, write: Callable[[Path, bytes], None]) -> int:
    """Render and ``write`` every plot into ``out_dir``; 0 with a message without matplotlib."""
    try:
        images = render_plots(rows)
    except ImportError:
        print(
            "leaderboard: matplotlib is not installed, so no plots were drawn "
            "(pip install 'buzz-lm-eval[plots]'); JSON and Markdown were still written"
        )
        return 0
    for name, png in images.items():
        write(out_dir / name, png)
    return len(images)
