"""Cache statistics of an lm-eval model, summed over its batches (per sequence).

``RunStats`` accumulates one run, or one task's requests of one type; ``combine`` merges
summaries (a group task's subtasks, or a task's request types) exactly as if accumulated together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class RunStats:
    """Accumulates ``EvictingCache.stats()`` of each batch; ``summary()`` is plain ints/floats.

    Peaks are the largest of any batch, per sequence (a batch's KV bytes divided by its rows);
    means are weighted by rows; the compression ratio is the full-cache bytes of all batches
    over their peak bytes.
    """

    sequences: int = 0
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0
    evict_seconds: float = 0.0
    kept_tokens_peak: int = 0
    kv_bytes_peak: float = 0.0
    kept_tokens_weighted: float = 0.0
    kv_bytes_weighted: float = 0.0
    full_bytes: float = 0.0
    peak_bytes: float = 0.0
    kept_tokens_peak_per_layer: list[int] = field(default_factory=list)
    prompt_tokens: float = 0.0  # after_prefill: tokens compressed, summed over sequences ...
    compressed_tokens: float = 0.0  # ... and what the compression left of them

    def add(self, stats: dict, rows: int, tokens: int, seconds: float) -> dict:
        """Fold in one batch; return that batch's per-sequence record (for the side file)."""
        per_row_peak = stats["kv_bytes_peak"] / rows
        self.sequences += rows
        self.batches += 1
        self.tokens += tokens
        self.seconds += seconds
        self.evict_seconds += stats["evict_seconds"]
        self.kept_tokens_peak = max(self.kept_tokens_peak, stats["kept_tokens_peak"])
        layers = stats.get("kept_tokens_peak_per_layer") or []
        self.kept_tokens_peak_per_layer = layer_peaks(self.kept_tokens_peak_per_layer, layers)
        self.kv_bytes_peak = max(self.kv_bytes_peak, per_row_peak)
        self.kept_tokens_weighted += stats["kept_tokens_mean"] * rows
        self.kv_bytes_weighted += stats["kv_bytes_mean"]
        self.peak_bytes += stats["kv_bytes_peak"]
        self.full_bytes += stats["kv_bytes_peak"] * stats["compression_ratio"]
        self.prompt_tokens += stats.get("prompt_tokens_compressed", 0.0) * rows
        self.compressed_tokens += stats.get("kept_tokens_after_compression", 0.0) * rows
        return {
            "rows": rows,
            "tokens_seen": stats["tokens_seen"],
            "kept_tokens_peak": stats["kept_tokens_peak"],
            "kept_tokens_peak_per_layer": layers,
            "kv_bytes_peak_per_sequence": per_row_peak,
            "compression_ratio": stats["compression_ratio"],
            "evict_seconds": stats["evict_seconds"],
            "seconds": seconds,
        }

    def summary(self) -> dict:
        """Plain ints/floats; ``kv_bytes_peak_total`` (sum of the batches' peak bytes) lets
        summaries be combined again."""
        rows = max(self.sequences, 1)
        return {
            "sequences": self.sequences,
            "batches": self.batches,
            "tokens_processed": self.tokens,
            "kept_tokens_peak": self.kept_tokens_peak,
            "kept_tokens_peak_per_layer": self.kept_tokens_peak_per_layer,
            "kept_tokens_mean": self.kept_tokens_weighted / rows,
            "kv_bytes_peak": int(self.kv_bytes_peak),
            "kv_bytes_mean": self.kv_bytes_weighted / rows,
            "compression_ratio": self.full_bytes / self.peak_bytes if self.peak_bytes else 1.0,
            "evict_seconds": self.evict_seconds,
            "model_seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
            "kv_bytes_peak_total": self.peak_bytes,
            # after_prefill (kvpress's reading): the share of the prompt's tokens pruned by the compression
            "pruned_fraction_after_prefill": 1 - self.compressed_tokens / self.prompt_tokens
            if self.prompt_tokens
            else 0.0,
            "prompt_tokens_total": self.prompt_tokens,
            "kept_after_prefill_total": self.compressed_tokens,
        }

    @classmethod
    def from_summary(cls, summary: dict) -> RunStats:
        """The accumulator behind ``summary`` (inverse of ``summary()``)."""
        rows = summary["sequences"]
        peak_bytes = summary["kv_bytes_peak_total"]
        return cls(
            sequences=rows,
            batches=summary["batches"],
            tokens=summary["tokens_processed"],
            seconds=summary["model_seconds"],
            evict_seconds=summary["evict_seconds"],
            kept_tokens_peak=summary["kept_tokens_peak"],
            kv_bytes_peak=summary["kv_bytes_peak"],
            kept_tokens_weighted=summary["kept_tokens_mean"] * rows,
            kv_bytes_weighted=summary["kv_bytes_mean"] * rows,
            full_bytes=summary["compression_ratio"] * peak_bytes,
            peak_bytes=peak_bytes,
            kept_tokens_peak_per_layer=list(summary.get("kept_tokens_peak_per_layer") or []),
            prompt_tokens=summary.get("prompt_tokens_total", 0.0),
            compressed_tokens=summary.get("kept_after_prefill_total", 0.0),
        )

    def merge(self, other: RunStats) -> None:
        """Fold ``other`` in: sums add up, peaks take the larger."""
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name == "kept_tokens_peak_per_layer":
                setattr(self, item.name, layer_peaks(mine, theirs))
            else:
                peak = item.name in ("kept_tokens_peak", "kv_bytes_peak")
                setattr(self, item.name, max(mine, theirs) if peak else mine + theirs)


def layer_peaks(previous: list[int], layers: list[int]) -> list[int]:
    """Elementwise maximum of two per-layer peak lists (an empty list is no data yet)."""
    if not previous or not layers:
        return list(previous or layers)
    return [max(a, b) for a, b in zip(previous, layers, strict=True)]


def combine(summaries: list[dict]) -> dict:
    """One summary for several (raises KeyError for a summary without the fields it needs)."""
    total = RunStats()
    for summary in summaries:
        total.merge(RunStats.from_summary(summary))
    return total.summary()


# keys of config.buzz_cache that are statistics, not settings (also the per-batch cache.stats() ones)
STAT_KEYS = frozenset(RunStats().summary()) | {"tokens_seen", "per_task"}


def full_cache_stats(config, rows: int, tokens_seen: int, element_size: int) -> dict:
    """What a full (non-evicting) DynamicCache holds for ``rows`` sequences of ``tokens_seen``."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    total = 2 * text.num_hidden_layers * kv_heads * head_dim * element_size * rows * tokens_seen
    return {
        "tokens_seen": tokens_seen,
        "kept_tokens_peak": tokens_seen,
        "kept_tokens_mean": float(tokens_seen),
        "kv_bytes_peak": total,
        "kv_bytes_mean": float(total),
        "compression_ratio": 1.0,
        "evict_seconds": 0.0,
        "kept_tokens_peak_per_layer": [tokens_seen] * text.num_hidden_layers,
    }
