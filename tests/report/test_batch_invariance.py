"""The batch size never changes a result: a sweep of every policy gives the same samples and metrics
at batch sizes 1 and 8 on summarisation, WikiText streams (log-likelihood) give the same perplexity
at 1 and 3, and the stock ``lm_eval`` CLI generates the same at 1 and 3 or 8 on summaries and QA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buzz_lm_eval.policies import POLICY_NAMES

from ..conftest import run_lm_eval

TASKS = "buzz_xsum_smoke"


def sweep(
    tmp_path: Path, batch_size: int, tasks: str = TASKS, policies=POLICY_NAMES, limit: int = 4, score_chunk: int = 128
) -> Path:
    """One sweep of ``policies`` at budget 64 on the shipped model, with samples (``limit`` documents per
    task, 24 new tokens each)."""
    out = tmp_path / f"{tasks}-bs{batch_size}"
    script = Path(sys.executable).with_name("buzz-lm-eval")
    cmd = [
        str(script),
        "sweep",
        "--model_args",
        f"batch_size={batch_size},device=cpu",
        "--policies",
        ",".join(policies),
        "--budgets",
        "64",
        "--tasks",
        tasks,
        "--limit",
        str(limit),
        "--gen_kwargs",
        "max_gen_toks=24",
        "--score_chunk",
        str(score_chunk),
        "--log_samples",
        "--output",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def outcomes(out: Path) -> dict:
    """Per run: every task's metrics and every sample's responses and filtered answers."""
    found = {}
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        [results] = run_dir.glob("results_*.json")
        metrics = json.loads(results.read_text())["results"]
        samples = {}
        for path in sorted(run_dir.glob("samples_*.jsonl")):
            task = path.name.split("_20")[0]
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            samples[task] = sorted(
                (row["doc_id"], json.dumps(row["resps"]), json.dumps(row["filtered_resps"])) for row in rows
            )
        found[run_dir.name] = (metrics, samples)
    return found


@pytest.mark.slow
def test_a_sweep_of_every_policy_gives_the_same_results_at_batch_sizes_1_and_8(tmp_path):
    reference = outcomes(sweep(tmp_path, 1))
    assert len(reference) == len(POLICY_NAMES)  # full runs once, each other policy at budget 64
    other = outcomes(sweep(tmp_path, 8))
    assert other.keys() == reference.keys()
    for run, (metrics, samples) in reference.items():
        assert other[run][1] == samples, run
        assert other[run][0] == metrics, run


@pytest.mark.slow
def test_log_likelihood_streams_give_the_same_perplexity_at_batch_sizes_1_and_3(tmp_path):
    """Two WikiText articles (about 33,000 tokens each) streamed whole through evicting caches,
    right-padded in one batch or scored one by one. (Uncompressed 33k-token streams, such as the
    full cache's, differ in the last bits between batch shapes: float arithmetic, not eviction.)"""
    policies = ("h2o", "buzz")
    reference = outcomes(sweep(tmp_path, 1, "buzz_wikitext_smoke", policies, limit=2, score_chunk=512))
    other = outcomes(sweep(tmp_path, 3, "buzz_wikitext_smoke", policies, limit=2, score_chunk=512))
    assert other == reference and len(reference) == len(policies)


def generations(tmp_path: Path, batch_size: int, cache_args: str, task: str) -> list:
    path, _ = run_lm_eval(
        tmp_path / str(batch_size),
        "buzz_hf",
        cache_args,
        task,
        limit=4,
        extra=("--batch_size", str(batch_size), "--log_samples"),
    )
    [samples] = path.parent.glob("samples_*.jsonl")
    return sorted((row["doc_id"], row["resps"]) for row in map(json.loads, samples.read_text().splitlines()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "cache_args, task, batch_size",
    [
        ("cache=buzz,budget=64", "buzz_xsum_smoke", 3),  # batches of 3 + 1
        ("cache=h2o,budget=256", "buzz_10qa_smoke_gold4", 8),
        ("cache=random,budget=64,evict=every_forward,prefill_chunk=24", "buzz_xsum_smoke", 8),
    ],
)
def test_the_lm_eval_cli_generates_the_same_at_batch_1_and_more(tmp_path, cache_args, task, batch_size):
    assert generations(tmp_path, 1, cache_args, task) == generations(tmp_path, batch_size, cache_args, task)
