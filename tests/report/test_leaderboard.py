"""Tests for ``buzz-lm-eval leaderboard`` on hand-built lm-eval results files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from buzz_lm_eval import cli
from buzz_lm_eval.harness import files
from buzz_lm_eval.harness.run_stats import RunStats
from buzz_lm_eval.report import leaderboard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIRECTIONS = {"acc": True, "word_perplexity": False, "bypass": True}
CACHE_KEYS = ("policy", "budget", "sink", "window", "threshold", "stride", "heavy", "recent", "prefill_chunk")


def summary(peak: int, ratio: float, sequences: int = 1) -> dict[str, Any]:
    """A per-task statistics summary as buzz_hf writes it (one batch per sequence)."""
    stats = RunStats()
    for _ in range(sequences):
        stats.add(
            {
                "tokens_seen": 100,
                "kept_tokens_peak": peak,
                "kept_tokens_mean": peak * 0.9,
                "kv_bytes_peak": peak * 1024,
                "kv_bytes_mean": peak * 900,
                "compression_ratio": ratio,
                "evict_seconds": 0.1,
            },
            1,
            100,
            0.1,
        )
    return stats.summary()


def buzz_cache(policy: str, budget: int | None, **stats: Any) -> dict[str, Any]:
    """A ``config["buzz_cache"]`` block as buzz_hf writes it (whole-run statistics only)."""
    cache = {
        "policy": policy,
        "budget": budget,
        "sink": 4,
        "window": 16,
        "threshold": None,
        "stride": None,
        "heavy": None,
        "recent": None,
        "prefill_chunk": 512,
        "tokens_seen": 4096,
        "kept_tokens_peak": budget or 4096,
        "kept_tokens_mean": (budget or 4096) * 0.9,
        "kv_bytes_peak": (budget or 4096) * 1024,
        "kv_bytes_mean": (budget or 4096) * 900,
        "compression_ratio": 4096 / (budget or 4096),
        "evict_seconds": 0.5,
        "tokens_per_second": 1000.0,
    }
    cache.update(stats)
    return cache


def results_json(
    metrics: dict[str, dict[str, float]],
    cache: dict[str, Any] | None,
    *,
    model: str = "buzz_hf",
    pretrained: str = "/models/tiny-llama",
    date: float = 1_700_000_000.0,
) -> dict[str, Any]:
    """An lm-eval 0.4.13 results file: ``metrics`` is {task: {metric: value}}, stderr = value / 100."""
    results = {
        task: {
            "alias": task,
            "sample_len": 50,
            **{f"{m},none": v for m, v in values.items()},
            **{f"{m}_stderr,none": v / 100 for m, v in values.items()},
        }
        for task, values in metrics.items()
    }
    config: dict[str, Any] = {
        "model": model,
        "model_args": f"pretrained={pretrained},dtype=float32",
        "model_num_parameters": 1000,
        "model_dtype": "torch.float32",
        "model_revision": "main",
        "model_sha": "",
        "batch_size": 1,
        "device": "cpu",
        "limit": 50.0,
    }
    if cache is not None:
        config["buzz_cache"] = cache
    return {
        "results": results,
        "group_subtasks": {task: [] for task in metrics},
        "configs": {task: {"task": task} for task in metrics},
        "versions": {task: 1.0 for task in metrics},
        "n-shot": {task: 0 for task in metrics},
        "higher_is_better": {task: {m: DIRECTIONS[m] for m in vals} for task, vals in metrics.items()},
        "n-samples": {task: {"original": 100, "effective": 50} for task in metrics},
        "config": config,
        "git_hash": "abc1234",
        "date": date,
        "model_name": pretrained,
        "model_name_sanitized": pretrained.replace("/", "__"),
        "chat_template": None,
        "chat_template_sha": None,
        "max_length": 2048,
    }


def write_run(root: Path, run: str, data: dict[str, Any] | str, stamp: str = "2025-01-01T00-00-00") -> Path:
    """Write ``data`` where lm-eval's EvaluationTracker would put it under ``root/run``."""
    path = root / run / "__models__tiny-llama" / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A small sweep: full cache plus local and buzz at budgets 64 and 128."""
    root = tmp_path / "results"
    write_run(
        root, "full", results_json({"arc": {"acc": 0.80}, "wiki": {"word_perplexity": 10.0}}, buzz_cache("full", None))
    )
    for policy, budget, acc, ppl in [
        ("buzz", 64, 0.60, 20.0),
        ("local", 64, 0.40, 40.0),
        ("buzz", 128, 0.72, 12.5),
        ("local", 128, 0.64, 16.0),
    ]:
        metrics = {"arc": {"acc": acc}, "wiki": {"word_perplexity": ppl}}
        write_run(root, f"{policy}_b{budget}", results_json(metrics, buzz_cache(policy, budget)))
    return root


def load_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/leaderboard.json``."""
    return json.loads((out / "leaderboard.json").read_text(encoding="utf-8"))["rows"]


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The single row matching every ``match`` field."""
    hits = [row for row in rows if all(row[k] == v for k, v in match.items())]
    assert len(hits) == 1, hits
    return hits[0]


def test_row_schema_and_values(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert leaderboard.main([str(sweep), "--output", str(out)]) == 0
    row = find(load_rows(out), task="arc", policy="buzz", budget=64)
    settings = {
        "dtype": "torch.float32",
        "task_version": 1.0,
        "limit": 50,
        "num_fewshot": 0,
        "chat_template": None,
        "system_instruction": None,
        "fewshot_as_multiturn": None,
        "generation_kwargs": None,
        "max_length": 2048,
        "predict_only": False,
    }
    cache = {key: value for key, value in buzz_cache("buzz", 64).items() if key in CACHE_KEYS}
    assert row == {
        "model": "tiny-llama",
        "task": "arc",
        "metric": "acc",
        "filter": "none",
        "policy": "buzz",
        "budget": 64,
        "value": 0.60,
        "stderr": pytest.approx(0.006),
        "higher_is_better": True,
        "relative_quality": pytest.approx(0.75),
        "full_value": 0.80,
        "full_source": "full/__models__tiny-llama/results_2025-01-01T00-00-00.json",
        "compression_ratio": 64.0,
        "kv_bytes_peak": 65536,
        "kv_bytes_mean": 57600,
        "kept_tokens_peak": 64,
        "kept_tokens_mean": pytest.approx(57.6),
        "tokens_per_second": 1000.0,
        "stats_scope": "run",
        "n_samples": 50,
        "batch_size": 1,
        "source": "buzz_b64/__models__tiny-llama/results_2025-01-01T00-00-00.json",
        "model_id": {"path": "/models/tiny-llama", "revision": "main", "sha": None, "peft": None, "delta": None},
        "settings": settings,
        "cache": cache,
        "comparison": row["comparison"],
        "notes": ["statistics are the whole run's (the file has no per-task statistics)"],
    }
    full = find(load_rows(out), task="arc", policy="full")
    assert full["comparison"] == row["comparison"] and full["settings"] == settings


def test_relative_quality_orientation(sweep: Path) -> None:
    assert leaderboard.main([str(sweep)]) == 0
    rows = load_rows(sweep)
    assert find(rows, task="arc", policy="local", budget=128)["relative_quality"] == pytest.approx(0.8)
    assert find(rows, task="arc", policy="full")["relative_quality"] == pytest.approx(1.0)
    # perplexity: lower is better, so full / value
    ppl = find(rows, task="wiki", policy="buzz", budget=128)
    assert (ppl["higher_is_better"], ppl["relative_quality"]) == (False, pytest.approx(0.8))
    assert find(rows, task="wiki", policy="local", budget=64)["relative_quality"] == pytest.approx(0.25)


def test_rows_sorted_by_task_budget_policy(sweep: Path) -> None:
    assert leaderboard.main([str(sweep)]) == 0
    order = [(r["task"], r["budget"], r["policy"]) for r in load_rows(sweep)]
    arc = [
        ("arc", None, "full"),
        ("arc", 64, "local"),
        ("arc", 64, "buzz"),
        ("arc", 128, "local"),
        ("arc", 128, "buzz"),
    ]
    assert order == arc + [("wiki", *key[1:]) for key in arc]


def test_no_full_run_and_na_stderr_give_nulls(tmp_path: Path) -> None:
    data = results_json({"arc": {"acc": 0.5}}, buzz_cache("buzz", 32))
    data["results"]["arc"]["acc_stderr,none"] = "N/A"  # lm-eval's stand-in without bootstrap
    write_run(tmp_path, "buzz", data)
    assert leaderboard.main([str(tmp_path)]) == 0
    row = find(load_rows(tmp_path), policy="buzz")
    assert (row["relative_quality"], row["full_value"], row["stderr"]) == (None, None, None)


def test_markdown_table(sweep: Path) -> None:
    assert leaderboard.main([str(sweep)]) == 0
    text = (sweep / "leaderboard.md").read_text(encoding="utf-8")
    assert "### arc · acc (filter none, higher is better)" in text
    assert "### wiki · word_perplexity (filter none, lower is better)" in text
    note = "  |"
    full = (
        "| tiny-llama | full | full | 1 | 0.8000 | 0.0080 | 1.000 | 1.00× | 4.0 MiB | 3.5 MiB | 4096 | 3686 | "
        "1000.0 | 50 |"
    )
    buzz64 = (
        "| tiny-llama | buzz | 64 | 1 | 0.6000 | 0.0060 | 0.750 | 64.00× | 64.0 KiB | 56.2 KiB | 64 | 58 | "
        "1000.0 | 50 |"
    )
    local128 = "| tiny-llama | local | 128 | 1 | 0.6400 | 0.0064 | 0.800 | 32.00× | 128.0 KiB | 112.5 KiB | 128 | "
    local128 += "115 | "
    local128 += "1000.0 | 50 |"
    full, buzz64, local128 = full + note, buzz64 + note, local128 + note
    assert "tiny-llama (`/models/tiny-llama`, revision main) · dtype torch.float32 · task_version 1.0" in text
    assert "Every row: statistics are the whole run's (the file has no per-task statistics)." in text
    assert full in text
    assert text.index(buzz64) < text.index(local128) < text.index("### wiki")


def test_plots_are_valid_pngs(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert leaderboard.main([str(sweep), "--output", str(out)]) == 0
    pngs = sorted(path.name for path in out.glob("*.png"))
    assert pngs == [
        f"{stem}__vs_{kind}.png"
        for stem in ("arc__acc__tiny-llama", "wiki__word_perplexity__tiny-llama")
        for kind in ("budget", "compression", "kv_bytes_mean", "kv_bytes_peak")
    ]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert not list(out.glob(".*")), "temporary files left behind"


def test_missing_matplotlib_still_writes_tables(
    sweep: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert leaderboard.main([str(sweep)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (sweep / "leaderboard.json").is_file() and (sweep / "leaderboard.md").is_file()
    assert not list(sweep.glob("*.png"))


def test_bad_inputs_are_reported_and_skipped(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(sweep, "broken", "{not json")
    write_run(sweep, "foreign", {"scores": [1, 2]})
    write_run(sweep, "vllm", results_json({"arc": {"acc": 0.9}}, None, model="vllm"))
    write_run(sweep, "nopolicy", results_json({"arc": {"acc": 0.9}}, {"budget": 8}))
    empty = results_json({"arc": {"acc": 0.9}}, buzz_cache("buzz", 8))
    empty["results"] = {}
    write_run(sweep, "empty", empty)
    assert leaderboard.main([str(sweep)]) == 1  # rows are written, but skipped files are an error
    captured = capsys.readouterr()
    assert "5 skipped" in captured.out
    err = captured.err.splitlines()
    assert any("empty/" in line and "no results" in line for line in err)
    assert "5 results file(s) skipped" in err[-1]
    assert any("broken/" in line and "invalid JSON" in line for line in err)
    assert any("foreign/" in line and "no 'results' section" in line for line in err)
    assert any("vllm/" in line and "no config.buzz_cache" in line and "'vllm'" in line for line in err)
    assert any("nopolicy/" in line and "'policy'" in line for line in err)
    runs = {row["source"].split("/")[0] for row in load_rows(sweep)}
    assert runs == {"full", "buzz_b64", "local_b64", "buzz_b128", "local_b128"}


def test_stock_hf_run_is_the_full_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "hf", results_json({"arc": {"acc": 0.5}}, None, model="hf"))
    write_run(tmp_path, "buzz", results_json({"arc": {"acc": 0.4}}, buzz_cache("buzz", 16)))
    assert leaderboard.main([str(tmp_path)]) == 0
    assert "hf/" in capsys.readouterr().err
    rows = load_rows(tmp_path)
    full = find(rows, policy="full")
    assert (full["budget"], full["compression_ratio"], full["source"].split("/")[0]) == (None, None, "hf")
    assert find(rows, policy="buzz")["relative_quality"] == pytest.approx(0.8)


def test_duplicates_keep_newest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = buzz_cache("buzz", 64)
    newer = write_run(tmp_path, "rerun", results_json({"arc": {"acc": 0.7}}, cache, date=2e9))
    # the older run has the later file name: the JSON date must win
    older = write_run(
        tmp_path, "first", results_json({"arc": {"acc": 0.3}}, cache, date=1e9), stamp="2099-01-01T00-00-00"
    )
    assert leaderboard.main([str(tmp_path)]) == 0
    row = find(load_rows(tmp_path), policy="buzz")
    assert row["value"] == 0.7 and row["source"] == newer.relative_to(tmp_path).as_posix()
    [message] = [line for line in capsys.readouterr().err.splitlines() if "duplicate" in line]
    old_name, new_name = (p.relative_to(tmp_path).as_posix() for p in (older, newer))
    assert f"{old_name} and {new_name}; keeping {new_name}" in message
    assert "rule: the later 'date' in the JSON, then the later file name" in message


def test_no_usable_results_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "broken", "[]")
    assert leaderboard.main([str(tmp_path)]) == 1
    assert "no leaderboard rows" in capsys.readouterr().err
    assert not (tmp_path / "leaderboard.json").exists()


def test_missing_results_dir_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert leaderboard.main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_dispatch(sweep: Path, tmp_path: Path) -> None:
    assert cli.main(["leaderboard", str(sweep), "--output", str(tmp_path / "cli")]) == 0
    assert load_rows(tmp_path / "cli")


def test_read_only_output_folder_names_the_output(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "readonly"
    out.mkdir()

    def denied(suffix="", prefix="", dir=None, **_: Any):  # what a read-only folder gives mkstemp
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(files.tempfile, "mkstemp", denied)
    assert leaderboard.main([str(sweep), "--output", str(out)]) == 1
    [line] = capsys.readouterr().err.splitlines()[-1:]
    assert f"cannot write leaderboard.json into folder {out}: Permission denied" in line
    assert ".tmp" not in line and not list(out.iterdir())
