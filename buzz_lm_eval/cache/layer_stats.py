"""``LayerStats``: the running counters of one evicting cache layer, and its eviction timer."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Running counters of one layer (token counts are per batch row)."""

    forwards: int = 0
    peak_tokens: int = 0
    kept_tokens_sum: int = 0
    bytes_per_token: int = 0
    allocated_bytes_peak: int = 0  # bytes of the key/value buffers, spare capacity included
    evict_seconds: float = 0.0
    sync: bool = False
    prompt_tokens: int = 0  # after_prefill: tokens held when the prompt was compressed ...
    compressed_tokens: int = 0  # ... and right after

    def compressed(self, before: int, after: int) -> None:
        self.prompt_tokens, self.compressed_tokens = before, after

    def count_forward(self, kept: int) -> None:
        self.forwards += 1
        self.kept_tokens_sum += kept

    @contextmanager
    def timer(self):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.evict_seconds += time.perf_counter() - start
