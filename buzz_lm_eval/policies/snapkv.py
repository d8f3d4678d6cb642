"""``snapkv``: the tokens the last queries (the observation window) vote for, clustered by pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Picked, Policy, Selection, StepInput, check_sizes, span
from .budget import split_budget
from .ranked import lowest, top_indices, top_mask

OBSERVATION, KERNEL, POOLING = 32, 7, "avg"
POOLINGS = ("avg", "max")


class SnapKVPolicy(Policy):
    """Keep the last ``observation`` tokens and, among the older ones, the ``heavy`` best by score.

    Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"
    (arXiv 2404.14469). Once a layer holds more than ``heavy + observation`` tokens: the attention
    of the last ``observation`` queries of the forward (``query_window``) is summed over those
    queries and over the query heads of each KV head; the older tokens' sums are pooled over
    ``kernel`` neighbours (``pooling`` "avg" or "max", stride 1, zero padding, the window's own
    scores left out, as the authors' code does); per KV head the ``heavy`` highest pooled tokens
    (ties: the earliest) are kept with the window. Published regime: once, after the prompt; under
    ``evict=every_forward`` a decode step's one query is its observation.

    Budget N: ``heavy + observation = N - 1``; ``observation`` is 32 unless given, or
    ``(N - 1) // 2`` for budgets too small for it.
    """

    name = "snapkv"
    params = ("heavy", "observation", "kernel", "pooling")
    needs_scores = True
    default_evict = "after_prefill"

    def __init__(self, heavy: int = 2016, observation: int = OBSERVATION, kernel: int = KERNEL, pooling: str = POOLING):
        check_sizes(self.name, {"heavy": heavy, "observation": observation, "kernel": kernel}, {"heavy": 0})
        if kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be odd (a centred pooling window), got {kernel}")
        if pooling not in POOLINGS:
            raise ValueError(f"{self.name}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.heavy, self.observation, self.kernel, self.pooling = heavy, observation, kernel, pooling
        self.query_window = observation

    @classmethod
    def from_budget(cls, budget: int, heavy=None, observation=None, kernel=None, pooling=None, **options):
        default = max(1, min(OBSERVATION, (budget - 1) // 2)) if isinstance(budget, int) else OBSERVATION
        given = {"heavy": heavy, "observation": observation}
        sizes = split_budget(cls.name, budget, given, defaults={"observation": default}, weights={"heavy": 1})
        extra = {"kernel": kernel, "pooling": pooling, **options}
        return cls(**sizes, **{k: v for k, v in extra.items() if v is not None})

    def pooled(self, current: torch.Tensor, older: torch.Tensor) -> torch.Tensor:
        """[B, H, L] scores of the ``older`` tokens pooled over ``kernel`` neighbours (others count 0)."""
        return self._pool(torch.where(older, current, 0.0))

    def _pool(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` [B, H, n] pooled over ``kernel`` centred neighbours (stride 1, padded to n)."""
        if self.pooling == "avg":
            return window_mean(scores, self.kernel)
        return F.max_pool1d(scores, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)

    def select(self, state, inp: StepInput, current):
        if bool((inp.n <= self.heavy + self.observation).all()):
            return None
        boundary = inp.n - self.observation
        real = inp.rel >= 0
        older = real & (inp.rel < boundary)
        keep = top_mask(self.pooled(current, older), older, self.heavy) | (real & (inp.rel >= boundary))
        return Selection(keep=keep)

    def pick(self, state, length, current, device):
        if length <= self.heavy + self.observation:
            return None
        boundary = length - self.observation
        top = top_indices(self.older_pooled(current, length), self.heavy)
        return Picked(torch.cat([top, span(boundary, length, device).expand(*top.shape[:2], -1)], dim=-1))

    def older_pooled(self, current: torch.Tensor, length: int) -> torch.Tensor:
        """[B, H, L - observation] ``pooled`` of the tokens before the observation window, for rows
        without padding: the pool's padding stands in for the window's scores left out (an average
        counts it as 0; scores are >= 0, so a left-out 0 never wins a max either)."""
        return self._pool(current[..., : length - self.observation])

    def drop_size(self):
        return self.heavy + self.observation

    def drop_index(self, state, length, current, device):
        return lowest(self.older_pooled(current, length))


def window_mean(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """``F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)`` (odd ``kernel``), bit for bit.

    torch's pooling kernel adds each window's terms left to right in the input's float type and
    divides the sum by ``kernel`` (padding counts as 0); so do ``kernel`` shifted adds, in about
    half the time on CPU for a decode step's few rows (``tests/policies/test_policies_prefill.py`` checks
    the equality). Other dtypes (a wider accumulator) go to the library.
    """
    if scores.dtype not in (torch.float32, torch.float64):
        return F.avg_pool1d(scores, kernel_size=kernel, stride=1, padding=kernel // 2)
    length, half = scores.shape[-1], kernel // 2
    padded = F.pad(scores, (half, half))
    total = padded[..., :length].clone()
    for shift in range(1, kernel):
        total += padded[..., shift : shift + length]
    return total.div_(kernel)
