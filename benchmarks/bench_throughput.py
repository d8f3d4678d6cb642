"""Evaluation throughput per task: documents per minute, prefill and decode tokens per second.

    python benchmarks/bench_throughput.py --threads 2 --json throughput.json
    python benchmarks/bench_throughput.py --tasks buzz_cnndm_smoke --policies full,buzz --batches 1 --limit 2

Each (task, batch size, policy) is one ``lm_eval.simple_evaluate`` run of ``buzz_hf`` on the first
``--limit`` documents, exactly as a sweep runs it (chat template, the task's own generation
settings, each policy in its own regime and default prefill chunks). A clock on ``generate``'s
streamer splits every generation batch into prefill (from ``_model_generate``'s start, chunked
prefill included, to the first generated token) and decode (the remaining tokens). Prefill tokens
are the prompts' real tokens; decode tokens count every row of a step, as the batch pays for them.
Runs go one after another (batch size, then task, then policy): run it on an otherwise idle machine.

Default: SmolLM2-135M-Instruct (``buzz-lm-eval models fetch smollm2-135m-instruct``), every
headline policy at each task's middle published budget, batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers.generation.streamers import BaseStreamer

from buzz_lm_eval.harness.files import write_atomic
from buzz_lm_eval.harness.hflm import BuzzHFLM
from buzz_lm_eval.report.machine import hardware

TASK_BUDGETS = {"buzz_cnndm_smoke": 256, "buzz_xsum_200": 128, "buzz_10qa_smoke_gold4": 512}
POLICIES = ("full", "local", "streaming", "h2o", "buzz", "snapkv", "tova")


class StepClock(BaseStreamer):
    """Timestamps of ``generate``'s streamer calls: the prompt, then one per generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def new_split() -> dict:
    """Prefill and decode seconds and tokens, summed over generation batches, and each batch's shape."""
    return {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0, "batches": []}


class ClockedLM(BuzzHFLM):
    """``buzz_hf`` whose generation batches are split into prefill and decode time (``split``,
    restarted by ``run_one`` for each run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split = new_split()

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        clock = StepClock()
        mask = generation_kwargs.get("attention_mask")
        start = time.perf_counter()
        out = super()._model_generate(context, max_length, stop, streamer=clock, **generation_kwargs)
        end = time.perf_counter()
        first = clock.times[1] if len(clock.times) > 1 else end  # after the prompt's forward and token 1
        steps = max(len(clock.times) - 2, 0)
        prompt_tokens = int(mask.sum()) if mask is not None else context.numel()
        split = self.split
        split["prefill_s"] += first - start
        split["prefill_tokens"] += prompt_tokens
        split["decode_s"] += end - first
        split["decode_tokens"] += steps * context.shape[0]
        split["batches"].append({"rows": context.shape[0], "width": context.shape[1], "steps": steps})
        return out


def run_one(lm: ClockedLM, task: str, policy: str, budget: int, limit: int) -> dict:
    """One ``simple_evaluate`` run; its throughput."""
    from lm_eval import simple_evaluate

    lm.configure_cache(cache=policy, budget=None if policy == "full" else budget)
    lm.split = new_split()
    start = time.perf_counter()
    simple_evaluate(model=lm, tasks=[task], limit=limit, apply_chat_template=True, batch_size=lm.batch_size)
    seconds = time.perf_counter() - start
    split = lm.split
    return {
        "task": task,
        "policy": policy,
        "budget": None if policy == "full" else budget,
        "batch": lm.batch_size,
        "docs": limit,
        "seconds": seconds,
        "docs_per_min": 60 * limit / seconds,
        "prefill_tok_s": split["prefill_tokens"] / split["prefill_s"] if split["prefill_s"] else 0.0,
        "decode_tok_s": split["decode_tokens"] / split["decode_s"] if split["decode_s"] else 0.0,
        "prefill_tokens": split["prefill_tokens"],
        "decode_tokens": split["decode_tokens"],
        "generation_batches": split["batches"],
    }


def table(rows: list[dict]) -> list[str]:
    """Markdown rows, each policy against the full cache of its task and batch size."""
    full = {(r["task"], r["batch"]): r for r in rows if r["policy"] == "full"}
    lines = [
        "| task | batch | policy | budget | docs | docs/min | prefill tok/s | decode tok/s | decode x full | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = full.get((r["task"], r["batch"]))
        ratio = r["decode_tok_s"] / ref["decode_tok_s"] if ref and ref["decode_tok_s"] else None
        verdict = "-" if r["policy"] == "full" or ratio is None else ("PASS" if ratio >= 1.0 else "FAIL")
        lines.append(
            f"| {r['task']} | {r['batch']} | {r['policy']} | {r['budget'] or 'full'} | {r['docs']} | "
            f"{r['docs_per_min']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {verdict} |"
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", default=",".join(TASK_BUDGETS), help=f"from {', '.join(TASK_BUDGETS)}")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--batches", default="1,8", help="batch sizes")
    parser.add_argument("--limit", type=int, default=8, help="documents per run (at least the largest batch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.tasks, args.policies = args.tasks.split(","), args.policies.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    unknown = [t for t in args.tasks if t not in TASK_BUDGETS]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; valid: {sorted(TASK_BUDGETS)}")
    if "full" not in args.policies:
        parser.error("--policies must include full (every ratio is against it)")
    if args.limit < max(args.batches):
        parser.error(f"--limit {args.limit} is below the largest batch {max(args.batches)}: that batch would not fill")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"- {hardware()}; torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}")
    rows: list[dict] = []
    for batch in args.batches:
        lm = ClockedLM(pretrained=args.pretrained, device=args.device, dtype=args.dtype, batch_size=batch)
        for task in args.tasks:
            for policy in args.policies:
                rows.append(run_one(lm, task, policy, TASK_BUDGETS[task], args.limit))
                print(table(rows)[-1], flush=True)
                if args.json:
                    write_atomic(
                        args.json, json.dumps({"args": vars(args), "hardware": hardware(), "rows": rows}, indent=1)
                    )
        del lm
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
