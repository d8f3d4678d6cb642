"""``EvictingLayer``: one decoder layer's cache, evicting with its policy after each forward."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..policies import Policy
from ..policies.base import all_but, real_slots
from .attention import offer_layer
from .layer_stats import LayerStats
from .positions import KeyRotation, evicted_after
from .regime import Schedule
from .shifted_keys import LAG_CLASSES, ShiftedKeys
from .slots import SlotStore, broadcast_over_heads, last_into, rows_with, tail_moves
from .visibility import visible_mask

ONE_CACHE = "an evicting cache serves one generate call (build a new one with build_cache, or call cache.reset())"


class EvictingLayer(DynamicLayer):
    """A dynamic layer whose policy drops tokens after each forward's attention.

    An evicting policy's keys and values live in a ``SlotStore`` (see ``slots.py``): slots are
    reused, so ``keys``/``values`` hold the kept tokens in no particular order. ``positions``
    gives each slot's position (``-1`` for padding) and ``order`` the slots in the tokens'
    original order (None while slot i holds the i-th kept token); ``kept()`` returns them in
    that order. ``full`` stores as ``DynamicLayer`` does.
    """

    is_croppable = False

    def __init__(
        self,
        policy: Policy,
        sliding_window: int | None = None,
        sync_timing: bool = False,
        rotation: KeyRotation | None = None,
        schedule: Schedule | None = None,
    ):
        super().__init__()
        self.sync_timing = sync_timing
        self.policy = policy
        runs = LAG_CLASSES if policy.signal == "attention" else 1  # lag runs need the score kernel's decode
        self.shift = None if rotation is None else ShiftedKeys(rotation, runs)  # None: keys keep their rotation
        self.schedule = schedule or Schedule()
        self.phase = "evict"  # this forward: "evict", "observe" (scores only) or "grow" (regime.py)
        self.state = policy.new_state()
        self.sliding_window = sliding_window
        self.seen = 0
        self.pending: torch.Tensor | None = None  # scores of the last forward before a deferred compression
        self.evicted = False  # stored slots no longer equal the seen sequence
        self.padded = False  # some stored slot is padding (position -1)
        self.store: SlotStore | None = None
        self.positions: torch.Tensor | None = None  # [B, 1|H, L] per slot: position its key is rotated at
        self.order: torch.Tensor | None = None  # [B, 1|H, L] slots in original token order
        self.key_norms: torch.Tensor | None = None  # [B, H, L] per slot, for the key_norm signal (knorm)
        self.stats = LayerStats()
        self.group = None  # a LayerGroup batching this layer's decode drops with its cache's others
        self.group_index = 0  # this layer's turn in the group

    # -- the Cache layer contract ---------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.empty(key_states.shape[0], 1, 0, dtype=torch.long, device=self.device)
        batch, heads, _, dim = key_states.shape
        self.stats.bytes_per_token = 2 * batch * heads * dim * key_states.element_size()
        self.stats.sync = self.sync_timing and key_states.device.type == "cuda"

    def update(self, key_states, value_states, *args, **kwargs):
        if self.stored() and key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"EvictingCache: this cache holds {self.keys.shape[0]} sequence(s) but the forward brings "
                f"{key_states.shape[0]}: {ONE_CACHE}"
            )
        if self.group is not None:
            self.group.settle(self)  # a forward that ended before its last layer left this drop deferred
        before, new = self.stored(), key_states.shape[-2]
        if self.schedule.compress_first(self.seen, new):
            self.compress_pending()
            before = self.stored()
        keys, values = (
            self._append(key_states, value_states) if self.policy.evicts else super().update(key_states, value_states)
        )
        self.positions = torch.cat([self.positions, self._span(self.seen, new, self.positions)], dim=-1)
        if self.order is not None:
            self.order = torch.cat([self.order, self._span(before, new, self.order)], dim=-1)
        if self.policy.signal == "key_norm":  # a key's norm is its own: measured once, before any re-rotation
            if self.schedule.compressed:  # after_prefill's one compression is done: no eviction reads a norm again
                self.key_norms = None
            else:
                norms = torch.linalg.vector_norm(key_states, dim=-1, dtype=torch.float32)  # [B, H, new]
                self.key_norms = norms if self.key_norms is None else torch.cat([self.key_norms, norms], dim=-1)
        self.seen += new
        self.stats.peak_tokens = max(self.stats.peak_tokens, keys.shape[-2])
        allocated = self.store.nbytes() if self.store is not None else keys.untyped_storage().nbytes() * 2
        self.stats.allocated_bytes_peak = max(self.stats.allocated_bytes_peak, allocated)
        self.phase = self.schedule.phase(self.seen, new)
        if self.policy.evicts:
            offer_layer(self)  # the attention function evicts after this layer's attention
        else:
            self.stats.count_forward(keys.shape[-2])
        return keys, values

    def _append(self, key_states, value_states):
        """Write the new tokens into the slot store (an evicting policy's storage)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store is None:
            bounded = self.schedule.mode == "every_forward"  # after_prefill grows once compressed
            self.store = SlotStore(key_states, value_states, self.policy.budget if bounded else None)
        else:
            self.store.append(key_states, value_states)
        self.keys, self.values = self.store.keys, self.store.values
        if self.shift is not None:
            self.shift.on_append(self.keys[:, :, -key_states.shape[-2] :], self.seen + key_states.shape[-2])
        return self.keys, self.values

    def _span(self, start: int, count: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device).expand(*like.shape[:2], count)

    def stored(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 0:
            again = f"this cache has already seen {self.seen} tokens, at least as many as the new prompt; {ONE_CACHE}"
            cause = again if self.seen else "the prompt is empty"
            raise ValueError(f"EvictingCache: a forward with no new tokens: {cause}")
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def reset(self) -> None:
        """Forget every token and statistic: the layer is as new (whatever ``DynamicLayer.reset`` keeps)."""
        self.keys = self.values = None
        self.is_initialized = False
        self.state, self.seen, self.positions, self.key_norms = self.policy.new_state(), 0, None, None
        self.pending = None
        self.store = self.order = None
        if self.shift is not None:
            self.shift.reset()
        if self.group is not None:
            self.group.release()
        self.evicted = self.padded = False
        self.stats = LayerStats()
        self.schedule.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.stored() > 0:
            indices = indices.to(self.device)
            if self.store is not None:
                self.store.select_batch(indices)
                self.keys, self.values = self.store.keys, self.store.values
            else:
                self.keys, self.values = self.keys[indices], self.values[indices]
            self.positions = self.positions[indices]
            self.order = None if self.order is None else self.order[indices]
            self.key_norms = None if self.key_norms is None else self.key_norms[indices]
            self.pending = None if self.pending is None else self.pending[indices]
            self.state.select_batch(indices)
            if self.shift is not None:
                self.shift.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.stored() > 0:
            index = torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (assisted decoding is not supported)")

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [B, H, K, D], values and positions [B, H, K] of the stored tokens, in original order."""
        batch, heads, length, dim = self.keys.shape
        keys = self.keys if self.shift is None else self.shift.canonical(self.keys, self.seen)
        values, positions = self.values, self.positions.expand(batch, heads, length)
        if self.order is not None:
            order = self.order.expand(batch, heads, length)
            slots = order.unsqueeze(-1).expand(batch, heads, length, dim)
            keys, values, positions = keys.gather(2, slots), values.gather(2, slots), positions.gather(-1, order)
        return keys, values, positions

    def ordered(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Per-slot ``scores`` [B, H_kv, L] in the tokens' original order (None stays None)."""
        return None if scores is None else self.in_order(scores)

    def in_order(self, per_slot: torch.Tensor) -> torch.Tensor:
        """A per-slot [B, 1|H, L] tensor rearranged into the tokens' original order."""
        if self.order is None:
            return per_slot
        batch, _, length = per_slot.shape
        heads = max(per_slot.shape[1], self.order.shape[1])
        return per_slot.expand(batch, heads, length).gather(-1, self.order.expand(batch, heads, length))

    # -- called by the attention function -----------------------------------------------------
    @property
    def needs_attention(self) -> bool:
        """Whether this forward's attention probabilities are used (the policy's query window of them)."""
        if self.policy.signal != "attention":
            return False
        if self.phase == "evict":
            return True
        # before a deferred compression: accumulate, or keep the last forward's (no prompt length)
        return self.phase == "observe" and (self.policy.accumulates or self.schedule.prompt_length is None)

    def align_query(self, query: torch.Tensor, classed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The queries as the stored keys expect them (``shifted`` keys may lag) and the slots' lag runs
        (None: one run); ``classed``: the attention is ``attention_with_scores``, which scores runs
        (see ``ShiftedKeys.align_query``)."""
        if self.shift is None:
            return query, None
        return self.shift.align_query(query, self.keys, classed, self.seen)

    def visibility(self, library_mask: torch.Tensor | None, q: int, scored: bool = False) -> torch.Tensor | None:
        """What the new queries may see (``visible_mask``: the library mask until evicted)."""
        return visible_mask(self, library_mask, q, scored)

    def evict(self, scores: torch.Tensor | None, query_valid: torch.Tensor | None) -> None:
        """Mark padding among the new tokens, run the policy (repeated under a budget), compact.

        ``scores`` [B, H_kv, L] are per slot; the policy sees them in the tokens' original order.
        ``query_valid`` [B, q]: which new tokens are real, None when all are (``query_validity``).
        """
        if query_valid is not None:
            new = self.positions[..., -query_valid.shape[-1] :]
            new.masked_fill_(~query_valid.unsqueeze(1), -1)
            self.padded = True
        if self.phase != "evict":
            self.defer(self.ordered(scores))
            return
        if self.schedule.mode == "after_prefill":
            self.compress(self.ordered(scores))
        elif self.group is None or not self.group.defer(self, scores):
            self.evict_now(self.ordered(scores))

    def compress(self, scores: torch.Tensor | None) -> None:
        """The one eviction of ``after_prefill``, with the tokens held before and after it recorded."""
        before = self.stored()
        self.evict_now(scores)
        self.stats.compressed(before, self.stored())

    def compress_pending(self) -> None:
        """``after_prefill`` without a prompt length: the prompt ended with the previous forward, so
        compress now, with the scores it left (accumulating policies hold theirs in their state)."""
        self.schedule.mark_compressed()
        scores, self.pending = self.pending, None
        if scores is None and self.policy.signal == "attention" and self.keys is not None:
            scores = self.keys.new_zeros(*self.keys.shape[:2], self.stored(), dtype=torch.float32)
        self.compress(scores)

    def evict_now(self, scores: torch.Tensor | None) -> None:
        """This forward's eviction (``scores`` in original order): one dropped token, or the
        policy's kept list, repeated until the budget holds."""
        dropped = self.step_one(scores)
        if dropped is not None:  # the decode step's one token leaves
            self.drop_one(dropped)
            self.stats.count_forward(self.stored())
            return
        keep = self.run_policy(scores)
        budget = self.policy.budget
        while keep is not None:
            self.compact(keep)
            if budget is None or self.stored() <= budget - 1:
                break
            # another round inside this forward: no new attention, only the state's scores
            keep = self.run_policy(None if scores is None else scores.new_zeros(*scores.shape[:2], self.stored()))
        self.stats.count_forward(self.stored())

    def signal(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """What the policy reads ([B, H_kv, 1, L], original order): this forward's attention, or the
        stored keys' norms for a ``key_norm`` policy."""
        if self.policy.signal == "key_norm":
            scores = self.in_order(self.key_norms)
        return None if scores is None else scores.unsqueeze(2)

    def run_policy(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """One policy step over the stored tokens (original order); the kept indices or None."""
        batch, heads, length, _ = self.keys.shape
        return self.policy.step(
            self.state,
            self.signal(scores),
            self.in_order(self.positions)[:, 0] >= 0 if self.padded else None,
            shape=(batch, heads, length),
            device=self.keys.device,
        )

    def step_one(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """The policy's one-token step (``Policy.step_one``, which declines every other step) when
        nothing is padding: the dropped index [B|1, 1|H, 1] in original order, or None (then
        ``run_policy`` decides)."""
        if not self.drops_one():
            return None
        return self.policy.step_one(self.state, self.signal(scores), self.keys.shape[:3], self.keys.device)

    def drops_one(self) -> bool:
        """Whether this step's eviction drops one token (``step_one`` acts): nothing is padding and
        the policy drops exactly one of the stored tokens."""
        return not (self.padded or self.state.ragged) and self.policy.drops_one(self.state, self.stored())

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the tokens ``keep`` names; the common decode case (one token leaves, no padding) is cheaper."""
        width = keep.shape[-1]
        if self.padded or self.state.ragged or width != self.stored() - 1:
            self.compact_many(keep)
        else:  # the one index missing from ``keep``
            keep = self.tracked_rows(keep)
            self.drop_one(width - (keep != torch.arange(width, device=keep.device)).sum(-1, keepdim=True))

    def tracked_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep`` [B, H, K] as [B, 1, K] when every head keeps the same list and the slots are still
        tracked once per row (the order and positions are then kept per row, not per head)."""
        if broadcast_over_heads(keep) and (self.order is None or self.order.shape[1] == 1):
            return keep[:, :1]
        return keep

    def drop_one(self, dropped: torch.Tensor) -> None:
        """Drop the token at index ``dropped`` [B|1, 1|H, 1] of the original order, nothing being
        padding: the last slot's token moves into the freed slot, and (under ``shifted``) the kept
        tokens before the dropped one move one position forward, or those after it one back
        (whichever are fewer, see ``ShiftedKeys``). Positions are monotone in the original order,
        so "before" is read off the positions, without the order."""
        batch, heads, length, _ = self.keys.shape
        width = length - 1
        shared = dropped.shape[1] == 1 and (self.order is None or self.order.shape[1] == 1)
        rows = 1 if shared else heads  # the order and positions are tracked per row while heads agree
        dropped = dropped.expand(batch, rows, 1)
        order = torch.arange(length, device=self.device) if self.order is None else self.order
        order = order.expand(batch, rows, length)
        slot = order.gather(-1, dropped)  # [B, rows, 1]
        if self.shift is not None:
            self.shift.before_drop(self.keys, order, self.seen)
        self.store.move_last_into(slot)
        self.keys, self.values = self.store.keys, self.store.values
        order = order.gather(-1, all_but(length, dropped))
        self.order = torch.where(order == width, slot, order)
        positions = self.positions.expand(batch, rows, length)
        gone = positions.gather(-1, slot)
        positions = last_into(positions, slot)
        if self.key_norms is not None:
            self.key_norms = last_into(self.key_norms, slot.expand(batch, heads, 1))
        if self.shift is not None:
            before = positions < gone
            self.shift.on_drop_one(self.keys, before, slot, self.seen)
            positions = positions + before
        self.positions, self.evicted = positions, True

    def compact_many(self, keep: torch.Tensor) -> None:
        """Keep the tokens ``keep`` names ([B, H, K] indices in original order), moving as few slots as
        possible; re-rotate them under ``positions="shifted"``."""
        batch, heads, length, _ = self.keys.shape
        width = keep.shape[-1]
        if self.shift is not None:
            self.shift.flush(self.keys, self.seen)  # one lag for all: the deltas below are general
        keep = self.tracked_rows(keep)
        rows = keep.shape[1]
        slots = keep if self.order is None else self.order.expand(batch, rows, length).gather(-1, keep)
        live = real_slots(self.state.n_real, width) if self.padded or self.state.ragged else None
        if live is not None:  # rows keeping fewer real tokens fill their front with unused slots
            dummy = slots.new_zeros(batch, rows, length + 1).scatter_(-1, torch.where(live, slots, length), 1)
            spare = rows_with(dummy[..., :length] == 0, width - self.state.n_real.view(-1, 1), width)
            slots = torch.where(live, slots, spare)
        survive = torch.zeros(batch, rows, length, dtype=torch.bool, device=self.device).scatter_(-1, slots, True)
        src, dst = tail_moves(survive, width)
        positions = self.positions.expand(batch, rows, length).gather(-1, slots)
        norms = None if self.key_norms is None else self.key_norms.gather(-1, slots.expand(batch, heads, width))
        self.store.keep_first(width, src.expand(batch, heads, -1), dst.expand(batch, heads, -1))
        self.store.fit()
        self.keys, self.values = self.store.keys, self.store.values
        order = (
            torch.arange(length, device=self.device).expand(batch, rows, length).scatter(-1, src, dst).gather(-1, slots)
        )
        if live is not None:
            positions = positions.masked_fill(~live, -1)
            self.padded = bool((positions < 0).any())
        if self.shift is not None:
            real = self.in_order(self.positions) >= 0 if live is not None else None
            delta = evicted_after(keep, length, real, live).to(order.dtype)
            positions = torch.where(positions >= 0, positions + delta, positions)
            self.shift.on_evict(self.keys, delta, order, live, self.seen)
        self.positions = torch.empty_like(positions).scatter_(-1, order, positions)
        if norms is not None:
            self.key_norms = torch.empty_like(norms).scatter_(-1, order.expand(batch, heads, width), norms)
        self.order, self.evicted = order, True

    def defer(self, scores: torch.Tensor | None) -> None:
        """A forward that does not evict (after_prefill): accumulate scores before the compression."""
        if self.phase == "observe":
            self.policy.observe(self.state, None if scores is None else scores.unsqueeze(2))
            if not self.policy.accumulates and self.schedule.prompt_length is None:
                self.pending = scores  # the last prompt forward's scores, for ``compress_pending``
        self.stats.count_forward(self.stored())
