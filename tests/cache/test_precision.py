"""Half precision under eviction: what can be checked at that precision, on the test device.

Run on a GPU with ``python -m pytest --device cuda tests/cache/test_precision.py`` (the whole suite takes
``--device`` too); on CPU the same checks run in bfloat16 and float16.
"""

from __future__ import annotations

import pytest
import torch

from buzz_lm_eval.cache import build_cache

from ..conftest import tiny_model
from .test_cache import assert_batch_matches_alone, greedy, random_batch

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_full_policy_is_bit_exact_in_half_precision(dtype):
    model = tiny_model("llama", dtype=dtype)
    batch = random_batch([33, 21])
    assert torch.equal(greedy(model, batch, build_cache(model, "full")), greedy(model, batch))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("policy", ["streaming", "h2o", "buzz"])
def test_budget_holds_and_keys_stay_in_half_precision(dtype, policy):
    model = tiny_model("mistral", dtype=dtype)
    cache = build_cache(model, policy, budget=16)
    greedy(model, random_batch([60, 41]), cache, new=20, prefill_chunk_size=8)
    assert cache.stats()["kept_tokens_peak"] <= 16 - 1 + 8
    assert all(layer.keys.dtype == dtype and layer.stored() <= 15 for layer in cache.layers)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_padded_batch_matches_alone_in_half_precision(dtype, positions):
    model = tiny_model("llama", dtype=dtype)
    assert_batch_matches_alone(model, [37, 21], new=20, policy="buzz", budget=16, positions=positions)
