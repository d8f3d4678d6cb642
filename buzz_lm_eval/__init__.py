"""BUZZ and baseline KV-cache eviction for transformers, evaluated with lm-evaluation-harness.

Layers, data flowing one way:
``policies`` (scores -> kept indices) -> ``cache`` (a transformers Cache applying a policy
per layer) -> ``attention`` (score capture through the attention interface) -> ``hflm``
(the ``buzz_hf`` lm-eval model) -> ``tasks/`` -> ``sweep`` / ``leaderboard``.
"""

__version__ = "0.1.0"
