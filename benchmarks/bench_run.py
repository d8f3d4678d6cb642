"""One benchmark case: a random Llama, a chunked prefill, timed decode steps, and what the cache holds.

Only the engine's public API is used: ``build_cache``, ``cache.stats()`` and the
``keys`` / ``values`` tensors of ``cache.layers[i]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from buzz_lm_eval.cache import EvictingCache, build_cache
from buzz_lm_eval.cache.compat import cache_kwargs
from buzz_lm_eval.policies import build_policy

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {  # randomly initialised Llama shapes, values in SHAPE_KEYS order
    "tiny": dict(zip(SHAPE_KEYS, (256, 688, 4, 8, 4), strict=True)),
    # tiny's layers, 16 of them: per-layer costs add up
    "deep": dict(zip(SHAPE_KEYS, (256, 688, 16, 8, 4), strict=True)),
    "wide": dict(zip(SHAPE_KEYS, (2048, 5632, 2, 16, 8), strict=True)),
    "llama7b": dict(zip(SHAPE_KEYS, (4096, 11008, 32, 32, 32), strict=True)),
    "llama1b": dict(zip(SHAPE_KEYS, (2048, 8192, 16, 32, 8), strict=True)),  # Llama-3.2-1B-shaped
    "llama8b": dict(zip(SHAPE_KEYS, (4096, 14336, 32, 32, 8), strict=True)),  # Llama-3.1-8B-shaped
    "smollm2": dict(zip(SHAPE_KEYS, (576, 1536, 30, 9, 3), strict=True)),  # SmolLM2-135M-shaped (head dim 64)
}


def load_model(shape: str | None, args: argparse.Namespace):
    """A random Llama of the named shape, or the --pretrained model, in eval mode on the device."""
    if shape is None:
        return AutoModelForCausalLM.from_pretrained(args.pretrained, dtype=args.dtype).to(args.device).eval()
    vocab = 32000 if shape.startswith("llama") else 1000
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=65536, **SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # initialise directly in the target dtype and device
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kv_tensors(cache: EvictingCache) -> list[torch.Tensor]:
    """Every layer's keys and values tensors (layers not yet initialised have none)."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]


def resident_kv_bytes(cache: EvictingCache) -> int:
    """Bytes of the storages behind the cache's keys and values, each storage counted once.

    A storage's size includes any spare capacity of a preallocated buffer the keys are a view of.
    """
    storages = {}
    for tensor in kv_tensors(cache):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def kv_bytes_per_token(cache: EvictingCache) -> int:
    """Bytes one token takes in keys plus values, summed over layers ([B, H, L, D] tensors)."""
    return sum(t.shape[0] * t.shape[1] * t.shape[-1] * t.element_size() for t in kv_tensors(cache))


class Probe:
    """Looks at a cache after every forward: the tokens it holds and its resident KV bytes.

    Tokens held after a forward (mean over layers, after that forward's eviction) come from
    ``stats()``: ``kept_tokens_mean`` times ``forwards`` is the mean over layers of the summed
    kept counts, so its growth over one forward is what that forward left.
    """

    def __init__(self, cache: EvictingCache):
        self.cache = cache
        self.total = self.kept_total()
        self.held: list[float] = []  # tokens held after each forward seen by this probe
        self.resident: list[int] = []  # resident KV bytes after each forward

    def kept_total(self) -> float:
        stats = self.cache.stats()
        return stats["kept_tokens_mean"] * stats["forwards"]

    def after_forward(self) -> None:
        self.held.append(self.tokens_left())
        self.resident.append(resident_kv_bytes(self.cache))

    def tokens_left(self) -> float:
        """What the last forward left: a mean over layers of whole tokens, so read on the 1/layers
        grid (the float product drifts off it: 16 layers holding 1024 tokens each read 1024.000000000029,
        over a budget of 1024)."""
        total, layers = self.kept_total(), len(self.cache.layers)
        left, self.total = round((total - self.total) * layers) / layers, total
        return left

    def evicted(self, i: int) -> bool:
        """Whether forward ``i`` (one token) left fewer tokens than before plus the new one."""
        return i > 0 and self.held[i] < self.held[i - 1] + 0.5


@torch.inference_mode()
def timed_forward(model, cache: EvictingCache, ids: torch.Tensor, device: str, probe: Probe | None = None):
    """One forward of ``ids`` through the cache; returns its seconds and the greedy next token [B, 1].
    Only the last position's logits are computed, as ``generate`` and ``buzz_hf``'s prefill do."""
    sync(device)
    start = time.perf_counter()
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
    sync(device)
    seconds = time.perf_counter() - start
    if probe is not None:
        probe.after_forward()
    return seconds, logits[:, -1:].argmax(-1)


