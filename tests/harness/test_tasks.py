"""The lm-eval task definitions in tasks/: smoke tasks load offline, metrics score as documented,
bad records are skipped with a warning, and an end-to-end run on the shipped tiny model reports
every metric."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from pathlib import Path

import datasets
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from buzz_lm_eval.harness import datasets as shipped  # noqa: E402
from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR, tasks_dir  # noqa: E402

TASKS = tasks_dir()
SUMMARY_SUFFIX = "\n\nSUMMARIZE the previous text to 50 words!"
SMOKE_SIZES = {
    "buzz_cnndm_smoke": 15,
    "buzz_xsum_smoke": 50,
    "buzz_wikitext_smoke": 62,
    "buzz_10qa_smoke_gold0": 50,
    "buzz_10qa_smoke_gold4": 50,
    "buzz_10qa_smoke_gold9": 50,
}
METRICS = {
    "buzz_cnndm_smoke": ("rouge1", "rouge2", "rougeL"),
    "buzz_xsum_smoke": ("rouge1", "rouge2", "rougeL"),
    "buzz_wikitext_smoke": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "buzz_10qa_smoke_gold0": ("best_subspan_em",),
    "buzz_10qa_smoke_gold4": ("best_subspan_em",),
    "buzz_10qa_smoke_gold9": ("best_subspan_em",),
    "buzz_10qa_smoke": ("best_subspan_em",),
}
SOURCE_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "test_split"}


def _module(relative: str):
    path = TASKS / relative
    spec = importlib.util.spec_from_file_location(f"buzz_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _module("summarization/summarize.py")
litm = _module("lost_in_the_middle/litm.py")
wikitext = _module("wikitext/wikitext.py")


def _dataset(tmp_path: Path, records: list[dict]) -> datasets.Dataset:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return shipped.load_jsonl(path, "test")["test"]


@pytest.fixture(scope="module")
def smoke_tasks():
    # model args reach custom_dataset through metadata, as on the CLI
    metadata = {"pretrained": "x", "dtype": "float32"}
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    return manager.load(["buzz_smoke"])


# ---------------------------------------------------------------- (a) task definitions


def test_group_layout(smoke_tasks):
    assert set(smoke_tasks["tasks"]) == set(SMOKE_SIZES)
    assert set(smoke_tasks["group_map"]["buzz_smoke"]) == {
        "buzz_cnndm_smoke",
        "buzz_xsum_smoke",
        "buzz_wikitext_smoke",
        "buzz_10qa_smoke",
    }
    index = TaskManager(include_path=str(TASKS), include_defaults=False).all_tasks
    for name in ("buzz", "buzz_cnndm", "buzz_xsum", "buzz_wikitext", "buzz_10qa", "buzz_10qa_gold4"):
        assert name in index


@pytest.mark.parametrize("name", sorted(SMOKE_SIZES))
def test_smoke_docs_and_metrics(smoke_tasks, name):
    task = smoke_tasks["tasks"][name]
    assert len(task.eval_docs) == SMOKE_SIZES[name]
    assert {m["metric"] for m in task.config.metric_list} == set(METRICS[name])


@pytest.mark.parametrize("name", ["buzz_cnndm_smoke", "buzz_xsum_smoke"])
def test_summarization_prompt(smoke_tasks, name):
    task = smoke_tasks["tasks"][name]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == f"Text: {doc['document']}{SUMMARY_SUFFIX}"
    assert task.doc_to_target(doc) == doc["summary"] and doc["summary"].strip()
    gen = task.config.generation_kwargs
    assert task.config.output_type == "generate_until"
    assert gen["do_sample"] is False and gen["temperature"] == 0 and gen["max_gen_toks"] == 128


def test_cnndm_smoke_is_validation_split(smoke_tasks):
    task = smoke_tasks["tasks"]["buzz_cnndm_smoke"]
    assert task.config.test_split == "validation"
    assert task.eval_docs[0]["document"].startswith("Jarryd Hayne's move to the NFL")


def test_wikitext_target(smoke_tasks):
    task = smoke_tasks["tasks"]["buzz_wikitext_smoke"]
    doc = task.eval_docs[0]
    assert task.config.output_type == "loglikelihood_rolling"
    target = task.doc_to_target(doc)
    assert target.startswith(" = Robert Boulter =\n") and " @-@ " not in target


@pytest.mark.parametrize("position", [0, 4, 9])
def test_10qa_prompt(smoke_tasks, position):
    task = smoke_tasks["tasks"][f"buzz_10qa_smoke_gold{position}"]
    doc = task.eval_docs[0]
    prompt = task.doc_to_text(doc)
    head, documents, question = prompt.split("\n\n")
    assert head == litm.INSTRUCTION
    lines = documents.split("\n")
    assert len(lines) == 10
    assert all(line.startswith(f"Document [{i}](Title: ") for i, line in enumerate(lines, start=1))
    gold = doc["ctxs"][position]
    assert gold["isgold"]
    assert lines[position] == f"Document [{position + 1}](Title: {gold['title']}) {gold['text']}"
    assert question == f"Question: {doc['question']}\nAnswer:"
    assert task.doc_to_target(doc) == doc["answers"]
    assert task.config.generation_kwargs["until"] == ["\n"]


def test_smoke_variants_differ_only_in_data_source():
    pairs = [
        ("summarization/buzz_cnndm.yaml", "summarization/buzz_cnndm_smoke.yaml"),
        ("summarization/buzz_xsum.yaml", "summarization/buzz_xsum_smoke.yaml"),
        ("wikitext/buzz_wikitext.yaml", "wikitext/buzz_wikitext_smoke.yaml"),
    ] + [
        (f"lost_in_the_middle/buzz_10qa_gold{p}.yaml", f"lost_in_the_middle/buzz_10qa_smoke_gold{p}.yaml")
        for p in (0, 4, 9)
    ]
    for full, smoke in pairs:
        full_cfg, smoke_cfg = (load_yaml(TASKS / name, resolve_func=False) for name in (full, smoke))
        assert full_cfg["dataset_path"] and not smoke_cfg["dataset_path"] and smoke_cfg["custom_dataset"]
        strip = lambda cfg: {k: v for k, v in cfg.items() if k not in SOURCE_KEYS}  # noqa: E731
        assert strip(full_cfg) == strip(smoke_cfg), smoke


# ---------------------------------------------------------------- (b) metrics and bad input


def test_rouge_perfect_and_disjoint():
    text = "The cat sat on the mat near the door."
    assert summarize.rouge_f1(text, text) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert summarize.rouge_f1("dogs bark loudly", text) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # stemming: "sitting" and "sits" share the stem "sit"
    assert summarize.rouge_f1("cats sitting", "cat sits")["rouge1"] == 1.0
    scores = summarize.process_results({"summary": text}, ["  " + text + "\n"])
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_normalize_answer():
    assert litm.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert litm.normalize_answer("an apple a day") == "apple day"


@pytest.mark.parametrize(
    ("prediction", "answers", "score"),
    [
        ("It was Wilhelm Conrad Röntgen, in 1901.", ["Wilhelm Conrad Röntgen"], 1.0),
        ("wilhelm   conrad röntgen", ["Wilhelm Conrad Röntgen"], 1.0),
        ("The answer is the Beatles", ["Beatles", "The Rolling Stones"], 1.0),
        ("Conrad", ["Wilhelm Conrad Röntgen"], 0.0),
        ("anything at all", ["The", "!"], 0.0),
        ("", ["Paris"], 0.0),
    ],
)
def test_best_subspan_em(prediction, answers, score):
    assert litm.best_subspan_em(prediction, answers) == score


def test_10qa_scores_first_line_only():
    doc = {"answers": ["Paris"]}
    assert litm.process_results(doc, [" Paris is the capital.\nMore"]) == {"best_subspan_em": 1.0}
    assert litm.process_results(doc, ["I do not know.\nParis"]) == {"best_subspan_em": 0.0}


def test_10qa_arrangement_from_30_documents():
    """A 30-document record reduces to the shipped 10-document records for every gold position."""
    records = {p: shipped.nq10(p)["test"] for p in (0, 4, 9)}
    for i in range(3):
        base = records[0][i]
        extra = [dict(c, title=f"extra {k}", isgold=False) for k, c in enumerate(base["ctxs"][1:] * 3)][:20]
        thirty = base["ctxs"] + extra  # gold first, then 29 distractors in order
        for position, rows in records.items():
            assert litm.arrange(thirty, position) == rows[i]["ctxs"]


def test_10qa_hub_file_layout(tmp_path):
    """A file shaped like the authors' 30-document release loads with the hub data_files and reduces to 10."""
    cfg = load_yaml(TASKS / "lost_in_the_middle/buzz_10qa_gold4.yaml", resolve_func=False)
    (name,) = cfg["dataset_kwargs"]["data_files"].values()
    gold = {"title": "Gold", "text": "The answer is Paris.", "hasanswer": True, "isgold": True}
    distractors = [
        {
            "id": str(i),
            "title": f"T{i}",
            "text": f"text {i}",
            "score": "1.5",
            "hasanswer": False,
            "original_retrieval_index": i,
            "isgold": False,
        }
        for i in range(29)
    ]
    annotated = {"title": "Gold", "long_answer": "x", "chunked_long_answer": "x", "short_answers": ["Paris"]}
    record = {
        "question": "capital of france",
        "answers": ["Paris"],
        "ctxs": [gold, *distractors],
        "nq_annotated_gold": annotated,
    }
    with gzip.open(tmp_path / name, "wt", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    loaded = datasets.load_dataset(str(tmp_path), data_files={"test": name}, cache_dir=str(tmp_path / "cache"))
    (doc,) = litm.docs_gold_at_4(loaded["test"])
    assert [ctx["title"] for ctx in doc["ctxs"]] == ["T0", "T1", "T2", "T3", "Gold", *(f"T{i}" for i in range(4, 9))]


def test_bad_records_are_skipped_with_a_warning(tmp_path, caplog):
    ctxs = [{"title": "t", "text": f"x{i}", "isgold": i == 3} for i in range(10)]
    good = {"question": "q", "answers": ["Paris"], "ctxs": ctxs}
    qa = _dataset(tmp_path, [good, {**good, "answers": []}, {**good, "question": ""}, {"answers": ["Paris"]}])
    summaries = _dataset(
        tmp_path, [{"article": "a", "highlights": "h"}, {"article": "   ", "highlights": "h"}, {"article": "a"}]
    )
    pages = _dataset(tmp_path, [{"page": "text"}, {"page": ""}])
    with caplog.at_level(logging.WARNING, logger="buzz_lm_eval.harness.datasets"):
        kept_qa = litm.docs_gold_at_9(qa)
        kept_sum = summarize.cnndm_docs(summaries)
        kept_pages = wikitext.docs(pages)
    assert len(kept_qa) == len(kept_sum) == len(kept_pages) == 1
    assert kept_qa[0]["ctxs"][9]["isgold"] and kept_qa[0]["gold_position"] == 9
    messages = "\n".join(caplog.messages)
    assert "skipped 3 of 4 records" in messages and "1 no answers" in messages
    assert "2 missing or empty 'question'" in messages
    assert "skipped 2 of 3 records (1 missing or empty 'document', 1 missing or empty 'summary')" in messages
    assert "skipped 1 of 2 records (1 missing or empty 'page')" in messages


def test_unusable_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="none of the 1 records is usable"):
        summarize.xsum_docs(_dataset(tmp_path, [{"document": "d"}]))
    (tmp_path / "broken.jsonl").write_text('{"page": "ok"}\n{"page": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        shipped.load_jsonl(tmp_path / "broken.jsonl", "test")
    with pytest.raises(ValueError, match="gold_position must be one of"):
        shipped.nq10(5)


# ---------------------------------------------------------------- (c) end to end


@pytest.mark.slow
def test_end_to_end_buzz_smoke():
    import lm_eval
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 292,800-parameter model runs fastest on one thread
    try:
        out = _run_buzz_smoke(lm_eval)
    finally:
        torch.set_num_threads(threads)
    results = out["results"]
    for name, metrics in METRICS.items():
        for metric in metrics:
            value = results[name][f"{metric},none"]
            assert isinstance(value, float) and value == value, (name, metric)  # present, not NaN
    assert results["buzz_wikitext_smoke"]["word_perplexity,none"] > 1.0


def _run_buzz_smoke(lm_eval):
    model_args = {"pretrained": str(DEFAULT_MODEL_DIR), "dtype": "float32"}
    manager = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=model_args)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=["buzz_smoke"],
        task_manager=manager,
        device="cpu",
        batch_size=1,
        limit=1,
        log_samples=False,
        bootstrap_iters=0,
    )
