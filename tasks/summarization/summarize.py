"""Documents and ROUGE scoring for the buzz_cnndm / buzz_xsum summarisation tasks.

Both datasets are brought to the same two fields, ``document`` and ``summary``, so one prompt
template serves both.
"""

from __future__ import annotations

from functools import lru_cache

import datasets
from rouge_score import rouge_scorer

from buzz_lm_eval.harness.datasets import drop_invalid, missing_text

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(record: dict) -> str | None:
    return missing_text(record, "document", "summary")


def xsum_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """XSum records (id, document, summary) without unusable ones."""
    return drop_invalid(dataset, _check, "xsum")


def cnndm_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """CNN/DailyMail records with article/highlights renamed document/summary, without unusable ones."""
    dataset = dataset.rename_columns({"article": "document", "highlights": "summary"})
    return drop_invalid(dataset, _check, "cnn_dailymail")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of ``prediction`` against ``reference`` (rouge-score, Porter stemming)."""
    scores = _scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Per-sample ROUGE F1 of the generated summary; lm-eval averages them and reports the stderr."""
    return rouge_f1(results[0].strip(), doc["summary"])
