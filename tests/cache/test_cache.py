"""The evicting cache on real forwards: exactness, padding, chunked prefill, scores, statistics."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from buzz_lm_eval.cache import attention, build_cache
from buzz_lm_eval.policies import POLICY_NAMES

from ..conftest import CACHE_STATS, CONFIGS, eager_logits_and_probs, on_device, tiny_model

EVICTING = [name for name in POLICY_NAMES if name != "full"]
STORY = (
    "Once upon a time, there was a little dog named Max. Max liked to run in the big green park "
    "with his friend Tom. One day, Tom found a shiny red ball under a tree. "
)


def greedy(model, inputs, cache=None, new=24, **kw):
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    return model.generate(**inputs, past_key_values=cache, max_new_tokens=new, do_sample=False, **kw)


def random_batch(lengths, vocab=128, seed=0):
    """Left-padded random prompts (token 0 pads) with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return {"input_ids": on_device(ids), "attention_mask": on_device(mask)}


def assert_full_is_bit_exact(model):
    """``full`` through build_cache gives exactly the tokens and logits of running without it."""
    batch = random_batch([40, 29, 35])
    reference = greedy(model, batch)
    assert torch.equal(greedy(model, batch, build_cache(model, "full")), reference)
    ids = batch["input_ids"][:1]
    plain = model(input_ids=ids).logits
    cached = model(input_ids=ids, past_key_values=build_cache(model, "full")).logits
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_full_policy_is_bit_exact(arch):
    assert_full_is_bit_exact(tiny_model(arch))


def test_full_policy_leaves_the_models_own_attention_alone():
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")
    batch = random_batch([33, 20])
    reference = greedy(model, batch)
    assert torch.equal(greedy(model, batch, build_cache(model, "full")), reference)
    assert model.config._attn_implementation == "eager"


def assert_batch_matches_alone(model, lengths, new=30, seed=3, generate=None, alone_args=None, **cache_args):
    """Greedy tokens of a left-padded batch equal each prompt run alone, row by row.

    ``alone_args(n)`` adds cache arguments for a prompt of n tokens run alone (e.g. its prompt length).
    """
    batch = random_batch(lengths, seed=seed)
    generate = generate or {}
    together = greedy(model, batch, build_cache(model, **cache_args), new=new, **generate)
    for row, n in enumerate(lengths):
        alone = {k: v[row : row + 1, -n:] for k, v in batch.items()}
        extra = alone_args(n) if alone_args else {}
        single = greedy(model, alone, build_cache(model, **{**cache_args, **extra}), new=new, **generate)
        assert torch.equal(single[0, n:], together[row, -new:]), f"row {row}"


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("policy", EVICTING)
def test_padded_batch_matches_each_prompt_alone(arch, policy):
    assert_batch_matches_alone(tiny_model(arch), [37, 21, 30], policy=policy, budget=16)


