"""Keeping the best-ranked tokens: the selection shared by snapkv, pyramidkv, tova, knorm and random.

``top_mask`` (rows with their own padding) and ``top_indices`` (rows of one geometry) state the
same rule: per row and head, the ``count`` highest scores, ties going to the earliest token.
``RankedPolicy`` is the base of the one-size policies (tova, knorm, random): once a row holds
more than ``capacity`` tokens it keeps the ``capacity`` best-ranked ones.
"""

from __future__ import annotations

import torch

from .base import Picked, Policy, Selection, StepInput, all_but, check_sizes, span
from .budget import split_budget


def top_mask(scores: torch.Tensor, candidate: torch.Tensor, count: int) -> torch.Tensor:
    """[B, H, L] bool: the ``count`` candidates with the highest score per row/head (ties: earliest)."""
    ranked = torch.where(candidate, scores, float("-inf"))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices[..., : min(count, ranked.shape[-1])]
    return torch.zeros_like(ranked, dtype=torch.bool).scatter(-1, order, True) & candidate


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[.., count] ascending indices of the ``count`` highest scores per row/head (ties: earliest)."""
    length = scores.shape[-1]
    if count == length - 1:  # a decode step drops one
        return all_but(length, lowest(scores))
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :count].sort(dim=-1).values


def lowest(scores: torch.Tensor) -> torch.Tensor:
    """[.., 1] the index of the lowest score per row/head, the latest of equal ones: the one index
    ``top_indices`` leaves out when it keeps all but one."""
    return scores.shape[-1] - 1 - scores.flip(-1).argmin(dim=-1, keepdim=True)


class RankedPolicy(Policy):
    """Keep the ``capacity`` best-ranked tokens once there are more; subclasses define ``ranking``.

    Budget N: ``capacity = N - 1``, so a decode step holds at most ``capacity + 1 = N`` tokens.
    """

    params = ("capacity",)

    def __init__(self, capacity: int = 160):
        check_sizes(self.name, {"capacity": capacity}, {})
        self.capacity = capacity

    @classmethod
    def from_budget(cls, budget: int, capacity: int | None = None, **options) -> RankedPolicy:
        sizes = split_budget(cls.name, budget, {"capacity": capacity}, defaults={}, weights={"capacity": 1})
        return cls(**sizes, **{k: v for k, v in options.items() if v is not None})

    def ranking(self, state, current: torch.Tensor | None, rel: torch.Tensor) -> torch.Tensor:
        """[B|1, 1|H, L] scores, higher = kept; ``rel`` [B|1, 1, L] is each slot's index in its row."""
        raise NotImplementedError

    def select(self, state, inp: StepInput, current):
        if bool((inp.n <= self.capacity).all()):
            return None
        return Selection(keep=top_mask(self.ranking(state, current, inp.rel), inp.rel >= 0, self.capacity))

    def pick(self, state, length, current, device):
        if length <= self.capacity:
            return None
        return Picked(top_indices(self.ranking(state, current, span(0, length, device)), self.capacity))

    def drop_size(self):
        return self.capacity

    def drop_index(self, state, length, current, device):
        return lowest(self.ranking(state, current, span(0, length, device)))
