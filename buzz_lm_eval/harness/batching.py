"""Request batching helpers of ``buzz_hf``: grouped runs, temporary settings, chunk-aligned prompts."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def temporarily(owner, attribute: str, value):
    """Set ``owner.attribute`` to ``value`` for the duration of a ``with`` block."""
    previous = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, previous)


def in_groups(items: list, key, run, longest_first: bool = False) -> list:
    """``run(group_key, members)`` for each group of ``items`` sharing ``key(item)`` (in first-seen
    order, or by descending key); the outputs come back in the items' original order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    order = sorted(groups, reverse=True) if longest_first else list(groups)
    results: list = [None] * len(items)
    for group in order:
        members = groups[group]
        for i, output in zip(members, run(group, [items[i] for i in members]), strict=True):
            results[i] = output
    return results


def pad_to_chunks(
    context: torch.Tensor, generation_kwargs: dict, chunk: int, pad_id: int
) -> tuple[torch.Tensor, dict, int]:
    """Left-pad the prompts ``context`` [B, T] to a multiple of ``chunk`` (``prefill_chunk``) tokens.

    ``generate`` cuts the prompt into chunks from its first column. Padded to a multiple of the
    chunk, every chunk boundary lies a whole number of chunks before the prompts' common end, so
    each row meets the same boundaries (and evictions) whatever its padding: in any batch, as
    alone. Returns the context, the generation kwargs with the widened attention mask, and how
    many columns were added (stripped from the output again).
    """
    extra = -context.shape[1] % chunk
    if extra == 0:
        return context, generation_kwargs, 0
    pad = torch.full((context.shape[0], extra), pad_id, dtype=context.dtype, device=context.device)
    mask = generation_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(context)
    generation_kwargs = {
        **generation_kwargs,
        "attention_mask": torch.cat([torch.zeros_like(pad, dtype=mask.dtype), mask], dim=1),
    }
    return torch.cat([pad, context], dim=1), generation_kwargs, extra
