"""Loaders for the evaluation data shipped in ``buzz_lm_eval/data``, and the record checks the tasks share.

The ``*_smoke`` tasks name the loaders in ``custom_dataset: !function buzz_lm_eval.harness.datasets.<loader>``.
lm-eval calls them as ``fn(**(metadata | dataset_kwargs))``, and every ``model_args`` key is merged
into ``metadata``, so each loader ignores keywords it does not know.

Bad records (a missing field, an empty text, a question without answers) are never fatal in the
middle of a run: each task's ``process_docs`` passes its check to :func:`drop_invalid`, which skips
them and logs one warning saying how many were skipped and why. A dataset with no usable record at
all, a malformed JSON line or a missing shipped file is a clear error when the task is built.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from buzz_lm_eval.harness.paths import DATA_DIR

logger = logging.getLogger(__name__)

NQ10_GOLD_POSITIONS = (0, 4, 9)

#: A record check: returns why the record is unusable, or None when it is fine.
RecordCheck = Callable[[dict[str, Any]], "str | None"]

_already_warned: set[str] = set()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file; blank lines are skipped, any other non-object line is an error."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def load_jsonl(path: Path, split: str) -> datasets.DatasetDict:
    """A JSON Lines file as a one-split DatasetDict; a field missing from some records is None there."""
    records = read_jsonl(path)
    fields = list(dict.fromkeys(key for record in records for key in record))
    rows = [{field: record.get(field) for field in fields} for record in records]
    try:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{path}: the records do not share one type per field ({err})") from err


def _shipped(name: str, split: str) -> datasets.DatasetDict:
    return load_jsonl(DATA_DIR / name, split)


def cnndm_validation(**_: Any) -> datasets.DatasetDict:
    """Shipped CNN/DailyMail 3.0.0 subset: 15 records of the *validation* split (id, article, highlights)."""
    return _shipped("cnndm_validation.jsonl", "validation")


def xsum_test(**_: Any) -> datasets.DatasetDict:
    """Shipped XSum subset, smoke size: the first 50 test records (id, document, summary)."""
    return datasets.DatasetDict({"test": xsum_test_200()["test"].select(range(50))})


def xsum_test_200(**_: Any) -> datasets.DatasetDict:
    """Shipped XSum subset: the first 200 test records (id, document, summary)."""
    return _shipped("xsum_test_200.jsonl", "test")


def wikitext2_test(**_: Any) -> datasets.DatasetDict:
    """Shipped WikiText-2 raw test split: all 62 articles, one per record (page)."""
    return _shipped("wikitext2_test.jsonl", "test")


def nq10(gold_position: int, **_: Any) -> datasets.DatasetDict:
    """Shipped 10-document NQ-Open QA (built from the Lost-in-the-Middle oracle file), gold at that position."""
    if gold_position not in NQ10_GOLD_POSITIONS:
        raise ValueError(f"gold_position must be one of {NQ10_GOLD_POSITIONS}, got {gold_position!r}")
    return _shipped(f"nq10_gold_at_{gold_position}.jsonl", "test")


def missing_text(record: dict[str, Any], *fields: str) -> str | None:
    """Why the record is unusable if one of ``fields`` is absent, not a string or blank; else None."""
    for field in fields:
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"missing or empty '{field}'"
    return None


def drop_invalid(dataset: datasets.Dataset, check: RecordCheck, what: str) -> datasets.Dataset:
    """``dataset`` without the records ``check`` rejects, with one warning giving the count per reason.

    Raises ValueError when no record is left (e.g. a field is missing from the whole dataset).
    """
    reasons: Counter[str] = Counter()
    keep = []
    for index, record in enumerate(dataset):
        reason = check(record)
        if reason is None:
            keep.append(index)
        else:
            reasons[reason] += 1
    if not reasons:
        return dataset
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    if not keep:
        raise ValueError(f"{what}: none of the {len(dataset)} records is usable ({summary})")
    _warn_once(f"{what}: skipped {sum(reasons.values())} of {len(dataset)} records ({summary})")
    return dataset.select(keep)


def _warn_once(message: str) -> None:
    # lm-eval calls process_docs several times per task; say it once.
    if message not in _already_warned:
        _already_warned.add(message)
        logger.warning(message)
