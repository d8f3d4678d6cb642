"""Slot storage: evictions move few slots, never copy the cache, and shifted keys may lag."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.cache.compat import cache_kwargs
from buzz_lm_eval.cache.slots import SlotStore, tail_moves

from ..conftest import DEVICE, TINY, on_device, tiny_model
from .test_cache import random_batch
from .test_positions import ROPES, one_layer_llama, stream


@pytest.mark.parametrize("seed", range(20))
def test_tail_moves_pack_the_survivors_into_the_first_slots(seed):
    generator = torch.Generator().manual_seed(seed)
    rows, length = 6, int(torch.randint(2, 40, (1,), generator=generator))
    kept = int(torch.randint(1, length, (1,), generator=generator))
    order = torch.rand(rows, length, generator=generator).argsort(-1)[:, :kept]
    survive = torch.zeros(1, rows, length, dtype=torch.bool).scatter_(-1, order.unsqueeze(0), True)
    src, dst = tail_moves(survive, kept)
    assert src.shape[-1] == min(kept, length - kept)
    slots = torch.arange(length).expand(1, rows, length).clone()
    slots.scatter_(-1, dst, slots.gather(-1, src))
    for row in range(rows):
        assert sorted(slots[0, row, :kept].tolist()) == sorted(order[row].tolist())
        unmoved = [i for i in range(kept) if survive[0, row, i]]
        assert all(slots[0, row, i] == i for i in unmoved)  # survivors below ``kept`` stay put


def test_a_per_step_eviction_writes_two_slots_not_the_cache():
    """Dropping one token per decode step: one new token written, at most one token moved."""
    model = tiny_model("llama", seed=1)
    ids = random_batch([60])["input_ids"]
    cache = build_cache(model, "h2o", budget=32, positions="original")
    with torch.no_grad():
        model(input_ids=ids[:, :40], past_key_values=cache)
        model(input_ids=ids[:, 40:41], past_key_values=cache)  # the first grouped drop moves the layers into one buffer
        assert cache.layers[0].group.drops == 1
        store = cache.layers[0].store
        for token in ids[0, 41:].split(1):
            before, pointer = store.keys.clone(), store.keys.data_ptr()
            model(input_ids=token.view(1, 1), past_key_values=cache)
            assert store.keys.data_ptr() == pointer and store.keys.shape == before.shape  # no new buffer
            changed = (store.keys != before).any(dim=-1)  # [B, H, K] slots rewritten this step
            assert int(changed.sum(dim=-1).max()) <= 2


@pytest.mark.parametrize("heads", [1, 2])
def test_a_one_token_drop_moves_the_last_slot_for_any_number_of_kv_heads(heads):
    """One row of one KV head (Gemma 3 270M, multi-query models) makes the last slot a plain slice
    of the buffer it is copied into (index_copy_ once refused that); the last slot may also be the
    dropped one and then moves onto itself."""
    keys = torch.arange(1 * heads * 5 * 2, dtype=torch.float32).view(1, heads, 5, 2)
    store = SlotStore(keys.clone(), -keys.clone(), limit=None)
    store.move_last_into(torch.tensor([[[4]]]))  # the last slot itself
    assert store.n == 4 and torch.equal(store.keys, keys[:, :, :4]) and torch.equal(store.values, -keys[:, :, :4])
    store.move_last_into(torch.tensor([[[1]]]))  # another slot: the last one fills it
    assert torch.equal(store.keys, keys[:, :, [0, 3, 2]])


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_one_kv_head_models_decode_past_the_budget(policy):
    """A one-KV-head model under a dropping policy decodes past the budget and keeps it (one layer:
    nothing to group, so each drop moves a slot within the layer's own one-head buffer)."""
    config = LlamaConfig(**{**TINY, "num_key_value_heads": 1, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
    ids = on_device(random_batch([60], seed=2)["input_ids"])
    cache = build_cache(model, policy, budget=12)
    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False)
    assert out.shape[1] == 84 and all(layer.keys.shape[2] <= 12 for layer in cache.layers)


def test_buffers_grow_to_the_budget_plus_one_chunk_at_most():
    model = tiny_model("llama", seed=2)
    ids = random_batch([300], seed=3)["input_ids"]
    cache = build_cache(model, "buzz", budget=64)
    stream(model, ids, cache, chunk=16)
    layer = cache.layers[0]
    per_slot = 2 * layer.keys[0, 0, 0].numel() * layer.keys.element_size() * layer.keys.shape[1]
    assert layer.store.capacity <= 64 - 1 + 16
    assert cache.stats()["kv_bytes_allocated_peak"] <= len(cache.layers) * (64 - 1 + 16) * per_slot


def test_a_store_gives_spare_capacity_back_after_a_large_eviction():
    keys = torch.randn(1, 2, 300, 4)
    store = SlotStore(keys, keys.clone(), limit=40)
    survive = torch.zeros(1, 2, 300, dtype=torch.bool)
    survive[..., :39] = True
    store.keep_first(39, *tail_moves(survive, 39))
    store.fit()
    assert store.capacity == 40 and torch.equal(store.keys, keys[:, :, :39])


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_lagging_shifted_keys_give_the_authors_logits(rope):
    """``random`` drops tokens anywhere (its choice ignores scores, so an ``original`` run names the
    kept tokens); after many such steps the stored keys lag, and the next token still scores as
    the model run on the kept tokens at contiguous positions."""
    model = one_layer_llama(ROPES[rope], seed=3)
    ids = random_batch([41], seed=4)["input_ids"]
    runs = {
        mode: build_cache(model, "random", capacity=12, evict="every_forward", positions=mode)
        for mode in ("shifted", "original")
    }
    for cache in runs.values():
        stream(model, ids[:, :20], cache, chunk=5)
        stream(model, ids[:, 20:-1], cache, chunk=1)
    shifted = runs["shifted"].layers[0]
    assert shifted.shift.lag is not None and bool((shifted.shift.lag != 0).any())
    last = stream(model, ids[:, -1:], runs["shifted"], chunk=1)[:, -1]
    kept = runs["original"].layers[0].kept()[2][0, 0]  # original positions of the 12 kept tokens
    tokens = torch.cat([ids[:, kept.cpu()], ids[:, -1:]], dim=1)
    with torch.no_grad():
        authors = model(input_ids=tokens, position_ids=on_device(torch.arange(13)).unsqueeze(0)).logits[:, -1]
    assert torch.allclose(last, authors, atol=1e-5)


@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("policy", ["local", "streaming", "h2o", "tova", "knorm", "random", "snapkv"])
def test_dropping_one_token_matches_the_general_compaction(monkeypatch, policy, positions):
    """The decode fast path (the policy names the one token that leaves, one slot moves) keeps,
    stores and orders exactly as the policy's kept list does, whether the one-token drop reads the
    dropped index off that list or the general compaction runs.

    Under ``shifted`` a score policy's fast path lets its keys lag in runs (``ShiftedKeys``), so its
    rotations compose in another order than the general path's one lag: keys and logits then agree
    to float32 rounding, and the kept tokens and their slots exactly.
    """
    from buzz_lm_eval.cache.layer import EvictingLayer

    def run():
        model = tiny_model("llama", seed=5)
        cache = build_cache(model, policy, budget=20, evict="every_forward", positions=positions)
        logits = stream(model, random_batch([45], seed=6)["input_ids"], cache, chunk=1)
        return logits, [layer.kept() for layer in cache.layers], [layer.positions for layer in cache.layers]

    named = []  # whether each step_one call named the dropped token
    step_one = EvictingLayer.step_one

    def counted(self, scores):
        dropped = step_one(self, scores)
        named.append(dropped is not None)
        return dropped

    monkeypatch.setattr(EvictingLayer, "step_one", counted)
    fast = run()
    assert sum(named) >= 20  # every decode step past the budget, in every layer
    monkeypatch.setattr(EvictingLayer, "step_one", lambda self, scores: None)  # the kept list, then drop_one
    from_list = run()
    monkeypatch.setattr(EvictingLayer, "compact", EvictingLayer.compact_many)
    general = run()
    same = torch.equal if positions == "original" else lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)
    for other in (from_list, general):
        assert same(fast[0], other[0])
        for (keys, values, kept), (keys_o, values_o, kept_o) in zip(fast[1], other[1], strict=True):
            assert same(keys, keys_o) and same(values, values_o) and torch.equal(kept, kept_o)
        assert all(torch.equal(a, b) for a, b in zip(fast[2], other[2], strict=True))  # the same slots


@pytest.mark.parametrize("policy", ["random", "pyramidkv"])
def test_per_layer_policies_keep_each_layers_budget_and_buffer_bound(policy):
    """Policies built per layer (``for_layer``) carry their layer's budget: rounds repeat until it
    holds, and the layer's buffers stay within that budget plus one chunk."""
    model = tiny_model("llama", seed=3)
    cache = build_cache(model, policy, budget=40, evict="every_forward")
    budgets = [layer.policy.budget for layer in cache.layers]
    assert all(b is not None for b in budgets)
    if policy == "pyramidkv":
        assert budgets == cache.policy.layer_budgets(len(cache.layers)) and budgets[0] > 40
    chunk = 32
    with torch.no_grad():
        for part in random_batch([300], seed=2)["input_ids"].split(chunk, dim=1):
            model(input_ids=part, past_key_values=cache)
            assert all(layer.stored() <= b - 1 for layer, b in zip(cache.layers, budgets, strict=True))
    assert all(layer.store.capacity <= b - 1 + chunk for layer, b in zip(cache.layers, budgets, strict=True))


@pytest.mark.parametrize("policy", ["buzz", "buzz_nomax"])
def test_rows_with_different_histories_keep_a_consistent_slot_layout(policy):
    """Rows whose BUZZ samples differ keep different numbers of real tokens (front-filled indices)
    even once no padding is left: every forward must leave each row's order a permutation of
    its slots, and two identical runs must give identical logits (no slot read uninitialised)."""
    model = tiny_model("llama", seed=3)
    batch = random_batch([70, 52], seed=4)

    def run():
        cache = build_cache(model, policy, budget=24, positions="original")
        ids, mask, logits = batch["input_ids"], batch["attention_mask"], []
        with torch.no_grad():
            for start in range(0, ids.shape[1], 16):
                out = model(
                    input_ids=ids[:, start : start + 16], attention_mask=mask[:, : start + 16], past_key_values=cache
                )
                logits.append(out.logits[:, -1])
                for layer in cache.layers:
                    if layer.order is not None:
                        ordered = layer.order.sort(dim=-1).values
                        assert torch.equal(
                            ordered, torch.arange(layer.stored(), device=ordered.device).expand_as(ordered)
                        )
        return torch.stack(logits)

    assert torch.equal(run(), run())


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_keys_lagging_in_runs_score_as_with_one_lag(monkeypatch, policy):
    """Score policies' decode lets keys lag in runs (``ShiftedKeys``): re-cut every 3 drops and
    flushed for a multi-token chunk, they give the logits, kept tokens and keys of one lag."""
    from buzz_lm_eval.cache import layer as layer_module
    from buzz_lm_eval.cache import shifted_keys

    monkeypatch.setattr(shifted_keys, "RESPLIT_EVERY", 3)
    ids = random_batch([70, 70], seed=8)["input_ids"]

    def run(classes):
        monkeypatch.setattr(layer_module, "LAG_CLASSES", classes)
        model = tiny_model("llama", seed=5)
        cache = build_cache(model, policy, budget=20, evict="every_forward")
        logits, used = [stream(model, ids[:, :16], cache, chunk=16)], False
        for start, stop in [(t, t + 1) for t in range(16, 46)] + [(46, 51)] + [(t, t + 1) for t in range(51, 70)]:
            logits.append(stream(model, ids[:, start:stop], cache, chunk=stop - start)[:, -1:])
            used |= any(layer.shift.key_class is not None for layer in cache.layers)
        return torch.cat(logits, dim=1), [layer.kept() for layer in cache.layers], used

    runs, one = run(shifted_keys.LAG_CLASSES), run(1)
    assert runs[2] and not one[2]  # runs were in use in the first, never in the second
    assert torch.allclose(runs[0], one[0], rtol=0, atol=1e-5)
    for (keys, values, kept), (keys_1, values_1, kept_1) in zip(runs[1], one[1], strict=True):
        assert torch.equal(kept, kept_1)
        assert torch.allclose(keys, keys_1, rtol=0, atol=1e-5) and torch.allclose(values, values_1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["local", "streaming"])
def test_decode_steps_with_no_lag_rotate_no_query_and_no_new_key(monkeypatch, policy):
    """A sliding window's or StreamingLLM's drops leave every lag at zero: on the CPU their decode
    steps then skip the query's and the new key's rotation (``ShiftedKeys.lags``), and the logits,
    kept tokens and keys are exactly those of rotating by zero."""
    from buzz_lm_eval.cache.shifted_keys import ShiftedKeys

    if DEVICE.type != "cpu":
        pytest.skip("the zero-lag read is made on the CPU only (elsewhere it would synchronise)")
    ids = random_batch([60, 60], seed=9)["input_ids"]

    def run():
        model = tiny_model("llama", seed=6)
        cache = build_cache(model, policy, budget=20, evict="every_forward")
        logits = [stream(model, ids[:, :16], cache, chunk=8)]
        logits += [stream(model, ids[:, t : t + 1], cache, chunk=1) for t in range(16, 60)]
        return torch.cat([part[:, -1:] for part in logits], dim=1), cache

    skipped, cache = run()
    shifts = [layer.shift for layer in cache.layers]
    assert all(shift.lag is not None and not shift.lags(1) for shift in shifts)  # the skip was taken
    assert all(shift.lags(16) for shift in shifts)  # a chunk rotates as before
    monkeypatch.setattr(ShiftedKeys, "lags", lambda self, tokens: self.lag is not None)
    rotated, rotated_cache = run()
    assert torch.equal(skipped, rotated)
    for layer, other in zip(cache.layers, rotated_cache.layers, strict=True):
        for mine, theirs in zip(layer.kept(), other.kept(), strict=True):
            assert torch.equal(mine, theirs)
