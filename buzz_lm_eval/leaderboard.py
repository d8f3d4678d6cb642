"""``buzz-lm-eval leaderboard RESULTS_DIR [--output DIR]``: compare KV eviction at equal budgets.

Reads every lm-eval ``results_*.json`` under RESULTS_DIR and writes ``leaderboard.json``,
``leaderboard.md`` and (with the ``plots`` extra) PNG plots into DIR (default: RESULTS_DIR).

A run's policy and budget come from ``config["buzz_cache"]`` (written by ``buzz_hf``). A file
without it is the full-cache reference when its model is stock ``hf``; otherwise it is skipped.
A ``full`` run always has budget null and is the reference line of its model/task/metric.

``relative_quality`` is the run's quality against that reference, oriented so that > 1 is better:
value / full for higher-is-better metrics (and when the direction is unknown), full / value for
lower-is-better ones such as perplexity; null when there is no full run or a divisor is zero.
When several files give the same model/policy/budget/task, the newest (``date``, then file name)
wins. Each unusable file gets a one-line message on stderr; the exit code is 1 when no row results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterator

from buzz_lm_eval.files import write_atomic
from buzz_lm_eval.heatmaps import is_cell, write_heatmaps
from buzz_lm_eval.plots import DIRECTIONS, write_plots

POLICY_ORDER = ("full", "local", "streaming", "h2o", "buzz", "buzz_fast", "buzz_nomax", "snapkv", "pyramidkv", "tova",
                "knorm", "random")
STAT_FIELDS = ("compression_ratio", "kv_bytes_peak", "kept_tokens_peak", "tokens_per_second")
HF_MODELS = frozenset({"hf", "hf-auto", "huggingface"})
GROUP_FIELDS = ("task", "metric", "filter")
RELATIVE_QUALITY_NOTE = (
    "relative_quality is value / full (full / value for lower-is-better metrics), "
    "so above 1 beats the full cache; null without a full-cache run"
)


class SkipFile(Exception):
    """A results file that cannot contribute rows; the message says why."""


@dataclass(frozen=True)
class Run:
    """One lm-eval results file with its model identity and cache settings."""

    source: str
    date: float | None
    model: str
    policy: str
    budget: int | None
    stats: dict[str, float | None]
    data: dict[str, Any]


def warn(message: str) -> None:
    """Print a one-line diagnostic to stderr."""
    print(f"leaderboard: {message}", file=sys.stderr)


def number(value: Any) -> float | int | None:
    """``value`` if it is a finite int/float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def load_results(path: Path) -> dict[str, Any]:
    """Parse ``path`` and check it looks like an lm-eval results file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SkipFile(f"unreadable or invalid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise SkipFile("not an lm-eval results file (no 'results' section)")
    if not isinstance(data.get("config"), dict):
        raise SkipFile("no 'config' section, so model and cache are unknown")
    return data


def model_name(data: dict[str, Any]) -> str:
    """A readable model name: the basename of ``pretrained``, else lm-eval's model name."""
    config, args = data["config"], data["config"].get("model_args")
    if isinstance(args, str):  # lm-eval keeps the command-line form "key=value,key=value"
        args = dict(part.strip().split("=", 1) for part in args.split(",") if "=" in part)
    name = (
        (args.get("pretrained") if isinstance(args, dict) else None)
        or config.get("model_name")
        or data.get("model_name")
        or config.get("model")
        or "unknown"
    )
    return re.split(r"[\\/]", str(name).rstrip("/\\"))[-1] or str(name)


def cache_settings(data: dict[str, Any]) -> tuple[str, int | None, dict[str, float | None]]:
    """(policy, budget, whole-run stats) from ``config["buzz_cache"]``."""
    config = data["config"]
    cache = config.get("buzz_cache")
    if cache is None:
        if config.get("model") in HF_MODELS:
            return "full", None, dict.fromkeys(STAT_FIELDS)
        raise SkipFile(f"no config.buzz_cache and model is {config.get('model')!r}, not hf")
    if not isinstance(cache, dict) or not isinstance(cache.get("policy"), str):
        raise SkipFile("config.buzz_cache has no 'policy' string")
    budget = cache.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise SkipFile(f"config.buzz_cache.budget is {budget!r}, not an integer or null")
    policy = cache["policy"]
    stats = {field: number(cache.get(field)) for field in STAT_FIELDS}
    return policy, None if policy == "full" else budget, stats


