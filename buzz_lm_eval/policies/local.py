"""``local``: a sliding window over the most recent tokens."""

from __future__ import annotations

import torch

from .base import Picked, Policy, Selection, check_sizes, span


class LocalPolicy(Policy):
    """Keep the last ``window`` tokens once there are more.

    Budget N: ``window = N - 1``, so a decode step holds at most ``window + 1 = N`` tokens.
    """

    name = "local"
    params = ("window",)
    signal = "none"

    def __init__(self, window: int = 160):
        check_sizes(self.name, {"window": window}, {})
        self.window = window

    @classmethod
    def from_budget(cls, budget: int, window: int | None = None) -> LocalPolicy:
        if window is not None and window != budget - 1:
            raise ValueError(
                f"local: window={window} disagrees with budget={budget} (window = budget - 1 = {budget - 1})"
            )
        return cls(window=budget - 1)

    def select(self, state, inp, current):
        if bool((inp.n <= self.window).all()):
            return None
        return Selection(keep=inp.rel >= (inp.n - self.window).clamp_min(0))

    def pick(self, state, length, current, device):
        return None if length <= self.window else Picked(span(length - self.window, length, device))

    def drop_size(self):
        return self.window

    def drop_index(self, state, length, current, device):
        return torch.zeros((1, 1, 1), dtype=torch.long, device=device)  # the oldest token
