"""The lm-eval side: the ``buzz_hf`` model and everything it needs to run inside lm-eval.

- ``hflm``: ``BuzzHFLM`` (registered as ``buzz_hf``), lm-eval's ``HFLM`` under an evicting cache;
- ``model_args``: its own keys (the policy keys come from ``policies.POLICIES``) and their checks;
- ``startup``: the import hook ``buzz_lm_eval_startup.pth`` installs (registration, task path);
- ``lm_eval_cli``: lm-eval's CLI in this process; ``datasets``/``longbench``: task data and exports;
- ``offline_models``, ``paths``, ``files``, ``run_stats``: models, shipped files, atomic writes,
  per-run statistics.

Imports only ``policies`` and ``cache`` from this package. Kept import-light: the startup hook
imports this package at every interpreter start.
"""
