"""``leaderboard.md``: one table per task, metric and comparison (same model and settings)."""

from __future__ import annotations

import itertools
import json
from operator import itemgetter
from typing import Any

from buzz_lm_eval.report.plots import DIRECTIONS

GROUP_FIELDS = ("task", "metric", "filter", "comparison")
FIXED = ("policy", "budget")

Row = dict[str, Any]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """Format a number for the Markdown table, an em dash when missing."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def fmt_bytes(size: float | None) -> str:
    """Human-readable byte count in KiB, MiB or GiB."""
    if size is None:
        return "—"
    units = ((3, "GiB"), (2, "MiB"), (1, "KiB"))
    power, unit = next((p, u) for p, u in units if size >= 1024**p or p == 1)
    return f"{size / 1024**power:.1f} {unit}"


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def compact(value: Any) -> str:
    """A setting's value in one short line."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def varying_cache_keys(rows: list[Row]) -> list[str]:
    """Cache settings that tell apart rows of the same policy and budget (chunk sizes, positions...)."""
    keys: set[str] = set()
    for _, group in itertools.groupby(sorted(rows, key=itemgetter("policy")), itemgetter("policy", "budget")):
        caches = [row["cache"] for row in group]
        for key in set().union(*caches) - set(FIXED):
            if len({compact(cache.get(key)) for cache in caches}) > 1:
                keys.add(key)
    return sorted(keys)


def markdown_row(row: Row, cache_keys: list[str], shared: list[str]) -> str:
    """One Markdown table line for a leaderboard row."""
    cache = [", ".join(f"{key}={compact(row['cache'].get(key))}" for key in cache_keys)] if cache_keys else []
    cells = [
        row["model"],
        row["policy"],
        "full" if row["budget"] is None else str(row["budget"]),
        *cache,
        compact(row.get("batch_size")),
        fmt(row["value"], ".4f"),
        fmt(row["stderr"], ".4f"),
        fmt(row["relative_quality"], ".3f"),
        fmt(row["compression_ratio"], ".2f", "×"),
        fmt_bytes(row["kv_bytes_peak"]),
        fmt_bytes(row["kv_bytes_mean"]),
        fmt(row["kept_tokens_peak"], ".0f"),
        fmt(row["kept_tokens_mean"], ".0f"),
        fmt(row["tokens_per_second"], ".1f"),
        fmt(row["n_samples"], "d"),
        "; ".join(note for note in row["notes"] if note not in shared),
    ]
    return "| " + " | ".join(cell(text) for text in cells) + " |"


def settings_line(row: Row) -> str:
    """The model identity and run settings every row of a table shares."""
    model = row["model_id"]
    identity = [f"`{model['path']}`", f"revision {model['revision']}"]
    identity += [f"{key} {model[key]}" for key in ("sha", "peft", "delta") if model[key]]
    settings = [
        key if value is True else f"{key} {compact(value)}"
        for key, value in row["settings"].items()
        if value not in (None, False)
    ]
    return f"{row['model']} ({', '.join(identity)}) · " + " · ".join(settings)


def markdown_section(rows: list[Row]) -> str:
    """A heading, the shared settings and a table for one task/metric/comparison."""
    first = rows[0]
    higher = first["higher_is_better"]
    direction = f", {DIRECTIONS[higher]}" if higher in DIRECTIONS else ""
    cache_keys = varying_cache_keys(rows)
    shared = [note for note in first["notes"] if all(note in row["notes"] for row in rows)]
    columns = [
        "model",
        "policy",
        "budget",
        *(["cache settings"] if cache_keys else []),
        "batch",
        first["metric"],
        "± stderr",
        "rel. quality",
        "compression",
        "KV peak",
        "KV mean",
        "kept peak",
        "kept mean",
        "tok/s",
        "n",
        "notes",
    ]
    aligns = ["---", "---", "---:", *(["---"] if cache_keys else []), *["---:"] * 11, "---"]
    lines = [
        f"### {first['task']} · {first['metric']} (filter {first['filter']}{direction})",
        "",
        cell(settings_line(first)),
        "",
        *([f"Every row: {'; '.join(shared)}.", ""] if shared else []),
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(aligns) + "|",
    ]
    return "\n".join(lines + [markdown_row(row, cache_keys, shared) for row in rows])


def render_markdown(rows: list[Row], note: str) -> str:
    """The whole leaderboard as Markdown (rows already in display order)."""
    intro = f"# KV-cache eviction leaderboard\n\nBudget `full` is the uncompressed reference; {note}."
    sections = [markdown_section(list(group)) for _, group in itertools.groupby(rows, itemgetter(*GROUP_FIELDS))]
    return "\n\n".join([intro, *sections]) + "\n"