def prefill(model, cache: EvictingCache, ids: torch.Tensor, chunk: int, probe: Probe | None = None) -> torch.Tensor:
    """Feed the context through the cache in chunks; returns the greedy next token [1, 1]."""
    device = ids.device.type
    for start in range(0, ids.shape[1], chunk):
        _, token = timed_forward(model, cache, ids[:, start : start + chunk], device, probe)
    return token


def decode(
    model, cache: EvictingCache, token: torch.Tensor, steps: int, device: str, probe: Probe | None = None
) -> tuple[list[float], int, torch.Tensor]:
    """Run ``steps`` one-token forwards; returns per-step seconds, steps that evicted, next token.

    Without a ``probe`` one is made here, and the first step is not counted as evicting.
    """
    probe = probe or Probe(cache)
    times, fired = [], 0
    for _ in range(steps):
        seconds, token = timed_forward(model, cache, token, device, probe)
        times.append(seconds)
        fired += probe.evicted(len(probe.held) - 1)
    return times, fired, token


def regime_of(policy: str, budget: int | None, evict: str) -> str | None:
    """The eviction regime a case runs under (None for ``full``); ``default``: the policy's own."""
    if budget is None:
        return None
    return build_policy(policy, budget=budget).default_evict if evict == "default" else evict


def bound_tokens(regime: str | None, budget: int | None, length: int, chunk: int, decode_forwards: int) -> int | None:
    """Tokens per layer the resident KV may hold: budget + chunk, or under after_prefill the whole
    prompt (read before its one compression) or the budget plus every generated token."""
    if regime is None:
        return None
    if regime == "after_prefill":
        return max(length, budget + decode_forwards)
    return budget + chunk


@dataclass(frozen=True)
class Spec:
    """What one case runs: ``budget`` None for ``full``; ``evict`` None for the run's --evict."""

    model: str
    policy: str
    budget: int | None
    length: int
    evict: str | None = None
    batch_layers: bool = True  # build_cache's: one-token drops of all layers as one batch
    batch: int = 1  # rows, each its own random prompt
    chunk: int | None = None  # prefill chunk (None: the run's --chunk)


class Case:
    """One case in progress: its cache, what the probe saw, its next input and its timings."""

    def __init__(self, model, spec: Spec, args):
        self.spec, self.args = spec, args
        self.regime = regime_of(spec.policy, spec.budget, spec.evict or args.evict)
        sizes = (
            {} if spec.budget is None else {"budget": spec.budget, "evict": self.regime, "prompt_length": spec.length}
        )
        self.cache = build_cache(
            model,
            spec.policy,
            sync_timing=args.device == "cuda",  # exact on GPU
            batch_layers=spec.batch_layers,
            **sizes,
        )
        self.probe = Probe(self.cache)
        generator = torch.Generator().manual_seed(spec.length)
        shape = (spec.batch, spec.length)
        self.ids = torch.randint(0, model.config.vocab_size, shape, generator=generator).to(args.device)
        self.chunk = spec.chunk or args.chunk
        self.prefill_s, self.times, self.fired, self.token = 0.0, [], 0, None
        self.prefill_peak = self.evict_before = None

    def chunks(self) -> list[int]:
        """Where each prefill chunk starts."""
        return list(range(0, self.spec.length, self.chunk))

    def prefill_chunk(self, model, start: int) -> None:
        seconds, self.token = timed_forward(
            model, self.cache, self.ids[:, start : start + self.chunk], self.args.device, self.probe
        )
        self.prefill_s += seconds

    def decode_step(self, model, timed: bool) -> None:
        seconds, self.token = timed_forward(model, self.cache, self.token, self.args.device, self.probe)
        if timed:
            self.times.append(seconds)
            self.fired += self.probe.evicted(len(self.probe.held) - 1)

    def row(self, gpu_peak: int | None) -> dict:
        spec, args, stats, steps = self.spec, self.args, self.cache.stats(), len(self.times)
        step_ms, median_ms = 1000 * statistics.fmean(self.times), 1000 * statistics.median(self.times)
        evict_ms = 1000 * (stats["evict_seconds"] - self.evict_before) / steps
        chunks = math.ceil(spec.length / self.chunk)
        decode_peak = max(held + 1 for held in self.probe.held[chunks - 1 : -1])  # held while a step attends
        bound = bound_tokens(self.regime, spec.budget, spec.length, self.chunk, args.warmup + steps)
        bound_bytes = None if bound is None else bound * kv_bytes_per_token(self.cache)
        resident = max(self.probe.resident)
        return {
            "model": spec.model,
            "policy": spec.policy,
            "evict": self.regime,
            "budget": spec.budget,
            "length": spec.length,
            "batch_layers": spec.batch_layers,
            "batch": spec.batch,
            "chunk": self.chunk,
            "steps": steps,
            "prefill_s": self.prefill_s,
            "step_ms": step_ms,
            "step_ms_median": median_ms,
            "step_ms_all": [1000 * t for t in self.times],
            "evict_ms": evict_ms,
            "evict_share_pct": 100 * evict_ms / step_ms,
            "evictions": self.fired,
            "peak_tokens_prefill": self.prefill_peak,
            "peak_tokens_decode": decode_peak,
            "within_budget": decode_peak <= spec.budget if self.regime == "every_forward" else None,
            "kv_bytes_peak": stats["kv_bytes_peak"],
            "compression_ratio": stats["compression_ratio"],
            "kv_resident_peak": resident,
            "kv_bound": bound_bytes,
            "within_bound": None if bound_bytes is None else resident <= bound_bytes,
            "gpu_peak_bytes": gpu_peak,
        }


