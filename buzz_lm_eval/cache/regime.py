"""When a cache layer evicts: after every forward, or once when the prompt has been read.

``every_forward``: the policy runs after each forward (prefill, prefill chunk, decode step).
``after_prefill``: the policy runs once, when the prompt has been read: after the forward that
brings the layer to exactly ``prompt_length`` tokens or, without a prompt length, at the first
forward that brings one token per row (a decode step), before that token is stored, with the
scores of the forwards before it. So ``generate(prefill_chunk_size=...)`` compresses the whole
prompt with or without ``prompt_length``. Earlier forwards only record scores, and later ones let
the cache grow.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policies.base import EVICT_MODES, Policy


def check_regime(evict: str | None, prompt_length: int | None, policy: Policy) -> str:
    """The eviction mode to use (``evict``, else the policy's published one); ValueError if invalid."""
    if evict is not None and evict not in EVICT_MODES:
        raise ValueError(f"evict must be one of {', '.join(EVICT_MODES)}, got {evict!r}")
    if prompt_length is not None and (
        isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1
    ):
        raise ValueError(f"prompt_length must be a positive integer, got {prompt_length!r}")
    return policy.default_evict if evict is None else evict


@dataclass
class Schedule:
    """One layer's eviction schedule; ``phase`` is asked once per forward."""

    mode: str = "every_forward"
    prompt_length: int | None = None
    compressed: bool = False
    last_new: int = 0  # tokens the previous forward brought
    shrunk: bool = False  # a forward brought fewer tokens than the one before: the prompt's last chunk

    def compress_first(self, seen: int, new: int) -> bool:
        """Whether the stored prompt is compressed before this forward's ``new`` tokens are appended:
        under ``after_prefill`` without a prompt length, the first forward bringing one token per
        row after the first forward ends the prefill."""
        return (
            self.mode == "after_prefill"
            and self.prompt_length is None
            and not self.compressed
            and seen > 0
            and new == 1
        )

    def phase(self, seen: int, new: int) -> str:
        """``evict``, ``observe`` (accumulate only) or ``grow`` for the forward of ``new`` tokens
        reaching ``seen``; ValueError when the forwards show that ``prompt_length`` is not the prompt's."""
        if self.mode == "every_forward":
            return "evict"
        if self.compressed:
            return "grow"
        ended, self.shrunk = self.shrunk, self.shrunk or 0 < new < self.last_new
        self.last_new = new
        if self.prompt_length is None:
            return "observe"  # until ``compress_first``
        if seen == self.prompt_length:
            self.compressed = True
            return "evict"
        if seen > self.prompt_length or ended:
            what = (
                f"a forward brought tokens {seen - new + 1}..{seen}, past it"
                if seen > self.prompt_length
                else f"the prompt ended before it (a forward shorter than the one before it, then another "
                f"forward, with {seen} tokens seen)"
            )
            raise ValueError(
                f"prompt_length={self.prompt_length} disagrees with the prompt: {what}; give the prompt's "
                "real length, or leave prompt_length out (the first one-token forward then ends the prefill)"
            )
        return "observe"

    def mark_compressed(self) -> None:
        self.compressed = True

    def reset(self) -> None:
        self.compressed, self.last_new, self.shrunk = False, 0, False
