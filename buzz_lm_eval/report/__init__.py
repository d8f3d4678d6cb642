"""Sweeps and their reports: grids of runs through lm-eval, then leaderboards, plots and heatmaps.

- ``sweep`` (``buzz-lm-eval sweep``) and ``sweep_resume``: one model load, many cache settings;
- ``leaderboard`` (``buzz-lm-eval leaderboard``), ``leaderboard_md``, ``results_reader``,
  ``plots``, ``heatmaps``: results files to tables and figures;
- ``machine``: the hardware a run records.

The last stage: imports ``harness``, ``cache`` and ``policies``, and nothing imports it.
"""
