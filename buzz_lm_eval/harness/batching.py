"""Request batching helpers of ``buzz_hf``: grouped runs and temporary settings."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def temporarily(owner, attribute: str, value):
    """Set ``owner.attribute`` to ``value`` for the duration of a ``with`` block."""
    previous = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, previous)


def in_groups(items: list, key, run, longest_first: bool = False) -> list:
    """``run(group_key, members)`` for each group of ``items`` sharing ``key(item)`` (in first-seen
    order, or by descending key); the outputs come back in the items' original order."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    order = sorted(groups, reverse=True) if longest_first else list(groups)
    results: list = [None] * len(items)
    for group in order:
        members = groups[group]
        for i, output in zip(members, run(group, [items[i] for i in members]), strict=True):
            results[i] = output
    return results
