"""Facts about a chunk's mask are read on the host once per forward, not once per layer."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from buzz_lm_eval.cache import build_cache, mask_reads

from ..conftest import DEVICE, TINY, tiny_model

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}  # .item(), bool(), equal


class CountHostReads(TorchDispatchMode):
    """Counts the operators that hand a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in HOST_READS
        return func(*args, **(kwargs or {}))


def test_an_answer_is_reused_only_for_the_same_mask_until_forgotten():
    calls = []

    def read(mask):
        calls.append(1)
        return bool(mask.all())

    mask = torch.ones(2, 3, dtype=torch.bool)
    assert mask_reads.read_once(mask, "q", read) and mask_reads.read_once(mask, "q", read)
    assert len(calls) == 1
    assert mask_reads.read_once(mask.clone(), "q", read) and len(calls) == 2  # another object: read
    assert mask_reads.read_once(mask, "other question", lambda m: False) is False
    mask[0, 0] = False
    mask_reads.forget()  # a new forward: the rewritten mask is read again
    assert not mask_reads.read_once(mask, "q", read) and len(calls) == 3


def test_a_forward_forgets_the_answers_of_the_last_one_under_inference_mode():
    """A mask rewritten in place between two forwards is read again (inference tensors have no
    version counter to tell)."""
    model = tiny_model("llama")
    cache = build_cache(model, "h2o", budget=8, evict="every_forward")
    with torch.inference_mode():
        ids = torch.randint(0, 128, (1, 12), device=DEVICE)
        model(input_ids=ids, past_key_values=cache)
        mask = torch.ones(1, 1, 4, 16, dtype=torch.bool, device=DEVICE).tril_(12)
        assert mask_reads.plain_causal(mask)
        mask[0, 0, 1, 0] = False  # what a caller's mask of the next forward could be
        model(input_ids=ids[:, :4], past_key_values=cache)
        assert not mask_reads.plain_causal(mask)


def test_a_freed_mask_is_forgotten():
    before = len(mask_reads._slots())
    for _ in range(20):
        mask_reads.read_once(torch.ones(4, dtype=torch.bool), "q", lambda m: True)
    gc.collect()
    assert len(mask_reads._slots()) <= before + 1


def reads_per_chunk(layers: int, policy: str, evict: str) -> list[int]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": layers})).to(DEVICE).eval()
    cache = build_cache(model, policy, budget=24, evict=evict, prompt_length=96)
    counts = []
    with torch.no_grad():
        for part in torch.randint(0, 128, (1, 96), device=DEVICE).split(16, dim=1):
            with CountHostReads() as counter:
                model(input_ids=part, past_key_values=cache)
            counts.append(counter.reads)
    return counts


@pytest.mark.parametrize(
    "policy, evict",
    [("h2o", "after_prefill"), ("h2o", "every_forward"), ("tova", "every_forward"), ("streaming", "every_forward")],
)
def test_a_chunked_prefill_reads_its_mask_once_per_forward_whatever_the_layer_count(policy, evict):
    two, four = reads_per_chunk(2, policy, evict), reads_per_chunk(4, policy, evict)
    assert two[0] == 0  # the first chunk comes without a mask
    assert two == four and max(two) <= 3  # is it plain causal (2 reads), are all queries real (1)
    assert max(two) == (1 if policy == "streaming" else 3)  # sdpa never asks whether it is plain causal
