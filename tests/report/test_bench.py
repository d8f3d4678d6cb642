"""The cache benchmark's measurements and target verdicts (benchmarks/), on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from buzz_lm_eval.cache import build_cache

from .. import conftest
from ..conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_cache  # noqa: E402
import bench_real  # noqa: E402
import bench_run  # noqa: E402
import bench_targets as targets  # noqa: E402


def small_args(*extra: str):
    return bench_cache.parse_args(
        [
            "--tiny",
            "--lengths",
            "48",
            "--budgets",
            "16",
            "--steps",
            "3",
            "--chunk",
            "16",
            "--device",
            conftest.DEVICE.type,
            *extra,
        ]
    )


def test_probe_reads_held_tokens_and_resident_bytes():
    model = tiny_model("llama")
    cache = build_cache(model, "full")
    probe = bench_run.Probe(cache)
    ids = conftest.on_device(torch.arange(48).view(1, 48))
    token = bench_run.prefill(model, cache, ids, 16, probe)
    times, fired, _ = bench_run.decode(model, cache, token, 2, conftest.DEVICE.type, probe)
    assert probe.held == pytest.approx([16, 32, 48, 49, 50])
    assert len(times) == 2 and fired == 0
    per_token = bench_run.kv_bytes_per_token(cache)
    assert per_token == 2 * 2 * 2 * 16 * 4  # layers x (keys, values) x KV heads x head dim x float32
    assert [r >= n * per_token for r, n in zip(probe.resident, probe.held, strict=True)] == [True] * 5


class _Counted:
    """A cache's counters as ``stats()`` derives them: each layer's kept-token sum over its forwards,
    averaged over ``layers`` layers (a float, whose products drift off whole tokens)."""

    def __init__(self, layers: int):
        self.layers, self.sums, self.forwards = [None] * layers, 0, 0

    def hold(self, tokens: int) -> None:
        self.sums, self.forwards = self.sums + tokens, self.forwards + 1

    def stats(self) -> dict:
        means = [self.sums / self.forwards] * len(self.layers)
        return {"kept_tokens_mean": sum(means) / len(self.layers), "forwards": self.forwards}


def test_probe_counts_whole_tokens_held_whatever_the_layer_count():
    """16 layers holding 1024 tokens each after a 1535-token forward: the float product of the
    counters grows by 1024.0000000000018 at the fourth step, which compared with a budget of 1024
    reported the case over budget; the probe reads whole tokens."""
    counted = _Counted(16)
    counted.hold(1535)
    probe = bench_run.Probe(counted)
    raw, previous = [], probe.kept_total()
    for _ in range(4):
        counted.hold(1024)
        raw.append(counted.stats()["kept_tokens_mean"] * counted.forwards - previous)
        previous += raw[-1]
        assert probe.tokens_left() == 1024.0
    assert max(raw) > 1024  # the drift is real in this arithmetic


def test_resident_bytes_count_a_shared_storage_once():
    model = tiny_model("llama")
    cache = build_cache(model, "full")
    bench_run.prefill(model, cache, conftest.on_device(torch.arange(8).view(1, 8)), 8)
    for layer in cache.layers:  # keys and values as views of one spare-capacity buffer per layer
        buffer = torch.zeros(2, 1, 2, 64, 16, device=layer.keys.device)
        layer.keys, layer.values = buffer[0, :, :, :8], buffer[1, :, :, :8]
    assert bench_run.resident_kv_bytes(cache) == 2 * (2 * 2 * 64 * 16 * 4)


def test_side_by_side_cases_stay_within_budget_and_bound():
    model = tiny_model("llama")
    args = small_args()
    specs = [
        bench_run.Spec("tiny", "full", None, 48),
        bench_run.Spec("tiny", "h2o", 16, 48, "every_forward"),
        bench_run.Spec("tiny", "snapkv", 16, 48, "after_prefill"),
    ]
    full, h2o, snapkv = rows = bench_run.run_cases(model, specs, 3, args)
    bench_run.add_ratios(rows)
    per_token = 2 * 2 * 2 * 16 * 4
    assert (full["kv_bound"], full["within_bound"], full["within_budget"]) == (None, None, None)
    assert h2o["evictions"] == 3 and h2o["peak_tokens_decode"] == pytest.approx(16) and h2o["within_budget"]
    assert h2o["kv_bound"] == (16 + 16) * per_token and h2o["within_bound"]
    assert snapkv["evict"] == "after_prefill" and snapkv["within_budget"] is None
    assert snapkv["peak_tokens_decode"] == pytest.approx(15 + 2 + 3)  # compressed to N - 1, then grows
    assert snapkv["kv_bound"] == 48 * per_token and snapkv["within_bound"]
    assert [r["steps"] for r in rows] == [3, 3, 3]
    assert full["prefill_x_full"] == 1.0 and h2o["decode_x_full"] > 0


def test_grouping_section_compares_grouped_drops_with_layer_by_layer():
    """Each one-token-drop policy runs twice side by side, its drops grouped and layer by layer; the
    rows record which, and the ratios and info lines read the grouped row against the other."""
    model = tiny_model("llama")
    rows = bench_cache.grouping_section(model, "tiny", 48, 16, small_args())
    assert [(r["policy"], r["drops"], r["batch_layers"]) for r in rows[:2]] == [
        ("h2o", "layer by layer", False),
        ("h2o", "grouped", True),
    ]
    assert len(rows) == 2 * len(targets.GROUPED_POLICIES) and all(r["evictions"] == 3 for r in rows)
    for alone, grouped in zip(rows[::2], rows[1::2], strict=True):
        assert grouped["evict_x_alone"] == pytest.approx(grouped["evict_ms"] / alone["evict_ms"])
        assert grouped["step_x_alone"] == bench_cache.paired_ratio(grouped, alone)
    lines = targets.grouping_lines(rows)
    assert len(lines) == len(targets.GROUPED_POLICIES) and lines[0].startswith(
        "- info: tiny h2o every_forward budget 16"
    )


def test_prefill_section_keeps_each_cases_best_of_its_side_by_side_runs(monkeypatch):
    model = tiny_model("llama")
    args = small_args("--repeats", "3")
    # per forward, in the side-by-side order (full, h2o | h2o, full | full, h2o) of each of 3 runs:
    # full is fastest in run 1 (0.3 s), h2o in run 2 (0.6 s)
    seconds = iter([0.1, 0.5, 0.5, 0.1, 0.1, 0.5] + [1, 0.2, 0.2, 1, 1, 0.2] + [1] * 6)
    monkeypatch.setattr(
        bench_run.Case,
        "prefill_chunk",
        lambda case, model, start: setattr(case, "prefill_s", case.prefill_s + next(seconds)),
    )
    specs = [bench_run.Spec("tiny", "full", None, 48), bench_run.Spec("tiny", "h2o", 16, 48, "after_prefill")]
    full, h2o = bench_run.best_prefills(model, specs, 3, args)
    assert (full["policy"], h2o["policy"], h2o["evict"], h2o["repeats"]) == ("full", "h2o", "after_prefill", 3)
    assert full["prefill_s"] == pytest.approx(0.3) and h2o["prefill_s"] == pytest.approx(0.6)
    assert full["prefill_x_full"] == 1.0 and h2o["prefill_x_full"] == pytest.approx(2.0)
    assert full["prefill_spread_pct"] == pytest.approx(900.0) and h2o["prefill_spread_pct"] == pytest.approx(400.0)
    assert (
        bench_cache.parse_args(["--tiny", "--quick"]).repeats == 1
        and small_args().repeats == bench_cache.DEFAULTS["repeats"]
    )
    with pytest.raises(SystemExit):
        bench_cache.parse_args(["--repeats", "0"])


def test_decode_pairs_repeat_and_the_targets_read_their_medians(monkeypatch):
    """Each decode-section pair runs ``--repeats`` times with fresh caches; the row is the run with the
    median paired step ratio (the upper one of an even count), the eviction target reads the median share."""
    ratios, shares = iter([1.05, 0.99, 1.01, 1.2, 1.0]), iter([5.2, 4.0, 4.5, 3.0, 6.0])

    def scripted(model, specs, steps, args):
        ratio, share = next(ratios), next(shares)
        return [
            row(specs[0].policy, step_ms_all=[20.0 * ratio], step_ms_median=20.0 * ratio, evict_share_pct=share),
            row("full", None, step_ms_all=[20.0], step_ms_median=20.0),
        ]

    monkeypatch.setattr(bench_cache, "run_cases", scripted)
    spec, reference = (
        bench_run.Spec("wide", "tova", 1024, 4096, "every_forward"),
        bench_run.Spec("wide", "full", None, 1024),
    )
    three = bench_cache.repeated_pair(None, spec, reference, small_args("--repeats", "3"))
    assert three["step_x_ref"] == pytest.approx(1.01) and three["evict_share_pct"] == 4.5
    assert three["step_x_ref_runs"] == pytest.approx([0.99, 1.01, 1.05]) and three["evict_share_runs"] == [
        4.0,
        4.5,
        5.2,
    ]
    two = bench_cache.repeated_pair(None, spec, reference, small_args("--repeats", "2"))
    assert two["step_x_ref"] == pytest.approx(1.2) and two["evict_share_median"] == 6.0  # the upper of two
    section = {
        "reference": [row("full", None, length=1024)] * 2,
        "noise_pct": 0.1,
        "rows": [three | {"evict_share_pct": 5.2, "evict_share_median": 4.5}, two],
    }
    shares_lines = targets.evict_share_lines(section, [])
    assert shares_lines[0].startswith("- **PASS**") and "median of 3 runs: 4.00%, 4.50%, 5.20%" in shares_lines[0]
    assert shares_lines[1].startswith("- **FAIL**")
    steps = targets.step_lines(section)
    assert steps[1].startswith("- **PASS**") and "the median of 3 runs: 0.990x, 1.010x, 1.050x" in steps[1]
    assert steps[2].startswith("- **FAIL**")


def test_decode_section_rows_carry_every_runs_ratio():
    model = tiny_model("llama")
    section = bench_cache.decode_section(model, "tiny", 48, 16, small_args("--repeats", "2"))
    assert len(section["rows"]) == len(targets.DECODE_POLICIES) * len(targets.REGIMES)
    for decoded in section["rows"]:
        assert len(decoded["step_x_ref_runs"]) == 2 and decoded["step_x_ref"] == max(decoded["step_x_ref_runs"])
        assert decoded["evict_share_median"] == max(decoded["evict_share_runs"])
    assert "," in bench_cache.markdown(section["rows"]).splitlines()[2]  # the per-run lists are printed


def row(policy: str, evict: str | None = "every_forward", **values) -> dict:
    base = {
        "model": "wide",
        "policy": policy,
        "evict": evict,
        "budget": 1024,
        "length": 4096,
        "steps": 32,
        "evict_ms": 0.5,
        "step_ms": 20.0,
        "evict_share_pct": 2.5,
        "evictions": 0,
        "step_ms_median": 20.0,
    }
    return base | values


def test_step_target_uses_the_noise_allowance():
    limit = 1 + targets.NOISE_ALLOWANCE_PCT / 100
    reference = row("full", None, budget=None, length=1024)
    section = {
        "reference": [reference, reference],
        "noise_pct": 0.5,
        "rows": [
            row("h2o", step_x_ref=limit - 0.001, ref_step_ms_median=20.0),
            row("tova", step_x_ref=limit + 0.001, ref_step_ms_median=20.0),
        ],
    }
    lines = targets.step_lines(section)
    assert "**PASS** wide h2o" in lines[1] and "**FAIL** wide tova" in lines[2]
    assert not any("warning" in line for line in lines)
    assert "warning" in targets.step_lines(section | {"noise_pct": 9.0})[1]


def test_step_ratio_pairs_the_steps_of_one_round():
    """A burst that slows both cases of a round cancels in the paired ratio; the ratio of medians
    would read it as a difference."""
    policy = {"step_ms_all": [10.0, 10.0, 30.0, 30.0, 30.0]}
    reference = {"step_ms_all": [10.0, 10.0, 30.0, 30.0, 10.0]}
    assert bench_cache.paired_ratio(policy, reference) == 1.0
    assert bench_cache.paired_ratio({"step_ms_all": [11.0, 22.0, 33.0]}, {"step_ms_all": [10.0, 20.0, 30.0]}) == 1.1
    with pytest.raises(ValueError):
        bench_cache.paired_ratio(policy, {"step_ms_all": [10.0]})  # rounds that do not pair up


def test_buzz_every_forward_share_is_judged_on_its_amortised_cycle():
    section = {
        "rows": [
            row("buzz", evict_share_pct=0.1),
            row("buzz", "after_prefill", evict_share_pct=0.1),
            row("h2o", evict_share_pct=6.0),
        ]
    }
    cycle = row("buzz", steps=729, evictions=1, evict_share_pct=7.0)
    lines = targets.evict_share_lines(section, [cycle])
    assert lines[0].startswith("- **FAIL** wide buzz every_forward") and "729 steps" in lines[0]
    assert lines[1].startswith("- **PASS** wide buzz after_prefill")
    assert lines[2].startswith("- **FAIL** wide h2o")


def test_memory_and_prefill_verdicts():
    inside = row("h2o", kv_resident_peak=10, kv_bound=10, within_bound=True)
    over = row("local", kv_resident_peak=11, kv_bound=10, within_bound=False)
    assert targets.memory_lines({"t": [inside]})[0].startswith("- **PASS** t:")
    failed = targets.memory_lines({"t": [inside, over]})[0]
    assert failed.startswith("- **FAIL** t:") and "over: wide local" in failed
    prefill = [
        row("full", None, budget=None, prefill_x_full=1.0, prefill_s=1.0),
        row("h2o", prefill_x_full=1.25, prefill_s=1.25),
        row("buzz", prefill_x_full=1.1, prefill_s=1.1),
        row("local", prefill_x_full=2.0, prefill_s=2.0),
    ]
    lines = targets.prefill_lines(prefill)
    assert [line[:10] for line in lines] == ["- **FAIL**", "- **PASS**"]  # local keeps no scores: not judged


def test_host_sync_verdicts():
    assert targets.gpu_lines([], None, "cpu")[0].startswith("- info: host-sync check")

    def sync_row(policy, syncs, **counts):
        return {
            "policy": policy,
            "budget": None if policy == "full" else 1024,
            "length": 4096,
            "counts": {"cuda_calls": 50} | counts,
            "syncs": syncs,
        }

    syncs = [
        sync_row("full", 0, **{"aten::item": 1}),
        sync_row("buzz", 0),
        sync_row("h2o", 2, cudaStreamSynchronize=2),
        sync_row("tova", 0, cuda_calls=0),
    ]
    lines = targets.gpu_lines([], syncs, "cuda")
    assert [line.split()[1] for line in lines] == ["info:", "**PASS**", "**FAIL**", "**FAIL**"]
    assert "aten::item x1" in lines[0] and "cudaStreamSynchronize x2" in lines[2]
    assert "recorded no CUDA runtime call" in lines[3]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0"], "--budgets needs positive integers, got [0]"),
        (["--policies", "buzz,nope"], "unknown policies ['nope']; valid: full,"),
        (["--chunk", "-1"], "--chunk needs positive integers, got [-1]"),
    ],
)
def test_bad_options_stop_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_cache.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_real_goals_pair_each_policy_with_both_full_caches_and_judge_every_goal():
    """bench_real's decode section on a tiny random Llama: every policy at L/4 beside the full cache
    holding L and L/4, a verdict line per goal, and the goals a shorter run leaves out named."""
    args = bench_cache.parse_args(["--steps", "2", "--warmup", "1", "--device", conftest.DEVICE.type])
    assert args.decode_lengths == [4096, 8192] and args.gen_batches == [1, 8] and args.repeats == 2
    model = bench_run.load_model("tiny", args)
    rows = bench_real.decode_section(model, "tiny", 64, 1, args)
    assert [row["policy"] for row in rows] == ["full", "full", *bench_real.POLICIES]
    assert (rows[0]["length"], rows[1]["length"]) == (64, 16)
    for row in rows[2:]:
        assert row["budget"] == 16 and row["length"] == 64
        assert row["x_full_L"] == bench_cache.paired_ratio(row, rows[0])
        assert row["x_full_quarter"] == bench_cache.paired_ratio(row, rows[1])
    h2o = next(row for row in rows if row["policy"] == "h2o")
    assert h2o["evict"] == "every_forward" and h2o["chunk"] == 4  # buzz_hf's default chunk: budget // 4
    lines = bench_real.decode_lines(rows, 64, 1)
    assert len(lines) == 1 + 3 * len(bench_real.POLICIES)
    assert all(("**PASS**" in line) != ("**FAIL**" in line) for line in lines[1:])
    short = bench_cache.parse_args(["--decode-lengths", "4096", "--no-batch", "--gen-batches", "1"])
    [missing] = bench_real.not_judged(short)
    assert "decode at 8192" in missing and "batch 8" in missing and "generation at batch 8" in missing
    [missing] = bench_real.not_judged(bench_cache.parse_args(["--no-generation"]))
    assert missing == "- not judged in this run: generation"  # --no-generation leaves out every generation goal
