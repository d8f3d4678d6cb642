"""``tova`` (Token Omission Via Attention): drop the tokens the current query attends to least."""

from __future__ import annotations

from .ranked import RankedPolicy


class TOVAPolicy(RankedPolicy):
    """Whenever a layer holds more than ``capacity`` tokens, keep the ``capacity`` tokens with the
    highest attention from the current (last) query, averaged over all heads; so one kept set per
    layer, shared by its heads, as in the paper. Ties go to the earliest token.

    Oren et al. 2024, "Transformers are Multi-State RNNs" (arXiv 2401.06104). Only the last query
    of a forward counts (``query_window = 1``); after a one-token decode step that drops exactly
    the lowest-scoring token. Budget N: ``capacity = N - 1``.
    """

    name = "tova"
    needs_scores = True
    query_window = 1

    def ranking(self, state, current, rel):
        return current.sum(dim=1, keepdim=True)  # the mean over heads ranks as the sum does