def load_run(path: Path, root: Path) -> Run:
    """Read one results file into a Run (raises SkipFile)."""
    data = load_results(path)
    policy, budget, stats = cache_settings(data)
    source = path.relative_to(root).as_posix()
    if data["config"].get("buzz_cache") is None:
        warn(f"{source}: no config.buzz_cache; stock hf model, so used as the full-cache reference")
    return Run(source, number(data.get("date")), model_name(data), policy, budget, stats, data)


def load_runs(root: Path) -> list[Run]:
    """Every usable results file under ``root``; the others are reported and skipped."""
    runs = []
    for path in sorted(root.rglob("results_*.json")):
        try:
            runs.append(load_run(path, root))
        except SkipFile as exc:
            warn(f"skipping {path.relative_to(root).as_posix()}: {exc}")
    return runs


def age_key(run: Run) -> tuple[bool, float, str]:
    """Sort key ordering runs oldest to newest: JSON ``date``, then file name."""
    return run.date is not None, run.date or 0.0, Path(run.source).name


def newest_entries(runs: list[Run]) -> list[tuple[Run, str]]:
    """(run, task) pairs, only the newest run per model/policy/budget/task; reports the rest."""
    kept: dict[tuple[str, str, int | None, str], Run] = {}
    dropped: dict[tuple[str, str, str], list[str]] = {}
    for run in sorted(runs, key=age_key):
        for task in run.data["results"]:
            key = (run.model, run.policy, run.budget, task)
            if key in kept:
                label = f"{run.model} {run.policy} budget={run.budget}"
                dropped.setdefault((label, kept[key].source, run.source), []).append(task)
            kept[key] = run
    for (label, old, new), tasks in dropped.items():
        warn(f"duplicate {label} ({', '.join(tasks)}): keeping the newer {new}, ignoring {old}")
    return [(run, key[3]) for key, run in kept.items()]


def task_metrics(values: dict[str, Any]) -> Iterator[tuple[str, str, float, float | None]]:
    """(metric, filter, value, stderr) for each numeric ``metric,filter`` entry of a task."""
    for key, value in values.items():
        metric, sep, filter_name = key.partition(",")
        if not sep or metric.endswith("_stderr") or number(value) is None:
            continue
        yield metric, filter_name, value, number(values.get(f"{metric}_stderr,{filter_name}"))


def sample_count(data: dict[str, Any], task: str) -> int | None:
    """Documents evaluated for ``task``: ``n-samples`` effective, else the task's ``sample_len``."""
    counts = (data.get("n-samples") or {}).get(task)
    if isinstance(counts, dict) and number(counts.get("effective")) is not None:
        return int(counts["effective"])
    fallback = number((data["results"].get(task) or {}).get("sample_len"))
    return None if fallback is None else int(fallback)


def entry_rows(run: Run, task: str) -> Iterator[dict[str, Any]]:
    """Leaderboard rows (without relative quality) for one task of one run."""
    values = run.data["results"].get(task)
    values = values if isinstance(values, dict) else {}
    directions = (run.data.get("higher_is_better") or {}).get(task) or {}
    for metric, filter_name, value, stderr in task_metrics(values):
        higher = directions.get(metric)
        yield {
            "model": run.model, "task": task, "metric": metric, "filter": filter_name,
            "policy": run.policy, "budget": run.budget, "value": value, "stderr": stderr,
            "higher_is_better": higher if isinstance(higher, bool) else None,
            "relative_quality": None, "full_value": None, **run.stats,
            "n_samples": sample_count(run.data, task), "source": run.source,
        }


