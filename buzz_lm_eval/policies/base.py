"""What every eviction policy shares: its state, the step skeleton, and parameter checks.

A policy is a pure function of attention scores to kept token indices. It never sees keys,
values or a model. One ``step`` runs after each forward (prefill, prefill chunk, decode step):

    keep = policy.step(state, attn)   # attn: [B, H_kv, q, L] probabilities, or None
    # keep: None (nothing evicted) or LongTensor [B, H_kv, K] of ascending indices

Rows of a batch may carry left padding. The cache then passes ``mask`` ([B, L] bool, True for
real tokens; real tokens always form a suffix of the row). Each row is evicted as if it were
alone; rows that keep fewer tokens than the longest row are filled at the front with index 0,
and ``state.n_real`` says how many trailing slots of each row are real.

Each policy states its rule twice: ``pick`` for rows of one shared geometry (no mask: index
arithmetic, no masks or sorts, the hot path) and ``select`` for rows with their own padding
(boolean masks). The tests run both on the same inputs and require identical results. Policies
that drop one token per decode step also name that token alone (``drop_size`` and
``drop_index``, behind ``step_one``), so a decode step never builds and decodes a kept list.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import ClassVar

import torch


@dataclass
class PolicyState:
    """Per-layer (and per-request) state, compacted together with the cache."""

    scores: torch.Tensor | None = None  # [B, H, L] float32 accumulated attention (S)
    n_old: torch.Tensor | None = None  # [B, 1, 1] middle tokens that are earlier samples
    n_real: torch.Tensor | None = None  # [B] real (non-padding) trailing slots after the step
    ragged: bool = False  # the last kept indices front-fill some row (it keeps fewer than the widest)
    n_old_all: int | None = None  # n_old when every row has the same one (the fast path)
    forwards: int = 0  # steps taken so far (policies whose choice varies per step, e.g. random)
    idle: torch.Tensor | None = None  # [B] steps at which the row held padding only (before its prompt starts)

    def real_steps(self) -> int | torch.Tensor:
        """Steps at which each row held a real token: the same for a prompt alone and in any
        left-padded batch (``forwards`` also counts the forwards of padding only)."""
        return self.forwards if self.idle is None else self.forwards - self.idle.view(-1, 1, 1)

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (or reorder) batch rows, for beam search and batch pruning."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.index_select(0, index.to(value.device)))


@dataclass(frozen=True)
class Selection:
    """What a policy decided on one step, in the pre-eviction layout."""

    keep: torch.Tensor  # [B, 1|H, L] bool, kept real tokens
    reset: torch.Tensor | None = None  # [B, 1|H, L] bool, kept tokens whose score restarts at 0
    n_old: torch.Tensor | None = None  # [B, 1, 1] new count of earlier samples (buzz)


@dataclass(frozen=True)
class Picked:
    """A decision for rows of one shared geometry (no padding): ascending indices directly."""

    indices: torch.Tensor  # [1|B, 1|H, K] ascending indices, the same count in every row
    reset_below: int = 0  # kept tokens before this index restart their score at 0
    n_old: int | None = None  # new count of earlier samples (buzz)


@dataclass(frozen=True)
class StepInput:
    """Shapes and per-row geometry of one step, derived once from ``attn``/``mask``."""

    batch: int
    heads: int
    length: int
    offset: torch.Tensor  # [B, 1, 1] padding slots before the first real token
    n: torch.Tensor  # [B, 1, 1] real tokens in the row
    rel: torch.Tensor  # [B, 1, L] index relative to the first real token (negative = padding)
    device: torch.device


EVICT_MODES = ("every_forward", "after_prefill")
SIGNALS = ("attention", "key_norm", "none")


class Policy:
    """Base class: subclasses set ``name``, ``params``, ``needs_scores`` and ``select``.

    Optional hooks (the defaults are the behaviour of the original policies):
    ``query_window`` (only the last that many queries of a forward count; None = all),
    ``signal`` (what ``attn`` holds: attention probabilities, the L2 norms of the stored keys
    [B, H_kv, 1, L], or nothing), ``default_evict`` (the published regime: after every forward,
    or once after the prompt) and ``for_layer`` (a per-layer variant, e.g. its own budget).
    """

    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    needs_scores: ClassVar[bool] = False
    accumulates: ClassVar[bool] = False  # keeps the accumulated score S in its state
    evicts: ClassVar[bool] = True  # False only for ``full``
    # set by ``build_policy(name, budget=N)``: the cache then evicts until <= N - 1 tokens remain
    budget: int | None = None
    signal: ClassVar[str] = "attention"  # one of SIGNALS; "none" exactly when needs_scores is False
    default_evict: ClassVar[str] = "every_forward"  # one of EVICT_MODES
    query_window: int | None = None

    def new_state(self) -> PolicyState:
        return PolicyState()

    def for_layer(self, layer_idx: int, n_layers: int) -> Policy:
        """The policy that layer ``layer_idx`` of ``n_layers`` runs (default: this one)."""
        return self

    def observe(self, state: PolicyState, attn: torch.Tensor | None) -> None:
        """A forward before a deferred (after-prefill) eviction: accumulate scores, evict nothing."""
        if self.accumulates and attn is not None:
            state.scores = _accumulate(state.scores, self._current(attn), attn.shape[-1])

    def _current(self, attn: torch.Tensor | None) -> torch.Tensor | None:
        """[B, H, L] float32: ``attn`` summed over the queries this policy counts (read, never written)."""
        if attn is None:
            return None
        if attn.shape[2] == 1 and attn.dtype == torch.float32:
            return attn[:, :, 0]  # one query (a decode step, or the cache's own sum): nothing to add up
        return self._window(attn).sum(dim=2, dtype=torch.float32)

    def _window(self, attn: torch.Tensor) -> torch.Tensor:
        """The queries of ``attn`` [B, H, q, L] this policy counts (the last ``query_window``)."""
        return attn if self.query_window is None else attn[:, :, -self.query_window :]

    # -- the contract -------------------------------------------------------------------
    def step(
        self,
        state: PolicyState,
        attn: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        shape: tuple[int, int, int] | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor | None:
        """Update ``state`` with one forward's attention and return the kept indices or None.

        ``attn`` is [B, H_kv, q, L] (only its sum over the last ``query_window`` queries, all by
        default, is used, so callers may pass that sum as [B, H_kv, 1, L]). Policies without scores
        accept ``attn=None`` together with ``shape=(B, H_kv, L)`` (and the cache's ``device``, where
        the kept indices are made).
        """
        if attn is None and self.needs_scores:
            raise ValueError(f"policy {self.name!r} needs attention scores; got attn=None")
        if attn is not None:
            if attn.dim() != 4:
                raise ValueError(f"attn must be [B, H_kv, q, L], got shape {tuple(attn.shape)}")
            batch, heads, _, length = attn.shape
            current = self._current(attn)
            device = attn.device
        elif shape is not None:
            (batch, heads, length), current = shape, None
            device = device or (mask.device if mask is not None else torch.device("cpu"))
        else:
            raise ValueError(f"policy {self.name!r}: pass attn or shape=(B, H_kv, L)")
        state.forwards += 1
        if self.accumulates:
            state.scores = _accumulate(state.scores, current, length)
        if mask is None and (state.n_old is None or state.n_old_all is not None):
            return self._step_uniform(state, batch, heads, length, current, device)
        inp = _geometry(batch, heads, length, mask, device)
        empty = (inp.n.view(-1) == 0).long()
        state.idle = empty if state.idle is None else state.idle + empty
        selection = self.select(state, inp, current)
        if selection is None:
            state.n_real = inp.n.view(-1)
            return None
        keep, state.n_real = _indices_from_mask(selection.keep.expand(batch, heads, length))
        state.ragged = bool((state.n_real < keep.shape[-1]).any())  # _indices_from_mask synced already
        if state.scores is not None:
            live = real_slots(state.n_real, keep.shape[-1])
            if selection.reset is not None:
                live = live & ~selection.reset.expand(batch, heads, length).gather(-1, keep)
            state.scores = state.scores.gather(-1, keep) * live
        if selection.n_old is not None:
            state.n_old, state.n_old_all = selection.n_old, None
        return keep

    def _step_uniform(self, state, batch, heads, length, current, device) -> torch.Tensor | None:
        """The step when every row has the same geometry: index arithmetic, no masks or sorts."""
        picked = self.pick(state, length, current, device)
        state.n_real = torch.full((batch,), length if picked is None else picked.indices.shape[-1], device=device)
        state.ragged = False
        if picked is None:
            return None
        keep = picked.indices.expand(batch, heads, -1)
        if state.scores is not None:
            state.scores = state.scores.gather(-1, keep)
            if picked.reset_below:
                state.scores.masked_fill_(keep < picked.reset_below, 0.0)
        if picked.n_old is not None:
            state.n_old_all = picked.n_old
            state.n_old = torch.full((batch, 1, 1), picked.n_old, device=device)
        return keep

    def step_one(
        self, state: PolicyState, attn: torch.Tensor | None, shape: tuple[int, int, int], device: torch.device
    ) -> torch.Tensor | None:
        """``step`` (no mask) for a step that drops exactly one token: the index of that token,
        [1|B, 1|H, 1] in original order; ``step`` would keep every other one (the state is
        updated alike). None, with the state untouched, when this policy drops no single token
        from ``shape = (B, H_kv, L)`` (no ``drop_size``, another length, or earlier samples).
        """
        batch, heads, length = shape
        if not self.drops_one(state, length):
            return None
        state.forwards += 1
        current = self._current(attn)
        if self.accumulates:
            state.scores = _accumulate(state.scores, current, length)
        dropped = self.drop_index(state, length, current, device)
        state.n_real, state.ragged = None, False  # every row real: nothing to record (see ``compact``)
        if state.scores is not None:
            state.scores = state.scores.gather(-1, all_but(length, dropped).expand(batch, heads, -1))
        return dropped

    def drops_one(self, state: PolicyState, length: int) -> bool:
        """Whether ``step_one`` acts on ``length`` tokens: this policy then drops exactly one."""
        return self.drop_size() == length - 1 and state.n_old is None

    # -- hooks for subclasses (the same rule, twice) -----------------------------------------
    def select(self, state: PolicyState, inp: StepInput, current: torch.Tensor | None) -> Selection | None:
        """Any batch, rows with their own padding: a mask of the kept real tokens, or None."""
        raise NotImplementedError

    def pick(self, state: PolicyState, length: int, current, device) -> Picked | None:
        """Rows without padding (one geometry): the kept indices, or None to keep everything."""
        raise NotImplementedError

    def drop_size(self) -> int | None:
        """The tokens a step without padding keeps when it drops exactly one (None: no such step)."""
        return None

    def drop_index(self, state: PolicyState, length: int, current, device) -> torch.Tensor:
        """``pick`` for ``length == drop_size() + 1``: the dropped index [1|B, 1|H, 1] (the state's
        scores are already accumulated and are compacted by the caller)."""
        raise NotImplementedError

    def max_chunk(self) -> int | None:
        """Largest forward whose eviction always restores the size bound (None: any size)."""
        return None

    def check_bounded(self) -> None:
        """ValueError when these sizes let the cache grow without bound (no policy here does by default)."""

    def sizes(self) -> dict[str, int | str]:
        """The policy's sizes (plain ints; ``pooling`` is a name) for logs and result files."""
        return {p: getattr(self, p) for p in self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)}" for p in self.params)
        return f"{type(self).__name__}({args})"


