"""Slot storage of one cache layer: keys and values in preallocated buffers, compacted in place.

A layer's keys and values live in ``[B, H, capacity, D]`` buffers whose first ``n`` slots are
live. New tokens are written after the live slots (the buffer grows geometrically, clamped to
the layer's budget under ``every_forward``, only when it is full). An eviction that keeps ``K`` of ``n`` tokens moves
each surviving token stored at a slot ``>= K`` into a freed slot ``< K``: at most
``min(K, n - K)`` tokens move, so dropping one token per decode step moves at most one token,
never the whole cache. Slots therefore hold tokens in no particular order; the cache layer keeps
each slot's position and the logical (original) order separately.
"""

from __future__ import annotations

import torch


class SlotStore:
    """Keys and values in buffers with spare capacity; ``keys``/``values`` view the live slots."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, limit: int | None):
        self.limit = limit  # the most slots doubling grows to (a budget that evictions keep to)
        self.n = 0
        self._keys, self._values = keys[:, :, :0], values[:, :, :0]
        self.append(keys, values)

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, n: int, limit: int | None) -> SlotStore:
        """A store over existing ``[B, H, capacity, D]`` buffers whose first ``n`` slots are live."""
        store = cls.__new__(cls)
        store._keys, store._values, store.n, store.limit = keys, values, n, limit
        return store

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.n]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.n]

    def nbytes(self) -> int:
        """Bytes the buffers occupy (live slots and spare capacity; this store's share of a buffer
        that several layers' stores view, see ``layer_group.py``)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in (self._keys, self._values))

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``[B, H, q, D]`` new tokens after the live slots."""
        new = keys.shape[2]
        self._reserve(self.n + new)
        self._keys[:, :, self.n : self.n + new] = keys
        self._values[:, :, self.n : self.n + new] = values
        self.n += new

    def _reserve(self, needed: int) -> None:
        """Room for ``needed`` slots: doubling, but not past the limit (or past what one chunk needs)."""
        if needed <= self.capacity:
            return
        target = max(needed, 2 * self.capacity)
        if self.limit is not None:  # doubling stops at the limit; past it, exactly what one chunk needs
            target = max(needed, min(target, self.limit))
        self._resize(target)

    def fit(self) -> None:
        """Give back spare capacity after a large eviction (e.g. the one compression after a prompt)."""
        floor = max(self.n, self.limit or 0)
        if self.capacity > 2 * floor:
            self._resize(floor)

    def _resize(self, capacity: int) -> None:
        self._keys = _resized(self._keys, self.n, capacity)
        self._values = _resized(self._values, self.n, capacity)

    def keep_first(self, kept: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move slot ``src`` to ``dst`` ([B, 1|H, M] pairs from ``tail_moves``), then keep ``kept`` slots."""
        if src.shape[-1]:
            for buffer in (self._keys, self._values):
                batch, heads, _, dim = buffer.shape
                shape = (batch, heads, src.shape[-1], dim)
                moved = buffer.gather(2, src.unsqueeze(-1).expand(shape))
                buffer.scatter_(2, dst.unsqueeze(-1).expand(shape), moved)
        self.n = kept

    def move_last_into(self, slot: torch.Tensor) -> None:
        """Drop one token per row and head: the last live slot moves into ``slot`` [B, 1|H, 1] (the
        last slot itself: nothing moves), then ``n - 1`` slots remain."""
        last = self.n - 1
        for buffer in (self._keys, self._values):
            # the last slot copied out first: a source inside the buffer it is written into is
            # refused by index_copy_ whenever torch can tell (one row of one KV head, e.g. Gemma 3
            # 270M, makes it a plain slice), and would be read while written if it is the target
            moved = buffer[:, :, last : last + 1].clone()
            if slot.shape[:2] == (1, 1):  # one row whose heads share the slot: copy along the slot axis
                buffer.index_copy_(2, slot.view(1), moved)
            else:
                index = slot.unsqueeze(-1).expand(*buffer.shape[:2], 1, buffer.shape[-1])
                buffer.scatter_(2, index, moved)
        self.n = last

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (or reorder) batch rows."""
        self._keys, self._values = self._keys[indices], self._values[indices]


def last_into(per_slot: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Per-slot values [B, R, n] after a one-token drop (``move_last_into`` of the freed ``slot``
    [B, R, 1]): the last slot's value moves into ``slot``; n - 1 values remain."""
    return per_slot.scatter(-1, slot, per_slot[..., -1:])[..., :-1]


def _resized(buffer: torch.Tensor, live: int, capacity: int) -> torch.Tensor:
    batch, heads, _, dim = buffer.shape
    resized = buffer.new_empty(batch, heads, capacity, dim)
    resized[:, :, :live] = buffer[:, :, :live]
    return resized


def tail_moves(survive: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot moves that pack the ``kept`` surviving slots of each row into slots ``[0, kept)``.

    ``survive`` is [B, H, n] bool with exactly ``kept`` True per row. Returns ``(src, dst)``
    [B, H, M], ``M = min(kept, n - kept)``: the m-th surviving slot at or after ``kept`` moves to
    the m-th free slot before it. Rows that need fewer moves are padded with a move of a
    surviving slot below ``kept`` onto itself (a row that needs padding has one), so no pair
    touches another's slots. No host synchronisation.
    """
    length = survive.shape[-1]
    width = min(kept, length - kept)
    if width == 0:
        none = survive.new_empty((*survive.shape[:-1], 0), dtype=torch.long)
        return none, none
    below = survive[..., :kept]
    stay = below.to(torch.uint8).argmax(-1, keepdim=True)  # the first survivor below ``kept``
    dst = _ranked(~below, width, 0, stay)
    src = _ranked(survive[..., kept:], width, kept, stay)
    return src, dst


def _ranked(mask: torch.Tensor, width: int, offset: int, fill: int | torch.Tensor) -> torch.Tensor:
    """[.., width]: ``offset +`` the indices of ``mask``'s True entries in ascending order, then ``fill``."""
    rank = mask.cumsum(-1) - 1
    column = torch.where(mask & (rank < width), rank, width)  # the rest land in a dropped column
    fill = torch.as_tensor(fill, dtype=torch.long, device=mask.device)
    out = fill.expand(*mask.shape[:-1], width + 1).clone()
    index = torch.arange(offset, offset + mask.shape[-1], device=mask.device).expand(mask.shape)
    return out.scatter_(-1, column, index)[..., :width]


def rows_with(mask: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """[.., width]: per row, the first ``counts`` indices where ``mask`` is True (then index 0)."""
    rank = mask.cumsum(-1) - 1
    return _ranked(mask & (rank < counts.unsqueeze(-1)), width, 0, 0)


def broadcast_over_heads(keep: torch.Tensor) -> bool:
    """Whether ``keep`` [B, H, K] is one list broadcast to every row and head (a policy's shared pick)."""
    return all(size == 1 or stride == 0 for size, stride in zip(keep.shape[:2], keep.stride()[:2], strict=True))
