"""What differs between the transformers 5.x releases this package allows.

transformers 5.24 renamed the models' ``past_key_values=`` argument to ``cache=`` (the old name
warns, and is announced to go in 5.40); earlier 5.x releases only know ``past_key_values``.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name the installed transformers' ``model.forward`` and ``generate`` take."""
    return {_cache_argument(type(model)): cache}
