"""What the new queries of an evicting layer may see: the attention visibility mask it builds from
its stored positions once it has evicted (until then, the library's own mask)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .mask_reads import PLAIN_CAUSAL, plain_causal, remember

if TYPE_CHECKING:
    from .layer import EvictingLayer


def visible_mask(
    layer: EvictingLayer, library_mask: torch.Tensor | None, q: int, scored: bool = False
) -> torch.Tensor | None:
    """[B, 1|H, q, L] bool mask of what ``layer``'s new queries may see (the library mask until evicted).

    The new tokens occupy the last ``q`` slots in order; earlier slots are visible by position (never
    padding, position -1, nor under a sliding window what lies too far back). ``scored``: the mask
    goes to the score kernel, which asks whether it is plain causal; the answer is then recorded
    from the library mask's, without reading the new mask.
    """
    if not layer.evicted:
        return library_mask
    if q == 1 and not layer.padded and layer.sliding_window is None:
        return None  # a single query sees every stored token
    past = layer.positions[..., : layer.stored() - q]
    allowed = (past >= 0).unsqueeze(2)
    if layer.sliding_window is not None:
        query_pos = torch.arange(layer.seen - q, layer.seen, device=layer.device).view(1, 1, q, 1)
        allowed = allowed & (past.unsqueeze(2) > query_pos - layer.sliding_window)
    batch, heads = past.shape[:2]
    allowed = allowed.expand(batch, heads, q, past.shape[-1])
    if library_mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=layer.device).tril().expand(batch, heads, q, q)
    else:
        new = library_mask[..., -q:].expand(batch, heads, q, q)
    visible = torch.cat([allowed, new], dim=-1)
    if scored and not layer.padded and layer.sliding_window is None:  # every stored slot visible
        if library_mask is None or plain_causal(library_mask):  # and the new block causal
            remember(visible, PLAIN_CAUSAL, True)  # the kernel's question, answered without a read
    return visible
