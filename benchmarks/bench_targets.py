"""The benchmark's targets: each one a line with its measured number and PASS/FAIL (or info:)."""

from __future__ import annotations

SCORE_POLICIES = ("h2o", "buzz", "buzz_fast", "snapkv", "pyramidkv", "tova")
DECODE_POLICIES = ("buzz", "h2o", "tova", "streaming", "local", "snapkv")
GROUPED_POLICIES = ("h2o", "tova", "streaming", "local", "snapkv")  # one-token drops per decode step
REGIMES = ("every_forward", "after_prefill")
TARGET_SPEEDUP = 100.0  # BUZZ selection vs the per-segment loop, at least
TARGET_SHARE = 3.0  # amortised buzz eviction, % of a decode step, at most
TARGET_PREFILL = 1.2  # score-policy chunked prefill, x the full cache's, at most
TARGET_PREFILL_LENGTH = 4096  # judged from this context up
TARGET_EVICT_SHARE = 5.0  # eviction, % of a decode step at the decode context, at most
TARGET_DECODE_GPU = 1.5  # buzz budget 1024 decode tokens/s at >= 32k, x the full cache's, at least
# Two identical full caches of the wide model at 1024 tokens decoded side by side (32 steps, ratio of
# medians) on this project's 2-core CPU while other jobs ran (load average 2-6): 0.3-0.9% apart in 9
# of 10 pairs with 1 torch thread (one pair 22%), 0.6-6.3% apart with 2 threads. The step target now
# reads paired per-round ratios, which a burst shared by both cases of a round does not move.
NOISE_ALLOWANCE_PCT = 3.0


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def case(row: dict) -> str:
    budget = "" if row["budget"] is None else f" budget {row['budget']}"
    regime = "" if row.get("evict") is None else f" {row['evict']}"
    return f"{row['model']} {row['policy']}{regime}{budget} at {row['length']}"


def selection_lines(selection: dict) -> list[str]:
    return [
        f"- {verdict(selection['speedup'] >= TARGET_SPEEDUP)} BUZZ selection >= {TARGET_SPEEDUP:.0f}x faster "
        f"than the per-segment loop: {selection['speedup']:.0f}x"
    ]


def amortised_lines(share_rows: list[dict]) -> list[str]:
    """Amortised buzz eviction share, judged on the last (realistic) model."""
    lines = []
    for row in share_rows:
        mark = verdict(row["evict_share_pct"] <= TARGET_SHARE) if row is share_rows[-1] else "info:"
        lines.append(
            f"- {mark} amortised buzz eviction <= {TARGET_SHARE}% of a decode step ({case(row)}, "
            f"{row['steps']} steps, {row['evictions']} evictions fired): {row['evict_share_pct']:.1f}% "
            f"({row['evict_ms']:.3f} of {row['step_ms']:.2f} ms, means)"
        )
    if len(share_rows) > 1:
        lines.append(
            f"  - the {share_rows[0]['model']} model's decode step is unrealistically cheap, so the "
            "eviction's fixed per-layer overhead dominates it; the target is judged on the wider model"
        )
    return lines


def budget_lines(rows: list[dict]) -> list[str]:
    """buzz under every_forward never holds more than its budget while a decode step attends."""
    buzz = [r for r in rows if r["policy"] == "buzz" and r["within_budget"] is not None]
    bad = [f"{case(r)}: {r['peak_tokens_decode']:.0f}" for r in buzz if not r["within_budget"]]
    return [
        f"- {verdict(bool(buzz) and not bad)} buzz decode-phase peak kept tokens (mean over layers) <= budget "
        f"in every every_forward case ({len(buzz)} cases{'; over: ' + ', '.join(bad) if bad else ''})"
    ]


def prefill_lines(rows: list[dict]) -> list[str]:
    """Score policies' chunked prefill against the full cache's, from TARGET_PREFILL_LENGTH tokens up."""
    judged = [
        r
        for r in rows
        if r["policy"] in SCORE_POLICIES and r["length"] >= TARGET_PREFILL_LENGTH and r["prefill_x_full"] is not None
    ]
    if not judged:
        return [f"- info: no score-policy prefill at >= {TARGET_PREFILL_LENGTH} tokens in this run (not judged)"]
    return [
        f"- {verdict(r['prefill_x_full'] <= TARGET_PREFILL)} {case(r)}: chunked prefill <= {TARGET_PREFILL}x "
        f"the full cache's: {r['prefill_x_full']:.2f}x ({r['prefill_s']:.2f} s)"
        for r in judged
    ]


def evict_share_lines(section: dict, share_rows: list[dict]) -> list[str]:
    """Eviction share of the decode step per policy and regime; buzz every_forward: its amortised row."""
    lines = []
    amortised = {(r["model"], r["length"], r["budget"]): r for r in share_rows}
    for row in section["rows"]:
        share, note = row.get("evict_share_median", row["evict_share_pct"]), f"{row['steps']} steps"
        detail = f"{row['evict_ms']:.3f} of {row['step_ms']:.2f} ms"
        if "evict_share_runs" in row:
            note += f"; median of {len(row['evict_share_runs'])} runs: {listed(row['evict_share_runs'], '{:.2f}%')}"
            detail = f"the step-ratio median run: {detail}"
        cycle = amortised.get((row["model"], row["length"], row["budget"]))
        if row["policy"] == "buzz" and row["evict"] == "every_forward" and cycle is not None:
            share, detail = cycle["evict_share_pct"], f"{cycle['evict_ms']:.3f} of {cycle['step_ms']:.2f} ms"
            note = (
                f"amortised over a full eviction cycle of {cycle['steps']} steps ({cycle['evictions']} fired; "
                f"{row['steps']} steps alone: {row['evict_share_pct']:.1f}%)"
            )
        lines.append(
            f"- {verdict(share <= TARGET_EVICT_SHARE)} {case(row)}: eviction <= "
            f"{TARGET_EVICT_SHARE}% of the decode step: {share:.2f}% ({detail}, means; {note})"
        )
    return lines


