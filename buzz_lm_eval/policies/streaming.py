"""``streaming`` (StreamingLLM): attention sinks plus a recent window."""

from __future__ import annotations

import torch

from .base import Picked, Policy, Selection, check_sizes, span


class StreamingPolicy(Policy):
    """Keep the first ``sink`` and the last ``window`` tokens.

    Budget N: ``sink`` stays as given (default 4) and ``window = N - 1 - sink``.
    """

    name = "streaming"
    params = ("sink", "window")
    signal = "none"

    def __init__(self, sink: int = 4, window: int = 160):
        check_sizes(self.name, {"sink": sink, "window": window}, {"sink": 0})
        self.sink, self.window = sink, window

    @classmethod
    def from_budget(cls, budget: int, sink: int | None = None, window: int | None = None) -> StreamingPolicy:
        from .budget import split_budget

        sizes = split_budget(
            cls.name, budget, {"sink": sink, "window": window}, defaults={"sink": 4}, weights={"window": 1}
        )
        return cls(**sizes)

    def select(self, state, inp, current):
        if bool((inp.n <= self.sink + self.window).all()):
            return None
        rel = inp.rel
        keep = (rel >= 0) & ((rel < self.sink) | (rel >= inp.n - self.window))
        return Selection(keep=keep)

    def pick(self, state, length, current, device):
        if length <= self.sink + self.window:
            return None
        return Picked(torch.cat([span(0, self.sink, device), span(length - self.window, length, device)], dim=-1))

    def drop_size(self):
        return self.sink + self.window

    def drop_index(self, state, length, current, device):
        return torch.full((1, 1, 1), self.sink, device=device)  # the oldest token after the sinks
