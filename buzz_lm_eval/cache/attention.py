"""Score capture through transformers' public attention interface.

``prepare_model`` registers one attention function, ``"buzz"``, that wraps the stock sdpa
function (so models keep sdpa speed) and its mask function. After each layer's attention it
hands that forward's attention probabilities, summed over queries and over the query heads of
each KV group, to the evicting cache layer that served the keys. Layers of other caches (or no
cache) run plain sdpa.

The cache layer and the attention call are paired by identity: ``EvictingLayer.update`` leaves
itself in a thread-local slot, and the attention function claims it only if the keys it was
given are the very tensor that layer returned.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .mask_reads import QUERIES_REAL, read_once
from .score_attention import attention_with_scores, expand_to_query_heads, softcapped_attention

ATTN_IMPLEMENTATION = "buzz"

_pending = threading.local()


def offer_layer(layer) -> None:
    """Called by a cache layer's ``update``: its attention is about to run."""
    _pending.layer = layer


def claim_layer(key: torch.Tensor):
    """The evicting layer that returned ``key`` in this thread, if any (claimed once)."""
    layer = getattr(_pending, "layer", None)
    if layer is None or layer.keys is not key:
        return None
    _pending.layer = None
    return layer


def buzz_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention that lets an evicting cache layer see the probabilities and evict.

    Policies that need scores get them from the same pass that computes the output
    (``attention_with_scores``: one QK^T per query block); the others run the stock sdpa.
    That pass is an inference kernel (no autograd): a module in training mode runs sdpa, or
    ``softcapped_attention`` for Gemma 2's capped logits.
    """
    layer = claim_layer(key)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")  # Gemma 2 caps its logits; sdpa cannot
    dropout = kwargs.get("dropout", 0.0)
    if layer is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module.training:
            return softcapped_attention(query, key, value, attention_mask, scaling, softcap, dropout), None
        return attention_with_scores(query, key, value, attention_mask, scaling, softcap=softcap)[0], None
    q_len = query.shape[2]
    kernel = not module.training and (softcap is not None or layer.needs_attention)
    with layer.stats.timer():
        visible = layer.visibility(attention_mask, q_len, scored=kernel)
        query, key_class = layer.align_query(query, classed=kernel)
    scores = None
    if kernel:
        window = layer.policy.query_window
        output, scores = attention_with_scores(query, key, value, visible, scaling, window, softcap, key_class)
        scores = scores if layer.needs_attention else None
    elif softcap is not None:
        output = softcapped_attention(query, key, value, visible, scaling, softcap, dropout)
    else:
        output, _ = sdpa_attention_forward(module, query, key, value, expand_to_query_heads(visible, query), **kwargs)
    with layer.stats.timer():
        layer.evict(scores, query_validity(attention_mask, q_len))
    return output, None


def query_validity(attention_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """[B, q] bool: which new tokens are real, read off the mask's last q x q diagonal; None when
    all are (read once per mask, see ``read_once``)."""
    if attention_mask is None:
        return None
    valid = torch.diagonal(attention_mask[:, 0, :, -q:], dim1=-2, dim2=-1)
    return None if read_once(attention_mask, QUERIES_REAL, lambda _: bool(valid.all())) else valid


def prepare_model(model) -> None:
    """Register the score-capturing attention (once per process) and switch ``model`` to it."""
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, buzz_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