def rotated(cases: list, i: int) -> list:
    """``cases`` starting at the i-th (mod their count): no case always goes first."""
    k = i % len(cases)
    return cases[k:] + cases[:k]


def run_cases(model, specs: list[Spec], steps: int, args) -> list[dict]:
    """Run the cases side by side, one result row each.

    Each prefill chunk and decode step of every case runs before the next one of any case, so
    a machine busy for a while slows them all alike and their ratios hold. Times are per forward
    (synchronised on GPU). ``gpu_peak_bytes`` (CUDA) is set only for a case run alone.
    """
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cases = [Case(model, spec, args) for spec in specs]
    prefill_side_by_side(model, cases, args)
    for case in cases:
        case.prefill_peak = case.cache.stats()["kept_tokens_peak"]
    for i in range(args.warmup + steps):
        for case in rotated(cases, i):
            if i == args.warmup:
                case.evict_before = case.cache.stats()["evict_seconds"]
            case.decode_step(model, timed=i >= args.warmup)
    alone = args.device == "cuda" and len(cases) == 1
    return [case.row(torch.cuda.max_memory_allocated() if alone else None) for case in cases]


def prefill_side_by_side(model, cases: list, args) -> None:
    """Prefill every case chunk by chunk: the i-th chunk of every case before the next of any."""
    starts = [case.chunks() for case in cases]
    for i in range(max(len(s) for s in starts)):
        for case, case_starts in rotated(list(zip(cases, starts, strict=True)), i):
            if i < len(case_starts):
                case.prefill_chunk(model, case_starts[i])


def best_prefills(model, specs: list[Spec], repeats: int, args) -> list[dict]:
    """Prefill the cases side by side ``repeats`` times (fresh caches each time); each case's best
    prefill time, its ratio to the first case's (the reference, e.g. the full cache), and how far
    its slowest run lay above its best (the noise the best-of hides)."""
    runs = [[] for _ in specs]
    for _ in range(repeats):
        cases = [Case(model, spec, args) for spec in specs]
        prefill_side_by_side(model, cases, args)
        for seconds, case in zip(runs, cases, strict=True):
            seconds.append(case.prefill_s)
    best = [min(seconds) for seconds in runs]
    return [
        {
            "model": spec.model,
            "policy": spec.policy,
            "evict": case.regime,
            "budget": spec.budget,
            "length": spec.length,
            "prefill_s": fastest,
            "prefill_x_full": fastest / best[0],
            "repeats": repeats,
            "prefill_spread_pct": 100 * (max(seconds) - fastest) / fastest,
        }
        for spec, case, seconds, fastest in zip(specs, cases, runs, best, strict=True)
    ]


def run_case(
    model, name: str, policy: str, budget: int | None, length: int, steps: int, args, evict: str | None = None
) -> dict:
    """Prefill ``length`` random tokens, then time ``steps`` decode steps; one result row."""
    return run_cases(model, [Spec(name, policy, budget, length, evict)], steps, args)[0]


def paired_ratio(row: dict, ref: dict) -> float:
    """The median over decode rounds of ``row``'s step / ``ref``'s step of the same round: the two
    ran one after the other, so a machine busy for a while slows both and their ratio holds."""
    return statistics.median(a / b for a, b in zip(row["step_ms_all"], ref["step_ms_all"], strict=True))


def add_ratios(rows: list[dict]) -> None:
    """Each row's prefill time and median decode speed against the full cache at the same length."""
    full = {(row["model"], row["length"]): row for row in rows if row["policy"] == "full"}
    for row in rows:
        ref = full.get((row["model"], row["length"]))
        row["prefill_x_full"] = row["prefill_s"] / ref["prefill_s"] if ref else None
        row["decode_x_full"] = ref["step_ms_median"] / row["step_ms_median"] if ref else None


def policy_specs(name: str, policies: list[str], budgets: list[int], length: int) -> list[Spec]:
    """``full`` once without budget, every other policy at every budget, all at ``length``."""
    pairs = [(p, None) for p in policies if p == "full"] + [(p, b) for b in budgets for p in policies if p != "full"]
    return [Spec(name, policy, budget, length) for policy, budget in pairs]
