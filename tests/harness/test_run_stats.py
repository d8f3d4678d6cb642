"""Cache statistics per task and request type, their merging, and the ``stats_file`` side file."""

from __future__ import annotations

import json
import os

import pytest
from lm_eval.api.instance import Instance

from buzz_lm_eval.harness.hflm import BuzzHFLM
from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR
from buzz_lm_eval.harness.run_stats import STAT_KEYS, RunStats, combine

MODEL = str(DEFAULT_MODEL_DIR)
SHORT = "Tom had a dog."
LONG = "Once upon a time, there was a little girl named Lily. She loved to play in the park. " * 4


def request(kind: str, task: str, idx: int, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=(task, idx, 1))


def batch_stats(peak: int, ratio: float, rows: int = 1) -> dict:
    """One batch's ``cache.stats()`` as the cache reports it."""
    return {
        "tokens_seen": 100,
        "kept_tokens_peak": peak,
        "kept_tokens_mean": peak / 2,
        "kv_bytes_peak": peak * 10 * rows,
        "kv_bytes_mean": peak * 5 * rows,
        "compression_ratio": ratio,
        "evict_seconds": 0.1,
        "kept_tokens_peak_per_layer": [peak, peak // 2],
    }


def test_combine_equals_accumulating_together() -> None:
    batches = [(batch_stats(10, 4.0, 2), 2), (batch_stats(30, 2.0), 1), (batch_stats(20, 3.0, 3), 3)]
    together, first, second = RunStats(), RunStats(), RunStats()
    for i, (stats, rows) in enumerate(batches):
        together.add(stats, rows, 50 * rows, 0.5)
        (first if i == 0 else second).add(stats, rows, 50 * rows, 0.5)
    merged, expected = combine([first.summary(), second.summary()]), together.summary()
    assert merged.pop("kept_tokens_peak_per_layer") == expected.pop("kept_tokens_peak_per_layer") == [30, 15]
    assert merged == pytest.approx(expected)
    assert merged["kept_tokens_peak"] == 30 and merged["sequences"] == 6


def test_statistic_keys_cover_the_summary() -> None:
    assert set(RunStats().summary()) <= STAT_KEYS and {"per_task", "tokens_seen"} <= STAT_KEYS
    assert not {"policy", "budget", "sink", "prefill_chunk"} & STAT_KEYS


def test_statistics_are_recorded_per_task_and_request_type(tmp_path) -> None:
    """Requests of two tasks in one call (as lm-eval hands them): each task gets its own numbers,
    results keep their order, and the whole-run summary is the two combined."""
    stats_file = tmp_path / "stats.jsonl"
    lm = BuzzHFLM(
        pretrained=MODEL,
        device="cpu",
        batch_size=4,
        cache="streaming",
        budget=24,
        score_chunk=8,
        stats_file=str(stats_file),
    )
    mixed = [
        request("loglikelihood", "long", 0, LONG, " She was happy."),
        request("loglikelihood", "short", 1, SHORT, " It ran."),
        request("loglikelihood", "long", 2, LONG, " The end."),
    ]
    alone = BuzzHFLM(pretrained=MODEL, device="cpu", batch_size=4, cache="streaming", budget=24, score_chunk=8)
    expected = [alone.loglikelihood([r])[0][0] for r in mixed]
    assert [logprob for logprob, _ in lm.loglikelihood(mixed)] == pytest.approx(expected, abs=1e-4)
    lm.generate_until([request("generate_until", "short", 3, SHORT, {"max_gen_toks": 4})])

    cache = lm.get_model_info()["buzz_cache"]
    per_task = cache["per_task"]
    assert set(per_task) == {"long", "short"}
    assert set(per_task["short"]) == {"loglikelihood", "generate_until"}
    long_stats, short_stats = per_task["long"]["loglikelihood"], per_task["short"]["loglikelihood"]
    assert (long_stats["sequences"], short_stats["sequences"]) == (2, 1)
    assert long_stats["kept_tokens_peak"] == 24 - 1 + 8 > short_stats["kept_tokens_peak"]
    assert long_stats["compression_ratio"] > 2 > short_stats["compression_ratio"]
    every = [stats for kinds in per_task.values() for stats in kinds.values()]
    whole = {k: v for k, v in cache.items() if k in RunStats().summary()}
    combined = combine(every)
    assert combined.pop("kept_tokens_peak_per_layer") == whole.pop("kept_tokens_peak_per_layer")
    assert combined == pytest.approx(whole)

    lines = [json.loads(line) for line in stats_file.read_text(encoding="utf-8").splitlines()]
    assert [(line["task"], line["request_type"]) for line in lines] == [
        ("long", "loglikelihood"),
        ("short", "loglikelihood"),
        ("short", "generate_until"),
    ]
    first = lines[0]
    assert first["pid"] == os.getpid() and first["host"] and first["time"] > 0
    assert first["cache"]["policy"] == "streaming" and first["cache"]["budget"] == 24


def test_unwritable_stats_file_fails_before_the_model_loads(tmp_path) -> None:
    missing = tmp_path / "no_such_dir" / "stats.jsonl"
    with pytest.raises(ValueError, match=r"stats_file=.*no_such_dir.*cannot be written.*writable folder"):
        BuzzHFLM(pretrained="/nonexistent/model/dir", cache="buzz", budget=64, stats_file=str(missing))
