"""``buzz_hf`` with ``evict=``: log-likelihood compressed after the context, generation, settings, CLI."""

from __future__ import annotations

import pytest
import torch

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.harness.hflm import BuzzHFLM

from ..conftest import lm_eval_cli
from .test_hflm import STORY, buzz, requests


def by_hand(lm, context, continuation, chunk, **cache_args):
    """The continuation's log-probability through ``chunk``-token forwards; under after_prefill the
    context's forwards end at the context, which the cache compresses, then the continuation follows."""
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])[:, :-1]
    cache = build_cache(lm.model, prompt_length=len(context_ids), **cache_args)
    cut = len(context_ids) if cache_args["evict"] == "after_prefill" else 0
    parts = [*ids[:, :cut].split(chunk, 1), *ids[:, cut:].split(chunk, 1)] if cut else list(ids.split(chunk, 1))
    with torch.no_grad():
        logits = torch.cat([lm.model(input_ids=part, past_key_values=cache).logits for part in parts], 1)
    n = len(continuation_ids)
    target = torch.tensor(continuation_ids)
    return float(logits[0, -n:].log_softmax(-1).gather(-1, target[:, None]).sum())


def test_after_prefill_scores_the_continuation_on_the_compressed_context():
    lm = buzz(cache="snapkv", budget=24, score_chunk=8)
    assert lm.evict == "after_prefill"  # snapkv's published regime
    pairs = [(STORY, " She was happy."), ("Tom had a dog.", " The dog ran fast."), (STORY[:120], " Lily smiled.")]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        expected = by_hand(lm, context, continuation, 8, policy="snapkv", budget=24, evict="after_prefill")
        assert logprob == pytest.approx(expected, abs=1e-4)
    full = buzz(cache="full").loglikelihood(requests("loglikelihood", *pairs))
    assert got[0][0] != pytest.approx(full[0][0], abs=1e-3)  # a long context: compression changes the score
    assert got[1][0] == pytest.approx(full[1][0], abs=1e-4)  # a context under the budget: nothing evicted
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["evict"] == "after_prefill" and stats["batches"] == 3  # one batch per context length
    assert stats["observation"] == 11 and stats["heavy"] == 12


def test_every_forward_is_an_option_for_snapkv_and_after_prefill_for_h2o():
    every = buzz(cache="snapkv", budget=24, score_chunk=8, evict="every_forward")
    [(logprob, _)] = every.loglikelihood(requests("loglikelihood", (STORY, " She was happy.")))
    expected = by_hand(every, STORY, " She was happy.", 8, policy="snapkv", budget=24, evict="every_forward")
    assert logprob == pytest.approx(expected, abs=1e-4)
    h2o = buzz(cache="h2o", budget=24, evict="after_prefill", score_chunk=8)
    [(logprob, _)] = h2o.loglikelihood(requests("loglikelihood", (STORY, " She was happy.")))
    expected = by_hand(h2o, STORY, " She was happy.", 8, policy="h2o", budget=24, evict="after_prefill")
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert h2o.cache_settings()["evict"] == "after_prefill"
    assert buzz(cache="full").cache_settings()["evict"] is None


def test_generation_compresses_after_the_prompt_then_grows():
    lm = buzz(cache="tova", budget=20, evict="after_prefill")
    lm.generate_until(requests("generate_until", (STORY, {"until": ["\n\n"], "max_gen_toks": 12})))
    stats = lm.get_model_info()["buzz_cache"]
    prompt = len(lm.tok_encode(STORY))
    assert stats["kept_tokens_peak_per_layer"] == [prompt] * 5  # the prompt is read whole ...
    assert stats["kept_tokens_mean"] == (19 + 30) / 2  # ... then compressed to 19 and grown to 30 by 11 steps


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "snapkv", "evict": "once"}, "evict must be one of every_forward, after_prefill, got 'once'"),
        ({"cache": "snapkv", "kernel": 2}, "kernel must be odd"),
        ({"cache": "tova", "seed": 3}, "tova: unknown parameter.*seed.*valid: capacity, budget"),
    ],
)
def test_bad_regime_or_sizes_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuzzHFLM(pretrained="/nonexistent/model/dir", **kwargs)


def test_cli_runs_snapkv_on_the_qa_smoke_task(tmp_path):
    results = lm_eval_cli(tmp_path, "buzz_hf", "cache=snapkv,budget=64", "buzz_10qa_smoke")
    stats = results["config"]["buzz_cache"]
    assert stats["policy"] == "snapkv" and stats["evict"] == "after_prefill" and stats["budget"] == 64
    assert len(stats["kept_tokens_peak_per_layer"]) == 5 and stats["compression_ratio"] > 1
    assert all(isinstance(v["best_subspan_em,none"], float) for k, v in results["results"].items() if "gold" in k)
