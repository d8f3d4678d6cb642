"""More model families under the evicting cache: the same checks as Llama, Gemma 2's softcap, refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    GraniteConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
)

from buzz_lm_eval.cache import attention, build_cache
from buzz_lm_eval.cache.architectures import SUPPORTED_MODEL_TYPES, layer_windows

from ..conftest import TINY, eager_logits_and_probs
from .test_cache import EVICTING, assert_batch_matches_alone, assert_full_is_bit_exact, greedy, random_batch

ALTERNATING = ["sliding_attention", "full_attention"]
FAMILIES = {
    # Phi-4-mini uses the phi3 architecture with a partial rotary factor
    "phi3": lambda: Phi3Config(**TINY, pad_token_id=0, partial_rotary_factor=0.5),
    "olmo2": lambda: Olmo2Config(**TINY, pad_token_id=0),
    "granite": lambda: GraniteConfig(
        **TINY, attention_multiplier=0.2, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0
    ),
    "mixtral": lambda: MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, sliding_window=24),
    # a small cap so that softcapping changes the attention of these random weights
    "gemma2": lambda: Gemma2Config(
        **TINY,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=24,
        layer_types=ALTERNATING,
        attn_logit_softcapping=2.0,
        pad_token_id=0,
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        **TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=24, layer_types=ALTERNATING, pad_token_id=0
    ),
}


def family_config(arch: str):
    """The tiny config of ``arch``; a skip where this transformers cannot build that family's config."""
    try:
        return FAMILIES[arch]()
    except StrictDataclassFieldValidationError as exc:  # transformers 5.4's Olmo2Config rejects its defaults
        pytest.skip(f"transformers {transformers.__version__} cannot build a {arch} config: {exc}")


def family_model(arch: str, seed: int = 0):
    """A randomly initialised 2-layer decoder of ``arch`` (GQA), float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(arch), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def test_every_family_is_on_the_allow_list():
    assert set(FAMILIES) <= set(SUPPORTED_MODEL_TYPES)
    assert layer_windows(FAMILIES["gemma2"]()) == [24, None]
    assert layer_windows(FAMILIES["mixtral"]()) == [24, 24]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_full_policy_is_bit_exact(arch):
    assert_full_is_bit_exact(family_model(arch))


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("policy", EVICTING)
def test_padded_batch_matches_each_prompt_alone(arch, policy):
    assert_batch_matches_alone(family_model(arch), [37, 21, 30], policy=policy, budget=16)


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("policy", ["local", "streaming", "h2o", "buzz"])
def test_budget_bounds_every_layer(arch, policy):
    model = family_model(arch)
    batch = random_batch([60, 45], seed=5)
    budget, chunk = 24, 8
    chunked = build_cache(model, policy, budget=budget)
    greedy(model, batch, chunked, new=20, prefill_chunk_size=chunk)
    assert chunked.stats()["tokens_seen"] == 60 + 19
    assert chunked.stats()["kept_tokens_peak"] <= budget - 1 + chunk
    stepped = build_cache(model, policy, budget=budget)
    for part in batch["input_ids"][:1].split(1, dim=1):  # one token per forward: the budget itself
        model(input_ids=part, past_key_values=stepped)
    assert stepped.stats()["kept_tokens_peak"] <= budget
    assert all(layer.keys.shape[-2] < budget for layer in stepped.layers)


def test_gemma2_softcapped_scores_and_outputs_match_eager_attention():
    model = family_model("gemma2", seed=2)
    ids = random_batch([19])["input_ids"]
    cache = build_cache(model, "h2o", heavy=100, recent=100)  # prepares the model; nothing evicted
    logits = model(input_ids=ids, past_key_values=cache).logits
    eager, attentions = eager_logits_and_probs(model, ids)
    assert torch.allclose(logits, eager, atol=1e-5)
    for layer, probs in zip(cache.layers, attentions, strict=True):
        expected = probs.sum(dim=2).view(1, 2, 2, 19).sum(dim=2)  # query heads i//2 -> KV head
        assert torch.allclose(layer.state.scores, expected, atol=1e-5)
    # the cap matters for these weights: without it, the scores differ
    query, key = torch.randn(1, 4, 19, 16) * 4, torch.randn(1, 2, 19, 16) * 4
    value = torch.randn(1, 2, 19, 16)
    capped = attention.attention_with_scores(query, key, value, None, 0.25, softcap=2.0)[1]
    assert not torch.allclose(capped, attention.attention_with_scores(query, key, value, None, 0.25)[1], atol=1e-2)


def test_softcapped_attention_matches_a_direct_computation_with_padding():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 5, 16) * 3, torch.randn(2, 2, 9, 16) * 3, torch.randn(2, 2, 9, 16)
    visible = torch.ones(9, 9, dtype=torch.bool).tril()[4:].expand(2, 1, 5, 9).clone()
    visible[1, :, :, :3] = False  # a left-padded row
    output, scores = attention.attention_with_scores(query, key, value, visible, 0.25, softcap=3.0)
    logits = torch.tanh(query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.25 / 3.0) * 3.0
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    assert torch.allclose(output, (probs @ value.repeat_interleave(2, 1)).transpose(1, 2), atol=1e-6)
    assert torch.allclose(scores, probs.sum(2).view(2, 2, 2, 9).sum(2), atol=1e-6)
    assert float(scores[1, :, :3].abs().max()) == 0.0
    causal = attention.attention_with_scores(query, key, value, None, 0.25, softcap=3.0)
    assert torch.allclose(causal[0][0], output[0], atol=1e-6)


def test_gemma2_decodes_under_eviction_with_softcap():
    model = family_model("gemma2")
    batch = random_batch([50])
    cache = build_cache(model, "buzz", budget=20)
    out = greedy(model, batch, cache, new=10)
    assert out.shape == (1, 60) and cache.stats()["tokens_seen"] == 59
    assert all(layer.evicted for layer in cache.layers)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda: GptOssConfig(**TINY, num_local_experts=4, num_experts_per_tok=2), "sink logits"),
        (lambda: DeepseekV2Config(num_hidden_layers=2), "latent"),
        (lambda: DeepseekV3Config(num_hidden_layers=2), "latent"),
    ],
)
def test_silently_wrong_families_are_refused_with_the_reason(config, reason):
    config = config()
    with pytest.raises(ValueError, match=rf"refuses model type '{config.model_type}':.*{reason}.*supported: llama"):
        layer_windows(config)
