"""Selection micro-benchmark: BUZZ's vectorised step against a per-segment Python loop."""

from __future__ import annotations

import time

import torch

from buzz_lm_eval.policies import build_policy

SELECTION_SHAPE = (1, 32, 1, 4096)  # [B, H_kv, q, L] random scores


def loop_select(scores: torch.Tensor, sink: int, window: int, stride: int) -> list[list[int]]:
    """Reference: per head, sinks + argmax of every ``stride``-token middle segment + window."""
    length = scores.shape[-1]
    kept = []
    for head in range(scores.shape[1]):
        row = scores[0, head, 0]
        picks = list(range(sink))
        for start in range(sink, length - window, stride):
            segment = row[start : min(start + stride, length - window)]
            picks.append(start + int(segment.argmax()))
        kept.append(picks + list(range(length - window, length)))
    return kept


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def selection_bench(device: str) -> dict:
    """BUZZ vectorised step vs the per-segment loop on the same random scores, plus other policies."""
    scores = torch.rand(SELECTION_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    buzz = build_policy("buzz")
    keep = buzz.step(buzz.new_state(), scores)
    reference = loop_select(scores.cpu(), buzz.sink, buzz.window, buzz.stride)
    assert keep[0].tolist() == reference, "vectorised BUZZ selection disagrees with the loop reference"

    def step_of(policy):
        def run():
            policy.step(policy.new_state(), scores)
            if device == "cuda":
                torch.cuda.synchronize()

        return run

    loop_s = best_time(lambda: loop_select(scores.cpu(), buzz.sink, buzz.window, buzz.stride), 3)
    others = ("buzz", "buzz_fast", "buzz_nomax", "h2o")
    step_ms = {name: 1000 * best_time(step_of(build_policy(name)), 20) for name in others}
    return {
        "shape": list(SELECTION_SHAPE),
        "loop_ms": 1000 * loop_s,
        "step_ms": step_ms,
        "speedup": 1000 * loop_s / step_ms["buzz"],
        "identical": True,
    }


def selection_markdown(selection: dict) -> str:
    """The micro-benchmark's section."""
    lines = [
        f"## Selection micro-benchmark (random scores {selection['shape']}, default sizes)\n",
        "| method | ms |",
        "|---|---|",
        f"| per-segment Python loop (buzz reference) | {selection['loop_ms']:.2f} |",
    ]
    lines += [f"| {policy} `Policy.step` (vectorised) | {ms:.3f} |" for policy, ms in selection["step_ms"].items()]
    lines.append(f"\nBUZZ picks identical to the loop: yes; speed-up {selection['speedup']:.0f}x\n")
    return "\n".join(lines)
