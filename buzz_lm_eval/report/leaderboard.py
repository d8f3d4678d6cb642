"""``buzz-lm-eval leaderboard RESULTS_DIR [--output DIR]``: compare KV eviction at equal budgets.

Reads every lm-eval results file under RESULTS_DIR (``results_<date>.json``, and ``x_<date>.json``
from ``--output_path x.json``: recognised by content) and writes ``leaderboard.json``,
``leaderboard.md`` and (with the ``plots`` extra) PNG plots into DIR (default: RESULTS_DIR).

Each row is one model x task x metric x cache configuration and carries what decides
comparability: the model's identity as lm-eval records it (``model_id``: path or hub id, revision,
weights hash, adapters), the run's settings (``settings``: dtype, task version, limit, few-shot,
chat template, generation kwargs, max_length, predict-only), every cache setting of
``config.buzz_cache`` (``cache``), and the cache statistics of that task (a group: its subtasks').
Rows sharing model, task and settings form one ``comparison`` (one table, one plot).

``relative_quality`` is the run's quality against the full-cache run of the same comparison,
oriented so that > 1 is better: value / full for higher-is-better metrics (and when the direction
is unknown), full / value for lower-is-better ones such as perplexity. The full cache runs lm-eval's
own code paths, so its cache settings (chunk sizes, positions, ...) play no part in the match. A
row without a matching full run says why in ``notes`` (and stderr names the differing settings).
Predict-only runs and NaN values give rows without a value, flagged in ``notes``.

Runs with the same model, task, settings and cache settings are duplicates: the later ``date`` in
the JSON (then the later file name) wins, and both files are named. Unusable files are named on
stderr; the exit code is 1 when any results file was skipped or no row results, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from buzz_lm_eval.harness.files import write_atomic
from buzz_lm_eval.report.heatmaps import is_cell, write_heatmaps
from buzz_lm_eval.report.leaderboard_md import GROUP_FIELDS
from buzz_lm_eval.report.paired import write_paired
from buzz_lm_eval.report.plots import write_plots
from buzz_lm_eval.report.results_reader import (
    ModelId,
    Run,
    SkipFile,
    canonical,
    find_results,
    load_run,
    number,
    printable,
    task_settings,
    task_stats,
)

POLICY_ORDER = (
    "full",
    "local",
    "streaming",
    "h2o",
    "buzz",
    "buzz_fast",
    "buzz_nomax",
    "snapkv",
    "pyramidkv",
    "tova",
    "knorm",
    "random",
)
RELATIVE_QUALITY_NOTE = (
    "relative_quality is value / full (full / value for lower-is-better metrics), "
    "so above 1 beats the full cache; null without a full-cache run of the same model and settings"
)
PREDICT_ONLY = "predict-only run (lm-eval --predict_only): no scores"


def warn(message: str) -> None:
    """Print a one-line diagnostic to stderr."""
    print(f"leaderboard: {printable(message)}", file=sys.stderr)


@dataclass
class Scan:
    """What a results folder held: usable runs, skipped results files, other JSON files."""

    runs: list[Run]
    skipped: list[str]
    others: list[str]


def load_runs(root: Path) -> Scan:
    """Every usable results file under ``root``; the others are named and skipped."""
    paths, others = find_results(root)
    scan = Scan([], [], [printable(path.relative_to(root).as_posix()) for path in others])
    for path in paths:
        name = path.relative_to(root).as_posix()
        if printable(name) != name:
            warn(f"{printable(name)}: file name is not valid UTF-8 (shown with \\x escapes); reading it")
        try:
            run = load_run(path, root)
        except SkipFile as exc:
            warn(f"skipping {printable(name)}: {exc}")
            scan.skipped.append(printable(name))
            continue
        if "buzz_cache" not in run.data["config"]:
            warn(f"{run.source}: no config.buzz_cache; stock hf model, so used as the full-cache reference")
        scan.runs.append(run)
    return scan


def display_names(models: Iterable[ModelId]) -> dict[ModelId, str]:
    """Short readable names: the last path part, more parts (then revision, hash, adapters) only
    where two different models would otherwise share a name."""
    models = set(models)
    parts = {m: [p for p in re.split(r"[\\/]", m.path) if p] or [m.path] for m in models}
    names = {}
    for model in models:
        for depth in range(1, len(parts[model]) + 1):
            name = "/".join(parts[model][-depth:])
            clashes = [o for o in models if o != model and "/".join(parts[o][-depth:]) == name]
            if not clashes:
                break
        for field in ("revision", "sha", "peft", "delta"):
            value = getattr(model, field)
            if any(getattr(other, field) != value for other in clashes):
                name += f" {field}={value}"
        names[model] = name
    return names


def age_key(run: Run) -> tuple[bool, float, str]:
    """Sort key ordering runs oldest to newest: JSON ``date``, then file name."""
    return run.date is not None, run.date or 0.0, Path(run.source).name


def newest_entries(runs: list[Run]) -> list[tuple[Run, str, dict[str, Any]]]:
    """(run, task, settings), only the newest of duplicate runs; names both files of each duplicate."""
    kept: dict[tuple, tuple[Run, dict[str, Any]]] = {}
    dropped: dict[tuple[str, str], list[str]] = {}
    for run in sorted(runs, key=age_key):
        cache = {"policy": "full"} if run.policy == "full" else run.cache
        for task in run.data["results"]:
            settings = task_settings(run.data, task)
            key = (run.model, task, canonical(settings), canonical(cache))
            if key in kept:
                dropped.setdefault((kept[key][0].source, run.source), []).append(task)
            kept[key] = (run, settings)
    for (old, new), tasks in dropped.items():
        warn(
            f"duplicate runs (same model, settings and cache) for {', '.join(tasks)}: {old} and {new}; "
            f"keeping {new} (rule: the later 'date' in the JSON, then the later file name)"
        )
    return [(run, key[1], settings) for key, (run, settings) in kept.items()]


def not_evaluated(value: Any, stderr: Any) -> bool:
    """lm-eval's RULER marks a length it did not run (not in ``max_seq_lengths``) with -1 and an
    'N/A' standard error: no score to rank."""
    return value == -1 and stderr == "N/A"


def task_metrics(values: dict[str, Any]) -> Iterator[tuple[str, str, Any, float | None]]:
    """(metric, filter, raw value, stderr) for each ``metric,filter`` entry of a task, without the
    entries that say a metric was not evaluated (``not_evaluated``)."""
    for key, value in values.items():
        metric, sep, filter_name = key.partition(",")
        stderr = values.get(f"{metric}_stderr,{filter_name}")
        if sep and not metric.endswith("_stderr") and not not_evaluated(value, stderr):
            yield metric, filter_name, value, number(stderr)


def sample_count(data: dict[str, Any], task: str) -> int | None:
    """Documents evaluated for ``task``: ``n-samples`` effective, else the task's ``sample_len``."""
    counts = (data.get("n-samples") or {}).get(task)
    if isinstance(counts, dict) and number(counts.get("effective")) is not None:
        return int(counts["effective"])
    fallback = number((data["results"].get(task) or {}).get("sample_len"))
    return None if fallback is None else int(fallback)


