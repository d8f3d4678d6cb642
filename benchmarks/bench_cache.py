"""Benchmark the evicting KV cache: prefill and decode time against the full cache, eviction cost, KV memory.

    python benchmarks/bench_cache.py                         # the goals on SmolLM2-135M-Instruct's shapes
    python benchmarks/bench_cache.py --decode-lengths 4096 --prefill-lengths 1024 --no-batch --gen-batches ''  # shorter
    python benchmarks/bench_cache.py --tiny --quick          # engine smoke run on tiny random Llamas
    python benchmarks/bench_cache.py --tiny --device cuda    # 1B-shaped random Llama (or --shape, --pretrained)

The default run measures the real model's goals (``bench_real.py``: the fetched SmolLM2 weights, or
random weights of its shapes) and prints each as PASS or FAIL; ``--tiny`` runs the engine's older
suite on small random Llamas (targets in benchmarks/README.md). With --json PATH the numbers are
also written as JSON. The engine is only used through its public API.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import bench_real
import bench_targets as targets
import torch
import transformers
from bench_run import (  # noqa: F401  (prefill, decode, sync: for scripts importing this module)
    SHAPES,
    Spec,
    add_ratios,
    best_prefills,
    decode,
    load_model,
    paired_ratio,
    policy_specs,
    prefill,
    regime_of,
    run_case,
    run_cases,
    sync,
)
from bench_selection import selection_bench, selection_markdown
from bench_sync import sync_check, sync_markdown

from buzz_lm_eval.cache import build_cache  # noqa: F401  (scripts importing this module use it)
from buzz_lm_eval.harness.files import write_atomic
from buzz_lm_eval.policies import POLICY_NAMES, build_policy
from buzz_lm_eval.report.machine import hardware

DEFAULTS = {"lengths": [1024, 4096, 16384], "budgets": [256, 1024], "steps": 64, "decode_context": 4096, "repeats": 3}
QUICK = {"lengths": [1024, 4096], "budgets": [256], "steps": 8, "decode_context": 1024, "repeats": 1}
CUDA = {
    "lengths": [4096, 16384, 32768],
    "budgets": [512, 1024, 2048],
    "steps": 32,
    "decode_context": 4096,
    "repeats": 2,
}
TARGET_BUDGET = 1024  # the decode section's budget when the run has it
DEEP = "deep"  # with the tiny main model, the grouped-drops section also runs this 16-layer shape


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="default: float32 on cpu, bfloat16 on cuda"
    )
    p.add_argument("--shape", choices=tuple(SHAPES), help="random Llama shape (default: tiny on cpu, llama1b on cuda)")
    p.add_argument(
        "--evict",
        choices=("every_forward", "after_prefill", "default"),
        default="every_forward",
        help="eviction regime of the main table (default: every_forward; 'default': each policy's own)",
    )
    p.add_argument("--lengths", type=ints, help=f"context lengths of the main table (default {DEFAULTS['lengths']})")
    p.add_argument(
        "--budgets", type=ints, help=f"KV-token budgets of non-full policies (default {DEFAULTS['budgets']})"
    )
    p.add_argument("--steps", type=int, help=f"timed decode steps per case (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    p.add_argument(
        "--decode-context",
        type=int,
        dest="decode_context",
        help=f"context of the decode section and the amortised table (default {DEFAULTS['decode_context']})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help=f"side-by-side runs of the prefill section (best kept) and of each decode-section pair "
        f"(median kept) (default {DEFAULTS['repeats']})",
    )
    p.add_argument("--policies", type=lambda t: t.split(","), default=list(POLICY_NAMES), help="main table's policies")
    p.add_argument("--pretrained", help="load this model instead of a random Llama")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help=f"with --tiny: smoke run; defaults become {QUICK}")
    p.add_argument(
        "--tiny", action="store_true", help="the engine suite on tiny random Llamas instead of the real goals"
    )
    p.add_argument(
        "--decode-lengths",
        type=ints,
        dest="decode_lengths",
        default=[4096, 8192],
        help="real goals: prompt lengths of the decode goals (a policy holds a quarter)",
    )
    p.add_argument(
        "--prefill-lengths",
        type=ints,
        dest="prefill_lengths",
        default=[1024, 4096, 8192],
        help="real goals: prompt lengths of the prefill goals",
    )
    p.add_argument("--no-batch", dest="batch_goals", action="store_false", help="real goals: skip batch 8")
    p.add_argument(
        "--batch-length", type=int, default=4096, dest="batch_length", help="real goals: batch 8 decode length"
    )
    p.add_argument(
        "--gen-batches", type=ints, default=[1, 8], dest="gen_batches", help="real goals: generation batch sizes"
    )
    p.add_argument(
        "--gen-tasks",
        type=lambda t: [x for x in t.split(",") if x],
        default=["cnndm", "qa10"],
        dest="gen_tasks",
        help="real goals: generation workloads (cnndm, qa10)",
    )
    p.add_argument(
        "--no-generation", dest="generation", action="store_false", help="real goals: skip buzz_hf generation"
    )
    p.add_argument("--gen-tokens", type=int, default=32, dest="gen_tokens", help="real goals: tokens per generation")
    p.add_argument("--json", help="also write all numbers to this JSON file (atomic)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else CUDA if args.device == "cuda" else DEFAULTS
    if not args.tiny:
        defaults = {**defaults, "steps": 16, "repeats": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:  # explicit options win over --quick
            setattr(args, key, value)
    unknown = sorted(set(args.policies) - set(POLICY_NAMES))
    if unknown:
        p.error(f"unknown policies {unknown}; valid: {', '.join(POLICY_NAMES)}")
    sizes = {
        "--lengths": args.lengths,
        "--budgets": args.budgets,
        "--steps": [args.steps],
        "--chunk": [args.chunk],
        "--decode-context": [args.decode_context],
        "--warmup": [args.warmup + 1],
        "--repeats": [args.repeats],
    }
    for option, values in sizes.items():
        if not values or min(values) < 1:
            p.error(f"{option} needs positive integers, got {values}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def machine_header(device: str) -> list[str]:
    """Lines describing where the numbers come from."""
    hw = hardware()
    lines = [
        f"- machine: {hw['cpu']} ({hw['platform']}), {hw['cpu_count']} cores, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
        f"- torch {hw['torch']}, transformers {transformers.__version__}, python {hw['python']}",
    ]
    if device == "cuda":
        lines.append(f"- GPU: {hw['cuda_device']}")
    if os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
        lines.append(
            "- **warning: the machine is busy; CPU timings will be noisy (try --threads 1 or an idle machine)**"
        )
    return lines


COLUMNS = [  # (header, key, format)
    ("model", "model", "{}"),
    ("policy", "policy", "{}"),
    ("evict", "evict", "{}"),
    ("budget", "budget", "{}"),
    ("context", "length", "{}"),
    ("prefill s", "prefill_s", "{:.2f}"),
    ("step ms p50", "step_ms_median", "{:.2f}"),
    ("step ms", "step_ms", "{:.2f}"),
    ("evict ms/step", "evict_ms", "{:.3f}"),
    ("evict %", "evict_share_pct", "{:.1f}"),
    ("evictions", "evictions", "{}"),
    ("peak tok prefill", "peak_tokens_prefill", "{}"),
    ("peak tok decode", "peak_tokens_decode", "{:.0f}"),
    ("<= budget", "within_budget", "{}"),
    ("KV MiB (counters)", "kv_bytes_peak", "{}"),
    ("resident KV MiB", "kv_resident_peak", "{}"),
    ("bound MiB", "kv_bound", "{}"),
    ("<= bound", "within_bound", "{}"),
    ("compression", "compression_ratio", "{:.1f}x"),
    ("prefill x full", "prefill_x_full", "{:.2f}"),
    ("decode speed x full", "decode_x_full", "{:.2f}"),
    ("full@N step ms p50", "ref_step_ms_median", "{:.2f}"),
    ("step x full@N", "step_x_ref", "{:.3f}"),
    ("step x full@N, each run", "step_x_ref_runs", "{:.3f}"),
    ("evict %, each run", "evict_share_runs", "{:.1f}"),
    ("runs (best kept)", "repeats", "{}"),
    ("slowest run %", "prefill_spread_pct", "+{:.0f}"),
    ("drops", "drops", "{}"),
    ("evict x layer by layer", "evict_x_alone", "{:.2f}"),
    ("step x layer by layer", "step_x_alone", "{:.3f}"),
    ("GPU MiB peak", "gpu_peak_bytes", "{}"),
]
MIB = ("kv_bytes_peak", "kv_resident_peak", "kv_bound", "gpu_peak_bytes")


def cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "-"
    if key in MIB:
        return f"{value / 2**20:.2f}"
    if key.startswith("within_"):
        return "yes" if value else "**NO**"
    if isinstance(value, list):
        return targets.listed(value, fmt)
    return fmt.format(value)


def markdown(rows: list[dict]) -> str:
    """A table of ``rows``, leaving out columns no row has a value in."""
    columns = [c for c in COLUMNS if any(row.get(c[1]) is not None for row in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, f, row.get(k)) for _, k, f in columns) + " |" for row in rows]
    return "\n".join(lines)


def decode_section(model, name: str, length: int, budget: int, args) -> dict:
    """Every DECODE_POLICIES x REGIMES case at ``length``, each side by side with a full cache of ``budget`` tokens
    (``--repeats`` times, see ``repeated_pair``).

    First two identical full-cache runs side by side: how far apart they land is the noise.
    """
    reference = Spec(name, "full", None, budget)
    first, second = run_cases(model, [reference, reference], args.steps, args)
    rows = [
        repeated_pair(model, Spec(name, policy, budget, length, regime), reference, args)
        for policy in targets.DECODE_POLICIES
        for regime in targets.REGIMES
    ]
    return {"reference": [first, second], "rows": rows, "noise_pct": 100 * abs(paired_ratio(first, second) - 1)}


def repeated_pair(model, spec: Spec, reference: Spec, args) -> dict:
    """``spec`` decoded side by side with ``reference``, ``--repeats`` times with fresh caches (the same
    case landed 1-3% apart from one run to the next on the 2-core CPU, more than two identical caches
    decoded side by side in one run).

    Returns the run with the median paired step ratio (the upper one of an even count), with every
    run's ratio and eviction share beside it and the median share: the step and eviction targets
    read the medians.
    """
    runs = []
    for _ in range(args.repeats):
        row, ref = run_cases(model, [spec, reference], args.steps, args)
        row["ref_step_ms_median"] = ref["step_ms_median"]
        row["step_x_ref"] = paired_ratio(row, ref)
        runs.append(row)
    runs.sort(key=lambda run: run["step_x_ref"])
    chosen = runs[len(runs) // 2]
    shares = sorted(run["evict_share_pct"] for run in runs)
    chosen["step_x_ref_runs"] = [run["step_x_ref"] for run in runs]
    chosen["evict_share_runs"], chosen["evict_share_median"] = shares, shares[len(shares) // 2]
    return chosen


def grouping_section(model, name: str, length: int, budget: int, args) -> list[dict]:
    """Each policy that drops one token per decode step, its drops batched across layers (the
    default) and layer by layer (``build_cache(batch_layers=False)``), side by side at ``length``."""
    rows = []
    for policy in targets.GROUPED_POLICIES:
        specs = [
            Spec(name, policy, budget, length, "every_forward", batch_layers=False),
            Spec(name, policy, budget, length, "every_forward"),
        ]
        alone, grouped = run_cases(model, specs, args.steps, args)
        alone["drops"], grouped["drops"] = "layer by layer", "grouped"
        grouped["evict_x_alone"] = grouped["evict_ms"] / alone["evict_ms"]
        grouped["step_x_alone"] = paired_ratio(grouped, alone)
        rows += [alone, grouped]
    return rows


def main_table(model, name: str, args) -> list[dict]:
    """Every policy at every budget and length; on CPU the cases of one length run side by side."""
    rows = []
    for length in args.lengths:
        specs = policy_specs(name, args.policies, args.budgets, length)
        groups = [specs] if args.device == "cpu" else [[spec] for spec in specs]  # CUDA: a GPU peak per case
        rows += [row for group in groups for row in run_cases(model, group, args.steps, args)]
    add_ratios(rows)
    return rows


def prefill_section(model, name: str, budget: int, args) -> list[dict]:
    """From the prefill target's length up: the full cache and every score policy under after_prefill
    at ``budget`` (their score capture covers the whole prompt; under every_forward each chunk
    attends to the budget plus a chunk only), prefilled side by side, best of ``--repeats`` runs."""
    rows = []
    for length in [n for n in args.lengths if n >= targets.TARGET_PREFILL_LENGTH]:
        specs = [Spec(name, "full", None, length)] + [
            Spec(name, policy, budget, length, "after_prefill")
            for policy in targets.SCORE_POLICIES
            if policy in args.policies
        ]
        rows += best_prefills(model, specs, args.repeats, args)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print("# buzz-lm-eval cache benchmark\n")
    header = machine_header(args.device)  # the start's load average, as printed
    print("\n".join(header))
    if not args.tiny:
        return real_goals(args, header, began)
    main_shape = None if args.pretrained else args.shape or ("llama1b" if args.device == "cuda" else "tiny")
    name = args.pretrained or main_shape
    print(
        f"- model: {name}, dtype {str(args.dtype).split('.')[-1]}, prefill chunk {args.chunk}, "
        f"{args.steps} timed decode steps after {args.warmup} warm-up steps\n"
    )

    selection = selection_bench(args.device)
    print(selection_markdown(selection), flush=True)

    budget = TARGET_BUDGET if TARGET_BUDGET in args.budgets else max(args.budgets)
    model = load_model(main_shape, args)
    rows = main_table(model, name, args)
    print(f"## Prefill, decode and KV memory of every policy ({name}, evict: {args.evict})\n")
    print(markdown(rows) + "\n", flush=True)

    grouping_models = [(name, model)] + ([(DEEP, load_model(DEEP, args))] if main_shape == "tiny" else [])
    grouping = [row for n, m in grouping_models for row in grouping_section(m, n, args.decode_context, budget, args)]
    print(
        f"## Decode drops grouped across layers vs layer by layer ({', '.join(n for n, _ in grouping_models)}, "
        f"every_forward, budget {budget}, {args.decode_context} tokens, side by side)\n"
    )
    print(markdown(grouping) + "\n", flush=True)

    prefills = prefill_section(model, name, budget, args)
    print(
        f"## Prefill over the whole prompt: score policies under after_prefill at budget {budget} ({name}, "
        f"side by side with the full cache, best of {args.repeats} runs)\n"
    )
    print(markdown(prefills) + "\n", flush=True)

    length = args.decode_context
    decode_name, decode_model = (name, model) if args.device == "cuda" or args.pretrained else ("wide", None)
    decode_model = decode_model or load_model(decode_name, args)
    section = decode_section(decode_model, decode_name, length, budget, args)
    print(
        f"## Decode at {length} tokens, budget {budget}, both regimes ({decode_name}; each pair the median "
        f"of {args.repeats} side-by-side runs)\n"
    )
    print(markdown(section["reference"] + section["rows"]) + "\n", flush=True)

    cycle = build_policy("buzz", budget=budget).threshold + 1  # >= 1 eviction in any such run
    share_models = [(name, model)] + ([] if decode_name == name else [(decode_name, decode_model)])
    share_rows = [run_case(m, n, "buzz", budget, length, cycle, args, evict="every_forward") for n, m in share_models]
    print(f"## Amortised buzz eviction over a full eviction cycle ({cycle} decode steps)\n")
    print(markdown(share_rows) + "\n", flush=True)

    syncs = sync_check(model, budget, length, args.chunk) if args.device == "cuda" else None
    if syncs is not None:
        print(f"## Host syncs in one decode step (torch.profiler, {name})\n")
        print(sync_markdown(syncs) + "\n")

    print("## Targets\n")
    lines = (
        targets.selection_lines(selection)
        + targets.amortised_lines(share_rows)
        + targets.budget_lines(rows + section["rows"] + share_rows)
        + targets.prefill_lines(rows + prefills)
        + targets.evict_share_lines(section, share_rows)
        + targets.step_lines(section)
        + targets.grouping_lines(grouping)
        + targets.memory_lines(
            {"main table": rows, "decode section": section["rows"], "amortised": share_rows, "grouping": grouping}
        )
        + targets.gpu_lines(rows, syncs, args.device)
    )
    print("\n".join(lines))
    wall = time.perf_counter() - began
    load_end = os.getloadavg()[0]
    print(f"\nwall time {wall:.0f} s, load average at end {load_end:.2f}")
    if args.json:
        payload = {
            "machine": header,
            "load_average_end": load_end,
            "args": {k: str(v) for k, v in vars(args).items()},
            "selection": selection,
            "cases": rows,
            "grouping": grouping,
            "prefill": prefills,
            "decode": section,
            "amortised": share_rows,
            "host_syncs": syncs,
            "targets": lines,
            "wall_s": wall,
        }
        write_atomic(args.json, json.dumps(payload, indent=2))


def real_goals(args, header: list[str], began: float) -> None:
    """The default run: every goal of ``bench_real`` on SmolLM2-135M-Instruct's shapes; with --json
    the file is rewritten after every section."""

    def save(out: dict) -> None:
        if args.json:
            payload = {"machine": header, "args": {k: str(v) for k, v in vars(args).items()}, **out}
            write_atomic(args.json, json.dumps({**payload, "wall_s": time.perf_counter() - began}, indent=2))

    out = bench_real.run(args, save)
    print("\n## Goals\n\n" + "\n".join(out["lines"]))
    wall = time.perf_counter() - began
    print(f"\n{out['summary']}; wall time {wall:.0f} s, load average at end {os.getloadavg()[0]:.2f}")
    save(out)


if __name__ == "__main__":
    main()
