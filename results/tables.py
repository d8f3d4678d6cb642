"""Print the Markdown tables of results/README.md from a leaderboard.json.

    python results/tables.py results/SmolLM2-135M-Instruct/leaderboard.json

First an overview: each main policy, in its published regime, as a percentage of the full
cache's score, per task and budget. Then one table per task: every policy, budget and regime with
each metric's value and standard error, its value relative to the full cache, KV memory at peak
and on average, and n. Then RULER, and last, per task, every policy and regime at each budget
where the remaining policies (or a policy's other regime) ran, with its paired comparison from
the ``paired.json`` beside the leaderboard. Runs without the chat template (the prompt-choice evidence) are left out
of the summarisation, QA and needle tables.
"""

from __future__ import annotations

import json
import os
import sys

from buzz_lm_eval.policies import POLICY_NAMES, policy_class

TASKS = {  # task: (title, metrics, runs with the chat template only)
    "buzz_cnndm_smoke": ("CNN/DM (`buzz_cnndm_smoke`, 15 articles)", ["rouge1", "rouge2", "rougeL"], True),
    "buzz_xsum_200": ("XSum (`buzz_xsum_200`, 200 articles)", ["rouge1", "rouge2", "rougeL"], True),
    "buzz_10qa_smoke_gold4": ("10-document QA, gold at 4 (50 questions)", ["best_subspan_em"], True),
    "buzz_10qa_smoke_gold0": ("10-document QA, gold at 0 (50 questions)", ["best_subspan_em"], True),
    "buzz_10qa_smoke_gold9": ("10-document QA, gold at 9 (50 questions)", ["best_subspan_em"], True),
    "buzz_wikitext_smoke": ("WikiText-2 (`buzz_wikitext_smoke`, first 20 articles)", ["bits_per_byte"], False),
}
MIB = 2**20
MAIN = ("local", "streaming", "h2o", "buzz", "snapkv", "tova")  # the policies run at every budget
OVERVIEW_NOTE = (
    "Each policy in its published regime, all at the same budget: the same peak KV memory, except snapkv,\n"
    "which holds the whole prompt until it compresses it (compare it by mean memory, in the tables below).\n"
    "Bold: the best of the row. ± is the standard error of the policy's score, in percent of the full\n"
    "cache's; whether two policies differ on the same documents is in `paired.md`."
)
EXTRAS_NOTE = (
    "buzz_nomax, pyramidkv, knorm and random, and snapkv, pyramidkv and tova in the regime other than their\n"
    "published one (`(other)`), beside every policy run at the same budget. `vs full (paired)`: the mean\n"
    "difference from the full cache on the same documents with its standard error; W/L/T: documents where\n"
    "the policy did better / worse / the same (for bits per byte lower is better); p: two-sided exact sign test."
)
SHORT = {"buzz_cnndm_smoke": "CNN/DM", "buzz_xsum_200": "XSum", "buzz_wikitext_smoke": "WikiText bpb"}


def prompted(row: dict, chat_only: bool) -> bool:
    """Whether a row belongs in its task's tables: with the chat template where the task's tables
    keep only those runs (the plain-prompt runs are the prompt-choice evidence)."""
    return not chat_only or bool(row["settings"].get("chat_template"))


def published(row: dict) -> bool:
    """Whether an evicting policy's row ran in the policy's published regime."""
    return row["cache"].get("evict") == policy_class(row["policy"]).default_evict


def in_overview(row: dict) -> bool:
    """A main policy in its published regime, on its task's first metric, with a full-cache reference."""
    if row["task"] not in TASKS or row["policy"] not in MAIN or row["relative_quality"] is None:
        return False
    _, metrics, chat_only = TASKS[row["task"]]
    return row["metric"] == metrics[0] and prompted(row, chat_only) and published(row)


