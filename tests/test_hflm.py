"""``buzz_hf``: exactness against ``hf``, streaming under eviction, bad model_args, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import GPT2Config, LlamaConfig

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.hflm import BuzzHFLM
from buzz_lm_eval.paths import DEFAULT_MODEL_DIR

from . import conftest
from .conftest import lm_eval_cli

MODEL = str(DEFAULT_MODEL_DIR)
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 3


def requests(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def stock():
    return HFLM(pretrained=MODEL, device=conftest.DEVICE.type, batch_size=2)


def buzz(**kw):
    return BuzzHFLM(pretrained=MODEL, device=conftest.DEVICE.type, batch_size=2, **kw)


def test_full_cache_reproduces_hf_exactly(stock):
    full = buzz(cache="full")
    ll = requests("loglikelihood", (STORY, " She was happy."), ("Tom had a dog.", " The dog ran."))
    assert full.loglikelihood(ll) == stock.loglikelihood(ll)
    rolling = requests("loglikelihood_rolling", (STORY * 8,))
    assert full.loglikelihood_rolling(rolling) == stock.loglikelihood_rolling(rolling)
    gen = requests("generate_until", (STORY, {"until": ["\n\n"], "max_gen_toks": 30}), ("Tom had", {"max_gen_toks": 30}))
    assert full.generate_until(gen) == stock.generate_until(gen)
    info = full.get_model_info()["buzz_cache"]
    assert info["policy"] == "full" and info["compression_ratio"] == 1.0 and info["sequences"] > 0


def test_loglikelihood_is_streamed_through_the_evicting_cache():
    lm = buzz(cache="streaming", sink=4, window=16, score_chunk=1)
    context, continuation = STORY, " She was happy."
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    # the same stream by hand: token by token through a streaming cache
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + continuation_ids], device=lm.device)
    n_cont = len(continuation_ids)
    cache = build_cache(lm.model, "streaming", sink=4, window=16)
    with torch.no_grad():
        logits = torch.cat([lm.model(input_ids=t, past_key_values=cache).logits for t in ids[:, :-1].split(1, 1)], 1)
    expected = logits[0, -n_cont:].log_softmax(-1).gather(-1, ids[0, -n_cont:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)
    full_logprob = buzz(cache="full").loglikelihood(requests("loglikelihood", (context, continuation)))[0][0]
    assert logprob != pytest.approx(full_logprob, abs=1e-3)  # eviction changes the score
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["kept_tokens_peak"] <= 4 + 16 + 1 and stats["compression_ratio"] > 2


def test_rolling_document_is_one_stream_longer_than_the_context(stock):
    lm = buzz(cache="buzz", budget=64, score_chunk=32)
    document = STORY * 12
    n_tokens = len(lm.tok_encode(document))
    assert n_tokens > stock.max_length
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", (document,)))
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["batches"] == 1 and stats["tokens_processed"] == n_tokens  # one window, nothing cut
    assert stats["kept_tokens_peak"] <= 64 - 1 + 32


def test_generation_streams_long_prompts_when_prefill_is_chunked(stock):
    long_prompt = STORY * 12
    gen = requests("generate_until", (long_prompt, {"until": ["\n\n"], "max_gen_toks": 16}))
    lm = buzz(cache="buzz", budget=48, prefill_chunk=16)
    lm.generate_until(gen)
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["tokens_processed"] > stock.max_length  # the whole prompt, not truncated
    assert stats["kept_tokens_peak"] <= 48 - 1 + 16
    truncated = buzz(cache="buzz", budget=48)
    truncated.generate_until(gen)
    assert truncated.get_model_info()["buzz_cache"]["tokens_processed"] <= stock.max_length


def test_stats_file_gets_one_line_per_batch(tmp_path):
    path = tmp_path / "stats.jsonl"
    lm = buzz(cache="h2o", budget=32, stats_file=str(path))
    lm.generate_until(requests("generate_until", (STORY, {"max_gen_toks": 8}), ("Tom", {"max_gen_toks": 8})))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["rows"] == 2 and len(lines[0]["context_sha1"]) == 2
    assert lines[0]["policy"] == "h2o" and lines[0]["request_type"] == "generate_until"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "lru"}, "unknown cache policy 'lru'; valid policies: full, local, streaming, h2o, buzz"),
        ({"cache": "buzz", "heavy": 10}, "buzz: unknown parameter.*heavy.*valid: sink, window, threshold, stride, budget"),
        ({"cache": "buzz", "window": -3}, "window must be >= 1, got -3"),
        ({"cache": "h2o", "budget": 0}, "budget must be an integer >= 2, got 0"),
        ({"cache": "buzz", "budget": 6}, "budget=6 is too small"),
        ({"cache": "buzz", "prefill_chunk": 0}, "prefill_chunk must be a positive integer, got 0"),
        ({"cache": "buzz", "windw": 3}, "unknown model_args windw; buzz_hf keys: cache, budget, sink"),
        ({"cache": "buzz", "positions": "absolute"}, "positions must be one of shifted, original; got 'absolute'"),
    ],
)
def test_bad_model_args_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuzzHFLM(pretrained="/nonexistent/model/dir", **kwargs)  # never reaches the weights


def test_positions_reach_the_cache_and_the_results():
    shifted, original = buzz(cache="streaming", budget=24), buzz(cache="streaming", budget=24, positions="original")
    ll = requests("loglikelihood", (STORY * 2, " She was happy."))
    scores = {lm.positions: lm.loglikelihood(ll)[0][0] for lm in (shifted, original)}
    assert scores["shifted"] != pytest.approx(scores["original"], abs=1e-6)
    assert shifted.get_model_info()["buzz_cache"]["positions"] == "shifted"
    assert original.get_model_info()["buzz_cache"]["positions"] == "original"
    assert buzz(cache="full").get_model_info()["buzz_cache"]["positions"] is None


def test_length_dependent_rope_fails_from_its_config(tmp_path):
    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        BuzzHFLM(pretrained=str(tmp_path), cache="buzz", budget=64)


def test_unsupported_architecture_fails_from_its_config(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)  # a config, no weights at all
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        BuzzHFLM(pretrained=str(tmp_path), cache="buzz", budget=64)


# -- the installed console script ------------------------------------------------------------
def test_cli_runs_buzz_hf_and_records_cache_stats(tmp_path):
    results = lm_eval_cli(tmp_path, "buzz_hf", "cache=buzz,budget=64,score_chunk=16", "buzz_wikitext_smoke")
    stats = results["config"]["buzz_cache"]
    assert stats["policy"] == "buzz" and stats["budget"] == 64 and stats["window"] == 16
    assert stats["compression_ratio"] > 2 and stats["kept_tokens_peak"] <= 64 - 1 + 16
    assert stats["tokens_per_second"] > 0
    assert results["results"]["buzz_wikitext_smoke"]["word_perplexity,none"] > 1


def test_cli_full_cache_matches_stock_hf(tmp_path):
    ours = lm_eval_cli(tmp_path, "buzz_hf", "cache=full", "buzz_wikitext_smoke")
    stock = lm_eval_cli(tmp_path, "hf", "", "buzz_wikitext_smoke")
    assert ours["results"] == stock["results"]


def test_explicit_max_length_keeps_truncation_with_chunked_prefill():
    gen = requests("generate_until", (STORY * 12, {"until": ["\n\n"], "max_gen_toks": 16}))
    lm = buzz(cache="buzz", budget=48, prefill_chunk=16, max_length=200)
    lm.generate_until(gen)
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["tokens_processed"] <= 200 and stats["kept_tokens_peak"] <= 48 - 1 + 16
