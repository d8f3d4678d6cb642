"""``full``: the reference that keeps every token."""

from __future__ import annotations

from .base import Policy


class FullPolicy(Policy):
    """Never evicts. Has no budget: it is the full-cache reference line."""

    name = "full"
    evicts = False
    signal = "none"

    def select(self, state, inp, current):
        return None

    def pick(self, state, length, current, device):
        return None
