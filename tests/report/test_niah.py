"""buzz_niah: the grid, the documents, the cell metrics, a smoke run and the leaderboard's heatmap."""

from __future__ import annotations

import json

import pytest

from buzz_lm_eval.report import leaderboard
from buzz_lm_eval.report.heatmaps import cell, render_heatmaps

from ..conftest import load_task_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


niah = load_task_module("niah/niah.py", "buzz_test_niah")


def test_grid_defaults_and_bad_values_are_named():
    assert niah.grid({}) == ([1024, 2048, 4096], [0, 25, 50, 75, 100], 1, 0)
    assert niah.grid({"max_seq_lengths": [512, 256, 512], "niah_depths": 50, "niah_samples": 3}) == (
        [256, 512],
        [50],
        3,
        0,
    )
    for bad, match in [
        ({"niah_depths": [0, 120]}, r"niah_depths=\[0, 120\].*\[0, 100\]"),
        ({"max_seq_lengths": []}, "max_seq_lengths=.*non-empty"),
        ({"max_seq_lengths": ["1k"]}, "max_seq_lengths"),
        ({"niah_samples": 0}, "niah_samples=0 must be an integer >= 1"),
        ({"niah_seed": "x"}, "niah_seed='x'"),
    ]:
        with pytest.raises(ValueError, match=match):
            niah.grid(bad)


def test_documents_are_seeded_fill_their_length_and_place_the_needle_by_depth():
    grid = {"max_seq_lengths": [256, 480], "niah_depths": [0, 50, 100], "niah_samples": 2}
    docs = list(niah.dataset(**grid)["test"])
    assert docs == list(niah.dataset(**grid)["test"])  # deterministic
    assert [(d["length"], d["depth"], d["sample"]) for d in docs] == [
        (length, depth, sample) for length in (256, 480) for depth in (0, 50, 100) for sample in (0, 1)
    ]
    for doc in docs:
        assert doc["length"] - 25 <= doc["tokens"] <= doc["length"]  # full up to a word, never over
        needle = f"The magic number for {doc['gen_prefix'].split()[-2]} is {doc['answer']}."
        body = doc["input"][len(niah.INTRO) : doc["input"].rindex("\n\nWhat is")]
        position = body.index(needle) / max(1, len(body) - len(needle))
        assert abs(position - doc["depth"] / 100) < 0.2, (doc["depth"], position)
    assert docs[0]["answer"] != docs[1]["answer"] and docs[0]["input"] != docs[1]["input"]  # two samples
    other_seed = niah.dataset(**grid, niah_seed=1)["test"][0]
    assert other_seed["answer"] != docs[0]["answer"]


def test_too_short_lengths_and_haystacks_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"length 100 leaves no room .* alone take \d+ tokens"):
        niah.dataset(max_seq_lengths=[100], niah_depths=[50])
    text = tmp_path / "hay.txt"
    text.write_text("= Title =\nThe cat sat on the mat. The dog ran far away!\n", encoding="utf-8")
    assert niah.sentences(text.read_text()) == ["The cat sat on the mat.", "The dog ran far away!"]
    with pytest.raises(ValueError, match="haystack is shorter than the length 300"):
        niah.dataset(max_seq_lengths=[300], niah_haystack_file=str(text))
    with pytest.raises(ValueError, match="not both"):
        niah.dataset(niah_haystack_file=str(text), niah_haystack_dataset="x/y")


def test_a_users_haystack_file_is_used(tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text(" ".join(f"Sentence number {i} is about a red kite." for i in range(200)), encoding="utf-8")
    (doc,) = niah.dataset(max_seq_lengths=[300], niah_depths=[50], niah_haystack_file=str(text))["test"]
    assert "red kite" in doc["input"] and "Wikipedia" not in doc["input"]


def test_process_results_scores_containment_in_score_and_the_cell():
    doc = {"answer": "4821930", "length": 1024, "depth": 25}
    assert niah.process_results(doc, [" 4821930."]) == {"score": 1.0, "score_L1024_D25": 1.0}
    assert niah.process_results(doc, [" 482193"]) == {"score": 0.0, "score_L1024_D25": 0.0}


def test_smoke_task_runs_and_the_leaderboard_draws_its_heatmap(tmp_path):
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    results = lm_eval.simple_evaluate(
        model="buzz_hf",
        model_args="cache=buzz,budget=64,prefill_chunk=32,device=cpu",
        tasks=["buzz_niah_smoke"],
        limit=3,
    )
    values = results["results"]["buzz_niah_smoke"]
    cells = sorted(key for key in values if key.startswith("score_L") and "_stderr" not in key)
    assert cells == ["score_L256_D0,none", "score_L256_D100,none", "score_L256_D50,none"]
    assert values["score,none"] == sum(values[key] for key in cells) / 3  # near zero on this model
    assert results["higher_is_better"]["buzz_niah_smoke"]["score_L256_D50"] is True
    run = tmp_path / "results" / "buzz_b64"
    run.mkdir(parents=True)
    (run / "results_1.json").write_text(json.dumps(results, default=handle_non_serializable))
    assert leaderboard.main([str(tmp_path / "results"), "--output", str(tmp_path / "out")]) == 0
    [heatmap] = (tmp_path / "out").glob("*__heatmap.png")
    assert heatmap.name.startswith("buzz_niah_smoke__score__") and heatmap.name.endswith(
        "__buzz_b64_every_forward_shifted__heatmap.png"
    )
    assert heatmap.read_bytes().startswith(PNG_SIGNATURE)
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "buzz_niah_smoke · score " in markdown and "score_L256" not in markdown
    rows = json.loads((tmp_path / "out" / "leaderboard.json").read_text())["rows"]
    assert {row["metric"] for row in rows} == {"score", *(key.split(",")[0] for key in cells)}


def test_one_heatmap_per_run_and_metric():
    def row(metric, policy, budget, value):
        return {
            "model": "m",
            "task": "buzz_niah",
            "filter": "none",
            "metric": metric,
            "policy": policy,
            "budget": budget,
            "value": value,
        }

    rows = [
        row(f"score_L{length}_D{depth}", policy, budget, 0.5)
        for policy, budget in (("full", None), ("buzz", 128))
        for length in (512, 1024)
        for depth in (0, 100)
    ]
    rows.append(row("score", "buzz", 128, 0.5))
    images = render_heatmaps(rows)
    assert sorted(images) == ["buzz_niah__score__m__buzz_b128__heatmap.png", "buzz_niah__score__m__full__heatmap.png"]
    assert all(png.startswith(PNG_SIGNATURE) for png in images.values())
    assert cell(rows[0]) == ("score", 512, 0) and cell(rows[-1]) is None


def test_sweep_passes_the_grid_as_metadata(tmp_path):
    from buzz_lm_eval.report import sweep

    code = sweep.main(
        [
            "--policies",
            "streaming",
            "--budgets",
            "64",
            "--tasks",
            "buzz_niah_smoke",
            "--prefill_chunk",
            "32",
            "--limit",
            "2",
            "--output",
            str(tmp_path),
            "--model_args",
            "device=cpu",
            "--metadata",
            '{"max_seq_lengths": [300], "niah_depths": [10, 90]}',
        ]
    )
    assert code == 0
    [path] = (tmp_path / "streaming_b64").glob("results_*.json")
    values = json.loads(path.read_text())["results"]["buzz_niah_smoke"]
    assert sorted(key for key in values if key.startswith("score_L") and "_stderr" not in key) == [
        "score_L300_D10,none",
        "score_L300_D90,none",
    ]
