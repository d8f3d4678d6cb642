"""The cache under both eviction regimes, on tiny models: padding, bounds, signals, per-layer budgets."""

from __future__ import annotations

import pytest
import torch

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.policies import build_policy
from buzz_lm_eval.policies.snapkv import SnapKVPolicy

from ..conftest import eager_logits_and_probs, tiny_model
from .test_cache import assert_batch_matches_alone, greedy, random_batch

NEW = ("snapkv", "pyramidkv", "tova", "knorm", "random")
OTHER_REGIME = {
    name: "every_forward" if build_policy(name).default_evict == "after_prefill" else "after_prefill"
    for name in (*NEW, "h2o", "buzz", "streaming")
}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", sorted(OTHER_REGIME))
def test_padded_batch_matches_alone_in_the_other_regime(arch, policy):
    """The default regimes are covered by test_cache; here each policy's other one."""
    lengths = [37, 21, 30]
    assert_batch_matches_alone(
        tiny_model(arch),
        lengths,
        policy=policy,
        budget=16,
        evict=OTHER_REGIME[policy],
        prompt_length=max(lengths),
        alone_args=lambda n: {"prompt_length": n},
    )


@pytest.mark.parametrize("policy", [*NEW, "h2o", "buzz", "streaming"])
def test_after_prefill_compresses_once_then_grows_by_one_per_token(policy):
    model = tiny_model("llama", seed=1)
    ids = random_batch([50])["input_ids"]
    budget, chunk = 16, 12
    cache = build_cache(model, policy, budget=budget, evict="after_prefill", prompt_length=40)
    for part in ids[:, :40].split(chunk, dim=1):  # the prompt in chunks: no eviction before its end
        model(input_ids=part, past_key_values=cache)
        if cache.get_seq_length() < 40:
            assert [layer.stored() for layer in cache.layers] == [cache.get_seq_length()] * 2
    after = [layer.stored() for layer in cache.layers]
    bounds = cache.policy.layer_budgets(2) if policy == "pyramidkv" else [budget] * 2  # each layer's own
    assert all(size <= bound - 1 for size, bound in zip(after, bounds, strict=True)), after
    for step, token in enumerate(ids[0, 40:], start=1):
        model(input_ids=token.view(1, 1), past_key_values=cache)
        assert [layer.stored() for layer in cache.layers] == [size + step for size in after]
    stats = cache.stats()
    assert stats["kept_tokens_peak_per_layer"] == [40, 40] and stats["tokens_seen"] == 50  # the prompt


def test_after_prefill_accumulates_scores_over_prefill_chunks():
    """h2o compressing after a chunked prompt keeps what it keeps after the same prompt in one forward."""
    model = tiny_model("llama", seed=2)
    ids = random_batch([49])["input_ids"]
    whole = build_cache(model, "h2o", budget=20, evict="after_prefill")
    model(input_ids=ids[:, :48], past_key_values=whole)
    chunked = build_cache(model, "h2o", budget=20, evict="after_prefill", prompt_length=48)
    for part in ids[:, :48].split(10, dim=1):
        model(input_ids=part, past_key_values=chunked)
    for cache in (whole, chunked):  # without a prompt length, the first one-token forward ends the prompt
        model(input_ids=ids[:, 48:49], past_key_values=cache)
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        assert torch.equal(a.kept()[2], b.kept()[2])
        assert torch.allclose(a.state.scores, b.state.scores, atol=1e-5)


def test_every_forward_pyramid_holds_each_layer_to_its_own_budget():
    model = tiny_model("llama")
    policy = build_policy("pyramidkv", budget=24, observation=4, beta=4)
    budgets = policy.layer_budgets(2)
    assert budgets == [39, 9]  # mean heavy 19: 38 - 19/4 and 19/4, floored, the spare token to layer 0
    cache = build_cache(model, policy, evict="every_forward")
    greedy(model, random_batch([8]), cache, new=40)
    assert cache.stats()["kept_tokens_peak_per_layer"] == budgets
    assert [layer.stored() for layer in cache.layers] == [b - 1 for b in budgets]


