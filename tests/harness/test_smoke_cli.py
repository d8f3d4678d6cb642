"""The whole ``buzz_smoke`` group through the installed ``lm_eval`` script, per cache policy."""

from __future__ import annotations

import pytest

from ..conftest import CACHE_STATS, lm_eval_cli
from .test_tasks import METRICS

STATS = (*CACHE_STATS, "tokens_per_second")


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["full", "streaming", "h2o", "buzz"])
def test_buzz_smoke_group_reports_every_metric_and_the_cache(tmp_path, cache):
    model_args = "cache=full" if cache == "full" else f"cache={cache},budget=64,prefill_chunk=64"
    results = lm_eval_cli(tmp_path, "buzz_hf", model_args, "buzz_smoke")
    for task, metrics in METRICS.items():
        for metric in metrics:
            value = results["results"][task][f"{metric},none"]
            assert isinstance(value, float) and value == value, (task, metric)  # a number, not NaN
    stats = results["config"]["buzz_cache"]
    assert stats["policy"] == cache and all(isinstance(stats[k], (int, float)) for k in STATS)
    if cache == "full":
        assert stats["compression_ratio"] == 1.0
    else:
        assert stats["budget"] == 64 and stats["kept_tokens_peak"] <= 64 - 1 + 64
        assert stats["compression_ratio"] > 4  # the smoke documents are far longer than the budget
