"""No host synchronisation in the unpadded decode step of an evicting cache, off the CPU.

On a GPU, every read of a tensor's value by the host (``.item()``, ``bool(t)``, ``nonzero``, a
boolean-mask index, ``.tolist()``, a copy to the CPU) waits for the queued kernels. The meta
device has no data at all, so each such read raises there; the cache's CPU-only shortcuts
(``device.type == "cpu"``) are skipped on meta as on CUDA. A model and cache that prefill and
decode on meta therefore take the accelerator path with no host read of any tensor.

The prompt goes in as one forward, which transformers gives no mask. A prompt fed in chunks gets
one from the second chunk on, and what it says (plain causal? padding?) is read on the host once
per forward (``mask_reads``, counted in ``test_mask_reads.py``): none per decode step.
"""

from __future__ import annotations

import pytest
import torch

from buzz_lm_eval.cache import EvictingCache, build_cache
from buzz_lm_eval.policies import POLICY_NAMES

from ..conftest import tiny_model
from .test_positions import stream

EVICTING = [name for name in POLICY_NAMES if name != "full"]
BUDGET, PROMPT, STEPS = 20, 60, 30  # buzz thins 4 times in these steps


def meta_run(policy: str, **options) -> EvictingCache:
    """A cache built for a tiny Llama, then the model moved to meta: a prefill of ``PROMPT``
    tokens and ``STEPS`` one-token decode steps, all on meta; the cache."""
    model = tiny_model("llama")
    cache = build_cache(model, policy, budget=BUDGET, **options)  # reads the rotary table: before the move
    model.to("meta")
    ids = torch.zeros(1, PROMPT, dtype=torch.long, device="meta")
    stream(model, ids, cache, chunk=PROMPT)
    stream(model, ids[:, :STEPS], cache, chunk=1)
    return cache


def test_meta_refuses_every_host_read():
    """The premise: each kind of host read raises on meta."""
    tensor = torch.zeros(3, device="meta")
    reads = [
        lambda: bool(tensor.any()),
        lambda: tensor.nonzero(),
        lambda: tensor[tensor > 0],
        lambda: tensor.tolist(),
        lambda: tensor.cpu(),
        lambda: int(tensor.sum()),
    ]
    for read in reads:
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("policy", EVICTING)
def test_every_forward_prefill_and_decode_read_nothing_on_the_host(policy):
    cache = meta_run(policy, evict="every_forward")
    held = [layer.stored() for layer in cache.layers]
    assert all(layer.keys.device.type == "meta" for layer in cache.layers)
    assert sum(held) <= BUDGET * len(held)  # prefill and steps evicted, on meta (pyramidkv: per-layer budgets)


@pytest.mark.parametrize("policy", ["buzz", "h2o", "snapkv", "streaming"])
def test_after_prefill_compression_and_growth_read_nothing_on_the_host(policy):
    cache = meta_run(policy, evict="after_prefill", prompt_length=PROMPT)
    assert all(layer.stored() == BUDGET - 1 + STEPS for layer in cache.layers)


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming"])
@pytest.mark.parametrize("options", [{"positions": "original"}, {"batch_layers": False}])
def test_other_positions_and_layer_by_layer_drops_read_nothing_on_the_host(policy, options):
    cache = meta_run(policy, evict="every_forward", **options)
    assert all(layer.stored() <= BUDGET for layer in cache.layers)  # evicted, on meta