@pytest.mark.parametrize("policy", EVICTING)
def test_real_model_padded_batch_matches_alone(stories, policy):
    model, tokenizer = stories
    prompts = [STORY, "Lily had a red ball.", STORY[:90]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = greedy(model, batch, build_cache(model, policy, budget=24), new=40)
    for row, prompt in enumerate(prompts):
        single = greedy(model, tokenizer([prompt], return_tensors="pt"), build_cache(model, policy, budget=24), new=40)
        assert torch.equal(single[0, -40:], together[row, -40:])


@pytest.mark.parametrize("policy", EVICTING)
def test_chunked_prefill_bounds_memory_by_budget_plus_chunk(stories, policy):
    model, tokenizer = stories
    inputs = tokenizer([STORY * 3], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    budget, chunk = 32, 8
    cache = build_cache(model, policy, budget=budget, evict="every_forward")
    greedy(model, inputs, cache, new=20, prefill_chunk_size=chunk)
    stats = cache.stats()
    assert prompt_len > 4 * budget
    assert stats["tokens_seen"] == prompt_len + 19
    budgets = (
        [layer.policy.heavy + layer.policy.observation + 1 for layer in cache.layers]
        if policy == "pyramidkv"
        else [budget] * len(cache.layers)
    )  # pyramidkv: each layer's own budget
    assert all(p <= b - 1 + chunk for p, b in zip(stats["kept_tokens_peak_per_layer"], budgets, strict=True))
    assert stats["compression_ratio"] > 3


def test_buzz_keeps_sinks_and_window_at_their_original_positions(stories):
    model, tokenizer = stories
    inputs = tokenizer([STORY * 2], return_tensors="pt")
    cache = build_cache(model, "buzz", sink=4, window=8, threshold=20, stride=5, positions="original")
    out = greedy(model, inputs, cache, new=30)
    seen = out.shape[1] - 1
    for layer in cache.layers:
        assert layer.seen == seen
        positions = layer.kept()[2][0]
        assert positions[:, :4].tolist() == [[0, 1, 2, 3]] * 4
        assert positions[:, -8:].tolist() == [list(range(seen - 8, seen))] * 4
        assert bool((positions.diff(dim=-1) > 0).all())  # original order kept
        assert layer.keys.shape[-2] <= 4 + 8 + 20 + 1


def test_plain_forwards_evict_and_continue_positions():
    model = tiny_model("llama", seed=4)
    model.model.layers = model.model.layers[:1]  # one layer: cached keys depend on token and position only
    model.config.num_hidden_layers = 1
    ids = random_batch([41])["input_ids"]
    cache = build_cache(model, "streaming", sink=2, window=6, positions="original")
    for part in ids[:, :-1].split(5, dim=1):
        model(input_ids=part, past_key_values=cache)
    assert cache.get_seq_length() == 40 and cache.layers[0].keys.shape[-2] == 8
    last = model(input_ids=ids[:, -1:], past_key_values=cache).logits[:, -1]
    # the same token attending to exactly the kept tokens at their original positions
    kept = torch.cat([ids[:, :2], ids[:, -7:]], dim=1)
    positions = on_device(torch.cat([torch.arange(2), torch.arange(34, 41)]).unsqueeze(0))
    direct = model(input_ids=kept, position_ids=positions).logits[:, -1]
    assert torch.allclose(last, direct, atol=1e-5)


def test_captured_scores_equal_eager_attention_summed_over_groups():
    model = tiny_model("llama", seed=2)
    ids = random_batch([19])["input_ids"]
    cache = build_cache(model, "h2o", heavy=100, recent=100)
    model(input_ids=ids, past_key_values=cache)
    _, attentions = eager_logits_and_probs(model, ids)
    for layer, probs in zip(cache.layers, attentions, strict=True):
        expected = probs.sum(dim=2).view(1, 2, 2, 19).sum(dim=2)  # query heads i//2 -> KV head
        assert torch.allclose(layer.state.scores, expected, atol=1e-5)


def test_policies_without_scores_compute_none(attention_calls):
    calls = attention_calls
    model = tiny_model("llama")
    batch = random_batch([30])
    for policy in ("full", "local", "streaming", "buzz_nomax"):
        greedy(model, batch, build_cache(model, policy, **({} if policy == "full" else {"budget": 12})))
    assert calls == []
    greedy(model, batch, build_cache(model, "buzz", budget=12), new=2)
    # one pass per layer and forward gives output and scores: the prompt, then one decode step
    assert calls == [30, 30, 1, 1]


@pytest.mark.parametrize("q_len", [1, 5])
def test_one_pass_attention_matches_sdpa_and_softmax_probabilities(q_len):
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    causal = torch.ones(q_len, 9, dtype=torch.bool).tril(diagonal=9 - q_len)
    visible = causal.expand(2, 2, q_len, 9).clone()
    visible[1, :, :, :3] = False  # a padded row
    out, scores = attention.attention_with_scores(query, key, value, visible, 0.25)
    wide = visible.repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(2, 1),
        value.repeat_interleave(2, 1),
        attn_mask=wide,
        scale=0.25,
    )
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    logits = (query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~wide, float("-inf"))
    probs = logits.softmax(-1).sum(dim=2).view(2, 2, 2, 9).sum(dim=2)  # query heads i//2 -> KV head
    assert torch.allclose(scores, probs, atol=1e-6)
    assert float(scores[1, :, :3].abs().max()) == 0.0


def test_stats_report_the_contract_keys(stories):
    model, tokenizer = stories
    inputs = tokenizer([STORY], return_tensors="pt")
    full, buzz = build_cache(model, "full"), build_cache(model, "buzz", budget=20)
    greedy(model, inputs, full, new=30)
    greedy(model, inputs, buzz, new=30)
    keys = {"tokens_seen", *CACHE_STATS}
    for stats in (full.stats(), buzz.stats()):
        assert keys <= set(stats) and all(isinstance(stats[k], (int, float)) for k in keys)
    assert full.stats()["compression_ratio"] == 1.0
    per_token = 2 * 5 * 4 * 8 * 4  # K+V x layers x KV heads x head_dim x float32
    assert full.stats()["kv_bytes_peak"] == full.stats()["tokens_seen"] * per_token
    assert buzz.stats()["kv_bytes_peak"] < full.stats()["kv_bytes_peak"]
    assert buzz.stats()["kept_tokens_mean"] < buzz.stats()["kept_tokens_peak"] <= inputs["input_ids"].shape[1]


def test_unsupported_architecture_is_named_before_any_work():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2'.*supported: llama, mistral, qwen2"):
        build_cache(model, "buzz", budget=64)
    assert model.config._attn_implementation != attention.ATTN_IMPLEMENTATION


def test_bad_policy_fails_before_the_model_is_touched():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="unknown cache policy"):
        build_cache(model, "lru")
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("policy", ["buzz", "h2o"])
def test_half_precision_and_beam_search_run_under_eviction(policy):
    model = tiny_model("llama").to(torch.bfloat16)
    batch = random_batch([30, 18])
    cache = build_cache(model, policy, budget=16)
    out = greedy(model, batch, cache, new=20, prefill_chunk_size=8)
    assert out.shape == (2, 30 + 20) and cache.stats()["kept_tokens_peak"] <= 16 - 1 + 8
    assert cache.layers[0].keys.dtype == torch.bfloat16
    beams = build_cache(model, policy, budget=16)
    out = greedy(model, batch, beams, new=10, num_beams=3)
    assert out.shape == (2, 40) and beams.layers[0].keys.shape[0] == 6  # rows reordered per beam
