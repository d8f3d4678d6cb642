"""``random``: a seeded random choice of ``capacity`` tokens, the control every comparison needs."""

from __future__ import annotations

import torch

from .base import check_sizes
from .ranked import RankedPolicy

_U64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX_1, _MIX_2, _GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
MIX_1, MIX_2, GOLDEN = _signed(_MIX_1), _signed(_MIX_2), _signed(_GOLDEN)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shift(x, 30)) * MIX_1
    x = (x ^ _shift(x, 27)) * MIX_2
    return x ^ _shift(x, 31)


def mix64_int(value: int) -> int:
    """``mix64`` of one unsigned 64-bit Python int: a draw's key, mixed without a tensor (a decode
    step derives one per layer; as scalar tensors that was ~20 small operations)."""
    value = ((value ^ (value >> 30)) * _MIX_1) & _U64
    value = ((value ^ (value >> 27)) * _MIX_2) & _U64
    return value ^ (value >> 31)


def uniform_scores(rel: torch.Tensor, *keys: int, step: int | torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo-random float64 in [0, 1) per slot, a pure function of ``keys``, the slot index ``rel``
    and ``step`` (an int, or one per row as a [B, 1, 1] tensor, mixed in last)."""
    key = 0
    for part in keys:
        key = mix64_int((key * _GOLDEN + part + 1) & _U64)
    if isinstance(step, int):
        key = mix64_int((key * _GOLDEN + step + 1) & _U64)
    elif step is not None:  # one key per row
        mixed_key = mix64(step.to(torch.long) + (_signed((key * _GOLDEN + 1) & _U64)))
        return _shift(mix64(rel.to(torch.long) * GOLDEN + mixed_key), 11).to(torch.float64) / float(1 << 53)
    mixed = mix64(rel.to(torch.long) * GOLDEN + _signed(key))
    return _shift(mixed, 11).to(torch.float64) / float(1 << 53)


class RandomPolicy(RankedPolicy):
    """Once a layer holds more than ``capacity`` tokens, keep a uniformly random ``capacity`` of them.

    The choice is one set per batch row, shared by the layer's heads, drawn from a hash of
    (``seed``, layer, the row's step number counting only steps at which it held a real token, the
    slot's index within its row): the same for a prompt alone
    or in a padded batch, on CPU and CUDA, and free of any global random state. Compare with
    kvpress's ``RandomPress`` (which draws per head). Default regime: once after the prompt,
    like the prefill-compression methods it controls for; under ``evict=every_forward`` each
    step draws afresh. Budget N: ``capacity = N - 1``.
    """

    name = "random"
    params = ("capacity", "seed")
    signal = "none"
    default_evict = "after_prefill"

    def __init__(self, capacity: int = 160, seed: int = 0, layer: int = 0):
        super().__init__(capacity)
        check_sizes(self.name, {"seed": seed}, {"seed": 0})
        self.seed, self.layer = seed, layer

    def for_layer(self, layer_idx: int, n_layers: int) -> RandomPolicy:
        layer = RandomPolicy(self.capacity, self.seed, layer_idx)
        layer.budget = self.budget
        return layer

    def ranking(self, state, current, rel):
        return uniform_scores(rel, self.seed, self.layer, step=state.real_steps())
