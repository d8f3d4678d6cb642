"""``buzz-lm-eval longbench-export`` on lm-eval ``--log_samples`` files built as lm-eval writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buzz_lm_eval.cli import main as cli_main
from buzz_lm_eval.harness import longbench

DATE = "2026-01-02T03-04-05.678901"
TREC_CLASSES = ["Location", "Number", "Description", "Abbreviation"]


@pytest.fixture
def scoring() -> None:
    """Skip unless the optional packages lm-eval's LongBench metrics import are installed."""
    for name in ("jieba", "fuzzywuzzy", "rouge"):
        pytest.importorskip(name, reason=f"LongBench metrics need the optional package {name!r}")


def sample(doc_id: int, pred: str, answers: list[str], length: int = 3000, **doc: object) -> dict:
    """One line of ``samples_longbench_*.jsonl`` for a generate_until task, as lm-eval logs it."""
    doc = {
        "context": "Passage 1:\nParis is the capital of France.",
        "question": "What is the capital of France?",
        "answers": answers,
        "length": length,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": f"id{doc_id:04d}",
        **doc,
    }
    prompt = f"Answer the question.\n\n{doc['context']}\n\nQuestion: {doc['question']}\nAnswer:"
    return {
        "doc_id": doc_id,
        "doc": doc,
        "target": str(answers),
        "arguments": {"gen_args_0": {"arg_0": prompt, "arg_1": {"until": [], "max_gen_toks": 32}}},
        "resps": [[pred]],
        "filtered_resps": [pred],
        "filter": "none",
        "metrics": ["score", "qa_f1_score"],
        "doc_hash": "0" * 64,
        "prompt_hash": "1" * 64,
        "target_hash": "2" * 64,
        "score": 0.0,
        "qa_f1_score": 0.0,
    }


def write_samples(folder: Path, task: str, samples: list[dict], date: str = DATE) -> Path:
    """Write ``samples_<task>_<date>.jsonl`` in ``folder``."""
    path = folder / f"samples_{task}_{date}.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def run(tmp_path: Path, *files: Path, model: str = "m") -> int:
    return longbench.main([*map(str, files), "--model", model, "--output", str(tmp_path / "lb")])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def result(tmp_path: Path, pred: str = "pred", model: str = "m") -> dict:
    return json.loads((tmp_path / "lb" / pred / model / "result.json").read_text(encoding="utf-8"))


def test_layout_and_records_follow_longbench_pred_py(tmp_path: Path) -> None:
    path = write_samples(
        tmp_path,
        "longbench_hotpotqa",
        [
            sample(1, " Lyon\n", ["Lyon"], length=4100),
            sample(0, "Paris", ["Paris", "Paris, France"], length=3100),
        ],
    )
    run(tmp_path, path, model="org/My-Model")
    folder = tmp_path / "lb" / "pred" / "org__My-Model"
    assert sorted(p.name for p in folder.iterdir()) == ["hotpotqa.jsonl", "result.json"]
    assert read_jsonl(folder / "hotpotqa.jsonl") == [
        {"pred": "Paris", "answers": ["Paris", "Paris, France"], "all_classes": None, "length": 3100},
        {"pred": " Lyon\n", "answers": ["Lyon"], "all_classes": None, "length": 4100},
    ]
    assert list(read_jsonl(folder / "hotpotqa.jsonl")[0]) == ["pred", "answers", "all_classes", "length"]
    assert not (tmp_path / "lb" / "pred_e").exists()


def test_qa_f1_is_100_times_mean_of_best_answer(tmp_path: Path, scoring: None, capsys) -> None:
    path = write_samples(
        tmp_path,
        "longbench_hotpotqa",
        [
            sample(0, "Paris", ["Paris"]),  # exact: 1
            sample(1, "Paris France", ["Lyon", "Paris"]),  # best answer Paris: P=1/2, R=1 -> 2/3
            sample(2, "Lyon", ["Paris"]),  # 0
        ],
    )
    assert run(tmp_path, path) == 0
    assert result(tmp_path) == {"hotpotqa": round(100 * (1 + 2 / 3 + 0) / 3, 2)} == {"hotpotqa": 55.56}
    assert "hotpotqa" in capsys.readouterr().out


def test_first_line_only_for_trec_triviaqa_samsum_lsht(tmp_path: Path, scoring: None) -> None:
    samples = [sample(0, "\nParis\nThe capital", ["Paris"])]
    files = [write_samples(tmp_path, f"longbench_{name}", samples) for name in ("triviaqa", "hotpotqa")]
    assert run(tmp_path, *files) == 0
    # triviaqa keeps "Paris" (F1 1); hotpotqa scores "paris capital" against "paris" (F1 2/3).
    assert result(tmp_path) == {"hotpotqa": 66.67, "triviaqa": 100.0}


def test_classification_uses_all_classes(tmp_path: Path, scoring: None) -> None:
    path = write_samples(
        tmp_path,
        "longbench_trec",
        [
            sample(0, "Location\nNumber", ["Location"], all_classes=TREC_CLASSES),  # first line only: 1
            sample(1, "Number or Location", ["Location"], all_classes=TREC_CLASSES),  # two classes: 1/2
        ],
    )
    assert run(tmp_path, path) == 0
    assert result(tmp_path) == {"trec": 75.0}
    assert read_jsonl(tmp_path / "lb/pred/m/trec.jsonl")[0]["all_classes"] == TREC_CLASSES


