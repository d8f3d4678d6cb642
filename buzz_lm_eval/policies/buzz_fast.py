"""``buzz_fast``: BUZZ picking segment survivors by the current forward's attention only."""

from __future__ import annotations

from .buzz import BuzzPolicy


class BuzzFastPolicy(BuzzPolicy):
    """As ``buzz``, but no score is accumulated: each eviction looks at this forward's attention."""

    name = "buzz_fast"
    accumulates = False

    def segment_scores(self, state, current):
        return current
