"""BUZZ and baseline KV-cache eviction for transformers, evaluated with lm-evaluation-harness.

Subpackages named after the pipeline's stages, data flowing one way (each imports only those
before it):

- ``policies``: scores -> kept token indices, one file per policy (the registry ``POLICIES``);
- ``cache``: a transformers ``Cache`` applying a policy per layer, and the forward path it needs
  (score capture through the attention interface, mask reads, RoPE positions, regimes);
- ``harness``: the ``buzz_hf`` lm-eval model, its model_args, the startup hook, task data;
- ``tasks/`` (YAML, beside the package) -> ``report``: sweeps, leaderboards, plots.

``cli`` (the ``buzz-lm-eval`` script) and ``demo`` sit on top.
"""

__version__ = "0.1.0"