def test_code_retrieval_count_and_rouge_metrics(tmp_path: Path, scoring: None) -> None:
    files = [
        write_samples(tmp_path, "longbench_lcc", [sample(0, "    return x + 1\n# done", ["    return x + 1"])]),
        write_samples(
            tmp_path,
            "longbench_passage_retrieval_en",
            [sample(0, "Paragraph 3", ["Paragraph 3"]), sample(1, "Paragraph 1 or 3", ["Paragraph 3"])],
        ),
        write_samples(tmp_path, "longbench_passage_count", [sample(0, "There are 7", ["7"])]),
        write_samples(tmp_path, "longbench_gov_report", [sample(0, "the cat sat", ["the cat sat"])]),
    ]
    assert run(tmp_path, *files) == 0
    assert result(tmp_path) == {"gov_report": 100.0, "lcc": 100.0, "passage_count": 100.0, "passage_retrieval_en": 75.0}


def test_longbench_e_is_split_by_length(tmp_path: Path, scoring: None) -> None:
    path = write_samples(
        tmp_path,
        "longbench_hotpotqa_e",
        [
            sample(0, "Paris", ["Paris"], length=3999),
            sample(1, "Lyon", ["Paris"], length=4000),
            sample(2, "Paris", ["Paris"], length=8000),
            sample(3, "Paris France", ["Paris"], length=20000),
        ],
    )
    assert run(tmp_path, path) == 0
    assert result(tmp_path, "pred_e") == {"hotpotqa": {"0-4k": 100.0, "4-8k": 0.0, "8k+": 83.33}}
    assert [r["length"] for r in read_jsonl(tmp_path / "lb/pred_e/m/hotpotqa.jsonl")] == [3999, 4000, 8000, 20000]
    assert not (tmp_path / "lb" / "pred").exists()


def test_empty_length_bucket_is_null(tmp_path: Path, scoring: None) -> None:
    path = write_samples(tmp_path, "longbench_passage_count_e", [sample(0, "7", ["7"], length=100)])
    assert run(tmp_path, path) == 0
    assert result(tmp_path, "pred_e") == {"passage_count": {"0-4k": 100.0, "4-8k": None, "8k+": None}}


def test_bad_files_are_named_and_the_rest_goes_on(tmp_path: Path, scoring: None, capsys) -> None:
    good = write_samples(tmp_path, "longbench_hotpotqa", [sample(0, "Paris", ["Paris"])])
    other = write_samples(tmp_path, "arc_easy", [{"doc_id": 0, "doc": {}, "resps": [["A"]]}])
    broken = sample(1, "x", ["x"])
    del broken["doc"]["answers"]
    missing = write_samples(tmp_path, "longbench_qasper", [sample(0, "x", ["x"]), broken])
    garbled = tmp_path / f"samples_longbench_musique_{DATE}.jsonl"
    garbled.write_text("{not json\n", encoding="utf-8")
    absent = tmp_path / f"samples_longbench_narrativeqa_{DATE}.jsonl"
    assert run(tmp_path, good, other, missing, garbled, absent) == 1
    err = capsys.readouterr().err
    assert f"{other}: not a LongBench samples file" in err
    assert f"{missing}, line 2: missing or malformed field 'doc.answers'" in err
    assert f"{garbled}, line 1:" in err
    assert f"{absent}: cannot read" in err
    assert result(tmp_path) == {"hotpotqa": 100.0}
    assert sorted(p.name for p in (tmp_path / "lb/pred/m").iterdir()) == ["hotpotqa.jsonl", "result.json"]


def test_newest_run_wins_and_first_filter_only(tmp_path: Path, scoring: None, capsys) -> None:
    old = write_samples(tmp_path, "longbench_hotpotqa", [sample(0, "Lyon", ["Paris"])], date="2025-12-31T00-00-00.0")
    other_filter = {**sample(0, "Lyon", ["Paris"]), "filter": "strip"}
    new = write_samples(tmp_path, "longbench_hotpotqa", [sample(0, "Paris", ["Paris"]), other_filter])
    assert run(tmp_path, new, old) == 0
    assert f"{old}: skipped, superseded by the newer {new}" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "lb/pred/m/hotpotqa.jsonl") == [
        {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 3000}
    ]


def test_result_covers_every_dataset_in_the_folder(tmp_path: Path, scoring: None) -> None:
    first = write_samples(tmp_path, "longbench_hotpotqa", [sample(0, "Paris", ["Paris"])])
    second = write_samples(tmp_path, "longbench_musique", [sample(0, "Lyon", ["Paris"])])
    assert cli_main(["longbench-export", str(first), "--model", "m", "--output", str(tmp_path / "lb")]) == 0
    assert cli_main(["longbench-export", str(second), "--model", "m", "--output", str(tmp_path / "lb")]) == 0
    assert result(tmp_path) == {"hotpotqa": 100.0, "musique": 0.0}
