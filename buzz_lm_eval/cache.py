"""An evicting transformers ``Cache``: one policy per layer, applied after every forward.

    cache = build_cache(model, "buzz", budget=256)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24
    cache.stats()

Each ``EvictingLayer`` is a ``DynamicLayer`` that also remembers, for every stored slot, the
position its key is rotated at (``-1`` for padding). The layer reports tokens *seen* as its
sequence length, so new positions continue correctly, and once it has evicted it builds the
attention visibility from the stored positions itself. With ``positions="shifted"`` (default)
kept keys are re-rotated after each eviction as if the kept tokens were contiguous (see
``positions.py``); with ``"original"`` they keep their original rotation.

With a ``budget``, an eviction repeats its policy's rounds inside the forward until the layer
holds at most ``budget - 1`` tokens (BUZZ thins its samples again), so the budget is a
guarantee for any chunk size; explicit sizes without a budget keep the authors' one round per
forward ("paper mode").
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .architectures import layer_windows
from .attention import offer_layer, prepare_model
from .policies import Policy, build_policy
from .policies.base import real_slots
from .positions import KeyRotation, check_positions, evicted_after, key_rotations
from .regime import Schedule, check_regime

ONE_CACHE = "an evicting cache serves one generate call (build a new one with build_cache, or call cache.reset())"


@dataclass
class LayerStats:
    """Running counters of one layer (token counts are per batch row)."""

    forwards: int = 0
    peak_tokens: int = 0
    kept_tokens_sum: int = 0
    bytes_per_token: int = 0
    evict_seconds: float = 0.0
    sync: bool = False

    def count_forward(self, kept: int) -> None:
        self.forwards += 1
        self.kept_tokens_sum += kept

    @contextmanager
    def timer(self):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.evict_seconds += time.perf_counter() - start


class EvictingLayer(DynamicLayer):
    """A dynamic layer whose policy drops tokens after each forward's attention."""

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
        self.rotation = rotation  # None: kept keys keep their original rotation
        self.schedule = schedule or Schedule()
        self.phase = "evict"  # this forward: "evict", "observe" (scores only) or "grow" (regime.py)
        self.state = policy.new_state()
        self.sliding_window = sliding_window
        self.seen = 0
        self.evicted = False  # stored slots no longer equal the seen sequence
        self.padded = False  # some stored slot is padding (position -1)
        self.positions: torch.Tensor | None = None  # [B, 1|H, L] positions keys are rotated at, -1 = padding
        self.key_norms: torch.Tensor | None = None  # [B, H, L] for the key_norm signal (knorm)
        self.stats = LayerStats()

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
        keys, values = super().update(key_states, value_states)
        new = key_states.shape[-2]
        fresh = torch.arange(self.seen, self.seen + new, device=self.device)
        self.positions = torch.cat([self.positions, fresh.expand(*self.positions.shape[:2], new)], dim=-1)
        if self.policy.signal == "key_norm":  # a key's norm is its own: measured once, before any re-rotation
            norms = key_norms(key_states)
            self.key_norms = norms if self.key_norms is None else torch.cat([self.key_norms, norms], dim=-1)
        self.seen += new
        self.stats.peak_tokens = max(self.stats.peak_tokens, keys.shape[-2])
        self.phase = self.schedule.phase(self.seen)
        if self.policy.evicts:
            offer_layer(self)  # the attention function evicts after this layer's attention
        else:
            self.stats.count_forward(keys.shape[-2])
        return keys, values

    def stored(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 0:
            cause = "the prompt is empty" if self.seen == 0 else (
                f"this cache has already seen {self.seen} tokens, at least as many as the new prompt; {ONE_CACHE}"
            )
            raise ValueError(f"EvictingCache: a forward with no new tokens: {cause}")
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def reset(self) -> None:
        """Forget every token and statistic: the layer is as new (whatever ``DynamicLayer.reset`` keeps)."""
        self.keys = self.values = None
        self.is_initialized = False
        self.state, self.seen, self.positions, self.key_norms = self.policy.new_state(), 0, None, None
        self.evicted = self.padded = False
        self.stats = LayerStats()
        self.schedule.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.stored() > 0:
            indices = indices.to(self.device)
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.positions = self.positions[indices]
            self.key_norms = None if self.key_norms is None else self.key_norms[indices]
            self.state.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.stored() > 0:
            index = torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats)
            self.batch_select_indices(index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (assisted decoding is not supported)")

    # -- called by the attention function -----------------------------------------------------
    @property
    def needs_attention(self) -> bool:
        """Whether this forward's attention probabilities are used (the policy's query window of them)."""
        if self.policy.signal != "attention":
            return False
        return self.phase == "evict" or (self.phase == "observe" and self.policy.accumulates)

    def visibility(self, library_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
        """[B, 1|H, q, L] bool mask of what the new queries may see (library mask until evicted)."""
        if not self.evicted:
            return library_mask
        if q == 1 and not self.padded and self.sliding_window is None:
            return None  # a single query sees every stored token
        past = self.positions[..., : self.stored() - q]
        allowed = (past >= 0).unsqueeze(2)
        if self.sliding_window is not None:
            query_pos = torch.arange(self.seen - q, self.seen, device=self.device).view(1, 1, q, 1)
            allowed = allowed & (past.unsqueeze(2) > query_pos - self.sliding_window)
        batch, heads = past.shape[:2]
        allowed = allowed.expand(batch, heads, q, past.shape[-1])
        if library_mask is None:
            new = torch.ones(q, q, dtype=torch.bool, device=self.device).tril().expand(batch, heads, q, q)
        else:
            new = library_mask[..., -q:].expand(batch, heads, q, q)
        return torch.cat([allowed, new], dim=-1)

    def evict(self, scores: torch.Tensor | None, query_valid: torch.Tensor | None) -> None:
        """Mark padding among the new tokens, run the policy (repeated under a budget), compact."""
        if query_valid is not None and not bool(query_valid.all()):
            new = self.positions[..., -query_valid.shape[-1] :]
            new.masked_fill_(~query_valid.unsqueeze(1), -1)
            self.padded = True
        if self.phase != "evict":
            self.defer(scores)
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

    def run_policy(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """One policy step over the stored tokens; the kept indices or None.

        ``scores`` are this forward's attention; a ``key_norm`` policy gets the stored keys' norms.
        """
        batch, heads, length, _ = self.keys.shape
        if self.policy.signal == "key_norm":
            scores = self.key_norms
        return self.policy.step(
            self.state,
            None if scores is None else scores.unsqueeze(2),
            self.positions[:, 0] >= 0 if self.padded else None,
            shape=(batch, heads, length),
            device=self.keys.device,
        )

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` names; re-rotate them under ``positions="shifted"``."""
        batch, heads, length, _ = self.keys.shape
        real = self.positions >= 0 if self.padded else None
        shared = shared_indices(keep)
        if shared is not None:  # one list for every row and head: plain slicing copies
            keep = shared
            self.keys, self.values = self.keys.index_select(2, shared), self.values.index_select(2, shared)
            positions = self.positions.index_select(-1, shared)
        else:
            self.keys, self.values = take_tokens(self.keys, keep), take_tokens(self.values, keep)
            positions = self.positions.expand(batch, heads, length).gather(-1, keep)
        if self.key_norms is not None:
            self.key_norms = self.key_norms.gather(-1, keep.expand(batch, heads, -1))
        self.evicted = True
        live = None
        if self.padded:
            live = real_slots(self.state.n_real, keep.shape[-1])
            positions = positions.masked_fill(~live, -1)
            self.padded = bool((positions < 0).any())
        if self.rotation is not None:
            delta = evicted_after(keep, length, real, live)
            self.keys = self.rotation.rotate(self.keys, delta)
            positions = torch.where(positions >= 0, positions + delta, positions)
        self.positions = positions

    def defer(self, scores: torch.Tensor | None) -> None:
        """A forward that does not evict (after_prefill): accumulate scores before the compression."""
        if self.phase == "observe":
            self.policy.observe(self.state, None if scores is None else scores.unsqueeze(2))
        self.stats.count_forward(self.stored())


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """[B, H, L] float32 L2 norms of the stored keys (the ``key_norm`` signal)."""
    return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)


def shared_indices(keep: torch.Tensor) -> torch.Tensor | None:
    """The [K] index list if ``keep`` [B, H, K] is one list broadcast to every row and head."""
    if all(size == 1 or stride == 0 for size, stride in zip(keep.shape[:2], keep.stride()[:2])):
        return keep[0, 0]
    return None


def take_tokens(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``states[b, h, keep[b, h], :]`` for [B, H, L, D] states (row indexing beats ``gather`` here)."""
    batch, heads, length, dim = states.shape
    rows = torch.arange(batch * heads, device=states.device).unsqueeze(1)
    return states.reshape(batch * heads, length, dim)[rows, keep.reshape(batch * heads, -1)].view(batch, heads, -1, dim)


class EvictingCache(Cache):
    """A Cache of ``EvictingLayer``s, one per decoder layer, each running ``policy.for_layer(i, n)``.

    One cache serves one ``generate`` call (or one stream of plain forwards); ``reset()`` makes it
    new again. Handing a used cache to another ``generate`` is refused (transformers >= 5.17
    marks the caches it is handed; older 5.x are caught when the prompt is no longer than what
    the cache has seen, or has another batch size).
    """

    _handed_to_generate = False

    def __init__(
        self,
        policy: Policy,
        sliding_windows: list[int | None],
        sync_timing: bool = False,
        rotations: list[KeyRotation] | None = None,
        evict: str = "every_forward",
        prompt_length: int | None = None,
    ):
        n = len(sliding_windows)
        rotations = rotations or [None] * n
        super().__init__(layers=[
            EvictingLayer(policy.for_layer(i, n), window, sync_timing, rotation, Schedule(evict, prompt_length))
            for i, (window, rotation) in enumerate(zip(sliding_windows, rotations))
        ])
        self.policy, self.evict = policy, evict
        self.positions = None if not policy.evicts else "original" if rotations[0] is None else "shifted"

    @property
    def _is_user_defined(self) -> bool:
        return self._handed_to_generate

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        """``generate`` sets this on every cache it is handed: a used cache is refused there."""
        if value and self.get_seq_length() > 0:
            raise ValueError(f"EvictingCache: this cache has already seen {self.get_seq_length()} tokens; {ONE_CACHE}")
        self._handed_to_generate = value

    def stats(self) -> dict:
        """Whole-run statistics as plain ints and floats (see README for definitions)."""
        layers = [layer for layer in self.layers if layer.stats.forwards]
        if not layers:
            return {"tokens_seen": 0, "kept_tokens_peak": 0, "kept_tokens_mean": 0.0, "kv_bytes_peak": 0,
                    "kv_bytes_mean": 0.0, "compression_ratio": 1.0, "evict_seconds": 0.0, "forwards": 0,
                    "kept_tokens_peak_per_layer": [0] * len(self.layers)}
        seen = max(layer.seen for layer in layers)
        peak_bytes = sum(layer.stats.peak_tokens * layer.stats.bytes_per_token for layer in layers)
        mean_tokens = [layer.stats.kept_tokens_sum / layer.stats.forwards for layer in layers]
        full_bytes = sum(layer.seen * layer.stats.bytes_per_token for layer in layers)
        return {
            "tokens_seen": seen,
            "kept_tokens_peak": max(layer.stats.peak_tokens for layer in layers),
            "kept_tokens_mean": sum(mean_tokens) / len(layers),
            "kv_bytes_peak": peak_bytes,
            "kv_bytes_mean": sum(t * layer.stats.bytes_per_token for t, layer in zip(mean_tokens, layers)),
            "compression_ratio": full_bytes / peak_bytes if peak_bytes else 1.0,
            "evict_seconds": sum(layer.stats.evict_seconds for layer in layers),
            "forwards": layers[0].stats.forwards,
            "kept_tokens_peak_per_layer": [layer.stats.peak_tokens for layer in self.layers],
        }


def build_cache(
    model,
    policy: str | Policy = "buzz",
    *,
    positions: str | None = None,
    evict: str | None = None,
    prompt_length: int | None = None,
    sync_timing: bool = False,
    **policy_args,
) -> EvictingCache:
    """A fresh evicting cache for one batch of requests to ``model`` (prepared once for score capture).

    ``positions``: ``"shifted"`` (default; the authors' rule) or ``"original"`` RoPE positions for
    kept tokens; ``full`` never evicts, so it ignores them.
    ``evict``: ``every_forward`` or ``after_prefill`` (default: the policy's published regime);
    under ``after_prefill`` each layer evicts once, after the forward reaching ``prompt_length``
    tokens (default: after the first forward), then grows (see ``regime.py``).
    ``sync_timing`` makes ``evict_seconds`` exact on CUDA by synchronising around each eviction
    (benchmarks); otherwise it is host time, which on a GPU undercounts queued kernels.
    """
    windows = layer_windows(model.config.get_text_config(decoder=True))
    positions = check_positions(positions)
    if not isinstance(policy, Policy):
        policy = build_policy(policy, **policy_args)
    elif policy_args:
        raise ValueError("pass either a Policy object or a policy name with its parameters, not both")
    evict = check_regime(evict, prompt_length, policy)
    rotations = None
    if policy.evicts and positions == "shifted":
        rotations = key_rotations(model, len(windows))
    if policy.evicts:
        prepare_model(model)  # `full` keeps the model's own attention: bit-exact by construction
    return EvictingCache(policy, windows, sync_timing, rotations, evict, prompt_length)
