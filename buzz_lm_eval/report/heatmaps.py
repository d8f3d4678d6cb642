"""Depth x length heatmaps for needle-in-a-haystack results (``buzz_niah``), one PNG per run.

A task that reports one metric per grid cell, named ``<metric>_L<length>_D<depth>`` (buzz_niah:
``score_L1024_D50``), gets, per model, task, policy and budget, the familiar picture: context
length on x, needle depth (percent of the text before the needle) on y, the cell's mean score as
colour and number, the mean over the cells in the title. Needs matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

import io
import itertools
import math
import re
import textwrap
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

from buzz_lm_eval.report.plots import slug

CELL = re.compile(r"^(?P<metric>.+)_L(?P<length>\d+)_D(?P<depth>\d+)$")
RUN_KEY = ("model", "task", "filter", "policy", "budget")
REGIME_KEYS = ("evict", "positions")  # cache settings that tell two runs of one policy and budget apart

Row = dict[str, Any]


def cell(row: Row) -> tuple[str, int, int] | None:
    """(base metric, length, depth) when ``row`` is a grid-cell metric, else None."""
    match = CELL.match(row["metric"])
    return None if match is None else (match["metric"], int(match["length"]), int(match["depth"]))


def is_cell(row: Row) -> bool:
    """Whether ``row`` is one cell of a heatmap (drawn as a picture, not a table or line plot)."""
    return cell(row) is not None


def run_key(row: Row) -> tuple[str, ...]:
    """What makes one heatmap: the run (policy, budget, regime, comparison) and its task and model."""
    cache = row.get("cache") or {}
    regime = tuple(str(cache.get(key)) for key in REGIME_KEYS)
    return (*map(str, itemgetter(*RUN_KEY)(row)), *regime, str(row.get("comparison")))


def run_label(row: Row) -> str:
    """``policy`` or ``policy, budget N`` for titles."""
    return row["policy"] if row["budget"] is None else f"{row['policy']}, budget {row['budget']}"


def heatmap_png(rows: list[Row]) -> bytes:
    """The heatmap of one run's cell rows (one base metric) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = {cell(row)[1:]: row["value"] for row in rows}
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    grid = [[cells.get((length, depth), math.nan) for length in lengths] for depth in depths]
    figure = Figure(figsize=(1.6 + 0.9 * len(lengths), 1.4 + 0.45 * len(depths)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for y, x in itertools.product(range(len(depths)), range(len(lengths))):
        if not math.isnan(grid[y][x]):
            axes.text(x, y, f"{grid[y][x]:.2f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth}%" for depth in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    first, values = rows[0], list(cells.values())
    mean = f"mean {sum(values) / len(values):.3f} over {len(values)} cells"
    title = f"{first['task']} {cell(first)[0]}, {run_label(first)}: {mean}"
    axes.set_title("\n".join(textwrap.wrap(f"{title} ({first['model']})", 48)), fontsize=8)
    figure.colorbar(image, ax=axes, label=cell(first)[0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def render_heatmaps(rows: list[Row]) -> dict[str, bytes]:
    """PNG file name -> bytes, one heatmap per model, task, filter, policy, budget and base metric."""
    import matplotlib  # noqa: F401  (fail early and clearly when the extra is missing)

    cells = sorted((row for row in rows if is_cell(row)), key=lambda row: (*run_key(row), cell(row)[0]))
    images = {}
    for _, group in itertools.groupby(cells, key=lambda row: (run_key(row), cell(row)[0])):
        group = list(group)
        first = group[0]
        run = first["policy"] if first["budget"] is None else f"{first['policy']}_b{first['budget']}"
        cache = first.get("cache") or {}
        run += "".join(f"_{cache[key]}" for key in REGIME_KEYS if cache.get(key) and first["budget"] is not None)
        metric = cell(first)[0] if first["filter"] == "none" else f"{cell(first)[0]}-{first['filter']}"
        stem = "__".join(slug(part) for part in (first["task"], metric, first["model"], run))
        images[f"{stem}__heatmap.png"] = heatmap_png(group)
    return images


def write_heatmaps(rows: list[Row], out_dir: Path, write: Callable[[Path, bytes], None]) -> int:
    """Render and ``write`` every heatmap into ``out_dir``; 0 without matplotlib (write_plots says so)."""
    try:
        images = render_heatmaps(rows)
    except ImportError:
        return 0
    for name, png in images.items():
        write(out_dir / name, png)
    return len(images)
