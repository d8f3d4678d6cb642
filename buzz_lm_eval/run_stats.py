"""Whole-run cache statistics of an lm-eval model, summed over its batches (per sequence)."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def add(self, stats: dict, rows: int, tokens: int, seconds: float) -> dict:
        """Fold in one batch; return that batch's per-sequence record (for the side file)."""
        per_row_peak = stats["kv_bytes_peak"] / rows
        self.sequences += rows
        self.batches += 1
        self.tokens += tokens
        self.seconds += seconds
        self.evict_seconds += stats["evict_seconds"]
        self.kept_tokens_peak = max(self.kept_tokens_peak, stats["kept_tokens_peak"])
        layers = stats["kept_tokens_peak_per_layer"]
        previous = self.kept_tokens_peak_per_layer or [0] * len(layers)
        self.kept_tokens_peak_per_layer = [max(a, b) for a, b in zip(previous, layers, strict=True)]
        self.kv_bytes_peak = max(self.kv_bytes_peak, per_row_peak)
        self.kept_tokens_weighted += stats["kept_tokens_mean"] * rows
        self.kv_bytes_weighted += stats["kv_bytes_mean"]
        self.peak_bytes += stats["kv_bytes_peak"]
        self.full_bytes += stats["kv_bytes_peak"] * stats["compression_ratio"]
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
        }


def full_cache_stats(config, rows: int, tokens_seen: int, element_size: int) -> dict:
    """What a full (non-evicting) DynamicCache holds for ``rows`` sequences of ``tokens_seen``."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    total = 2 * text.num_hidden_layers * kv_heads * head_dim * element_size * rows * tokens_seen
    return {
        "tokens_seen": tokens_seen, "kept_tokens_peak": tokens_seen, "kept_tokens_mean": float(tokens_seen),
        "kv_bytes_peak": total, "kv_bytes_mean": float(total), "compression_ratio": 1.0, "evict_seconds": 0.0,
        "kept_tokens_peak_per_layer": [tokens_seen] * text.num_hidden_layers,
    }
