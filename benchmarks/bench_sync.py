"""CUDA only: count host-device synchronisations in one unpadded decode step with torch.profiler."""

from __future__ import annotations

from collections import Counter

import torch
from bench_run import decode, prefill
from torch.profiler import ProfilerActivity, profile

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.cache.compat import cache_kwargs

# CUDA runtime calls that make the host wait for the device: a .item()/bool()/.cpu() of a CUDA
# tensor shows as aten::item -> aten::_local_scalar_dense -> cudaStreamSynchronize
SYNC_EVENTS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
# shown for context: on a CPU tensor (transformers does some) they do not wait for the device
SCALAR_EVENTS = ("aten::item", "aten::_local_scalar_dense")
EVENTS = SYNC_EVENTS + SCALAR_EVENTS
SYNC_POLICIES = ("full", "buzz", "h2o")  # full: what transformers' own decode step does


def step_syncs(model, policy: str, budget: int, length: int, chunk: int) -> dict[str, int]:
    """EVENTS counts, and ``cuda_calls`` (every CUDA runtime call), in one profiled decode step
    after a ``length``-token prefill and 2 warm-up steps.

    The cache is built without ``sync_timing`` (its timer synchronises on purpose) and the step
    is a bare forward of one unpadded token (no attention mask).
    """
    sizes = {} if policy == "full" else {"budget": budget, "evict": "every_forward"}
    cache = build_cache(model, policy, **sizes)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    token = prefill(model, cache, ids.to(model.device), chunk)
    _, _, token = decode(model, cache, token, 2, "cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
    counts = Counter(event.name for event in prof.events())
    calls = sum(n for name, n in counts.items() if name.startswith("cuda"))
    return {name: counts[name] for name in EVENTS} | {"cuda_calls": calls}


def sync_check(model, budget: int, length: int, chunk: int) -> list[dict]:
    """One row per policy of SYNC_POLICIES: its event counts and ``syncs``, the SYNC_EVENTS total."""
    rows = []
    for policy in SYNC_POLICIES:
        counts = step_syncs(model, policy, budget, length, chunk)
        rows.append(
            {
                "policy": policy,
                "budget": None if policy == "full" else budget,
                "length": length,
                "counts": counts,
                "syncs": sum(counts[name] for name in SYNC_EVENTS),
            }
        )
    return rows


def sync_markdown(rows: list[dict]) -> str:
    """The profiler section: one row per policy, one column per event name."""
    names = EVENTS + ("cuda_calls",)
    lines = ["| policy | budget | context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
    for row in rows:
        cells = [row["policy"], str(row["budget"] or "-"), str(row["length"])]
        cells += [str(row["counts"][name]) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
