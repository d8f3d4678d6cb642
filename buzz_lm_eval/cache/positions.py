"""RoPE positions of kept tokens: ``original`` or ``shifted`` (the authors' and StreamingLLM's rule).

``original``: every kept key keeps the rotation of its original position.

``shifted``: after each eviction the kept keys are re-rotated so that the relative distance
between any later query and the i-th kept token of its row and KV head is what it would be if
the kept tokens were contiguous. The authors store keys unrotated and rotate the compacted cache
at indices 0..L-1 on every forward; since RoPE attention depends only on query-key distances,
the same logits follow from rotating each kept key forward by the number of evicted tokens that
came after it, once per eviction (rotations compose). Queries keep the positions transformers
gives them.

The rotation uses the inverse frequencies of the model's own rotary embedding, so every rope type
whose frequencies do not depend on the sequence length is exact (``STATIC_ROPE_TYPES``); types
that rescale with the length (dynamic NTK, LongRoPE) are refused under ``shifted``.
"""

from __future__ import annotations

import torch

POSITION_MODES = ("shifted", "original")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def check_positions(positions: str | None) -> str:
    """The validated mode (default ``shifted``); ValueError naming the valid ones."""
    positions = "shifted" if positions is None else positions
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}; got {positions!r}")
    return positions


class KeyRotation:
    """Rotates stored keys by per-token position deltas with one layer's RoPE frequencies.

    Deltas are whole numbers of positions, so the cosines and sines come from one table indexed
    by the delta (grown on demand), not from a transcendental per key.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()
        self.rotary_dim = 2 * inv_freq.numel()
        self._table = None  # cos and sin by delta (see ``tables``)

    def tables(self, bound: int, device) -> torch.Tensor:
        """[2n + 1, 2, rotary_dim / 2] cos and sin of every delta in ``[-n, n]``, ``n >= bound``; row
        ``n + d`` holds delta ``d``."""
        if self._table is None or self._table.shape[0] <= 2 * bound or self._table.device != torch.device(device):
            held = 0 if self._table is None else self._table.shape[0] // 2
            size = max(bound, 2 * held)  # doubling: a growing bound rebuilds the table rarely
            angles = torch.arange(-size, size + 1, device=device).unsqueeze(-1).float() * self.inv_freq.to(device)
            self._table = torch.stack([angles.cos(), angles.sin()], dim=1)
        return self._table

    def angles(self, delta: torch.Tensor, bound: int, back: bool = False) -> torch.Tensor:
        """[.., 2, rotary_dim / 2] cos and sin of ``delta`` [..] positions (|delta| <= ``bound``), or
        of ``-delta`` with ``back``: what ``turn_`` applies."""
        table = self.tables(bound, delta.device)
        middle, delta = table.shape[0] // 2, delta.long()  # (a narrower delta would overflow past ``middle``)
        rows = (middle - delta if back else delta + middle).reshape(-1)
        return table.view(table.shape[0], -1).index_select(0, rows).view(*delta.shape, 2, self.rotary_dim // 2)

    def rotate_(self, keys: torch.Tensor, delta: torch.Tensor, bound: int, back: bool = False) -> torch.Tensor:
        """Rotate ``keys`` [.., K, D] in place by ``delta`` [.., K] positions (|delta| <= ``bound``),
        or by ``-delta`` with ``back``. A delta of 0 leaves a key exactly as it was."""
        return self.turn_(keys, self.angles(delta, bound, back))

    def turn_(self, keys: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` [.., D] in place by the angles ``cos_sin`` [.., 2, rotary_dim / 2] (from
        ``angles``; broadcast over leading dimensions of ``keys``).

        RoPE's rotate-half layout: dimension j pairs with j + rotary_dim / 2; float32 math.
        """
        half = self.rotary_dim // 2
        cos, sin = cos_sin[..., 0, :], cos_sin[..., 1, :]
        first, second = keys[..., :half], keys[..., half : self.rotary_dim]
        x, y = (first, second) if keys.dtype == torch.float32 else (first.float(), second.float())
        x_sin = x * sin
        x.mul_(cos).addcmul_(y, sin, value=-1)
        y.mul_(cos).add_(x_sin)
        if x.data_ptr() != first.data_ptr():
            first.copy_(x)
            second.copy_(y)
        return keys

    def rotate_slots(self, keys: torch.Tensor, delta: torch.Tensor, bound: int) -> None:
        """Rotate ``keys`` [B, H, K, D] in place by ``delta`` [B, 1|H, K] (|delta| <= ``bound``) positions.

        On the CPU, where reading the count costs nothing, no key moves when none needs to and a
        small subset (e.g. StreamingLLM's sinks) is rotated alone; on accelerators every key is
        rotated (a delta of 0 exactly), so the step has no host synchronisation.
        """
        if keys.device.type == "cpu" and delta.shape[:2] == (1, 1):  # one row, its heads alike: index slots
            slots = delta.view(-1).nonzero().squeeze(1)
            if slots.shape[0] == 0:
                return
            if 2 * slots.shape[0] <= delta.shape[-1]:
                cos_sin = self.angles(delta.view(-1).index_select(0, slots), bound)
                keys.index_copy_(2, slots, self.turn_(keys.index_select(2, slots), cos_sin))
            else:  # most keys move: all of them, without counting again below
                self.rotate_(keys, delta.expand(keys.shape[:3]), bound)
            return
        delta = delta.expand(keys.shape[:3])
        if keys.device.type == "cpu":
            flat = delta.reshape(-1)
            moved = flat.nonzero().squeeze(1)  # (row * heads + head) * K + slot of each key that changes
            if moved.shape[0] == 0:
                return
            layout = _rows(keys)
            if layout is not None and 2 * moved.shape[0] <= flat.shape[0]:
                rows, capacity = layout
                width = keys.shape[2]
                index = moved + (moved // width) * (capacity - width)  # the key's row in ``rows``
                rows.index_copy_(
                    0, index, self.rotate_(rows.index_select(0, index), flat.index_select(0, moved), bound)
                )
                return
        self.rotate_(keys, delta, bound)


def _rows(keys: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``keys`` [B, H, K, D], the first K slots of a contiguous [B, H, capacity, D] buffer (a slot
    store's), as that buffer's [B * H * capacity, D] rows, and ``capacity``; None for another layout."""
    batch, heads, _, dim = keys.shape
    capacity = keys.stride(1) // dim
    if keys.stride(0) != heads * keys.stride(1) or keys.stride(1) % dim or keys.stride(2) != dim or keys.stride(3) != 1:
        return None
    return keys.as_strided((batch * heads * capacity, dim), (dim, 1)), capacity


def evicted_after(
    keep: torch.Tensor, length: int, real: torch.Tensor | None, kept_real: torch.Tensor | None
) -> torch.Tensor:
    """For each kept index, how many real tokens after it (in [0, length)) were evicted: [B|1, H|1, K].

    ``real`` [B, 1|H, length] marks real (non-padding) slots before the eviction; ``kept_real``
    [B, 1|H, K] marks which entries of ``keep`` are real kept tokens (padded layouts fill the front
    of short rows with index 0). Both None: every slot is real and every entry of ``keep`` counts.
    """
    source = torch.ones_like(keep, dtype=torch.int32) if kept_real is None else kept_real.expand(keep.shape).int()
    kept = torch.zeros(*keep.shape[:-1], length, dtype=torch.int32, device=keep.device)
    evicted = 1 - kept.scatter_reduce(-1, keep, source, reduce="amax")
    if real is not None:
        evicted = evicted * real.to(torch.int32)
    after = evicted.flip(-1).cumsum(-1).flip(-1)  # evicted at index >= i (a kept i adds nothing)
    return after.gather(-1, keep)


def key_rotations(model, n_layers: int) -> list[KeyRotation]:
    """One ``KeyRotation`` per decoder layer from the model's rotary embedding; ValueError if none fits."""
    text = model.config.get_text_config(decoder=True)
    rotary = _find_rotary(model)
    if rotary is None:
        raise ValueError(
            f"positions=shifted needs a rotary position embedding, and model type {text.model_type!r} "
            "has none that buzz-lm-eval can find; use positions=original"
        )
    layer_types = getattr(text, "layer_types", None) or [None] * n_layers
    rotations = []
    for layer_type in layer_types[:n_layers]:
        rope_type = rotary.rope_type
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(layer_type)
        require_static(rope_type)
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None and layer_type is not None:
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        if inv_freq is None:
            raise ValueError(f"positions=shifted: no inverse frequencies found on {type(rotary).__name__}")
        rotations.append(KeyRotation(inv_freq))
    return rotations


def require_static(rope_type) -> None:
    """ValueError unless kept keys of this rope type can be re-rotated exactly."""
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"positions=shifted cannot re-rotate keys for rope_type {rope_type!r} (its frequencies depend "
            f"on the sequence length); supported: {', '.join(STATIC_ROPE_TYPES)}. Use positions=original"
        )


def check_rope_config(config) -> None:
    """Fail before any weight loads if ``positions=shifted`` cannot serve this config's RoPE."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):
        return  # no standard RoPE description: ``key_rotations`` decides once the model is loaded
    per_type = rope.values() if "rope_type" not in rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in per_type:
        require_static(params.get("rope_type", "default"))


def _find_rotary(model):
    """The decoder's shared rotary embedding module (``rotary_emb``), if any."""
    for candidate in (getattr(model, "model", None), model.get_decoder() if hasattr(model, "get_decoder") else None):
        rotary = getattr(candidate, "rotary_emb", None)
        if rotary is not None and hasattr(rotary, "rope_type"):
            return rotary
    return None
