"""Eviction policies: pure functions from attention scores to kept token indices.

from buzz_lm_eval.policies import build_policy
policy = build_policy("buzz", sink=4, window=160, threshold=400, stride=5)   # or budget=256
state = policy.new_state()
keep = policy.step(state, attn)   # None, or LongTensor [B, H_kv, K] of ascending indices
"""

from __future__ import annotations

from .base import Policy, PolicyState, integral, whole
from .buzz import BuzzPolicy
from .buzz_fast import BuzzFastPolicy
from .buzz_nomax import BuzzNoMaxPolicy
from .full import FullPolicy
from .h2o import H2OPolicy
from .knorm import KnormPolicy
from .local import LocalPolicy
from .pyramidkv import PyramidKVPolicy
from .random_policy import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .suggest import did_you_mean
from .tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        FullPolicy,
        LocalPolicy,
        StreamingPolicy,
        H2OPolicy,
        BuzzPolicy,
        BuzzFastPolicy,
        BuzzNoMaxPolicy,
        SnapKVPolicy,
        PyramidKVPolicy,
        TOVAPolicy,
        KnormPolicy,
        RandomPolicy,
    )
}
POLICY_NAMES = tuple(POLICIES)
# every policy's own parameters (its ``params``), in registry order: the keys besides ``budget`` that
# the harness accepts and passes to ``build_policy``, so a new policy needs nothing outside this package
POLICY_PARAMS: tuple[str, ...] = tuple(dict.fromkeys(key for cls in POLICIES.values() for key in cls.params))
MIN_BUDGET = 2


def policy_keys(name: str) -> tuple[str, ...]:
    """The keyword arguments ``build_policy`` accepts for ``name`` (sizes, plus budget)."""
    cls = policy_class(name)
    return cls.params + (() if cls is FullPolicy else ("budget",))


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        hint = did_you_mean(name, POLICY_NAMES)
        raise ValueError(f"unknown cache policy {name!r}{hint}; valid policies: {', '.join(POLICY_NAMES)}")
    return POLICIES[name]


def build_policy(name: str, budget: int | float | None = None, **sizes: int | float | str | None) -> Policy:
    """Build a policy from explicit sizes, or derive its sizes from one KV-token ``budget``.

    Sizes and budget are integers; floats with an integral value (as lm-eval's CLI parses ``-5``)
    count as those integers.
    """
    cls = policy_class(name)
    unknown = sorted(set(sizes) - set(cls.params))
    if budget is not None and cls is FullPolicy:
        raise ValueError("full has no budget: it keeps every token (drop budget=, or pick another policy)")
    if unknown:
        valid = policy_keys(name)
        hint = did_you_mean(unknown[0], valid) if len(unknown) == 1 else ""
        raise ValueError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}{hint}; valid: {', '.join(valid) or 'none'}"
        )
    sizes = {key: whole(value) for key, value in sizes.items()}  # other values meet the policy's own checks
    if budget is None:
        return cls(**sizes)
    budget = integral(name, "budget", budget)
    if budget < MIN_BUDGET:
        raise ValueError(
            f"{name}: budget must be an integer >= {MIN_BUDGET}, got {budget} (a decode step holds "
            "the kept tokens and the new one, so at least one token must be kept)"
        )
    policy = cls.from_budget(budget, **sizes)
    policy.budget = budget  # a guarantee: the cache repeats eviction rounds until it holds
    return policy


__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "POLICY_PARAMS",
    "Policy",
    "PolicyState",
    "build_policy",
    "policy_class",
    "policy_keys",
]
