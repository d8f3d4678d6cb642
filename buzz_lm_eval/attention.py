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


ATTN_IMPLEMENTATION = "buzz"
SCORE_BLOCK_ELEMENTS = 1 << 24  # elements of one [B, H, q_block, L] probability block

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
    """
    layer = claim_layer(key)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")  # Gemma 2 caps its logits; sdpa cannot
    if layer is None:
        if softcap is not None:
            return attention_with_scores(query, key, value, attention_mask, scaling, softcap=softcap)[0], None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with layer.stats.timer():
        visible = layer.visibility(attention_mask, query.shape[2])
        query = layer.align_query(query)
    scores = None
    if softcap is not None or (layer.needs_attention and not module.training):
        window = layer.policy.query_window
        output, scores = attention_with_scores(query, key, value, visible, scaling, window, softcap)
        scores = scores if layer.needs_attention else None
    else:
        output, _ = sdpa_attention_forward(module, query, key, value, expand_to_query_heads(visible, query), **kwargs)
    with layer.stats.timer():
        layer.evict(scores, query_validity(attention_mask, query.shape[2]))
    return output, None


def attention_with_scores(
    query, key, value, visible, scaling: float, window: int | None = None, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the probabilities each key received, from one pass over the keys.

    Queries are processed in blocks (no [B, H, q, L] tensor is ever whole); each block's logits
    give both its output and its probabilities, summed over queries and over the query heads of
    each KV group (HF ``repeat_kv`` order). Returns the output as the sdpa function does
    ([B, q, H_q, D]) and the [B, H_kv, L] float32 scores. With ``window`` only the last
    ``window`` queries count in the scores (a policy's ``query_window``). ``softcap`` caps the
    logits as Gemma 2's eager attention does (``cap * tanh(logits / cap)`` before the mask), which
    torch's sdpa cannot. Rows of padding queries see nothing: their output and probabilities are 0.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    grouped = query.view(batch, kv_heads, groups, q_len, dim)
    keys_t = key.transpose(-1, -2)  # [B, H_kv, D, L], shared by the group: never repeated
    block = max(1, SCORE_BLOCK_ELEMENTS // max(1, batch * q_heads * length))
    total = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=query.device)
    output = query.new_empty(batch, kv_heads, groups, q_len, value.shape[-1])
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        rows = grouped[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), dim)
        logits = torch.matmul(rows, keys_t).view(batch, kv_heads, groups, stop - start, length).float() * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if visible is not None or q_len > 1:
            allowed = _visible_block(visible, start, stop, q_len, length, query.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if visible is not None:
            probs = probs.nan_to_num_(0.0)  # rows of padding queries see nothing
        counted = max(0, q_len - window - start) if window is not None else 0
        if counted < stop - start:
            total += probs[:, :, :, counted:].sum(dim=(2, 3))
        flat = probs.to(value.dtype).view(batch, kv_heads, groups * (stop - start), length)
        output[:, :, :, start:stop] = torch.matmul(flat, value).view(batch, kv_heads, groups, stop - start, -1)
    return output.view(batch, q_heads, q_len, -1).transpose(1, 2), total


def expand_to_query_heads(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """A [B, H_kv, q, L] mask repeated for the query heads of each group (HF ``repeat_kv`` order)."""
    if mask is None or mask.shape[1] in (1, query.shape[1]):
        return mask
    return mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)


def query_validity(attention_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """[B, q] bool: which new tokens are real, read off the mask's last q x q diagonal."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, :, -q:]
    return torch.diagonal(last, dim1=-2, dim2=-1)


def _visible_block(visible, start, stop, q_len, length, device) -> torch.Tensor:
    """Rows [start, stop) of the visibility mask, shaped [B|1, H|1, 1, rows, L]."""
    if visible is None:  # plain causal: query i sees keys up to L - q + i
        rows = torch.arange(start, stop, device=device).view(-1, 1) + (length - q_len)
        return (torch.arange(length, device=device).view(1, -1) <= rows).view(1, 1, 1, stop - start, length)
    return visible[:, :, start:stop, :].unsqueeze(2)


def prepare_model(model) -> None:
    """Register the score-capturing attention (once per process) and switch ``model`` to it."""
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, buzz_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