def relative_quality(value: float, full: float | None, higher: bool | None) -> float | None:
    """Quality against the full cache, > 1 is better (see the module docstring)."""
    numerator, denominator = (full, value) if higher is False else (value, full)
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def add_relative_quality(rows: list[dict[str, Any]]) -> None:
    """Fill ``full_value`` and ``relative_quality`` from each model/task/metric's full run."""
    ref_key = itemgetter("model", "task", "metric", "filter")
    reference = {ref_key(row): row["value"] for row in rows if row["policy"] == "full"}
    for row in rows:
        row["full_value"] = reference.get(ref_key(row))
        row["relative_quality"] = relative_quality(
            row["value"], row["full_value"], row["higher_is_better"]
        )


def row_order(row: dict[str, Any]) -> tuple:
    """Task, metric, model, then budget (full first) and policy in the canonical order."""
    policy = row["policy"]
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
    budget = row["budget"]
    return (*itemgetter(*GROUP_FIELDS, "model")(row), budget is not None, budget or 0, rank, policy)


def build_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """All leaderboard rows, with relative quality, in display order."""
    rows = [row for run, task in newest_entries(runs) for row in entry_rows(run, task)]
    add_relative_quality(rows)
    return sorted(rows, key=row_order)


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


def markdown_row(row: dict[str, Any]) -> str:
    """One Markdown table line for a leaderboard row."""
    cells = [
        row["model"].replace("|", "\\|"), row["policy"],
        "full" if row["budget"] is None else str(row["budget"]),
        fmt(row["value"], ".4f"), fmt(row["stderr"], ".4f"), fmt(row["relative_quality"], ".3f"),
        fmt(row["compression_ratio"], ".2f", "×"), fmt_bytes(row["kv_bytes_peak"]),
        fmt(row["kept_tokens_peak"], ".0f"), fmt(row["tokens_per_second"], ".1f"),
        fmt(row["n_samples"], "d"),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_section(task: str, metric: str, filter_name: str, rows: list[dict[str, Any]]) -> str:
    """A heading and table for one task/metric."""
    higher = rows[0]["higher_is_better"]
    direction = f", {DIRECTIONS[higher]}" if higher in DIRECTIONS else ""
    columns = ["model", "policy", "budget", metric, "± stderr", "rel. quality", "compression",
               "KV peak", "kept peak", "tok/s", "n"]
    lines = [f"### {task} · {metric} (filter {filter_name}{direction})", "",
             "| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    return "\n".join(lines + [markdown_row(row) for row in rows])


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """The whole leaderboard as Markdown, one table per task/metric."""
    intro = (
        "# KV-cache eviction leaderboard\n\n"
        f"Budget `full` is the uncompressed reference; {RELATIVE_QUALITY_NOTE}."
    )
    groups = itertools.groupby(rows, itemgetter(*GROUP_FIELDS))
    sections = [markdown_section(*key, list(group)) for key, group in groups]
    return "\n\n".join([intro, *sections]) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="buzz-lm-eval leaderboard",
        description="Compare KV-cache eviction policies at equal budgets from lm-eval results.",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR", type=Path,
                        help="searched recursively for lm-eval results_*.json files")
    parser.add_argument("--output", metavar="DIR", type=Path,
                        help="where leaderboard.json/.md and the PNGs go (default: RESULTS_DIR)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Build the leaderboard; 0 when at least one row was produced, else 1."""
    args = parse_args(argv)
    if not args.results_dir.is_dir():
        warn(f"results directory {args.results_dir} does not exist")
        return 1
    runs = load_runs(args.results_dir)
    rows = build_rows(runs)
    if not rows:
        warn(f"no leaderboard rows: no usable lm-eval results_*.json under {args.results_dir}")
        return 1
    out_dir = args.output or args.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    table = json.dumps({"note": RELATIVE_QUALITY_NOTE, "rows": rows}, indent=2, ensure_ascii=False)
    write_atomic(out_dir / "leaderboard.json", table + "\n")
    shown = [row for row in rows if not is_cell(row)]  # per-cell needle metrics: heatmaps instead
    write_atomic(out_dir / "leaderboard.md", render_markdown(shown))
    n_plots = write_plots(shown, out_dir, write_atomic) + write_heatmaps(rows, out_dir, write_atomic)
    print(f"leaderboard: {len(rows)} rows from {len(runs)} results files -> "
          f"{out_dir}/leaderboard.json, leaderboard.md, {n_plots} plots")
    return 0
