"""One evicting cache per generate call: reset() makes it new, reuse and empty prompts are named."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.cache.compat import cache_kwargs

from ..conftest import tiny_model

MARKS_HANDED_CACHES = Version(transformers.__version__) >= Version("5.17")


def prompts(*lengths, seed=0):
    """Left-padded random prompts of the given lengths with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=gen)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, cache, inputs, new=12):
    return model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=new, do_sample=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_reset_makes_the_cache_new_statistics_included(model):
    first, second = prompts(50, seed=1), prompts(37, seed=2)
    cache = build_cache(model, "buzz", budget=24)
    generate(model, cache, first)
    used = cache.stats()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats()["forwards"] == 0
    out = generate(model, cache, second)
    fresh = build_cache(model, "buzz", budget=24)
    assert torch.equal(out, generate(model, fresh, second))
    assert cache.stats() == {**fresh.stats(), "evict_seconds": cache.stats()["evict_seconds"]}
    assert cache.stats()["tokens_seen"] < used["tokens_seen"]


@pytest.mark.parametrize(
    "policy, second, message",
    [
        ("h2o", prompts(20), "EvictingCache: .*already seen 41 tokens.*serves one generate call"),
        ("streaming", prompts(60, 70), "EvictingCache: .*serves one generate call.*cache.reset"),  # other batch size
        pytest.param(
            "buzz",
            prompts(60),
            "already seen 41 tokens; an evicting cache serves one generate call",
            marks=pytest.mark.skipif(
                not MARKS_HANDED_CACHES, reason="generate marks the caches it is handed since transformers 5.17"
            ),
        ),  # a longer prompt
    ],
)
def test_a_used_cache_is_named(model, policy, second, message):
    cache = build_cache(model, policy, budget=24)
    generate(model, cache, prompts(30))
    with pytest.raises(ValueError, match=message):
        generate(model, cache, second)


def test_an_empty_prompt_is_named(model):
    empty = {"input_ids": torch.zeros(1, 0, dtype=torch.long)}
    with pytest.raises(ValueError, match="EvictingCache: a forward with no new tokens: the prompt is empty"):
        generate(model, build_cache(model, "buzz", budget=24), empty)
