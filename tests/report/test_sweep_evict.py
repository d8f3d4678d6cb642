"""``buzz-lm-eval sweep --evict``: the regime reaches every run, its directory name and its results."""

from __future__ import annotations

import json

from buzz_lm_eval.report import sweep

from .test_sweep import TASK, argv


def test_evict_option_runs_every_policy_in_that_regime(tmp_path, capsys):
    output = tmp_path / "run"
    code = sweep.main([*argv(output, policies="full,snapkv,tova", budgets="32"), "--evict", "every_forward"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["full", "snapkv_b32_every_forward", "tova_b32_every_forward"]
    for name in ("snapkv_b32_every_forward", "tova_b32_every_forward"):
        [path] = (output / name).glob("results_*.json")
        data = json.loads(path.read_text(encoding="utf-8"))
        cache = data["config"]["buzz_cache"]
        assert cache["evict"] == "every_forward" and cache["kept_tokens_peak"] <= 32 - 1 + 64
        assert "evict=every_forward" in data["config"]["model_args"] and data["results"][TASK]
    assert sweep.plan_grid(["snapkv"], [32])[0][0].evict is None  # without --evict: the policy's own regime
