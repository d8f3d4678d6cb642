"""``pyramidkv``: SnapKV's selection with per-layer budgets shrinking from the first to the last layer."""

from __future__ import annotations

from fractions import Fraction

from .base import check_sizes
from .snapkv import KERNEL, OBSERVATION, POOLING, SnapKVPolicy


class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV per layer, with a pyramid of budgets: wide at the bottom, narrow at the top.

    Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling" (arXiv 2406.02069). The published schedule, in our sizes: with ``heavy`` the mean
    number of selected tokens per layer, the last layer selects ``heavy / beta`` and the first
    ``2 * heavy - heavy / beta``, decreasing arithmetically in between (``beta`` = 20); every
    layer also keeps its ``observation`` window. The fractions are floored and the tokens left
    over go one each to the lowest layers, so the per-layer budgets
    (``heavy_i + observation + 1``) are non-increasing and sum to exactly ``budget x layers``;
    each layer's bound is its own budget. Without ``for_layer`` (a single layer) it is SnapKV at
    the mean budget. The authors also shrink the pyramid for prompts shorter than it; here a
    layer whose prompt fits its budget simply evicts nothing.

    Budget N (the mean per layer): as snapkv, ``heavy + observation = N - 1``.
    """

    name = "pyramidkv"
    params = ("heavy", "observation", "kernel", "pooling", "beta")

    def __init__(
        self,
        heavy: int = 2016,
        observation: int = OBSERVATION,
        kernel: int = KERNEL,
        pooling: str = POOLING,
        beta: int = 20,
    ):
        super().__init__(heavy, observation, kernel, pooling)
        check_sizes(self.name, {"beta": beta}, {})
        self.beta = beta

    def layer_heavy(self, n_layers: int) -> list[int]:
        """Selected tokens per layer (non-increasing, summing to ``heavy x n_layers``)."""
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"{self.name}: n_layers must be a positive integer, got {n_layers!r}")
        if n_layers == 1:
            return [self.heavy]
        low = Fraction(self.heavy, self.beta)
        high = 2 * self.heavy - low
        step = (high - low) / (n_layers - 1)
        sizes = [int(high - i * step) for i in range(n_layers)]  # floors: all values are >= 0
        for i in range(self.heavy * n_layers - sum(sizes)):
            sizes[i] += 1
        return sizes

    def layer_budgets(self, n_layers: int) -> list[int]:
        """Each layer's budget: the most tokens it holds in a decode step."""
        return [heavy + self.observation + 1 for heavy in self.layer_heavy(n_layers)]

    def for_layer(self, layer_idx: int, n_layers: int) -> SnapKVPolicy:
        heavy = self.layer_heavy(n_layers)[layer_idx]
        layer = SnapKVPolicy(heavy, self.observation, self.kernel, self.pooling)
        if self.budget is not None:  # each layer keeps to its own budget (the cache's guarantee)
            layer.budget = heavy + self.observation + 1
        return layer