# -- shared tensor helpers ---------------------------------------------------------------
def _geometry(batch, heads, length, mask, device) -> StepInput:
    """Per-row offsets of the real-token suffix."""
    if mask is None:
        n = torch.full((batch, 1, 1), length, dtype=torch.long, device=device)
    else:
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"mask must be [B, L] = {(batch, length)}, got {tuple(mask.shape)}")
        n = mask.to(device=device).sum(dim=-1, dtype=torch.long).view(batch, 1, 1)
    offset = length - n
    rel = torch.arange(length, device=device).view(1, 1, length) - offset
    return StepInput(batch, heads, length, offset, n, rel, device)


def _accumulate(scores: torch.Tensor | None, current: torch.Tensor, length: int) -> torch.Tensor:
    """S <- pad(S, new tokens with 0) + A.sum(q)."""
    if scores is None:
        return current.clone()
    pad = length - scores.shape[-1]
    if pad < 0:
        raise ValueError(f"attention covers {length} tokens but the state already holds {scores.shape[-1]}")
    return torch.nn.functional.pad(scores, (0, pad)) + current


def span(start: int, stop: int, device, step: int = 1) -> torch.Tensor:
    """``arange(start, stop, step)`` shaped [1, 1, n] to broadcast over rows and heads."""
    return torch.arange(start, stop, step, device=device).view(1, 1, -1)