def listed(values: list[float], fmt: str) -> str:
    """``values`` each formatted with ``fmt``, comma-separated (also the tables' cells of per-run lists)."""
    return ", ".join(fmt.format(value) for value in values)


def step_lines(section: dict) -> list[str]:
    """Each policy's median decode step against a full cache of ``budget`` tokens decoded side by side."""
    first, second = section["reference"]
    limit = 1 + NOISE_ALLOWANCE_PCT / 100
    lines = [
        f"- info: two identical full caches of {first['length']} tokens ({first['model']}) decoded side by side: "
        f"median steps {first['step_ms_median']:.2f} and {second['step_ms_median']:.2f} ms, median paired ratio "
        f"{section['noise_pct']:.1f}% from 1; noise allowance {NOISE_ALLOWANCE_PCT:.0f}% (ratio <= {limit:.2f})"
    ]
    if section["noise_pct"] > NOISE_ALLOWANCE_PCT:
        lines.append(
            "  - **warning: the identical runs differ by more than the allowance: the machine was busy; "
            "rerun on an idle machine before trusting the step targets**"
        )
    for row in section["rows"]:
        runs = row.get("step_x_ref_runs", [row["step_x_ref"]])
        spread = f"; the median of {len(runs)} runs: {listed(runs, '{:.3f}x')}" if len(runs) > 1 else ""
        lines.append(
            f"- {verdict(row['step_x_ref'] <= limit)} {case(row)}: decode step <= a full cache's holding "
            f"{first['length']} tokens (median of {row['steps']} paired steps{spread}): {row['step_x_ref']:.3f}x "
            f"(medians {row['step_ms_median']:.2f} vs {row['ref_step_ms_median']:.2f} ms)"
        )
    return lines


def grouping_lines(rows: list[dict]) -> list[str]:
    """What batching the one-token drops across layers buys (informational: no target names it)."""
    return [
        f"- info: {case(row)}: drops grouped across layers: eviction {row['evict_x_alone']:.2f}x and decode step "
        f"{row['step_x_alone']:.3f}x layer by layer's (median of {row['steps']} paired steps)"
        for row in rows
        if "evict_x_alone" in row
    ]


def memory_lines(tables: dict[str, list[dict]]) -> list[str]:
    """Resident KV bytes within each evicting case's bound, one line per table."""
    lines = []
    for title, rows in tables.items():
        judged = [r for r in rows if r["within_bound"] is not None]
        if not judged:
            continue
        worst = max(judged, key=lambda r: r["kv_resident_peak"] / r["kv_bound"])
        bad = [case(r) for r in judged if not r["within_bound"]]
        lines.append(
            f"- {verdict(not bad)} {title}: peak resident KV bytes <= bound in all {len(judged)} evicting "
            f"cases (largest share of its bound: {case(worst)}, {worst['kv_resident_peak'] / 2**20:.2f} of "
            f"{worst['kv_bound'] / 2**20:.2f} MiB){'; over: ' + ', '.join(bad) if bad else ''}"
        )
    lines.append(
        "  - bound: (budget + prefill chunk) x KV bytes per token, per layer, summed; under after_prefill "
        "the prompt is read whole before its compression, so max(prompt, budget + generated tokens)"
    )
    return lines


def gpu_lines(rows: list[dict], syncs: list[dict] | None, device: str) -> list[str]:
    """CUDA: buzz budget 1024 decode speed at >= 32k, and no host sync in an evicting decode step."""
    lines = []
    for row in rows:
        if row["policy"] == "buzz" and row["budget"] == 1024 and row["length"] >= 32768 and row["decode_x_full"]:
            lines.append(
                f"- {verdict(row['decode_x_full'] >= TARGET_DECODE_GPU)} {case(row)}: decode tokens/s >= "
                f"{TARGET_DECODE_GPU}x the full cache's (medians): {row['decode_x_full']:.2f}x"
            )
    if syncs is None:
        lines.append(f"- info: host-sync check of a decode step not run on {device} (it needs --device cuda)")
        return lines
    for row in syncs:
        found = ", ".join(f"{name} x{n}" for name, n in row["counts"].items() if n and name != "cuda_calls")
        where = f"{row['policy']}{'' if row['budget'] is None else ' budget ' + str(row['budget'])} at {row['length']}"
        if not row["counts"]["cuda_calls"]:
            lines.append(
                f"- **FAIL** host-sync check of {where}: the profiler recorded no CUDA runtime call, so it cannot tell"
            )
            continue
        mark = "info:" if row["policy"] == "full" else verdict(row["syncs"] == 0)
        lines.append(
            f"- {mark} no host sync (cuda*Synchronize) in one unpadded decode step, {where}: "
            f"{row['syncs']} ({found or 'no sync or scalar read'})"
        )
    return lines
