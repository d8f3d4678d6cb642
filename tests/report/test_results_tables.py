"""Tests for ``results/tables.py``, the script that prints results/README.md's tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "results" / "tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(policy: str, budget: int | None, evict: str | None, value: float, task: str = "buzz_10qa_smoke_gold4"):
    """A leaderboard row as ``buzz-lm-eval leaderboard`` writes it (the fields the tables read)."""
    return {
        "task": task,
        "metric": "best_subspan_em",
        "policy": policy,
        "budget": budget,
        "value": value,
        "stderr": 0.05,
        "higher_is_better": True,
        "relative_quality": None if policy == "full" else value / 0.2,
        "full_value": 0.2,
        "kv_bytes_peak": 2**20 * (budget or 100),
        "kv_bytes_mean": 2**19 * (budget or 100),
        "kept_tokens_mean": 10.0,
        "n_samples": 50,
        "batch_size": 8,
        "source": f"{policy}_{budget}_{evict}.json",
        "settings": {"chat_template": "abc"},
        "cache": {"evict": evict},
    }


def pair(source: str, difference: float) -> dict:
    return {
        "task": "buzz_10qa_smoke_gold4",
        "metric": "best_subspan_em",
        "source": source,
        "mean_difference": difference,
        "stderr": 0.04,
        "wins": 1,
        "losses": 6,
        "ties": 43,
        "sign_test_p": 0.125,
    }


def test_extras_table_lists_every_policy_at_the_extras_budget_with_its_paired_comparison(tables):
    rows = [
        row("full", None, None, 0.2),
        row("h2o", 512, "every_forward", 0.12),
        row("h2o", 256, "every_forward", 0.10),
        row("knorm", 512, "after_prefill", 0.04),
        row("snapkv", 512, "every_forward", 0.14),
    ]
    paired = [pair("knorm_512_after_prefill.json", -0.16)]
    text = tables.extras_table(rows, paired, "buzz_10qa_smoke_gold4")
    lines = text.splitlines()
    assert len(lines) == 2 + 3  # header, rule, and the three runs at 512 (not h2o at 256, not full)
    knorm = next(line for line in lines if "| knorm |" in line)
    assert "-0.160 ± 0.040" in knorm and "1/6/43" in knorm and "0.12" in knorm
    assert "512.0 / 256.0" in knorm
    snapkv = next(line for line in lines if "| snapkv |" in line)
    assert "every_forward (other)" in snapkv  # snapkv's published regime is after_prefill
    h2o = next(line for line in lines if "| h2o |" in line)
    assert "(other)" not in h2o and h2o.split("|")[6].strip() == ""  # no paired row: the cells stay empty


def test_extras_table_is_none_where_only_main_policies_ran(tables):
    rows = [
        row("full", None, None, 0.2),
        row("h2o", 512, "every_forward", 0.12),
        row("buzz", 512, "every_forward", 0.1),
    ]
    assert tables.extras_table(rows, [], "buzz_10qa_smoke_gold4") is None


def test_main_prints_the_extras_section_from_the_paired_file_beside_the_leaderboard(tables, tmp_path, capsys):
    rows = [row("full", None, None, 0.2), row("random", 512, "after_prefill", 0.02)]
    (tmp_path / "leaderboard.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "paired.json").write_text(json.dumps({"rows": [pair("random_512_after_prefill.json", -0.18)]}))
    tables.main(str(tmp_path / "leaderboard.json"))
    out = capsys.readouterr().out
    assert "#### 10-document QA, gold at 4 (50 questions)" in out
    assert "| 512 | random | after_prefill | 0.020 ± 0.050 | -0.180 ± 0.040 |" in out


def ruler_row(policy: str, budget: int | None, evict: str | None, value: float, task: str = "niah_single_1") -> dict:
    """A RULER leaderboard row: lm-eval names the metric by the sequence length."""
    return {**row(policy, budget, evict, value, task=task), "metric": "1024"}


def test_ruler_table_keeps_a_policy_in_its_other_regime_beside_its_published_run(tables):
    rows = [
        ruler_row("full", None, None, 1.0),
        ruler_row("snapkv", 256, "after_prefill", 0.8),
        ruler_row("snapkv", 256, "every_forward", 0.4),
    ]
    lines = tables.ruler_table(rows).splitlines()
    assert len(lines) == 2 + 3
    assert any(line.startswith("| 1024 | snapkv | 256 | 0.80 |") for line in lines)
    assert any(line.startswith("| 1024 | snapkv (other: every_forward) | 256 | 0.40 |") for line in lines)


def test_ruler_table_refuses_two_runs_of_one_cell(tables):
    rows = [ruler_row("h2o", 256, "every_forward", 0.8), ruler_row("h2o", 256, "every_forward", 0.6)]
    with pytest.raises(ValueError, match="two RULER runs for one cell"):
        tables.ruler_table(rows)
