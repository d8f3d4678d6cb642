"""``h2o`` (Heavy-Hitter Oracle): the tokens with most accumulated attention plus a recent window."""

from __future__ import annotations

import torch

from .base import Picked, Policy, Selection, check_sizes, span
from .budget import split_budget
from .ranked import lowest, top_indices


class H2OPolicy(Policy):
    """Keep the ``heavy`` highest-scoring older tokens and the last ``recent`` tokens.

    Scores are accumulated over every forward; ties go to the earliest token.
    Budget N: ``heavy + recent = N - 1``, split evenly as in the H2O paper
    (heavy gets the odd token).
    """

    name = "h2o"
    params = ("heavy", "recent")
    needs_scores = True
    accumulates = True

    def __init__(self, heavy: int = 400, recent: int = 160):
        check_sizes(self.name, {"heavy": heavy, "recent": recent}, {"heavy": 0})
        self.heavy, self.recent = heavy, recent

    @classmethod
    def from_budget(cls, budget: int, heavy: int | None = None, recent: int | None = None) -> H2OPolicy:
        given = {"heavy": heavy, "recent": recent}
        return cls(**split_budget(cls.name, budget, given, defaults={}, weights={"recent": 1, "heavy": 1}))

    def select(self, state, inp, current):
        active = inp.n > self.heavy + self.recent
        if not bool(active.any()):
            return None
        rel, boundary = inp.rel, inp.n - self.recent
        candidate = (rel >= 0) & (rel < boundary)
        ranked = torch.where(candidate, state.scores, float("-inf"))
        top = ranked.sort(dim=-1, descending=True, stable=True).indices[..., : min(self.heavy, inp.length)]
        heavy = torch.zeros_like(candidate.expand_as(ranked)).scatter(-1, top, True) & candidate
        keep = heavy | (rel >= boundary)
        return Selection(keep=torch.where(active, keep, rel >= 0))

    def pick(self, state, length, current, device):
        if length <= self.heavy + self.recent:
            return None
        top = top_indices(state.scores[..., : length - self.recent], self.heavy)
        recent = span(length - self.recent, length, device).expand(*top.shape[:2], -1)
        return Picked(torch.cat([top, recent], dim=-1))

    def drop_size(self):
        return self.heavy + self.recent

    def drop_index(self, state, length, current, device):
        return lowest(state.scores[..., : length - self.recent])
