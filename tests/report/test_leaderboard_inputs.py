"""``buzz-lm-eval leaderboard`` on awkward inputs: model identity, odd file names and values, results
files found by content, per-task statistics, comparability with the full run, unknown cache settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from buzz_lm_eval.report import leaderboard
from buzz_lm_eval.report.results_reader import ModelId, model_id

from .test_leaderboard import buzz_cache, find, load_rows, results_json, summary, write_run


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"config": {"model_args": {"pretrained": "org/Model-1B", "revision": "v2"}, "model_sha": "abc"}},
            ModelId("org/Model-1B", "v2", "abc", None, None),
        ),
        (
            {"config": {"model_args": "pretrained=/data/llama/,peft=/ad", "model_revision": "main"}},
            ModelId("/data/llama/", "main", None, "/ad", None),
        ),
        ({"config": {"model_args": "", "model_name_or_path": "/m/phi"}}, ModelId("/m/phi", "main", None, None, None)),
        (
            {"config": {"model": "buzz_hf"}, "model_name": "C:\\models\\phi"},
            ModelId("C:\\models\\phi", "main", None, None, None),
        ),
    ],
)
def test_model_id(data: dict[str, Any], expected: ModelId) -> None:
    assert model_id(data) == expected


def test_display_names_tell_models_apart() -> None:
    a, b = ModelId("/a/x/m", "main", None, None, None), ModelId("/b/x/m", "main", None, None, None)
    hub, hub2 = ModelId("org/m", "main", None, None, None), ModelId("org/m", "v2", None, None, None)
    names = leaderboard.display_names([a, b, hub, hub2, ModelId("/z/solo", "main", None, None, None)])
    assert names == {
        a: "a/x/m",
        b: "b/x/m",
        hub: "org/m revision=main",
        hub2: "org/m revision=v2",
        ModelId("/z/solo", "main", None, None, None): "solo",
    }


# -- results that hold up (issue 16) ----------------------------------------------------------
def test_two_models_in_folders_with_the_same_name_never_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder, acc in (("real", 0.7), ("random", 0.2)):
        data = results_json({"arc": {"acc": acc}}, buzz_cache("buzz", 64), pretrained=f"/{folder}/stories260K")
        write_run(tmp_path, folder, data)
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    assert {(row["model"], row["value"]) for row in rows} == {("real/stories260K", 0.7), ("random/stories260K", 0.2)}
    assert "duplicate" not in capsys.readouterr().err


def test_non_utf8_file_names_are_named_and_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "full", results_json({"arc": {"acc": 0.8}}, buzz_cache("full", None)))
    write_run(tmp_path, os.fsdecode(b"buzz\xff"), results_json({"arc": {"acc": 0.4}}, buzz_cache("buzz", 64)))
    (tmp_path / os.fsdecode(b"notes\xfe.txt")).write_text("not json", encoding="utf-8")
    assert leaderboard.main([str(tmp_path)]) == 0
    assert (
        "buzz\\xff/__models__tiny-llama/results_2025-01-01T00-00-00.json: file name is not valid UTF-8"
        in capsys.readouterr().err
    )
    row = find(load_rows(tmp_path), policy="buzz")
    assert row["source"].startswith("buzz\\xff/") and row["relative_quality"] == pytest.approx(0.5)
    assert "| buzz | 64 | 1 | 0.4000 |" in (tmp_path / "leaderboard.md").read_text(encoding="utf-8")


def test_nan_and_infinite_values_stay_visible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "full", results_json({"arc": {"acc": 0.8}}, buzz_cache("full", None)))
    data = results_json({"arc": {"acc": 0.5, "word_perplexity": 2.0}}, buzz_cache("buzz", 64))
    data["results"]["arc"]["acc,none"] = float("nan")
    data["results"]["arc"]["word_perplexity,none"] = float("inf")
    write_run(tmp_path, "buzz", json.dumps(data))  # lm-eval writes NaN / Infinity literally
    assert leaderboard.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "arc acc,none is nan" in err and "arc word_perplexity,none is inf" in err
    rows = load_rows(tmp_path)
    for metric, shown in (("acc", "nan"), ("word_perplexity", "inf")):
        row = find(rows, policy="buzz", metric=metric)
        assert row["value"] is None and row["relative_quality"] is None
        assert f"value is {shown} in the results file, not a finite number" in row["notes"]
    assert "value is nan" in (tmp_path / "leaderboard.md").read_text(encoding="utf-8")


def test_output_path_json_files_are_read_by_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    full = results_json({"arc": {"acc": 0.8}}, buzz_cache("full", None))
    (tmp_path / "out" / "full_2025-01-01T00-00-00.123.json").write_text(json.dumps(full), encoding="utf-8")
    buzz = results_json({"arc": {"acc": 0.6}}, buzz_cache("buzz", 64))
    (tmp_path / "out" / "x_2025-01-02T00-00-00.json").write_text(json.dumps(buzz, indent=2), encoding="utf-8")
    (tmp_path / "out" / "notes.json").write_text(json.dumps({"comment": "results"}), encoding="utf-8")
    assert leaderboard.main([str(tmp_path)]) == 0
    assert find(load_rows(tmp_path), policy="buzz")["relative_quality"] == pytest.approx(0.75)
    assert "ignored 1 other JSON file(s), not lm-eval results: out/notes.json" in capsys.readouterr().err
    assert leaderboard.main([str(tmp_path)]) == 0  # its own leaderboard.json is not read back


def test_rows_use_their_own_task_statistics(tmp_path: Path) -> None:
    """Two tasks in one run: each row shows its task's statistics; a group shows its subtasks'."""
    per_task = {
        "wiki": {"loglikelihood_rolling": summary(95, 5.39)},
        "xsum_a": {"generate_until": summary(384, 4.61)},
        "xsum_b": {"generate_until": summary(200, 6.0, 3)},
    }
    data = results_json(
        {"wiki": {"word_perplexity": 9.0}, "xsum": {"acc": 0.3}, "xsum_a": {"acc": 0.2}, "xsum_b": {"acc": 0.4}},
        buzz_cache("buzz", 64, per_task=per_task),
    )
    data["group_subtasks"] = {"xsum": ["xsum_a", "xsum_b"], "wiki": []}
    write_run(tmp_path, "buzz", data)
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    wiki, group = find(rows, task="wiki"), find(rows, task="xsum")
    assert (wiki["kept_tokens_peak"], wiki["compression_ratio"], wiki["stats_scope"]) == (95, 5.39, "task")
    assert find(rows, task="xsum_a")["kept_tokens_peak"] == 384
    full_bytes, peak_bytes = 384 * 1024 * 4.61 + 3 * 200 * 1024 * 6.0, 384 * 1024 + 3 * 200 * 1024
    assert group["kept_tokens_peak"] == 384 and group["compression_ratio"] == pytest.approx(full_bytes / peak_bytes)
    assert wiki["notes"] == group["notes"] == ["no full-cache run of this model and task"]


def test_relative_quality_only_against_a_comparable_full_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = results_json({"arc": {"acc": 0.8}, "gen": {"acc": 0.5}}, buzz_cache("full", None, prefill_chunk=None))
    full["config"]["limit"] = 20
    for data in (full, buzz := results_json({"arc": {"acc": 0.6}, "gen": {"acc": 0.4}}, buzz_cache("buzz", 64))):
        data["configs"]["gen"]["generation_kwargs"] = {"until": ["\n"], "do_sample": False}
    buzz["configs"]["gen"]["generation_kwargs"]["do_sample"] = True
    buzz["config"]["limit"] = 20.0
    write_run(tmp_path, "full", full)
    write_run(tmp_path, "buzz", buzz)
    write_run(tmp_path, "h2o", results_json({"arc": {"acc": 0.5}}, buzz_cache("h2o", 64)))  # limit 50
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    assert find(rows, task="arc", policy="buzz")["relative_quality"] == pytest.approx(0.75)  # chunks differ: fine
    gen = find(rows, task="gen", policy="buzz")
    assert gen["relative_quality"] is None and gen["full_value"] is None
    assert 'generation_kwargs ({"do_sample": false, "until": ["\\n"]} there, {"do_sample": true' in gen["notes"][-1]
    h2o = find(rows, task="arc", policy="h2o")
    assert h2o["relative_quality"] is None and "limit (20 there, 50 here)" in h2o["notes"][-1]
    err = capsys.readouterr().err
    assert "gen (tiny-llama, e.g. buzz/" in err and "the full-cache run full/" in err
    assert "limit (20 there, 50 here)" in err
    assert find(rows, task="arc", policy="full")["comparison"] != h2o["comparison"]


def test_predict_only_runs_carry_no_scores(tmp_path: Path) -> None:
    full = results_json({"arc": {"bypass": 999}}, buzz_cache("full", None))
    write_run(tmp_path, "full", full)
    write_run(tmp_path, "buzz", results_json({"arc": {"acc": 0.6}}, buzz_cache("buzz", 64)))
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    predicted = find(rows, policy="full")
    assert predicted["value"] is None and predicted["settings"]["predict_only"] is True
    assert leaderboard.PREDICT_ONLY in predicted["notes"]
    scored = find(rows, policy="buzz")
    assert scored["relative_quality"] is None and "no full-cache run of this model and task" in scored["notes"]


def test_every_cache_setting_is_carried_and_tells_runs_apart(tmp_path: Path) -> None:
    """A cache setting the leaderboard has never heard of (``positions``) appears in rows, keeps two
    runs apart, shows in the table, and plays no part in matching the full run."""
    write_run(tmp_path, "full", results_json({"arc": {"acc": 0.8}}, buzz_cache("full", None, positions=None)))
    for positions, acc in (("shifted", 0.6), ("original", 0.4)):
        cache = buzz_cache("buzz", 64, positions=positions)
        write_run(tmp_path, f"buzz_{positions}", results_json({"arc": {"acc": acc}}, cache))
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    shifted, original = find(rows, value=0.6), find(rows, value=0.4)
    assert (shifted["cache"]["positions"], original["cache"]["positions"]) == ("shifted", "original")
    assert (shifted["relative_quality"], original["relative_quality"]) == (pytest.approx(0.75), pytest.approx(0.5))
    text = (tmp_path / "leaderboard.md").read_text(encoding="utf-8")
    assert "| cache settings |" in text and "| buzz | 64 | positions=shifted | 1 | 0.6000 |" in text


def test_plots_of_other_settings_get_their_own_files(tmp_path: Path) -> None:
    for limit in (10, 20):
        for policy, budget in (("full", None), ("buzz", 64)):
            data = results_json({"arc": {"acc": 0.8 if budget is None else 0.6}}, buzz_cache(policy, budget))
            data["config"]["limit"] = limit
            write_run(tmp_path, f"{policy}_{limit}", data)
    assert leaderboard.main([str(tmp_path)]) == 0
    comparisons = {row["comparison"] for row in load_rows(tmp_path)}
    names = sorted(path.name for path in tmp_path.glob("*vs_budget.png"))
    assert len(comparisons) == 2 and names == sorted(f"arc__acc__tiny-llama__{c}__vs_budget.png" for c in comparisons)


def ruler_run(policy: str, budget: int | None, length: int, score: float) -> dict[str, Any]:
    """A RULER-like run at one length: lm-eval reports -1 ('N/A' stderr) for its default length it did
    not run, and copies the model arguments into the task metadata beside ``--metadata``'s lengths."""
    data = results_json({"ruler_vt": {"acc": score}}, buzz_cache(policy, budget))
    data["results"]["ruler_vt"] = {"alias": "ruler_vt", f"{length},none": score, f"{length}_stderr,none": 0.01}
    data["higher_is_better"]["ruler_vt"] = {str(length): True, "4096": True}
    if length != 4096:
        data["results"]["ruler_vt"].update({"4096,none": -1, "4096_stderr,none": "N/A"})
    metadata = {"version": 1.0, "max_seq_lengths": [length], "pretrained": "/models/tiny-llama", "dtype": "float32"}
    data["configs"]["ruler_vt"]["metadata"] = {**metadata, "config_source": f"/somewhere/{length}.yaml"}
    return data