def all_but(length: int, dropped: torch.Tensor) -> torch.Tensor:
    """[.., length - 1] ascending indices of ``[0, length)`` without ``dropped`` [.., 1]."""
    kept = cached_arange(length - 1, dropped.device)
    return kept + (kept >= dropped)


@functools.lru_cache(maxsize=16)
def cached_arange(length: int, device: torch.device) -> torch.Tensor:
    """``arange(length)``, made once per length and device (every decode step asks for the same
    one); shared, so callers never write into it."""
    return torch.arange(length, device=device)


def _indices_from_mask(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending kept indices per row/head; shorter rows are front-filled with index 0."""
    length = keep_mask.shape[-1]
    counts = keep_mask.sum(dim=-1)  # [B, H]
    width = int(counts.max())
    arange = torch.arange(length, device=keep_mask.device).expand_as(keep_mask)
    ranked = torch.where(keep_mask, arange, -1).sort(dim=-1).values[..., length - width :]
    return ranked.clamp_min(0), counts[:, 0]


def real_slots(n_real: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 1, width] bool: True for the trailing ``n_real`` slots of each row."""
    slots = torch.arange(width, device=n_real.device).view(1, 1, width)
    return slots >= (width - n_real).view(-1, 1, 1)


def whole(value):
    """An integral float as its int (lm-eval's CLI reads "-5" as -5.0); any other value unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integral(owner: str, key: str, value) -> int:
    """``value`` as an int: an int, or a float with an integral value; ValueError otherwise."""
    value = whole(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {key} must be an integer, got {value!r}")
    return value


def check_sizes(policy: str, values: dict, minimum: dict) -> None:
    """Reject non-integer or too-small sizes with a message naming the value and the rule."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{policy}: {key} must be an integer, got {value!r}")
        low = minimum.get(key, 1)
        if value < low:
            raise ValueError(f"{policy}: {key} must be >= {low}, got {value}")
