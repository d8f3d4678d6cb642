"""``buzz-lm-eval longbench-export``: lm-eval LongBench samples to LongBench's own layout and scores.

Reads the ``samples_longbench_<dataset>[_e]_<date>.jsonl`` files that ``lm_eval --log_samples``
writes, writes ``DIR/pred[_e]/<model>/<dataset>.jsonl`` as LongBench's ``pred.py`` does, then
scores every prediction file in those folders as LongBench's ``eval.py`` does, into
``result.json``. The per-answer metrics are the ones lm-eval ships (``pip install
'buzz-lm-eval[longbench]'`` for their jieba, fuzzywuzzy and rouge).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval.utils import sanitize_model_name

from buzz_lm_eval.harness.files import write_atomic

# LongBench eval.py's dataset2metric, by name in lm_eval.tasks.longbench.metrics.
METRIC_NAMES = {
    **dict.fromkeys(
        ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"],
        "qa_f1_score",
    ),
    "multifieldqa_zh": "qa_f1_zh_score",
    **dict.fromkeys(["dureader", "vcsum"], "rouge_zh_score"),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], "rouge_score"),
    **dict.fromkeys(["trec", "lsht"], "classification_score"),
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "passage_count": "count_score",
    **dict.fromkeys(["lcc", "repobench-p"], "code_sim_score"),
}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}
BUCKETS = (("0-4k", -math.inf, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, math.inf))
SAMPLES_NAME = re.compile(r"^samples_longbench_(?P<task>.+)_(?P<date>[^_]+)\.jsonl$")

Metric = Callable[..., float]


class ExportError(Exception):
    """A file that cannot be exported or scored; the message names it."""


@dataclass(frozen=True)
class Source:
    """One lm-eval samples file of a LongBench (or LongBench-E, ``extended``) dataset."""

    path: Path
    dataset: str
    extended: bool
    date: str


def warn(message: object) -> None:
    """Report a problem on stderr and carry on."""
    print(f"buzz-lm-eval longbench-export: {message}", file=sys.stderr)


def parse_source(path: Path) -> Source:
    """Dataset and variant from lm-eval's ``samples_<task>_<date>.jsonl`` file name."""
    match = SAMPLES_NAME.match(path.name)
    if not match:
        raise ExportError(f"{path}: not a LongBench samples file (samples_longbench_<dataset>_<date>.jsonl)")
    task = match["task"]
    extended = task.endswith("_e") and task[:-2] in METRIC_NAMES
    dataset = task[:-2] if extended else task
    if dataset not in METRIC_NAMES:
        raise ExportError(f"{path}: unknown LongBench dataset 'longbench_{task}'")
    return Source(path, dataset, extended, match["date"])


def newest(sources: list[Source]) -> list[Source]:
    """One source per (variant, dataset): the newest run's; older ones are reported and dropped."""
    chosen: dict[tuple[bool, str], Source] = {}
    for src in sorted(sources, key=lambda s: (s.date, str(s.path))):
        key = (src.extended, src.dataset)
        if key in chosen:
            warn(f"{chosen[key].path}: skipped, superseded by the newer {src.path}")
        chosen[key] = src
    return list(chosen.values())