def test_knorm_keeps_the_lowest_key_norms_of_the_prompt():
    model = tiny_model("llama", seed=3)
    ids = random_batch([31])["input_ids"]
    reference = build_cache(model, "full")
    model(input_ids=ids[:, :30], past_key_values=reference)
    cache = build_cache(model, "knorm", capacity=10, positions="original")
    model(input_ids=ids[:, :30], past_key_values=cache)
    model(input_ids=ids[:, 30:], past_key_values=cache)  # the first one-token forward: the prompt is compressed
    for full, layer in zip(reference.layers, cache.layers, strict=True):
        norms = full.keys.float().norm(dim=-1)[0]  # [H_kv, 30]
        expected = norms.argsort(dim=-1, stable=True)[:, :10].sort(dim=-1).values
        kept = layer.kept()[2][0]
        assert torch.equal(kept[:, :10], expected) and bool((kept[:, 10] == 30).all())
        assert layer.key_norms is None  # compressed for good: no norm is measured or kept any more


class RecordingSnapKV(SnapKVPolicy):
    """SnapKV that records the scores the cache hands it."""

    seen: list = []

    def step(self, state, attn=None, mask=None, **kw):
        self.seen.append(attn)
        return super().step(state, attn, mask, **kw)


def test_query_window_scores_are_the_last_queries_attention():
    model = tiny_model("llama", seed=2)
    ids = random_batch([19])["input_ids"]
    policy = RecordingSnapKV(heavy=100, observation=4)
    policy.seen = []
    # after_prefill (snapkv's own regime) steps once this prompt is in, each layer on its attention
    model(input_ids=ids, past_key_values=build_cache(model, policy, prompt_length=ids.shape[1]))
    _, attentions = eager_logits_and_probs(model, ids)
    for captured, probs in zip(policy.seen, attentions, strict=True):  # one step per layer
        expected = probs[:, :, -4:].sum(dim=2).view(1, 2, 2, 19).sum(dim=2)  # last 4 queries, heads i//2 -> KV
        assert torch.allclose(captured[:, :, 0], expected, atol=1e-5)


def test_probabilities_are_computed_only_when_a_policy_uses_them(attention_calls):
    calls = attention_calls
    model = tiny_model("llama")
    batch = random_batch([30])
    for policy in ("knorm", "random"):
        for evict in ("every_forward", "after_prefill"):
            greedy(model, batch, build_cache(model, policy, budget=12, evict=evict), new=3)
    assert calls == []
    greedy(model, batch, build_cache(model, "tova", budget=12, evict="after_prefill"), new=3)
    assert calls == [30, 30]  # the prefill only (two layers): decode steps after it need none


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"evict": "sometimes"}, "evict must be one of every_forward, after_prefill, got 'sometimes'"),
        ({"evict": "after_prefill", "prompt_length": 0}, "prompt_length must be a positive integer, got 0"),
    ],
)
def test_bad_regime_is_named_before_the_model_is_touched(kwargs, message):
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=message):
        build_cache(model, "snapkv", budget=64, **kwargs)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("policy", [*NEW, "h2o", "buzz"])
def test_after_prefill_compresses_a_chunked_prompt_with_or_without_its_length(policy):
    """``generate(prefill_chunk_size=...)`` without ``prompt_length``: the first one-token forward
    ends the prefill, so the whole prompt is compressed, exactly as with the length given."""
    model = tiny_model("llama", seed=3)
    ids = random_batch([100, 100])["input_ids"]
    outputs, kept = [], []
    for prompt_length in (None, 100):
        cache = build_cache(model, policy, budget=16, evict="after_prefill", prompt_length=prompt_length)
        outputs.append(
            model.generate(
                ids, past_key_values=cache, max_new_tokens=6, do_sample=False, prefill_chunk_size=32, pad_token_id=0
            )
        )
        kept.append([layer.kept()[2] for layer in cache.layers])
        stats = cache.stats()
        assert stats["prompt_tokens_compressed"] == 100 and stats["kept_tokens_after_compression"] < 100
        assert stats["tokens_seen"] == 105  # compressed once, then the 5 decoded tokens were added
        assert [layer.stored() for layer in cache.layers] == [
            layer.stats.compressed_tokens + 5 for layer in cache.layers
        ]
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


@pytest.mark.parametrize("prompt_length, message", [(150, "ended before it"), (50, "past it")])
def test_a_prompt_length_that_disagrees_with_the_prompt_is_an_error(prompt_length, message):
    model = tiny_model("llama", seed=3)
    ids = random_batch([100])["input_ids"]
    cache = build_cache(model, "snapkv", budget=16, evict="after_prefill", prompt_length=prompt_length)
    with pytest.raises(ValueError, match=f"prompt_length={prompt_length} disagrees with the prompt: .*{message}"):
        model.generate(
            ids, past_key_values=cache, max_new_tokens=6, do_sample=False, prefill_chunk_size=32, pad_token_id=0
        )