def overview(rows: list[dict]) -> str:
    """Rows (task, budget), columns the main policies in their published regimes: the policy's score
    as a percentage of the full cache's (for bits per byte, the full cache's over the policy's),
    with the standard error of the policy's score in the same units where lm-eval gives one."""
    order = list(TASKS)
    cells: dict[tuple, dict[str, dict]] = {}
    for row in filter(in_overview, rows):
        cells.setdefault((order.index(row["task"]), row["budget"]), {})[row["policy"]] = row
    lines = ["| task | budget | full | n | " + " | ".join(MAIN) + " |", "|---|---:|---:|---:|" + "---:|" * len(MAIN)]
    for index, budget in sorted(cells):
        task = order[index]
        by_policy = cells[(index, budget)]
        best = max(row["relative_quality"] for row in by_policy.values())
        shown = []
        for policy in MAIN:
            row = by_policy.get(policy)
            if row is None:
                shown.append("")
                continue
            if isinstance(row.get("stderr"), float) and row["higher_is_better"]:
                text = f"{100 * row['relative_quality']:.0f} ± {100 * row['stderr'] / row['full_value']:.0f}"
            else:  # no standard error (perplexities): one more digit, as the gaps are small
                text = f"{100 * row['relative_quality']:.1f}"
            shown.append(f"**{text}**" if row["relative_quality"] == best else text)
        first = next(iter(by_policy.values()))
        name = SHORT.get(task, task.replace("buzz_10qa_smoke_gold", "QA gold "))
        lines.append(
            f"| {name} | {budget} | {first['full_value']:.3f} | {first['n_samples']} | " + " | ".join(shown) + " |"
        )
    return "\n".join(lines)


