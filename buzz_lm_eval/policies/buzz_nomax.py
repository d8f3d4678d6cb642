"""``buzz_nomax``: BUZZ keeping the first token of every segment (no scores at all)."""

from __future__ import annotations

from .base import span
from .buzz import BuzzPolicy


class BuzzNoMaxPolicy(BuzzPolicy):
    """As ``buzz``, but each fresh segment keeps its first token, so no attention is needed."""

    name = "buzz_nomax"
    needs_scores = False
    signal = "none"
    accumulates = False

    def pick_fresh(self, fresh, offset, scores, inp):
        return fresh & (offset % self.stride == 0)

    def segment_winners(self, scores, start, stop, device):
        return span(start, stop, device, self.stride)
