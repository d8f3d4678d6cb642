"""``buzz-lm-eval sweep`` on the shipped stories260K model and the offline wikitext smoke task."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from buzz_lm_eval.report import leaderboard, sweep

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASK = "buzz_wikitext_smoke"
GRID = {"full": None, "streaming_b32": 32, "streaming_b64": 64, "buzz_b32": 32, "buzz_b64": 64}


def argv(output: Path, policies="full,streaming,buzz", budgets="32,64", tasks=TASK) -> list[str]:
    """A quick sweep command line: one document, 64-token scoring chunks."""
    return [
        "--policies",
        policies,
        "--budgets",
        budgets,
        "--tasks",
        tasks,
        "--limit",
        "1",
        "--score_chunk",
        "64",
        "--output",
        str(output),
    ]


def run_sweep(capsys, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sweep.main(args)``."""
    capsys.readouterr()
    code = sweep.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def results_of(run_dir: Path) -> dict:
    """The single results file of a run directory, parsed."""
    [path] = run_dir.glob("results_*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def mtimes(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time (ns)."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def no_model(**kwargs):
    raise AssertionError("the model must not be loaded")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One clean sweep over full + streaming/buzz at budgets 32 and 64: (output, code, stdout, stderr).

    capsys is function-scoped, so this module-wide fixture redirects the streams itself.
    """
    output = tmp_path_factory.mktemp("sweep") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep.main(argv(output))
    return output, code, out.getvalue(), err.getvalue()


@pytest.fixture
def copied(swept, tmp_path) -> Path:
    """A private copy of the sweep output (modification times kept) for tests that change it."""
    return Path(shutil.copytree(swept[0], tmp_path / "run"))


def test_sweep_writes_one_lm_eval_results_file_per_run(swept):
    output, code, out, err = swept
    assert code == 0, err
    assert sorted(p.name for p in output.iterdir()) == sorted(GRID)
    for name, budget in GRID.items():
        data = results_of(output / name)
        config, cache = data["config"], data["config"]["buzz_cache"]
        policy = name.split("_b")[0]
        assert (cache["policy"], cache["budget"]) == (policy, budget)
        assert config["model"] == "buzz_hf" and data["model_source"] == "buzz_hf"
        expected = f"cache={policy}" + ("" if budget is None else f",budget={budget}") + ",score_chunk=64"
        expected += "" if budget is None else ",positions=shifted"
        assert cache["positions"] == (None if budget is None else "shifted")
        assert config["model_args"].startswith("pretrained=") and config["model_args"].endswith(expected)
        assert data["results"][TASK]["word_perplexity,none"] > 0 and data["n-samples"][TASK]["effective"] == 1
        assert data["sweep"]["run"] == name
        assert data["sweep"]["command"].startswith("buzz-lm-eval sweep --policies full,streaming,buzz")
        assert data["sweep"]["hardware"]["torch"] == torch.__version__ and data["sweep"]["wall_seconds"] > 0
    assert not [p for p in output.rglob("*") if p.name.startswith(".")], "temp files left behind"
    assert sum(f"{name}: done in" in err for name in GRID) == len(GRID)
    assert "5/5" in err and f"buzz-lm-eval leaderboard {output}" in out


def test_evicting_runs_keep_fewer_tokens_than_full(swept):
    output = swept[0]
    full = results_of(output / "full")["config"]["buzz_cache"]
    for name in ("streaming_b32", "buzz_b32"):
        cache = results_of(output / name)["config"]["buzz_cache"]
        assert cache["kept_tokens_mean"] < full["kept_tokens_mean"] and cache["compression_ratio"] > 1


def test_rerun_skips_every_run_without_loading_the_model(copied, capsys, monkeypatch):
    before = mtimes(copied)
    monkeypatch.setattr(sweep, "load_model", no_model)
    code, out, err = run_sweep(capsys, argv(copied))
    assert code == 0, err
    assert mtimes(copied) == before
    assert all(f"{name}: skipped" in err for name in GRID)
    assert "0 new, 5 already there" in out


def test_resume_reruns_only_the_missing_run(copied, capsys):
    [lost] = (copied / "buzz_b64").glob("results_*.json")
    lost.unlink()
    before = mtimes(copied)
    code, _, err = run_sweep(capsys, argv(copied))
    assert code == 0, err
    after = mtimes(copied)
    assert {k: v for k, v in after.items() if k in before} == before
    [new] = set(after) - set(before)
    assert new.startswith("buzz_b64/results_")
    assert results_of(copied / "buzz_b64")["config"]["buzz_cache"]["budget"] == 64


def test_bad_policy_budget_and_task_are_named_and_the_rest_runs(tmp_path, capsys):
    output = tmp_path / "run"
    code, _, err = run_sweep(capsys, argv(output, "full,nosuch,buzz", "5,32", f"{TASK},nosuch_task"))
    assert code == 1
    assert "skipping unknown policy 'nosuch'" in err and err.count("'nosuch'") == 1
    assert "skipping buzz_b5: buzz: budget=5 is too small" in err
    assert "unknown task 'nosuch_task'" in err
    assert sorted(p.name for p in output.iterdir()) == ["buzz_b32", "full"]
    assert list(results_of(output / "buzz_b32")["results"]) == [TASK]


def test_nothing_valid_stops_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "load_model", no_model)
    code, _, err = run_sweep(capsys, argv(tmp_path / "a", policies="nosuch"))
    assert code == 1 and "no valid (policy, budget)" in err
    code, _, err = run_sweep(capsys, argv(tmp_path / "b", tasks="nosuch_task"))
    assert code == 1 and "no known task" in err
    assert not list(tmp_path.iterdir())


def test_cache_settings_in_model_args_are_refused(tmp_path, capsys):
    code, _, err = run_sweep(capsys, ["--model_args", "dtype=float32,budget=8,cache=h2o", *argv(tmp_path)])
    assert code == 2 and "must not set budget, cache" in err


def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path, capsys, monkeypatch):
    def fake_evaluate(lm, settings, run):
        if run.name == "streaming_b32":
            raise RuntimeError("out of memory\nwhile allocating 2 GiB")
        return {
            "results": {TASK: {"word_perplexity,none": 2.0}},
            "config": {"buzz_cache": {"compression_ratio": 3.0}},
        }, {}

    monkeypatch.setattr(sweep, "load_model", lambda kwargs: object())
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate)
    code, out, err = run_sweep(capsys, argv(tmp_path, "streaming,buzz", "32"))
    assert code == 1
    [line] = [line for line in err.splitlines() if "FAILED" in line]
    assert line == (
        "sweep: streaming_b32 FAILED (RuntimeError: out of memory); continuing (--verbose shows the traceback)"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "streaming_b32").exists()
    assert "word_perplexity=2" in err and results_of(tmp_path / "buzz_b32")["sweep"]["run"] == "buzz_b32"
    assert "1 of 2 runs have results" in out
    code, _, err = run_sweep(capsys, argv(tmp_path / "verbose", "streaming", "32") + ["--verbose"])
    assert code == 1 and "Traceback (most recent call last)" in err and "while allocating 2 GiB" in err


def test_leaderboard_reads_the_sweep_output(copied, capsys):
    assert leaderboard.main([str(copied)]) == 0
    rows = json.loads((copied / "leaderboard.json").read_text(encoding="utf-8"))["rows"]
    perplexity = [row for row in rows if row["metric"] == "word_perplexity"]
    assert sorted((r["policy"], r["budget"] or 0) for r in perplexity) == sorted(
        (name.split("_b")[0], budget or 0) for name, budget in GRID.items()
    )
    assert all(row["relative_quality"] is not None and row["model"] == "stories260K" for row in perplexity)


def test_results_of_other_settings_stop_the_sweep(copied, capsys, monkeypatch):
    """Another limit, other tasks or another cache setting into the same output: named, never reused."""
    before = mtimes(copied)
    monkeypatch.setattr(sweep, "load_model", no_model)
    code, _, err = run_sweep(capsys, [*argv(copied), "--limit", "2"])
    assert code == 2
    assert err.count("holds results of other settings: limit (1 there, 2 now)") == len(GRID)
    assert "stopped before loading the model" in err
    code, _, err = run_sweep(capsys, argv(copied, tasks=f"{TASK},buzz_xsum_smoke"))
    assert code == 2 and 'tasks (["buzz_wikitext_smoke"] there, ["buzz_wikitext_smoke", "buzz_xsum_smoke"] now)' in err
    code, _, err = run_sweep(capsys, [*argv(copied, policies="buzz", budgets="32"), "--score_chunk", "16"])
    assert code == 2
    assert "model_args.score_chunk (64 there, 16 now)" in err and "cache.score_chunk (64 there, 16 now)" in err
    assert mtimes(copied) == before


def test_a_changed_cache_default_is_noticed(copied, capsys, monkeypatch):
    [path] = (copied / "buzz_b32").glob("results_*.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    data["config"]["buzz_cache"]["stride"] = 3  # as if buzz's default stride had changed since
    path.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(sweep, "load_model", no_model)
    code, _, err = run_sweep(capsys, argv(copied))
    assert code == 2 and "buzz_b32 holds results of other settings: cache.stride (3 there, 5 now)" in err


def test_ctrl_c_stops_with_one_line_and_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(lm, settings, run):
        if run.name == "buzz_b32":
            raise KeyboardInterrupt
        return {"results": {TASK: {"word_perplexity,none": 2.0}}, "config": {"buzz_cache": {}}}, {}

    monkeypatch.setattr(sweep, "load_model", lambda kwargs: object())
    monkeypatch.setattr(sweep, "evaluate", interrupted)
    args = argv(tmp_path / "out", "streaming,buzz", "32")
    code, _, err = run_sweep(capsys, args)
    assert code == 130 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "interrupted" in line]
    assert (
        line
        == f"sweep: interrupted; runs with results: streaming_b32; resume with: buzz-lm-eval sweep {' '.join(args)}"
    )
    assert results_of(tmp_path / "out" / "streaming_b32") and not (tmp_path / "out" / "buzz_b32").exists()


def test_two_tasks_with_their_own_statistics_and_samples(tmp_path, capsys):
    """A sweep over a perplexity and a summarisation task: each leaderboard row carries its own
    task's cache statistics, and --log_samples puts lm-eval's samples files next to the results."""
    output = tmp_path / "run"
    args = [*argv(output, "buzz", "32", f"{TASK},buzz_xsum_smoke"), "--gen_kwargs", "max_gen_toks=4", "--log_samples"]
    code, _, err = run_sweep(capsys, args)
    assert code == 0, err
    [results] = (output / "buzz_b32").glob("results_*.json")
    date = results.name.removeprefix("results_").removesuffix(".json")
    assert sorted(p.name for p in (output / "buzz_b32").glob("samples_*")) == [
        f"samples_{TASK}_{date}.jsonl",
        f"samples_buzz_xsum_smoke_{date}.jsonl",
    ]
    [sample] = [
        json.loads(line)
        for line in (output / "buzz_b32" / f"samples_buzz_xsum_smoke_{date}.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    assert sample["doc_id"] == 0 and "gen_args_0" in sample["arguments"] and sample["resps"]
    data = json.loads(results.read_text(encoding="utf-8"))
    assert set(data["task_hashes"]) == {TASK, "buzz_xsum_smoke"} and "samples" not in data
    per_task = data["config"]["buzz_cache"]["per_task"]
    assert set(per_task[TASK]) == {"loglikelihood_rolling"} and set(per_task["buzz_xsum_smoke"]) == {"generate_until"}

    assert leaderboard.main([str(output)]) == 0
    rows = json.loads((output / "leaderboard.json").read_text(encoding="utf-8"))["rows"]
    wiki = next(row for row in rows if row["task"] == TASK)
    xsum = next(row for row in rows if row["task"] == "buzz_xsum_smoke")
    assert wiki["stats_scope"] == xsum["stats_scope"] == "task"
    # WikiText streams in score chunks of 64; XSum prefills in the default chunks of 32 // 4 = 8
    assert xsum["kept_tokens_peak"] <= 32 - 1 + 8 < wiki["kept_tokens_peak"] <= 32 - 1 + 64
    assert wiki["compression_ratio"] != pytest.approx(xsum["compression_ratio"])
    assert wiki["kept_tokens_peak"] == per_task[TASK]["loglikelihood_rolling"]["kept_tokens_peak"]

    code, _, err = run_sweep(capsys, args)  # resumes: same settings, samples there
    assert code == 0 and "buzz_b32: skipped" in err


def test_other_metadata_prompts_or_few_shot_are_never_reused(copied, capsys, monkeypatch):
    """Every setting that changes what a run computes decides resume, not only the cache."""
    monkeypatch.setattr(sweep, "load_model", no_model)
    for extra, named in (
        (["--metadata", '{"max_seq_lengths": [480]}'], 'metadata (null there, {"max_seq_lengths": [480]} now)'),
        (["--system_instruction", "Be brief."], 'system_instruction (null there, "Be brief." now)'),
        (["--num_fewshot", "2"], "num_fewshot (null there, 2 now)"),
    ):
        code, _, err = run_sweep(capsys, [*argv(copied), *extra])
        assert code == 2 and err.count(named) == len(GRID), err


def test_an_output_that_cannot_be_written_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "load_model", no_model)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_sweep(capsys, argv(blocker / "out"))
    assert code == 2 and "--output=" in err and "is a file, not a folder" in err


def test_a_run_saved_by_another_process_after_the_plan_is_kept_not_rerun(copied, capsys, monkeypatch):
    """Two sweeps into one folder: a run pending when this one was planned, but saved by the other
    before its turn, keeps the other's files (it was once rerun, its samples deleted as leftovers)."""
    stash = copied.parent / "stash"
    shutil.move(copied / "buzz_b64", stash)  # pending when this sweep is planned ...
    [theirs] = stash.glob("results_*.json")
    [lost] = (copied / "streaming_b64").glob("results_*.json")
    lost.unlink()
    real_evaluate = sweep.evaluate
    evaluated = []

    def meanwhile_another_process_saves_buzz_b64(lm, settings, run):
        evaluated.append(run.name)
        if run.name == "streaming_b64":  # ... and saved by the other process while this one works
            shutil.move(stash, copied / "buzz_b64")
        return real_evaluate(lm, settings, run)

    monkeypatch.setattr(sweep, "evaluate", meanwhile_another_process_saves_buzz_b64)
    code, out, err = run_sweep(capsys, argv(copied))
    assert code == 0, err
    assert evaluated == ["streaming_b64"]
    assert "buzz_b64: skipped, saved by another process since this sweep started" in err
    assert [p.name for p in (copied / "buzz_b64").glob("results_*.json")] == [theirs.name]
    assert "5 of 5 runs have results" in out


def test_the_log_line_names_the_length_a_ruler_run_scored_not_the_placeholder_of_one_it_left_out():
    results = {
        "results": {"niah_single_1": {"4096,none": -1, "4096_stderr,none": "N/A", "1024,none": 0.6}},
        "config": {"buzz_cache": {"compression_ratio": 2.5}},
    }
    assert sweep.headline(results) == "niah_single_1 1024=0.6, compression 2.50x"
