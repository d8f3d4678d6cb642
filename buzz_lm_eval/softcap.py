"""Attention with logit softcapping (Gemma 2) for the score-capturing path.

torch's sdpa has no softcap, so for a model that passes ``softcap`` the "buzz" attention computes
the output here instead, as Gemma 2's eager attention does (``cap * tanh(logits / cap)`` before the
mask, softmax in float32), in blocks of queries so that no whole [B, H, q, L] tensor is built. The
same probabilities, summed over queries and over the query heads of each KV group, are the
policy's scores: one pass gives both.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24  # elements of one [B, H, q_block, L] logit block


def softcap_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None,
    scaling: float, softcap: float, want_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softcapped attention: output [B, q, H_q, D] (as sdpa functions return it) and, if asked,
    the [B, H_kv, L] float32 scores.

    ``visible`` is a boolean [B|1, H|1, q, L] mask (True = may attend) or None for plain
    causal attention (query i sees keys up to L - q + i). Rows that see nothing (padding
    queries) get zero probabilities.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    grouped = query.view(batch, kv_heads, groups, q_len, dim)
    keys_t = key.transpose(-1, -2)
    block = max(1, BLOCK_ELEMENTS // max(1, batch * q_heads * length))
    outputs = []
    scores = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=query.device) if want_scores else None
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        rows = grouped[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), dim)
        logits = torch.matmul(rows, keys_t).float() * scaling
        logits = (torch.tanh(logits / softcap) * softcap).view(batch, kv_heads, groups, stop - start, length)
        allowed = visible_rows(visible, start, stop, q_len, length, query.device)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        if scores is not None:
            scores += probs.sum(dim=(2, 3))
        mixed = torch.matmul(probs.to(value.dtype).view(batch, kv_heads, -1, length), value)
        outputs.append(mixed.view(batch, kv_heads, groups, stop - start, -1))
    output = torch.cat(outputs, dim=3).view(batch, q_heads, q_len, -1)
    return output.transpose(1, 2).contiguous(), scores


def visible_rows(visible, start: int, stop: int, q_len: int, length: int, device) -> torch.Tensor | None:
    """Rows [start, stop) of the visibility, shaped [B|1, H|1, 1, rows, L]; None when all is visible."""
    if visible is not None:
        return visible[:, :, start:stop, :].unsqueeze(2)
    if q_len == 1:
        return None
    rows = torch.arange(start, stop, device=device).view(-1, 1) + (length - q_len)
    return (torch.arange(length, device=device).view(1, -1) <= rows).view(1, 1, 1, stop - start, length)
