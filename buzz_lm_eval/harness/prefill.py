"""Chunked prefill of ``buzz_hf`` generations: the prompt goes through the cache in chunks cut
from its end, so every left-padded row meets the same chunk boundaries (and evictions) in any batch
as alone; ``generate`` then reads the last chunk and decodes.

``generate(prefill_chunk_size=...)`` would cut from the first column, so a row's boundaries would
move with its padding.
"""

from __future__ import annotations

import torch

from ..cache.compat import cache_kwargs


def chunk_bounds(width: int, chunk: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` prefill chunks of a ``width``-token prompt that come before its last
    ``chunk`` tokens, cut from the prompt's end (the first chunk takes the remainder).

    Left-padded rows share the prompts' end, so with boundaries a whole number of chunks before the
    end every row meets the same boundaries (and evictions) in any batch as alone.
    """
    ends = list(range(width - chunk, 0, -chunk))[::-1]
    return list(zip([0, *ends[:-1]], ends, strict=True)) if ends else []


def prefill_head(model, context: torch.Tensor, mask: torch.Tensor | None, cache, chunk: int) -> None:
    """Feed ``context`` (left-padded ids), all but its last ``chunk`` tokens, through ``cache``
    in the chunks of ``chunk_bounds``, then hand the cache over to ``generate``.

    Positions are the ones ``generate`` gives: real tokens count from 0 in each row. Call it under
    ``torch.no_grad()`` (and the run's autocast).
    """
    bounds = chunk_bounds(context.shape[1], chunk)
    if not bounds:
        return
    mask = torch.ones_like(context) if mask is None else mask
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    forward = cache_kwargs(model, cache)
    if model._supports_logits_to_keep():  # nothing reads these chunks' logits (as generate skips them)
        forward["logits_to_keep"] = 1
    for begin, end in bounds:
        model(
            input_ids=context[:, begin:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, begin:end],
            **forward,
        )
    cache.hand_over()
