"""Multi-document QA as in "Lost in the Middle" (Liu et al., 2023): documents, prompt and best_subspan_em.

Each example shows 10 Wikipedia passages, exactly one of which (the NQ gold passage) answers the
question. ``docs_gold_at_<p>`` arranges any record that has one gold passage and at least 9
distractors the way the authors' ``make_qa_data_from_retrieval_results.py`` does: the first 9
distractors in the order given (retrieval order), with the gold passage inserted at index p. On the
published 30-document files this yields the published 10-document files; on the shipped 10-document
files it changes nothing.
"""

from __future__ import annotations

import re
import string

import datasets

from buzz_lm_eval.harness.datasets import drop_invalid, missing_text

NUM_DOCUMENTS = 10
INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and English articles, collapse whitespace."""
    text = text.lower().translate(_NO_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def best_subspan_em(prediction: str, answers: list[str]) -> float:
    """1.0 if some normalised answer occurs inside the normalised prediction, else 0.0.

    Answers that normalise to nothing (e.g. "The") are ignored: they would match any prediction.
    """
    prediction = normalize_answer(prediction)
    golds = (normalize_answer(answer) for answer in answers)
    return float(any(gold and gold in prediction for gold in golds))


def _is_gold(ctx: dict | None) -> bool:
    return bool(ctx and ctx.get("isgold"))


def _check(record: dict) -> str | None:
    reason = missing_text(record, "question")
    if reason:
        return reason
    if not any(isinstance(a, str) and normalize_answer(a) for a in record.get("answers") or []):
        return "no answers"
    ctxs = record.get("ctxs") or []
    if any(not ctx or not isinstance(ctx.get("title"), str) or missing_text(ctx, "text") for ctx in ctxs):
        return "a document without title or text"
    if sum(map(_is_gold, ctxs)) != 1:
        return "not exactly one gold document"
    if len(ctxs) < NUM_DOCUMENTS:
        return f"fewer than {NUM_DOCUMENTS} documents"
    return None


def arrange(ctxs: list[dict], gold_position: int) -> list[dict]:
    """The first NUM_DOCUMENTS - 1 distractors, in their order, with the gold document at ``gold_position``."""
    chosen = [ctx for ctx in ctxs if not _is_gold(ctx)][: NUM_DOCUMENTS - 1]
    chosen.insert(gold_position, next(ctx for ctx in ctxs if _is_gold(ctx)))
    return chosen


def _docs_with_gold_at(dataset: datasets.Dataset, gold_position: int) -> datasets.Dataset:
    dataset = drop_invalid(dataset, _check, f"10qa gold at {gold_position}")
    return dataset.map(lambda record: {"ctxs": arrange(record["ctxs"], gold_position), "gold_position": gold_position})


def docs_gold_at_0(dataset: datasets.Dataset) -> datasets.Dataset:
    """10-document examples, gold passage first."""
    return _docs_with_gold_at(dataset, 0)


def docs_gold_at_4(dataset: datasets.Dataset) -> datasets.Dataset:
    """10-document examples, gold passage fifth (the middle)."""
    return _docs_with_gold_at(dataset, 4)


def docs_gold_at_9(dataset: datasets.Dataset) -> datasets.Dataset:
    """10-document examples, gold passage last."""
    return _docs_with_gold_at(dataset, 9)


def doc_to_text(doc: dict) -> str:
    """The paper's QA prompt: instruction, 'Document [i](Title: ...) text' lines, question."""
    documents = "\n".join(
        f"Document [{number}](Title: {ctx['title']}) {ctx['text']}" for number, ctx in enumerate(doc["ctxs"], start=1)
    )
    return f"{INSTRUCTION}\n\n{documents}\n\nQuestion: {doc['question']}\nAnswer:"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """best_subspan_em of the answer's first line (the paper's rule: no credit for copying the context)."""
    first_line = results[0].split("\n")[0].strip()
    return {"best_subspan_em": best_subspan_em(first_line, doc["answers"])}
