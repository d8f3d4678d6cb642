"""One layer's ``shifted`` positions: kept keys re-rotated lazily, in classes that each carry a lag.

After an eviction a kept key must move forward by the number of evicted tokens after it
(``positions.py``). Moving every key of a row and KV head by a constant ``c`` changes no logit
if its queries move by ``c`` too, so keys may sit ``lag`` positions behind the positions the
cache reports, with queries and new keys put ``lag`` positions back as well.

Dropping one token per decode step moves the keys before it forward by one. With one lag per
row and head, the shorter side of the dropped token is rotated (c = 0 or 1): half the cache
when, as with H2O, the token leaving is the one in the middle. In a decode step whose attention
runs through the score kernel, the kept keys are instead cut into ``LAG_CLASSES`` contiguous
runs of the original order, each with its own lag: the runs before the dropped token only add
one to their lag, and only the dropped token's run rotates its shorter side. The kernel scores
each key with the query rotated by its run's lag (one small GEMM row per run). Every
``RESPLIT_EVERY`` drops, or before a forward that cannot use classes (several queries, sdpa),
the runs are flushed to one lag, rotating only the keys whose lag differs from the largest
run's; cutting runs that share a lag rotates nothing.
"""

from __future__ import annotations

import torch

from ..policies.base import cached_arange
from .positions import KeyRotation
from .slots import last_into

LAG_CLASSES = 2  # runs of kept keys, each with its own lag, in a decode step with scores
# decode drops between two flushes and re-cuts of the runs: new keys join the last run and drops
# thin the others, so rare re-cuts leave runs uneven (more keys rotate within one) and frequent
# ones rotate whole runs; tova's uniform drops in `wide` (1024 keys) rotated 1209 / 1151 / 1127 keys
# per drop over 256 steps at 32 / 64 / 128
RESPLIT_EVERY = 128


