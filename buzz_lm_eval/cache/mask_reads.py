"""Facts about an attention mask read on the host once per forward, not once per layer.

Reading a tensor's value on the host (``bool(t)``, ``torch.equal``) makes an accelerator finish
its queued kernels first. What the score kernel and the cache ask of a chunk's mask (is it the
plain causal mask? are all its queries real tokens?) is the same for every layer of a forward,
which all get the very same mask object from transformers: the answer is remembered for that
object until the next forward begins (``EvictingCache.update`` at layer 0 calls ``forget``; a
mask may be rewritten in place between forwards) or the mask is freed. Version counters cannot
serve: tensors made under ``torch.inference_mode`` have none. Each thread remembers its own.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

PLAIN_CAUSAL, QUERIES_REAL = "plain causal", "all queries real"
_remembered = threading.local()  # per thread: {(question, id(mask)): (weak mask, answer)}


def plain_causal(mask: torch.Tensor) -> bool:
    """Whether a [B, 1|H_kv, q, L] mask (q > 1) shows every past key and the new keys causally (the
    library's mask of an unpadded chunk): two byte comparisons, read once per mask."""
    return read_once(mask, PLAIN_CAUSAL, _reads_plain_causal)


def _reads_plain_causal(mask: torch.Tensor) -> bool:
    q_len, length = mask.shape[-2:]
    if q_len == 1 or length < q_len:
        return False  # one query: nothing to skip (and no host sync in a decode step)
    if length > q_len and not bool(mask[..., : length - q_len].view(torch.uint8).amin() == 1):
        return False
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=mask.device).tril_()
    return torch.equal(mask[..., length - q_len :], causal.expand(*mask.shape[:2], q_len, q_len))


def read_once(mask: torch.Tensor, question: str, read: Callable[[torch.Tensor], bool]) -> bool:
    """``read(mask)``, or its answer for this same mask object earlier in this forward."""
    held = _slots().get((question, id(mask)))
    if held is not None and held[0]() is mask:
        return held[1]
    answer = read(mask)
    remember(mask, question, answer)
    return answer


def remember(mask: torch.Tensor, question: str, answer: bool) -> None:
    """Record ``answer`` for ``mask``, known without reading it (e.g. from the mask it was built from)."""
    slots, key = _slots(), (question, id(mask))
    slots[key] = (weakref.ref(mask, lambda _: slots.pop(key, None)), answer)


def forget() -> None:
    """Drop every answer: a new forward begins."""
    _slots().clear()


def _slots() -> dict:
    slots = getattr(_remembered, "slots", None)
    if slots is None:
        slots = _remembered.slots = {}
    return slots
