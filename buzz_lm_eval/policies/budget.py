"""Split one KV-token budget N into a policy's sizes (the spec's "same memory" rule).

Every policy evicts as soon as it holds more than ``sum(sizes)`` tokens and then keeps at most
that many, so a decode step holds at most ``sum(sizes) + 1`` tokens: the sizes add up to
``N - 1``. Sizes the caller fixes are kept; the others share the rest by fixed weights.
"""

from __future__ import annotations


def split_budget(
    policy: str,
    budget: int,
    given: dict[str, int | None],
    defaults: dict[str, int],
    weights: dict[str, int],
) -> dict[str, int]:
    """Return sizes summing to ``budget - 1``; ValueError when they cannot."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
        raise ValueError(f"{policy}: budget must be an integer >= 2, got {budget!r}")
    total = budget - 1
    fixed = {k: v for k, v in given.items() if v is not None}
    fixed.update({k: v for k, v in defaults.items() if k not in fixed})
    free = [k for k in weights if k not in fixed]
    rest = total - sum(fixed.values())
    if not free:
        if rest != 0:
            shown = ", ".join(f"{k}={v}" for k, v in fixed.items())
            raise ValueError(
                f"{policy}: {shown} add up to {total - rest}, but budget={budget} needs {total} (budget - 1)"
            )
        return fixed
    if rest < len(free):
        fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "no fixed parts"
        raise ValueError(
            f"{policy}: budget={budget} is too small: after {fixed_text} only {rest} tokens remain "
            f"for {', '.join(free)} (each needs >= 1)"
        )
    weight_sum = sum(weights[k] for k in free)
    sizes = dict(fixed)
    for k in free[:-1]:
        sizes[k] = max(1, rest * weights[k] // weight_sum)
    sizes[free[-1]] = rest - sum(sizes[k] for k in free[:-1])
    if sizes[free[-1]] < 1:
        raise ValueError(f"{policy}: budget={budget} is too small to split among {', '.join(free)}")
    return sizes