def test_runs_at_other_task_lengths_are_kept_apart_and_unrun_lengths_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two lengths of one task (``--metadata``) are two comparisons, never duplicates of each other;
    RULER's -1 for a length it did not run is no score. Model arguments copied into the metadata and
    the YAML's path do not split comparisons."""
    for length, (full, buzz) in {1024: (0.9, 0.5), 2048: (0.8, 0.3)}.items():
        write_run(tmp_path / str(length), "full", ruler_run("full", None, length, full))
        write_run(tmp_path / str(length), "buzz", ruler_run("buzz", 64, length, buzz))
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    assert sorted((row["metric"], row["policy"], row["value"]) for row in rows) == [
        ("1024", "buzz", 0.5),
        ("1024", "full", 0.9),
        ("2048", "buzz", 0.3),
        ("2048", "full", 0.8),
    ]
    assert find(rows, metric="2048", policy="buzz")["relative_quality"] == pytest.approx(0.375)
    assert find(rows, metric="1024", policy="buzz")["settings"]["task_metadata"] == {"max_seq_lengths": [1024]}
    assert "duplicate runs" not in capsys.readouterr().err


def test_a_table_of_several_batch_sizes_says_its_memory_columns_count_padding(tmp_path: Path) -> None:
    """Quality does not depend on the batch size, so runs at 1 and 8 share a table and the full cache's
    relative quality; their memory statistics hold each batch's padding, and every row says so."""
    write_run(tmp_path, "full", results_json({"arc": {"acc": 0.8}}, buzz_cache("full", None)))
    batched = results_json({"arc": {"acc": 0.6}}, buzz_cache("buzz", 64))
    batched["config"]["batch_size"] = 8
    write_run(tmp_path, "buzz_b64", batched)
    write_run(tmp_path, "h2o_b64", results_json({"arc": {"acc": 0.7}}, buzz_cache("h2o", 64)))
    assert leaderboard.main([str(tmp_path)]) == 0
    rows = load_rows(tmp_path)
    buzz = find(rows, policy="buzz")
    assert buzz["batch_size"] == 8 and buzz["relative_quality"] == pytest.approx(0.75)
    note = "batch sizes 1, 8 in one table: KV bytes, kept tokens and compression count each batch's padding"
    assert all(note in row["notes"] for row in rows)
    table = (tmp_path / "leaderboard.md").read_text(encoding="utf-8")
    assert f"Every row: {note}." in table and "| tiny-llama | buzz | 64 | 8 | 0.6000 |" in table
    write_run(tmp_path, "buzz_b64", results_json({"arc": {"acc": 0.6}}, buzz_cache("buzz", 64)))  # now batch 1
    assert leaderboard.main([str(tmp_path)]) == 0
    assert not any("batch sizes" in note for row in load_rows(tmp_path) for note in row["notes"])