def field(obj: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``obj[key]`` if it is a ``kind``, else a ValueError naming the field."""
    if key not in obj or not isinstance(obj[key], kind):
        raise ValueError(f"missing or malformed field '{where}{key}'")
    return obj[key]


def first_text(resps: Any) -> str:
    """The first generation in lm-eval's ``filtered_resps``/``resps`` (nested lists of strings)."""
    while isinstance(resps, list) and resps:
        resps = resps[0]
    if not isinstance(resps, str):
        raise ValueError("no generated text in 'filtered_resps'/'resps'")
    return resps


def to_record(sample: dict) -> tuple[int, dict]:
    """``(doc_id, LongBench pred.py record)`` of one lm-eval sample."""
    doc_id = field(sample, "doc_id", int)
    doc = field(sample, "doc", dict)
    resps = sample["filtered_resps"] if "filtered_resps" in sample else sample.get("resps")
    return doc_id, {
        "pred": first_text(resps),
        "answers": field(doc, "answers", list, "doc."),
        "all_classes": field(doc, "all_classes", (list, type(None)), "doc."),
        "length": field(doc, "length", int, "doc."),
    }


def read_records(path: Path) -> list[dict]:
    """LongBench records of one samples file in doc_id order, for the first filter it logs."""
    by_filter: dict[Any, dict[int, dict]] = {}
    lineno = 0
    try:
        with open(path, encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, 1):  # noqa: B007 (the error message below names it)
                if line.strip():
                    sample = json.loads(line)
                    if not isinstance(sample, dict):
                        raise ValueError("line is not a JSON object")
                    doc_id, record = to_record(sample)
                    by_filter.setdefault(sample.get("filter"), {})[doc_id] = record
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ExportError(f"{path}, line {lineno}: {exc}") from exc
    if not by_filter:
        raise ExportError(f"{path}: no samples")
    records = next(iter(by_filter.values()))
    return [records[key] for key in sorted(records)]


def export(src: Source, output: Path, model: str) -> Path:
    """Write ``src`` as ``output/pred[_e]/<model>/<dataset>.jsonl``; return that folder."""
    records = read_records(src.path)
    folder = output / ("pred_e" if src.extended else "pred") / model
    target = folder / f"{src.dataset}.jsonl"
    write_atomic(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{src.path} -> {target} ({len(records)} samples)")
    return folder


def load_metrics() -> dict[str, Metric]:
    """LongBench's metric for each dataset, from lm-eval's copy of LongBench's metrics."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
        from lm_eval.tasks.longbench import metrics
    return {dataset: getattr(metrics, name) for dataset, name in METRIC_NAMES.items()}


def sample_score(metric: Metric, dataset: str, record: dict) -> float:
    """Best score of the prediction over the answers, as LongBench's eval.py computes it."""
    pred = record["pred"]
    if dataset in FIRST_LINE_ONLY:
        pred = pred.lstrip("\n").split("\n")[0]
    kwargs = {"all_classes": record["all_classes"]}
    return max([0.0, *(metric(pred, answer, **kwargs) for answer in record["answers"])])


def percent(scores: list[float]) -> float | None:
    """100 * mean, rounded to 2 places; None when there is nothing to average."""
    return round(100 * sum(scores) / len(scores), 2) if scores else None


def score_file(path: Path, metric: Metric, extended: bool) -> float | dict | None:
    """LongBench score of one prediction file; by length bucket for LongBench-E."""
    with open(path, encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    scored = [(r["length"], sample_score(metric, path.stem, r)) for r in records]
    if not extended:
        return percent([score for _, score in scored])
    return {name: percent([s for n, s in scored if lo <= n < hi]) for name, lo, hi in BUCKETS}


def score_folder(folder: Path, metrics: dict[str, Metric], extended: bool) -> dict:
    """Score every ``<dataset>.jsonl`` in ``folder`` and write its ``result.json``."""
    results: dict[str, Any] = {}
    for path in sorted(folder.glob("*.jsonl")):
        if path.stem not in metrics:
            warn(f"{path}: skipped, not a LongBench dataset name")
            continue
        try:
            results[path.stem] = score_file(path, metrics[path.stem], extended)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"{path}: cannot score ({exc!r})")
    write_atomic(folder / "result.json", json.dumps(results, ensure_ascii=False, indent=4) + "\n")
    return results


def print_table(folder: Path, results: dict, extended: bool) -> None:
    """Print ``results`` as a small aligned table."""
    header = [name for name, _, _ in BUCKETS] if extended else ["score"]
    print(f"\n{folder / 'result.json'}")
    print(f"{'dataset':<22}" + "".join(f"{h:>9}" for h in header))
    for dataset, value in results.items():
        cells = value.values() if isinstance(value, dict) else [value]
        print(f"{dataset:<22}" + "".join("        -" if v is None else f"{v:>9.2f}" for v in cells))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="buzz-lm-eval longbench-export",
        description="Export lm-eval longbench_* samples to LongBench's pred/ layout and score them.",
    )
    parser.add_argument("samples", nargs="+", help="samples_longbench_*.jsonl files (lm_eval --log_samples)")
    parser.add_argument("--model", required=True, help="model name for pred/<model>/")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Export, score and print; 1 if any file was skipped or scoring was impossible."""
    args = parse_args(argv)
    model = sanitize_model_name(args.model)
    ok = True
    sources = []
    for name in dict.fromkeys(args.samples):
        try:
            sources.append(parse_source(Path(name)))
        except ExportError as exc:
            warn(exc)
            ok = False
    folders: set[Path] = set()
    for src in newest(sources):
        try:
            folders.add(export(src, args.output, model))
        except ExportError as exc:
            warn(exc)
            ok = False
    if not folders:
        warn("nothing exported")
        return 1
    try:
        metrics = load_metrics()
    except ImportError as exc:
        warn(f"predictions written but not scored ({exc}); pip install 'buzz-lm-eval[longbench]'")
        return 1
    for folder in sorted(folders):
        extended = folder.parent.name == "pred_e"
        print_table(folder, score_folder(folder, metrics, extended), extended)
    return 0 if ok else 1
