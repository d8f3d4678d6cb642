"""Paired comparisons, document by document: ``paired.md`` and ``paired.json``.

With 15 or 50 documents a task's mean moves by noise alone; comparing each policy with the full
cache on the *same* documents removes the documents' own spread. For every leaderboard row that
has a comparable full-cache run (``full_source``) and both runs' lm-eval samples files
(``--log_samples``), the documents are paired by ``doc_id`` (and must agree on ``doc_hash``), and
the row gets: ``n``, the mean per-document difference (policy - full) with its standard error, wins,
losses and ties, and the two-sided exact sign-test p-value over the documents that differ.
``bits_per_byte`` (a ``[loglikelihood, bytes]`` pair per document, aggregated over all bytes) is
paired as each document's own bits per byte; the other perplexities are left out.

A second table pairs one policy (``focus``, by default ``buzz``) with every other policy run at the
same budget under the same comparable settings: whether BUZZ's gap to H2O on 50 questions is real
is the question a reader asks next.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from buzz_lm_eval.harness.files import write_atomic

# what a paired row keeps of its leaderboard row
KEPT_FIELDS = (
    "model",
    "task",
    "metric",
    "policy",
    "budget",
    "comparison",
    "source",
    "full_source",
    "kv_bytes_peak",
    "kv_bytes_mean",
)
HEADER = ["| policy | budget | evict | n | difference | W/L/T | sign-test p |", "|---|---:|---|---:|---:|---|---:|"]
BETWEEN_HEADER = [
    "| budget | evict | against | its evict | n | difference | W/L/T | sign-test p |",
    "|---:|---|---|---|---:|---:|---|---:|",
]

NOTE = (
    "difference = policy - full on the same documents (mean +- standard error of the per-document "
    "differences); W/L/T = documents where the policy did better / worse / the same (for bits_per_byte, "
    "each document's own, lower is better: a positive difference is a loss); p = two-sided exact sign "
    "test over the documents that differ"
)
BETWEEN_NOTE = (
    "difference = {focus} - the other policy at the same budget, on the documents both scored (mean +- "
    "standard error); W/L/T = documents where {focus} did better / worse / the same; p = two-sided exact "
    "sign test; at one budget policies under other regimes (evict) hold other peaks and means: see the leaderboard"
)


def samples_path(root: Path, source: str, task: str) -> Path | None:
    """The samples file lm-eval wrote beside ``results_<date>.json`` for ``task`` (same date id)."""
    results = root / source
    date_id = results.stem.split("_", 1)[-1]
    path = results.with_name(f"samples_{task}_{date_id}.jsonl")
    return path if path.is_file() else None


def per_document(path: Path, metric: str) -> dict[int, tuple[str, float]]:
    """``doc_id -> (doc_hash, value)`` for documents whose ``metric`` is one finite number (or, for
    ``bits_per_byte``, a ``[loglikelihood, bytes]`` pair: that document's bits per byte)."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        value = sample.get(metric)
        if metric == "bits_per_byte" and isinstance(value, list) and len(value) == 2 and value[1]:
            value = -value[0] / value[1] / math.log(2)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[sample["doc_id"]] = (sample.get("doc_hash"), float(value))
    return values


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` against ``losses`` at even odds."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(
    policy: dict[int, tuple[str, float]], full: dict[int, tuple[str, float]], higher_is_better: bool = True
) -> dict[str, Any] | None:
    """The paired statistics over documents present in both with the same hash (None: none); wins
    are the documents where ``policy`` did better in the metric's direction."""
    diffs = [policy[d][1] - full[d][1] for d in sorted(policy.keys() & full.keys()) if policy[d][0] == full[d][0]]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else None
    higher, lower = sum(x > 0 for x in diffs), sum(x < 0 for x in diffs)
    wins, losses = (higher, lower) if higher_is_better else (lower, higher)
    return {
        "n": n,
        "mean_difference": mean,
        "stderr": stderr,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "sign_test_p": sign_test(wins, losses),
    }


class SampleFiles:
    """Per-document values of a run's samples file, read once per (run, task, metric)."""

    def __init__(self, root: Path):
        self.root = root
        self._read: dict[tuple[str, str, str], dict[int, tuple[str, float]] | None] = {}

    def values(self, source: str, task: str, metric: str) -> dict[int, tuple[str, float]] | None:
        key = (source, task, metric)
        if key not in self._read:
            path = samples_path(self.root, source, task)
            self._read[key] = None if path is None else per_document(path, metric)
        return self._read[key]

    def compare(self, row: dict[str, Any], other_source: str) -> dict[str, Any] | None:
        """``compare`` of ``row``'s run with the run ``other_source`` on ``row``'s task and metric."""
        mine = self.values(row["source"], row["task"], row["metric"])
        other = self.values(other_source, row["task"], row["metric"])
        return compare(mine, other, row.get("higher_is_better") is not False) if mine and other else None


def paired_rows(rows: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """One paired comparison per leaderboard row with a full-cache reference and samples on both sides."""
    files, paired = SampleFiles(root), []
    for row in rows:
        if row["policy"] == "full" or not row.get("full_source") or row["value"] is None:
            continue
        stats = files.compare(row, row["full_source"])
        if stats is not None:
            paired.append({key: row[key] for key in KEPT_FIELDS} | {"evict": row["cache"].get("evict"), **stats})
    return paired


def policy_pairs(rows: list[dict[str, Any]], root: Path, focus: str) -> list[dict[str, Any]]:
    """``focus`` against every other policy at the same budget and comparable settings (same
    ``comparison``), on the documents both runs scored: difference = focus - other."""
    files, groups = SampleFiles(root), {}
    for row in rows:
        if row["budget"] is not None and row["value"] is not None:
            key = (row["model"], row["task"], row["metric"], row["comparison"], row["budget"])
            groups.setdefault(key, []).append(row)
    paired = []
    for members in groups.values():
        for mine in (row for row in members if row["policy"] == focus):
            for other in (row for row in members if row["policy"] != focus):
                stats = files.compare(mine, other["source"])
                if stats is not None:
                    paired.append(
                        {key: mine[key] for key in KEPT_FIELDS if key != "full_source"}
                        | {"evict": mine["cache"].get("evict"), "against": other["policy"]}
                        | {"against_evict": other["cache"].get("evict"), "against_source": other["source"], **stats}
                    )
    return paired


def render(paired: list[dict[str, Any]], between: list[dict[str, Any]] | None = None, focus: str = "buzz") -> str:
    """One Markdown table per (model, task, metric, comparison); then ``focus`` against the others."""
    lines = ["# Paired comparisons with the full cache", "", NOTE, ""]
    lines += sections(paired, HEADER, lambda row: [row["policy"], row["budget"], row["evict"]])
    if between:
        lines += [f"# {focus} against the other policies at the same budget", "", BETWEEN_NOTE.format(focus=focus), ""]
        lines += sections(
            between, BETWEEN_HEADER, lambda row: [row["budget"], row["evict"], row["against"], row["against_evict"]]
        )
    return "\n".join(lines)


def sections(rows: list[dict[str, Any]], header: list[str], leading) -> list[str]:
    """A heading and a table per (model, task, metric, comparison): each row's ``leading(row)``
    cells, then n, the mean difference with its standard error, W/L/T and the sign-test p."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["metric"], row["comparison"]), []).append(row)
    lines = []
    for (model, task, metric, comparison), members in groups.items():
        lines += [f"## {task}, {metric} ({model}, comparison {comparison})", "", *header]
        for row in members:
            stderr = "" if row["stderr"] is None else f" ± {row['stderr']:.4f}"
            cells = [*leading(row), row["n"], f"{row['mean_difference']:+.4f}{stderr}"]
            cells += [f"{row['wins']}/{row['losses']}/{row['ties']}", f"{row['sign_test_p']:.3g}"]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        lines.append("")
    return lines


def write_paired(rows: list[dict[str, Any]], root: Path, out_dir: Path, focus: str = "buzz") -> int:
    """Write ``paired.json`` and ``paired.md`` when any comparison could be paired; their count."""
    paired, between = paired_rows(rows, root), policy_pairs(rows, root, focus)
    if paired or between:
        table = {"note": NOTE, "rows": paired, "focus": focus, "between_note": BETWEEN_NOTE.format(focus=focus)}
        write_atomic(out_dir / "paired.json", json.dumps({**table, "between": between}, indent=2) + "\n")
        write_atomic(out_dir / "paired.md", render(paired, between, focus))
    return len(paired) + len(between)
