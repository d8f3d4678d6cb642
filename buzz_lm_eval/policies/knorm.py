"""``knorm``: keep the tokens whose keys have the smallest L2 norm (no attention needed)."""

from __future__ import annotations

from .ranked import RankedPolicy


class KnormPolicy(RankedPolicy):
    """Once a layer holds more than ``capacity`` tokens, keep, per KV head, the ``capacity`` tokens
    whose keys have the lowest L2 norm (ties: the earliest).

    Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    (arXiv 2406.11430): low-norm keys draw high attention. The cache hands the norms of its
    stored keys as the scores ([B, H_kv, 1, L], ``signal = "key_norm"``); RoPE is a rotation, so
    the norm does not depend on positions. Published regime: once, after the prompt.
    Budget N: ``capacity = N - 1``.
    """

    name = "knorm"
    needs_scores = True
    signal = "key_norm"
    default_evict = "after_prefill"

    def ranking(self, state, current, rel):
        return -current