def comparison_id(model: ModelId, task: str, settings: dict[str, Any]) -> str:
    """A short stable id of (model, task, settings): rows that may be compared share it."""
    text = canonical({"model": asdict(model), "task": task, "settings": settings})
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def entry_rows(run: Run, task: str, settings: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Leaderboard rows (without relative quality) for one task of one run."""
    values = run.data["results"].get(task)
    values = values if isinstance(values, dict) else {}
    directions = (run.data.get("higher_is_better") or {}).get(task) or {}
    stats, scope = task_stats(run, task)
    base_notes = []
    if scope == "run" and len(run.data["results"]) > 1:
        base_notes.append("statistics are the whole run's (the file has no per-task statistics)")
    for metric, filter_name, raw, stderr in task_metrics(values):
        value, notes = number(raw), list(base_notes)
        if settings["predict_only"]:
            value, stderr = None, None
            notes.append(PREDICT_ONLY)
        elif value is None:
            notes.append(f"value is {raw!r} in the results file, not a finite number")
            warn(f"{run.source}: {task} {metric},{filter_name} is {raw!r}; kept as a row without a value")
        higher = directions.get(metric)
        yield {
            "model": name,
            "task": task,
            "metric": metric,
            "filter": filter_name,
            "policy": run.policy,
            "budget": run.budget,
            "value": value,
            "stderr": stderr,
            "higher_is_better": higher if isinstance(higher, bool) else None,
            "relative_quality": None,
            "full_value": None,
            "full_source": None,
            **stats,
            "stats_scope": scope,
            "n_samples": sample_count(run.data, task),
            "batch_size": (run.data.get("config") or {}).get("batch_size"),
            "source": run.source,
            "model_id": asdict(run.model),
            "settings": settings,
            "cache": run.cache,
            "comparison": comparison_id(run.model, task, settings),
            "notes": notes,
        }


def relative_quality(value: float | None, full: float | None, higher: bool | None) -> float | None:
    """Quality against the full cache, > 1 is better (see the module docstring)."""
    numerator, denominator = (full, value) if higher is False else (value, full)
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def differences(here: dict[str, Any], there: dict[str, Any]) -> str:
    """``key (A there, B here)`` for every setting that differs."""

    def short(value: Any) -> str:
        text = canonical(value)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(k for k in here.keys() | there.keys() if canonical(here.get(k)) != canonical(there.get(k)))
    return ", ".join(f"{key} ({short(there.get(key))} there, {short(here.get(key))} here)" for key in keys)


def add_relative_quality(rows: list[dict[str, Any]]) -> None:
    """Fill ``full_value``/``relative_quality`` from the comparison's full run, or say why not."""
    ref_key = itemgetter("model", "task", "metric", "filter")
    references: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["policy"] == "full" and not row["settings"]["predict_only"]:
            references.setdefault(ref_key(row), []).append(row)
    mismatches: dict[tuple[str, str], str] = {}
    for row in rows:
        if row["settings"]["predict_only"]:
            continue
        candidates = references.get(ref_key(row), [])
        match = next((c for c in candidates if c["comparison"] == row["comparison"]), None)
        if match is None:
            why = [f"{c['source']} differs in {differences(row['settings'], c['settings'])}" for c in candidates]
            row["notes"].append(
                "no comparable full-cache run: " + "; ".join(why) if why else "no full-cache run of this model and task"
            )
            for candidate, text in zip(candidates, why, strict=True):
                mismatches.setdefault(
                    (row["comparison"], candidate["source"]),
                    f"{row['task']} ({row['model']}, e.g. {row['source']}): no relative "
                    f"quality, the full-cache run {text}",
                )
            continue
        row["full_value"], row["full_source"] = match["value"], match["source"]
        row["relative_quality"] = relative_quality(row["value"], match["value"], row["higher_is_better"])
    for message in mismatches.values():
        warn(message)


def row_order(row: dict[str, Any]) -> tuple:
    """Task, metric, model, comparison, then budget (full first) and policy in the canonical order."""
    policy, budget = row["policy"], row["budget"]
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
    return (
        *itemgetter("task", "metric", "filter", "model", "comparison")(row),
        budget is not None,
        budget or 0,
        rank,
        policy,
        canonical(row["cache"]),
    )


def build_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """All leaderboard rows, with relative quality, in display order."""
    names = display_names(run.model for run in runs)
    rows = [
        row for run, task, settings in newest_entries(runs) for row in entry_rows(run, task, settings, names[run.model])
    ]
    add_relative_quality(rows)
    note_mixed_batches(rows)
    return sorted(rows, key=row_order)


def note_mixed_batches(rows: list[dict[str, Any]]) -> None:
    """Say so on every row of a comparison whose runs used different batch sizes: quality does not
    depend on the batch (``buzz_hf`` gives each row what it gives alone), but the memory statistics
    hold each batch's padding (a short prompt padded to its batch's longest, rows that finished
    generating while others went on), so those columns compare only runs of one batch size."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(itemgetter(*GROUP_FIELDS)(row), []).append(row)  # one leaderboard.md table
    for members in groups.values():
        sizes = sorted({canonical(row["batch_size"]) for row in members})
        if len(sizes) > 1:
            note = (
                f"batch sizes {', '.join(sizes)} in one table: KV bytes, kept tokens and compression "
                "count each batch's padding"
            )
            for row in members:
                row["notes"].append(note)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="buzz-lm-eval leaderboard",
        description="Compare KV-cache eviction policies at equal budgets from lm-eval results.",
    )
    parser.add_argument(
        "results_dir", metavar="RESULTS_DIR", type=Path, help="searched recursively for lm-eval results files (*.json)"
    )
    parser.add_argument(
        "--output", metavar="DIR", type=Path, help="where leaderboard.json/.md and the PNGs go (default: RESULTS_DIR)"
    )
    parser.add_argument(
        "--focus",
        default="buzz",
        choices=POLICY_ORDER[1:],
        metavar="POLICY",
        help="paired.md also pairs this policy with every other one at the same budget (default: buzz)",
    )
    return parser.parse_args(argv)


def write_outputs(rows: list[dict[str, Any]], out_dir: Path) -> int:
    """Write leaderboard.json, leaderboard.md and the plots; returns the number of plots."""
    from buzz_lm_eval.report.leaderboard_md import render_markdown

    table = json.dumps({"note": RELATIVE_QUALITY_NOTE, "rows": rows}, indent=2, ensure_ascii=False)
    write_atomic(out_dir / "leaderboard.json", table + "\n")
    shown = [row for row in rows if not is_cell(row)]  # per-cell needle metrics: heatmaps instead
    write_atomic(out_dir / "leaderboard.md", render_markdown(shown, RELATIVE_QUALITY_NOTE))
    return write_plots(shown, out_dir, write_atomic) + write_heatmaps(rows, out_dir, write_atomic)


def write_paired_tables(rows: list[dict[str, Any]], root: Path, out_dir: Path, focus: str) -> str:
    """``paired.md``/``paired.json`` beside the leaderboard; a phrase for the summary line."""
    count = write_paired([row for row in rows if not is_cell(row)], root, out_dir, focus)  # a cell is one document
    return f", paired.md ({count} paired comparisons)" if count else ""


def main(argv: list[str]) -> int:
    """Build the leaderboard; 0 when rows were written and no results file was skipped, else 1."""
    args = parse_args(argv)
    if not args.results_dir.is_dir():
        warn(f"results directory {args.results_dir} does not exist")
        return 1
    scan = load_runs(args.results_dir)
    rows = build_rows(scan.runs)
    if scan.others:
        listed = ", ".join(scan.others[:3]) + (", ..." if len(scan.others) > 3 else "")
        warn(f"ignored {len(scan.others)} other JSON file(s), not lm-eval results: {listed}")
    if not rows:
        warn(f"no leaderboard rows: no usable lm-eval results file under {args.results_dir}")
        return 1
    out_dir = args.output or args.results_dir
    try:
        n_plots = write_outputs(rows, out_dir)
        paired = write_paired_tables(rows, args.results_dir, out_dir, args.focus)
    except OSError as exc:
        warn(f"could not write the leaderboard: {exc}")
        return 1
    print(
        printable(
            f"leaderboard: {len(rows)} rows from {len(scan.runs)} results files, "
            f"{len(scan.skipped)} skipped -> {out_dir}/leaderboard.json, leaderboard.md, {n_plots} plots{paired}"
        )
    )
    if scan.skipped:
        warn(f"{len(scan.skipped)} results file(s) skipped (named above), so the exit code is 1")
        return 1
    return 0
