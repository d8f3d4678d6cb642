"""Documents for buzz_wikitext; target and scoring are lm-eval's own wikitext functions (comparable numbers)."""

from __future__ import annotations

import datasets

from buzz_lm_eval.harness.datasets import drop_invalid, missing_text


def docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """WikiText articles without empty pages (an empty page has no tokens to score)."""
    return drop_invalid(dataset, lambda record: missing_text(record, "page"), "wikitext")
