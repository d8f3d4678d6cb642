"""Bad input through ``buzz-lm-eval`` fails before any task is indexed or weight loaded, naming the
value and what to do instead; huge values do not hang."""

from __future__ import annotations

import time

import pytest

from buzz_lm_eval.cli import main
from buzz_lm_eval.harness.hflm import check_parsed_model_args
from buzz_lm_eval.report import leaderboard

from ..conftest import lm_eval_cli


def refused(capsys, *argv: str) -> str:
    """stderr of a ``buzz-lm-eval`` command that must stop with exit code 2 before lm-eval runs."""
    assert main(["--model", "buzz_hf", "--tasks", "buzz_xsum_smoke", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("cache=buzz, budget=64", "' budget' have spaces around them"),
        ("cache=local,budget=1", "local: budget must be an integer >= 2, got 1"),
        ("cache=full,evict=after_prefill", "cache=full never evicts, so evict=after_prefill would have no effect"),
        ("cache=full,positions=original", "positions=original would have no effect"),
        ("cache=buzz,budget=64,batch_size=8", "batch_size (use --batch_size 8)"),
        ("pretrained=smollm2-135m-instruct,cache=buzz,budget=64", "models fetch smollm2-135m-instruct"),
    ],
)
def test_bad_model_args_are_named_before_lm_eval_starts(capsys, tmp_path, monkeypatch, model_args, message):
    monkeypatch.setenv("BUZZ_LM_EVAL_HOME", str(tmp_path))  # nothing fetched there
    assert message in refused(capsys, "--model_args", model_args)


def test_device_in_model_args_next_to_the_device_flag_is_named(capsys):
    err = refused(capsys, "--model_args", "cache=buzz,budget=64,device=cpu", "--device", "cpu")
    assert "device (use --device cpu)" in err


def test_an_output_path_that_cannot_be_written_is_named_before_anything_runs(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = refused(capsys, "--model_args", "cache=buzz,budget=64", "--output_path", str(blocker / "out"))
    assert "--output_path=" in err and "is a file, not a folder" in err


def test_a_huge_budget_is_checked_at_once():
    start = time.perf_counter()
    for cache in ("buzz", "buzz_fast", "buzz_nomax", "h2o", "pyramidkv"):
        check_parsed_model_args({"cache": cache, "budget": 10**9})
    assert time.perf_counter() - start < 10  # was 9.3 s per buzz policy at 1e8, minutes at 1e9


@pytest.mark.slow
def test_a_huge_budget_runs_like_the_full_cache_through_lm_eval(tmp_path):
    results = lm_eval_cli(tmp_path, "buzz_hf", "cache=buzz,budget=1000000000", "buzz_xsum_smoke")
    stats = results["config"]["buzz_cache"]
    assert stats["budget"] == 10**9 and stats["compression_ratio"] == pytest.approx(1.0)


def test_the_leaderboard_skips_deeply_nested_json(tmp_path, capsys):
    (tmp_path / "results_deep.json").write_text('{"results": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert leaderboard.main([str(tmp_path)]) == 1
    assert "results_deep.json: JSON nested too deeply to read" in capsys.readouterr().err