class ShiftedKeys:
    """Lags of one layer's stored keys: ``lag`` [B, 1|H, C] per run, ``key_class`` [B, 1|H, L] per slot
    (int8: a decode step's bookkeeping of runs moves an eighth of the bytes int64 would)."""

    def __init__(self, rotation: KeyRotation, classes: int = 1):
        self.rotation = rotation
        self.classes = classes  # 1: one lag per row and head, as for policies attending through sdpa
        self.reset()

    def reset(self) -> None:
        self.lag: torch.Tensor | None = None  # None: no key lags
        self.key_class: torch.Tensor | None = None  # None: every slot is in run 0
        self.drops = 0  # one-token drops since the runs were cut
        self._angles: tuple[torch.Tensor, torch.Tensor] | None = None  # (lag, its back rotation)
        self._moving: tuple[torch.Tensor, bool] | None = None  # (lag, whether any of it is non-zero)

    def on_append(self, new_keys: torch.Tensor, bound: int) -> None:
        """Put freshly stored keys [B, H, q, D] (a view into the store) into the last run, ``lag`` back."""
        if self.lag is None:
            return
        if self.key_class is not None or self.lags(new_keys.shape[2]):
            self.rotation.turn_(new_keys, self.lag_angles(bound)[:, :, -1:])
        if self.key_class is not None:
            last = self.key_class.new_full((*self.key_class.shape[:2], new_keys.shape[2]), self.classes - 1)
            self.key_class = torch.cat([self.key_class, last], dim=-1)

    def lags(self, tokens: int) -> bool:
        """Whether a key may lag, for a forward of ``tokens`` new tokens. In a CPU decode step a lag of
        zero everywhere (what a sliding window's or StreamingLLM's drops leave: they rotate keys
        but move no lag) counts as none, read once per lag tensor, so the step rotates no query and
        no new key, the bulk of its fixed cost per layer. Elsewhere any lag counts: on an
        accelerator the read would synchronise with the host, and a chunk's rotations are cheap
        against its attention (and its host reads stay once per forward, ``mask_reads``)."""
        if self.lag is None:
            return False
        if self.lag.device.type != "cpu" or tokens != 1:
            return True
        if self._moving is None or self._moving[0] is not self.lag:
            self._moving = (self.lag, bool(self.lag.any()))
        return self._moving[1]

    def lag_angles(self, bound: int) -> torch.Tensor:
        """[B, R, C, 2, rotary_dim / 2]: the rotation back by each run's lag, computed once per lag
        (a decode step's new key and its queries share it)."""
        if self._angles is None or self._angles[0] is not self.lag:
            self._angles = (self.lag, self.rotation.angles(self.lag, bound, back=True))
        return self._angles[1]

    def align_query(self, query: torch.Tensor, keys: torch.Tensor, classed: bool, bound: int):
        """The queries [B, H_q, q, D] as the stored keys expect them, and the slots' runs.

        With runs (``classed``: one query scored by ``attention_with_scores``) the query comes
        back as [B, H_q, C, D], rotated once per run, with ``key_class`` [B, 1|H_kv, L];
        otherwise the runs are flushed first and ``(query, None)`` comes back.
        """
        if self.key_class is not None and not (classed and query.shape[2] == 1):
            self.flush(keys, bound)
        if self.key_class is None and not self.lags(query.shape[2]):
            return query, None
        batch, heads, length, dim = query.shape
        rows = self.lag.shape[1]  # 1, or one lag per KV head: its query heads are consecutive
        angles = self.lag_angles(bound).unsqueeze(2)  # [B, R, 1, C, 2, half]
        if self.key_class is None:
            aligned = query.clone()
        else:
            aligned, length = query.expand(batch, heads, self.classes, dim).clone(), self.classes
        self.rotation.turn_(aligned.view(batch, rows, heads // rows, length, dim), angles)
        return aligned, self.key_class

    def before_drop(self, keys: torch.Tensor, order: torch.Tensor, bound: int) -> None:
        """Before a one-token drop (``keys`` not yet compacted, ``order`` [B, 1|H, L] the slots in
        original order): cut the runs if there are none yet or they are due for a re-cut."""
        if self.classes == 1 or (self.key_class is not None and self.drops < RESPLIT_EVERY):
            return
        self.flush(keys, bound)
        length = order.shape[-1]
        run = torch.arange(length, device=order.device) * self.classes // length  # by rank in original order
        self.key_class = torch.empty_like(order).scatter_(-1, order, run.expand_as(order)).to(torch.int8)
        lag = self.lag if self.lag is not None else order.new_zeros(order.shape[0], 1, 1)
        self.lag, self.drops = lag.expand(*lag.shape[:2], self.classes), 0

    def on_drop_one(self, keys: torch.Tensor, before: torch.Tensor, slot: torch.Tensor, bound: int) -> None:
        """One token dropped per row and head, its slot ``slot`` [B, R, 1] refilled by the last slot
        (``keys`` already compacted); ``before`` [B, 1|H, K] bool marks (per slot) the kept keys
        ahead of it. Runs before the dropped token's run add one to their lag; within its run, the
        keys ahead of it rotate forward by one, or, when they are the majority, the keys after it
        rotate back and the run's lag grows by one (the same choice ``on_evict`` makes for one run)."""
        if self.key_class is None:
            ahead = before.sum(-1, keepdim=True)
            shift = 2 * ahead > before.shape[-1]
            self.lag = shift.long() if self.lag is None else self.lag + shift
            self.rotation.rotate_slots(keys, before.long() - shift.long(), bound)
            return
        self.drops += 1
        runs = self.key_class.expand(*slot.shape[:2], -1)
        dropped = runs.gather(-1, slot)
        runs = last_into(runs, slot)  # the store's move: the last slot fills the freed one
        same = runs == dropped
        ahead = before & same
        same, ahead = same.view(torch.int8), ahead.view(torch.int8)  # 0/1 bytes: arithmetic without a copy
        shift = torch.sub(same, ahead, alpha=2).sum(-1, keepdim=True) < 0  # the keys ahead are the majority
        runs_before = cached_arange(self.classes, slot.device) < dropped + shift  # and the dropped one's when shift
        self.lag = self.lag + runs_before
        self.rotation.rotate_slots(keys, torch.where(shift, ahead - same, ahead), bound)
        self.key_class = runs

    def on_evict(
        self, keys: torch.Tensor, delta: torch.Tensor, order: torch.Tensor, live: torch.Tensor | None, bound: int
    ) -> None:
        """Move the kept keys (slots ``order`` of ``keys``) forward by ``delta`` [B, 1|H, K] (original
        order), after a compaction the runs were flushed before (``flush``)."""
        counted = delta if live is None else torch.where(live, delta, 0)
        top = counted.amax(-1, keepdim=True)
        below_top = ((delta < top) if live is None else (delta < top) & live).sum(-1, keepdim=True)
        shift = torch.where(below_top < (counted > 0).sum(-1, keepdim=True), top, 0)
        self.lag = shift if self.lag is None else self.lag + shift
        per_slot = torch.zeros_like(order).scatter_(-1, order, delta - shift)
        self.rotation.rotate_slots(keys, per_slot, bound)

    def flush(self, keys: torch.Tensor, bound: int) -> None:
        """Bring every run of ``keys`` [B, H, L, D] to one lag, the lag of each row and head's largest run."""
        if self.key_class is None:
            return
        lag, runs = self._per_slot()
        sizes = torch.zeros(lag.shape, dtype=runs.dtype, device=runs.device).scatter_add_(
            -1, runs, torch.ones_like(runs)
        )
        common = lag.gather(-1, sizes.argmax(-1, keepdim=True))
        self.rotation.rotate_slots(keys, lag.gather(-1, runs) - common, bound)
        self.lag, self.key_class = common, None

    def lag_of_slots(self) -> torch.Tensor:
        """[B, R, L] the lag of each slot's run."""
        lag, runs = self._per_slot()
        return lag.gather(-1, runs)

    def _per_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lag`` [B, R, C] and ``key_class`` [B, R, L] (as indices) expanded to the same rows."""
        rows = max(self.lag.shape[1], self.key_class.shape[1])
        return (
            self.lag.expand(self.lag.shape[0], rows, -1),
            self.key_class.long().expand(self.key_class.shape[0], rows, -1),
        )

    def canonical(self, keys: torch.Tensor, bound: int) -> torch.Tensor:
        """A copy of stored keys [B, H, K, D] rotated at the positions the cache reports."""
        if self.lag is None:
            return keys
        per_slot = self.lag if self.key_class is None else self.lag_of_slots()
        return self.rotation.rotate_(keys.clone(), per_slot.expand(keys.shape[:3]), bound)

    def select_batch(self, indices: torch.Tensor) -> None:
        if self.lag is not None:
            self.lag = self.lag[indices]
        if self.key_class is not None:
            self.key_class = self.key_class[indices]
