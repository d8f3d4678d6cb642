"""Decode drops batched across layers (``LayerGroup``) keep, store and score exactly as layer by layer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from buzz_lm_eval.cache import build_cache

from ..conftest import tiny_model
from .test_cache import greedy, random_batch
from .test_positions import stream

DROPPING = ["local", "streaming", "h2o", "tova", "knorm", "snapkv"]  # one token per decode step


def decode(policy, batch_layers, positions="shifted", arch="llama", length=60, budget=20):
    model = tiny_model(arch, seed=5)
    cache = build_cache(
        model, policy, budget=budget, evict="every_forward", positions=positions, batch_layers=batch_layers
    )
    logits = stream(model, random_batch([length], seed=6)["input_ids"], cache, chunk=1)
    return logits, cache


def assert_same_caches(a, b):
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        for x, y in zip(layer_a.kept(), layer_b.kept(), strict=True):
            assert torch.equal(x, y)
        assert torch.equal(layer_a.positions.expand_as(layer_b.positions), layer_b.positions)
        assert torch.equal(layer_a.store.keys, layer_b.store.keys)  # the same slots, bit for bit
        assert layer_a.state.forwards == layer_b.state.forwards and layer_a.seen == layer_b.seen
    stats_a, stats_b = a.stats(), b.stats()
    for key in ("kept_tokens_peak", "kept_tokens_mean", "kv_bytes_peak", "kv_bytes_allocated_peak", "forwards"):
        assert stats_a[key] == stats_b[key], key


@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("policy", DROPPING)
def test_grouped_drops_equal_layer_by_layer_bit_for_bit(policy, positions):
    grouped_logits, grouped = decode(policy, True, positions)
    alone_logits, alone = decode(policy, False, positions)
    group = grouped.layers[0].group
    assert group is not None and alone.layers[0].group is None
    assert group.drops == 60 - 20 + 1  # every forward from the budget-th token on dropped as one batch
    assert torch.equal(grouped_logits, alone_logits)
    assert_same_caches(grouped, alone)


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_grouped_drops_on_other_architectures(arch):
    grouped_logits, grouped = decode("snapkv", True, arch=arch)
    alone_logits, alone = decode("snapkv", False, arch=arch)
    assert grouped.layers[0].group.drops > 0
    assert torch.equal(grouped_logits, alone_logits)
    assert_same_caches(grouped, alone)


def test_grouped_layers_share_one_buffer_and_hold_no_other():
    """The layers' stores view one buffer per keys and values; no old per-layer buffer stays
    referenced, so the resident bytes are those of the shared buffers."""
    _, cache = decode("h2o", True)
    keys, values = cache.layers[0].group._buffers
    storages = {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}
    assert storages == {keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr()}
    assert cache.stats()["kv_bytes_allocated_peak"] == keys.nbytes + values.nbytes


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_padded_batches_beam_search_and_reset_fall_back_or_regroup(policy):
    """A padded batch drops layer by layer while it stores padding, then as a group; beam search
    replaces the buffers each step (the group moves the layers into a new one); a reset cache
    groups again and repeats its first run exactly."""
    model = tiny_model("llama", seed=2)
    padded, even = random_batch([30, 18], seed=1), random_batch([30, 30], seed=1)
    outs = []
    for batch_layers in (True, False):
        cache = build_cache(model, policy, budget=24, evict="every_forward", batch_layers=batch_layers)
        beams = build_cache(model, policy, budget=16, evict="every_forward", batch_layers=batch_layers)
        outs.append((greedy(model, padded, cache, new=12), greedy(model, even, beams, new=12, num_beams=3)))
        if batch_layers:
            assert 0 < cache.layers[0].group.drops < 11 and beams.layers[0].group.drops > 0  # 11 decode steps
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    cache = build_cache(model, policy, budget=16, evict="every_forward")
    ids = random_batch([40], seed=3)
    first = greedy(model, ids, cache, new=10)
    drops = cache.layers[0].group.drops
    assert drops > 0
    cache.reset()
    assert cache.layers[0].group._buffers is None
    assert torch.equal(greedy(model, ids, cache, new=10), first) and cache.layers[0].group.drops == 2 * drops


@pytest.mark.parametrize("batch_layers", [True, False])
def test_a_cache_no_longer_used_is_freed_at_once(batch_layers):
    """No reference cycle between the layers and their group: dropping the last reference to a
    cache frees its layers and buffers without waiting for the cycle collector."""
    _, cache = decode("h2o", batch_layers, length=30)
    layer, keys = weakref.ref(cache.layers[0]), weakref.ref(cache.layers[0].store._keys)
    gc.disable()
    try:
        del cache
        assert layer() is None and keys() is None
    finally:
        gc.enable()


def test_a_deferred_drop_runs_before_its_layer_stores_again():
    """A drop left deferred (a forward that never reached the last layer) runs, alone, before
    that layer takes new tokens: nothing is lost or applied twice."""
    _, cache = decode("tova", True, length=30)
    layer, group = cache.layers[0], cache.layers[0].group
    stored = layer.stored()
    device = layer.keys.device
    layer.update(*(torch.randn(1, layer.keys.shape[1], 1, layer.keys.shape[-1], device=device) for _ in range(2)))
    scores = torch.softmax(torch.randn(1, layer.keys.shape[1], layer.stored(), device=device), dim=-1)
    assert group.defer(layer, scores) and group.waiting  # deferred: layer 1 has not attended
    assert layer.stored() == stored + 1
    group.settle(cache.layers[1])  # not layer 1's drop: nothing runs
    assert group.waiting and layer.stored() == stored + 1
    group.settle(layer)
    assert not group.waiting and layer.stored() == stored


@pytest.mark.parametrize("policy", ["buzz", "random", "pyramidkv", "full"])
def test_policies_without_one_shared_single_token_drop_are_not_grouped(policy):
    model = tiny_model("llama", seed=1)
    cache = (
        build_cache(model, policy, budget=20, evict="every_forward") if policy != "full" else build_cache(model, "full")
    )
    assert all(layer.group is None for layer in cache.layers)
