"""When a cache layer evicts: after every forward, or once when the prompt has been read.

``every_forward``: the policy runs after each forward (prefill, prefill chunk, decode step).
``after_prefill``: the policy runs once, after the forward that brings the layer to
``prompt_length`` tokens (without a prompt length, after the first forward); earlier forwards
only accumulate scores for policies that accumulate them, and later ones let the cache grow.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policies.base import EVICT_MODES, Policy


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

    def phase(self, seen: int) -> str:
        """``evict``, ``observe`` (accumulate only) or ``grow`` for the forward reaching ``seen`` tokens."""
        if self.mode == "every_forward":
            return "evict"
        if self.compressed:
            return "grow"
        if self.prompt_length is None or seen >= self.prompt_length:
            self.compressed = True
            return "evict"
        return "observe"

    def reset(self) -> None:
        self.compressed = False
