"""RoPE positions of kept tokens (``shifted`` vs ``original``) and the budget guarantee."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.cache.positions import evicted_after

from .. import conftest
from ..conftest import TINY, on_device, tiny_model
from .test_cache import assert_batch_matches_alone, greedy, random_batch

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}


def one_layer_llama(rope: dict, seed: int = 0):
    """A one-layer random Llama: its cached keys depend only on each token and its position."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 1}, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(conftest.DEVICE).eval()
    model.generation_config.eos_token_id = None
    return model


def direct_keys(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer-0 keys of ``ids`` rotated directly at ``positions`` (a plain cache, no eviction)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, position_ids=positions, past_key_values=cache)
    return cache.layers[0].keys


def stream(model, ids: torch.Tensor, cache, chunk: int):
    """Feed ``ids`` through ``cache`` in chunks; the logits of the last forward."""
    with torch.no_grad():
        for part in ids.split(chunk, dim=1):
            logits = model(input_ids=part, past_key_values=cache).logits
    return logits


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize(
    "policy, args",
    [
        ("streaming", {"sink": 3, "window": 9}),
        ("h2o", {"heavy": 6, "recent": 5}),
        ("buzz", {"sink": 2, "window": 4, "threshold": 8, "stride": 3}),
    ],
)
def test_shifted_keys_equal_keys_rotated_at_the_contiguous_positions(rope, policy, args):
    model = one_layer_llama(ROPES[rope])
    ids = random_batch([47], seed=5)["input_ids"]
    cache = build_cache(model, policy, positions="shifted", **args)
    stream(model, ids, cache, chunk=3)
    layer = cache.layers[0]
    kept_tokens = layer.stored()
    evicted = 47 - kept_tokens
    assert evicted > 0
    # which original tokens each KV head kept: recover them from a run with original positions
    reference = build_cache(model, policy, positions="original", **args)
    stream(model, ids, reference, chunk=3)
    original = reference.layers[0].kept()[2][0]
    for head in range(2):
        kept_ids = ids[:, original[head]]
        expected = direct_keys(model, kept_ids, on_device(torch.arange(evicted, 47)).unsqueeze(0))[0, head]
        assert torch.allclose(layer.kept()[0][0, head], expected, atol=1e-5), f"head {head}"
    assert layer.kept()[2][0].tolist() == [list(range(evicted, 47))] * 2


@pytest.mark.parametrize("rope", list(ROPES))
def test_shifted_logits_follow_the_authors_rule(rope):
    """After eviction the next token scores as if the kept tokens were contiguous from position 0."""
    model = one_layer_llama(ROPES[rope], seed=1)
    ids = random_batch([41], seed=2)["input_ids"]
    cache = build_cache(model, "streaming", sink=2, window=6)  # shifted is the default
    assert cache.positions == "shifted"
    stream(model, ids[:, :-1], cache, chunk=5)
    last = stream(model, ids[:, -1:], cache, chunk=1)[:, -1]
    kept = torch.cat([ids[:, :2], ids[:, -7:]], dim=1)  # 2 sinks + window 6 + the new token
    with torch.no_grad():
        authors = model(input_ids=kept, position_ids=on_device(torch.arange(9)).unsqueeze(0)).logits[:, -1]
        original = model(
            input_ids=kept, position_ids=on_device(torch.cat([torch.arange(2), torch.arange(34, 41)]))[None]
        ).logits[:, -1]
    assert torch.allclose(last, authors, atol=1e-5)
    assert float((last - original).abs().max()) > 1e-4  # the two rules really differ


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("policy", ["streaming", "h2o", "buzz"])
def test_shifted_padded_batch_with_chunked_prefill_matches_alone(arch, policy):
    """Paddings are multiples of the chunk, so each row's chunks start where they start alone."""
    assert_batch_matches_alone(
        tiny_model(arch), [45, 24, 38], new=25, seed=7, generate={"prefill_chunk_size": 7}, policy=policy, budget=16
    )


def test_original_and_shifted_generate_differently_after_an_eviction(stories):
    model, tokenizer = stories
    inputs = tokenizer(["Once upon a time, there was a little dog named Max. " * 6], return_tensors="pt")
    outputs = {
        mode: greedy(model, inputs, build_cache(model, "streaming", budget=24, positions=mode), new=30)
        for mode in ("shifted", "original")
    }
    assert not torch.equal(outputs["shifted"], outputs["original"])


def test_length_dependent_rope_is_refused_under_shifted_only():
    model = one_layer_llama({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*positions=original"):
        build_cache(model, "buzz", budget=32)
    build_cache(model, "buzz", budget=32, positions="original")
    build_cache(model, "full")  # full never evicts: positions do not matter


def test_bad_positions_value_is_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="positions must be one of shifted, original; got 'contiguous'"):
        build_cache(model, "buzz", budget=32, positions="contiguous")


def test_evicted_after_counts_later_evictions_and_ignores_padding():
    keep = torch.tensor([[[0, 2, 5]]])
    assert evicted_after(keep, 7, None, None).tolist() == [[[4, 3, 1]]]  # dropped 1, 3, 4 and 6
    # a padded row: slots 0-1 are padding, so front-filled index 0 is not a real kept token
    real = torch.tensor([[[False, False, True, True, True, True]]])
    keep = torch.tensor([[[0, 2, 5]]])
    kept_real = torch.tensor([[[False, True, True]]])
    assert evicted_after(keep, 6, real, kept_real)[..., 1:].tolist() == [[[2, 0]]]  # dropped 3 and 4


@pytest.mark.parametrize("policy", ["local", "streaming", "h2o", "buzz", "buzz_fast", "buzz_nomax"])
@pytest.mark.parametrize("chunk", [1, 16, 128])
def test_a_budget_holds_for_every_chunk_size(policy, chunk):
    """No layer holds more than budget - 1 after a forward, nor budget - 1 + chunk during one."""
    model = tiny_model("llama", seed=3)
    model.config.max_position_embeddings = 4096
    budget = 64
    ids = random_batch([700], seed=1)["input_ids"]
    cache = build_cache(model, policy, budget=budget, **({"stride": 3} if "buzz" in policy else {}))
    with torch.no_grad():
        for part in ids.split(chunk, dim=1):
            model(input_ids=part, past_key_values=cache)
            assert max(layer.stored() for layer in cache.layers) <= budget - 1
    assert cache.stats()["kept_tokens_peak"] <= budget - 1 + chunk


def test_explicit_sizes_keep_the_authors_one_round_per_forward():
    model = tiny_model("llama", seed=3)
    ids = random_batch([300], seed=1)["input_ids"]
    cache = build_cache(model, "buzz", sink=4, window=8, threshold=20, stride=3)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    assert cache.layers[0].stored() > 4 + 8 + 20  # one round of a 300-token chunk leaves ~96 samples
