"""An evicting transformers ``Cache``: one policy per layer, applied after every forward.

    cache = build_cache(model, "buzz", budget=256)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24
    cache.stats()

Each ``EvictingLayer`` is a ``DynamicLayer`` that also remembers, for every stored slot, the
position its key is rotated at (``-1`` for padding). An evicting policy's keys and values live in
preallocated buffers whose slots are reused (``slots.py``): eviction moves at most the tokens it
must, never the whole cache, and ``layer.kept()`` gives the kept tokens in their original order.
The layer reports tokens *seen* as its sequence length, so new positions continue correctly, and
once it has evicted it builds the attention visibility from the stored positions itself
(``visibility.py``). With ``positions="shifted"`` (default)
kept keys are re-rotated after each eviction as if the kept tokens were contiguous (see
``positions.py``); with ``"original"`` they keep their original rotation. Decode steps that drop
one token in every layer drop for all layers at once after the last layer's attention
(``layer_group.py``).

With a ``budget``, an eviction repeats its policy's rounds inside the forward until the layer
holds at most ``budget - 1`` tokens (BUZZ thins its samples again), so the budget is a
guarantee for any chunk size; explicit sizes without a budget keep the authors' one round per
forward ("paper mode").
"""

from .evicting_cache import EvictingCache, build_cache
from .layer import EvictingLayer
from .layer_stats import LayerStats

__all__ = ["EvictingCache", "EvictingLayer", "LayerStats", "build_cache"]
