"""Paired comparisons with the full cache (``paired.md``/``paired.json`` beside the leaderboard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from buzz_lm_eval.report import leaderboard
from buzz_lm_eval.report.paired import compare, per_document, sign_test

from .test_leaderboard import buzz_cache, results_json

DATE = "2025-01-01T00-00-00"


def write_run(
    root: Path, name: str, policy: str, budget: int | None, scores: list[float], higher_is_better: bool = True
) -> None:
    """A results file whose task ``qa`` scored ``scores`` (per document), with its samples file; one
    heatmap cell metric (``acc_L64_D0``, the first document's) beside it."""
    folder = root / name
    folder.mkdir(parents=True)
    mean = sum(scores) / len(scores)
    data = results_json({"qa": {"acc": mean}}, cache=buzz_cache(policy, budget))
    data["results"]["qa"]["acc_L64_D0,none"] = scores[0]
    data["higher_is_better"]["qa"]["acc_L64_D0"] = True
    data["higher_is_better"]["qa"]["acc"] = higher_is_better
    (folder / f"results_{DATE}.json").write_text(json.dumps(data), encoding="utf-8")
    lines = [json.dumps({"doc_id": i, "doc_hash": f"h{i}", "acc": s, "acc_L64_D0": s}) for i, s in enumerate(scores)]
    (folder / f"samples_qa_{DATE}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(0, 6) == pytest.approx(2 / 64)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_compare_pairs_documents_with_the_same_hash_only():
    stats = compare({0: ("a", 1.0), 1: ("b", 0.0), 2: ("c", 0.5)}, {0: ("a", 0.0), 1: ("b", 1.0), 2: ("x", 0.5)})
    assert (stats["n"], stats["wins"], stats["losses"], stats["ties"]) == (2, 1, 1, 0)
    assert stats["mean_difference"] == 0.0 and stats["stderr"] == pytest.approx(1.0)


def test_wins_are_documents_where_the_policy_did_better_in_the_metrics_direction():
    """For a lower-is-better metric (bits per byte) a lower value wins; the difference keeps its sign."""
    policy, full = {0: ("a", 0.9), 1: ("b", 1.2), 2: ("c", 1.1)}, {0: ("a", 1.0), 1: ("b", 1.0), 2: ("c", 1.0)}
    higher = compare(policy, full)
    lower = compare(policy, full, higher_is_better=False)
    assert (higher["wins"], higher["losses"]) == (2, 1) and (lower["wins"], lower["losses"]) == (1, 2)
    assert lower["mean_difference"] == pytest.approx(higher["mean_difference"]) == pytest.approx(0.2 / 3)


def test_the_leaderboard_writes_paired_comparisons(tmp_path, capsys):
    root = tmp_path / "runs"
    full = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    write_run(root, "full", "full", None, full)
    write_run(root, "buzz_b64", "buzz", 64, [0, 0, 0, 1, 0, 0, 1, 0, 1, 1])  # loses 3 documents, wins none
    assert leaderboard.main([str(root)]) == 0
    assert "paired.md (1 paired comparisons)" in capsys.readouterr().out
    [row] = json.loads((root / "paired.json").read_text())["rows"]
    assert (row["policy"], row["budget"], row["n"], row["wins"], row["losses"], row["ties"]) == (
        "buzz",
        64,
        10,
        0,
        3,
        7,
    )
    assert row["mean_difference"] == pytest.approx(-0.3) and row["sign_test_p"] == pytest.approx(0.25)
    assert "| buzz | 64 | None | 10 | -0.3000 ± 0.1528 | 0/3/7 | 0.25 |" in (root / "paired.md").read_text()
    assert leaderboard.main([str(root)]) == 0  # its own paired.json is not read back, nor warned about
    assert "paired.json" not in capsys.readouterr().err


def test_the_leaderboard_counts_a_lower_value_of_a_lower_is_better_metric_as_a_win(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "full", "full", None, [1.0, 1.0, 1.0, 1.0], higher_is_better=False)
    write_run(root, "buzz_b64", "buzz", 64, [1.5, 1.2, 0.9, 1.0], higher_is_better=False)
    assert leaderboard.main([str(root)]) == 0
    [row] = json.loads((root / "paired.json").read_text())["rows"]
    assert (row["wins"], row["losses"], row["ties"]) == (1, 2, 1) and row["mean_difference"] == pytest.approx(0.15)


def test_bits_per_byte_pairs_each_documents_own_bits_per_byte(tmp_path):
    """A rolling task's samples hold [loglikelihood, bytes] per document: the paired value is that
    document's bits per byte; other pair-valued perplexities stay out."""
    import math

    path = tmp_path / "samples.jsonl"
    rows = [
        {"doc_id": 0, "doc_hash": "a", "bits_per_byte": [-100 * math.log(2), 50], "word_perplexity": [-3.0, 9]},
        {"doc_id": 1, "doc_hash": "b", "bits_per_byte": [-30 * math.log(2), 60], "word_perplexity": [-1.0, 9]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    values = per_document(path, "bits_per_byte")
    assert values[0] == ("a", pytest.approx(2.0)) and values[1] == ("b", pytest.approx(0.5))
    assert per_document(path, "word_perplexity") == {}


def test_the_focus_policy_is_paired_with_every_other_policy_at_its_budget(tmp_path):
    """paired.md's second table: buzz against each other policy run at the same budget, on the same
    documents (difference = buzz - other); other budgets, the full cache and heatmap cells (one
    document each) are not paired with it."""
    root = tmp_path / "runs"
    write_run(root, "full", "full", None, [1] * 8)
    write_run(root, "buzz_b64", "buzz", 64, [0, 0, 0, 0, 1, 1, 1, 1])
    write_run(root, "h2o_b64", "h2o", 64, [1, 1, 1, 1, 1, 1, 1, 0])  # buzz loses 4, wins 1
    write_run(root, "h2o_b128", "h2o", 128, [1] * 8)  # another budget: not paired with buzz at 64
    assert leaderboard.main([str(root)]) == 0
    [pair] = json.loads((root / "paired.json").read_text())["between"]
    assert (pair["policy"], pair["budget"], pair["against"], pair["n"]) == ("buzz", 64, "h2o", 8)
    assert (pair["wins"], pair["losses"], pair["ties"]) == (1, 4, 3)
    assert pair["mean_difference"] == pytest.approx(-3 / 8) and pair["sign_test_p"] == pytest.approx(0.375)
    assert "# buzz against the other policies at the same budget" in (root / "paired.md").read_text()
    assert leaderboard.main([str(root), "--focus", "h2o"]) == 0
    between = json.loads((root / "paired.json").read_text())["between"]
    assert [(row["policy"], row["against"]) for row in between] == [("h2o", "buzz")]


def test_an_unknown_focus_policy_is_named_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        leaderboard.main([str(tmp_path), "--focus", "bzz"])
    err = capsys.readouterr().err
    assert "'bzz'" in err and "h2o" in err and "buzz" in err