def table(rows: list[dict], task: str, metrics: list[str], chat_only: bool) -> str | None:
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["task"] != task or row["metric"] not in metrics:
            continue
        if not prompted(row, chat_only):
            continue
        key = (row["policy"], row["budget"], row["cache"].get("evict"))
        cells.setdefault(key, {})[row["metric"]] = row
    if not cells:
        return None
    head = [
        "policy",
        "budget",
        "evict",
        *metrics,
        f"rel. {metrics[0]}",
        "KV peak (MiB)",
        "KV mean (MiB)",
        "kept mean",
        "n",
        "batch",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    order = lambda key: (key[1] or 0, POLICY_NAMES.index(key[0]), str(key[2]))  # noqa: E731
    for key in sorted(cells, key=order):
        by_metric, first = cells[key], cells[key][metrics[0]]
        values = [
            f"{by_metric[m]['value']:.3f} ± {by_metric[m]['stderr']:.3f}"
            if isinstance(by_metric.get(m, {}).get("stderr"), float)
            else f"{by_metric[m]['value']:.3f}"
            for m in metrics
        ]
        relative = first.get("relative_quality")
        lines.append(
            "| "
            + " | ".join(
                [
                    key[0],
                    str(key[1] or "full"),
                    key[2] or "",
                    *values,
                    "-" if relative is None else f"{relative:.3f}",
                    f"{first['kv_bytes_peak'] / MIB:.1f}",
                    f"{first['kv_bytes_mean'] / MIB:.1f}",
                    f"{first['kept_tokens_mean']:.0f}",
                    str(first["n_samples"]),
                    str(first.get("batch_size")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


EXTRA_TASKS = {
    **{task: (title, metrics[0], chat) for task, (title, metrics, chat) in TASKS.items()},
    "buzz_niah": ("Needle in a haystack (`buzz_niah`, 15 prompts)", "score", True),
}


def is_extra(row: dict) -> bool:
    """A policy beyond the main six, or a main one outside its published regime."""
    if row["policy"] == "full":
        return False
    return row["policy"] not in MAIN or not published(row)


def extras_table(rows: list[dict], paired: list[dict], task: str) -> str | None:
    """Every policy at each budget of ``task`` where an extra (``is_extra``) ran: the score, the paired
    difference with the full cache on the same documents, wins/losses, the sign test, KV memory (per
    row of its batch, so compare means within one batch size) and the batch size."""
    _, metric, chat_only = EXTRA_TASKS[task]
    mine = [r for r in rows if r["task"] == task and r["metric"] == metric and prompted(r, chat_only)]
    budgets = sorted({r["budget"] for r in mine if is_extra(r)})
    if not budgets:
        return None
    by_source = {p["source"]: p for p in paired if p["task"] == task and p["metric"] == metric}
    lines = [
        f"| budget | policy | evict | {metric} | vs full (paired) | W/L/T | p | KV peak / mean (MiB) | n | batch |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    order = lambda r: (r["budget"], POLICY_NAMES.index(r["policy"]), str(r["cache"].get("evict")))  # noqa: E731
    for row in sorted((r for r in mine if r["budget"] in budgets), key=order):
        pair = by_source.get(row["source"])
        versus = "" if pair is None else f"{pair['mean_difference']:+.3f} ± {pair['stderr']:.3f}"
        counts = "" if pair is None else f"{pair['wins']}/{pair['losses']}/{pair['ties']}"
        p_value = "" if pair is None or pair["sign_test_p"] is None else f"{pair['sign_test_p']:.2g}"
        stderr = f" ± {row['stderr']:.3f}" if isinstance(row.get("stderr"), float) else ""
        evict = row["cache"].get("evict") or ""
        lines.append(
            f"| {row['budget']} | {row['policy']} | {evict}{'' if published(row) else ' (other)'} | "
            f"{row['value']:.3f}{stderr} | {versus} | {counts} | {p_value} | "
            f"{row['kv_bytes_peak'] / MIB:.1f} / {row['kv_bytes_mean'] / MIB:.1f} | "
            f"{row['n_samples']} | {row.get('batch_size')} |"
        )
    return "\n".join(lines)


RULER = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


def ruler_table(rows: list[dict]) -> str | None:
    """The offline RULER tasks: one row per length, policy, budget and regime, one column per task
    (lm-eval's score at that length, 0-1), with the samples per task. A policy outside its published
    regime is a row of its own, marked ``(other)``."""
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["task"] in RULER and row["metric"].isdigit() and row["value"] is not None:
            other = "" if row["policy"] == "full" or published(row) else row["cache"].get("evict")
            key = (int(row["metric"]), row["budget"] or 0, POLICY_NAMES.index(row["policy"]), other, row["policy"])
            if row["task"] in cells.get(key, {}):
                raise ValueError(
                    f"two RULER runs for one cell {key}: {cells[key][row['task']]['source']}, {row['source']}"
                )
            cells.setdefault(key, {})[row["task"]] = row
    if not cells:
        return None
    lines = ["| length | policy | budget | " + " | ".join(RULER) + " | n per task |", "|---:|---|---:|" + "---:|" * 7]
    for key in sorted(cells):
        by_task = cells[key]
        scores = [f"{by_task[t]['value']:.2f}" if t in by_task else "" for t in RULER]
        n = sorted({str(r["n_samples"]) for r in by_task.values()})
        name = f"{key[4]} (other: {key[3]})" if key[3] else key[4]
        lines.append(f"| {key[0]} | {name} | {key[1] or 'full'} | " + " | ".join(scores) + f" | {'/'.join(n)} |")
    return "\n".join(lines)


def main(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)["rows"]
    with open(os.path.join(os.path.dirname(path), "paired.json"), encoding="utf-8") as handle:
        paired = json.load(handle)["rows"]
    print(f"### Overview: percent of the full cache's score\n\n{overview(rows)}\n\n{OVERVIEW_NOTE}\n")
    for task, (title, metrics, chat_only) in TASKS.items():
        text = table(rows, task, metrics, chat_only)
        if text is not None:
            print(f"### {title}\n\n{text}\n")
    text = ruler_table(rows)
    if text is not None:
        print(f"### RULER, offline tasks (`buzz_ruler_offline`)\n\n{text}\n")
    print(f"### Every policy and regime at the budgets where the remaining ones ran\n\n{EXTRAS_NOTE}\n")
    for task, (title, _, _) in EXTRA_TASKS.items():
        text = extras_table(rows, paired, task)
        if text is not None:
            print(f"#### {title}\n\n{text}\n")


if __name__ == "__main__":
    main(sys.argv[1])
