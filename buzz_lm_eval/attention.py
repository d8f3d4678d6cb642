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
SCORE_BLOCK_ELEMENTS_CPU = 1 << 20  # on CPU: a block that stays in the L2 cache

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
    if layer is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module.training:
            return softcapped_attention(query, key, value, attention_mask, scaling, softcap, kwargs.get("dropout", 0.0)), None
        return attention_with_scores(query, key, value, attention_mask, scaling, softcap=softcap)[0], None
    with layer.stats.timer():
        visible = layer.visibility(attention_mask, query.shape[2])
    scores = None
    if module.training and softcap is not None:
        output = softcapped_attention(query, key, value, visible, scaling, softcap, kwargs.get("dropout", 0.0))
    elif softcap is not None or (layer.needs_attention and not module.training):
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

    Queries are processed in blocks sized to stay in cache (no [B, H, q, L] tensor is ever
    whole); each block's logits give both its output and its probabilities, summed over queries
    and over the query heads of each KV group (HF ``repeat_kv`` order). Returns the output as the
    sdpa function does ([B, q, H_q, D]) and the [B, H_kv, L] float32 scores. With ``window`` only
    the last ``window`` queries count in the scores (a policy's ``query_window``). ``softcap``
    caps the logits as Gemma 2's eager attention does (``cap * tanh(logits / cap)`` before the
    mask), which torch's sdpa cannot. ``visible`` is a [B, 1|H_kv, q, L] bool mask or None (plain
    causal). The keys end with the queries' own tokens and attention is causal: query i never
    sees keys past ``L - q + i``, which are skipped. Rows of padding queries (nothing visible)
    see nothing: their output and probabilities are 0. ``key``/``value`` may be strided views.
    Inference only: computed without autograd.
    """
    with torch.no_grad():
        return _attention_with_scores(query, key, value, visible, scaling, window, softcap)


def _attention_with_scores(query, key, value, visible, scaling, window, softcap):
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups, past, pairs = q_heads // kv_heads, length - q_len, batch * kv_heads
    # rows (query, group) of each KV head, scaled once: a query block is a contiguous row range
    rows = query.new_empty(batch, kv_heads, q_len, groups, dim)
    torch.mul(query.view(batch, kv_heads, groups, q_len, dim).transpose(2, 3), scaling / (softcap or 1.0), out=rows)
    rows = rows.view(pairs, q_len * groups, dim)
    keys_t, values = key.flatten(0, 1).transpose(1, 2), value.flatten(0, 1)  # views: K/V never copied
    hidden, weights = _hidden_and_weights(visible, kv_heads, groups)
    upper = None if visible is not None or q_len == 1 else torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu_(1)
    total = torch.zeros(pairs, length, dtype=torch.float32, device=query.device)
    output = value.new_empty(pairs, q_len * groups, value.shape[-1])
    block = _block_queries(pairs * groups, length, query.device)
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        size, seen = stop - start, past + stop  # keys past ``seen`` are in every row's future
        logits = torch.bmm(rows[:, start * groups : stop * groups], keys_t[:, :, :seen])
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if softcap is not None:
            logits.tanh_().mul_(softcap)
        if hidden is not None:
            block_view = logits.view(batch, kv_heads, size, groups, seen)
            block_view.masked_fill_(hidden[:, :, start:stop, None, :seen], float("-inf"))
        elif upper is not None:
            logits.view(pairs, size, groups, seen)[..., past + start :].masked_fill_(upper[:size, None, :size], float("-inf"))
        probs = torch.softmax(logits, dim=-1, out=logits)
        counted = groups * max(0, q_len - window - start) if window is not None else 0
        if counted < size * groups:
            if weights is None:
                total[:, :seen] += probs[:, counted:].sum(dim=1)
            else:
                total[:, :seen] += torch.bmm(weights[:, :, start * groups + counted : stop * groups], probs[:, counted:]).squeeze(1)
        torch.bmm(probs.to(value.dtype), values[:, :seen], out=output[:, start * groups : stop * groups])
    output = output.view(batch, kv_heads, q_len, groups, -1)
    if weights is not None:  # padding queries: their (finite) rows were computed, then dropped
        output *= weights.view(batch, kv_heads, q_len, groups, 1).to(output.dtype)
    return output.transpose(1, 2).reshape(batch, q_len, q_heads, -1), total.view(batch, kv_heads, length)


def _hidden_and_weights(visible, kv_heads: int, groups: int):
    """What each query may not see ([B, 1|H_kv, q, L]) and each row's weight ([B*H_kv, 1, q*G], 1 or 0).

    A padding query sees nothing; its row is left unmasked (no NaN from an all -inf softmax) and
    weighted 0. None, None for plain causal attention.
    """
    if visible is None:
        return None, None
    live = visible.any(dim=-1, keepdim=True)
    hidden = visible.logical_not().logical_and_(live)
    batch, q_len = visible.shape[0], visible.shape[2]
    weights = live.expand(batch, kv_heads, q_len, groups).to(torch.float32)
    return hidden, weights.reshape(batch * kv_heads, 1, q_len * groups)


def _block_queries(rows_per_query: int, length: int, device: torch.device) -> int:
    """Queries per block: on CPU the block's logits stay in cache; elsewhere memory is the bound."""
    elements = SCORE_BLOCK_ELEMENTS_CPU if device.type == "cpu" else SCORE_BLOCK_ELEMENTS
    return max(1, elements // max(1, rows_per_query * length))


def softcapped_attention(query, key, value, visible, scaling: float, softcap: float, dropout: float = 0.0):
    """Gemma 2's eager capped attention with autograd (training); [B, q, H_q, D] like sdpa's."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.tanh(query @ key.transpose(-1, -2) * (scaling / softcap)) * softcap
    if visible is None:
        length, q_len = key.shape[2], query.shape[2]
        visible = torch.ones(q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)
    probs = logits.masked_fill(~expand_to_query_heads(visible, query), float("-inf")).softmax(-1).nan_to_num(0.0)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return (probs.to(value.dtype) @ value).transpose(1, 2)


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


def prepare_model(model) -> None:
    """Register the score-capturing attention (once per process) and switch ``model`` to it."""
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, buzz_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
