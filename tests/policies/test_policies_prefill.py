"""snapkv, pyramidkv, tova, knorm, random against slow plain-Python references, step by step.

Each stream feeds batches of left-padded rows (via the mask), chunks of several queries, ties
(scores rounded to quarters) and 1-3 KV heads; the reference sees each row alone.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from buzz_lm_eval.policies import POLICIES, build_policy
from buzz_lm_eval.policies.base import EVICT_MODES, SIGNALS
from buzz_lm_eval.policies.random_policy import uniform_scores

NEW = ("snapkv", "pyramidkv", "tova", "knorm", "random")


# -- the references: one row alone, plain Python ---------------------------------------------
def best(scores, count):
    """Indices of the ``count`` highest scores, ties to the earliest, ascending."""
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:count])


def ref_snapkv(rows, heavy, observation, kernel, pooling, **_):
    """rows[h][q][j]: this forward's attention of the row alone. Kept indices per head."""
    n = len(rows[0][0])
    if n <= heavy + observation:
        return [list(range(n))] * len(rows)
    older = n - observation
    kept = []
    for queries in rows:
        votes = [sum(query[j] for query in queries[-observation:]) for j in range(older)]
        pooled = []
        for j in range(older):
            near = [votes[i] for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < older]
            pooled.append(sum(near) if pooling == "avg" else max(near))  # avg: same order as sum / kernel
        kept.append(best(pooled, heavy) + list(range(older, n)))
    return kept


def ref_tova(rows, capacity, **_):
    n = len(rows[0][0])
    if n <= capacity:
        return [list(range(n))] * len(rows)
    last = [sum(queries[-1][j] for queries in rows) for j in range(n)]
    return [best(last, capacity)] * len(rows)


def ref_knorm(rows, capacity, **_):
    n = len(rows[0][0])
    if n <= capacity:
        return [list(range(n))] * len(rows)
    return [best([-norm for norm in queries[0]], capacity) for queries in rows]


def ref_random(rows, capacity, seed, step, **_):
    n = len(rows[0][0])
    if n <= capacity:
        return [list(range(n))] * len(rows)
    scores = [float(uniform_scores(torch.tensor(j), seed, 0, step)) for j in range(n)]
    return [best(scores, capacity)] * len(rows)


REFERENCES = {"snapkv": ref_snapkv, "pyramidkv": ref_snapkv, "tova": ref_tova, "knorm": ref_knorm, "random": ref_random}


# -- streams -------------------------------------------------------------------------------------
def stream(name, sizes, lengths, heads, steps, seed, padded=True):
    """Run ``steps`` forwards through the policy and the reference; assert they agree every step."""
    policy = build_policy(name, **sizes)
    gen = torch.Generator().manual_seed(seed)
    state, real = policy.new_state(), list(lengths)
    width, new = max(lengths), max(lengths)
    for step in range(1, steps + 1):
        mask = torch.tensor([[False] * (width - n) + [True] * n for n in real])
        q = 1 if name == "knorm" else new  # knorm: one row of key norms per forward
        attn = (torch.rand(len(real), heads, q, width, generator=gen) * 4).round() / 4
        attn = attn * mask[:, None, None, :] * mask[:, None, -q:, None]  # padding queries see nothing
        given = attn if policy.needs_scores else None
        keep = policy.step(state, given, mask if padded else None, shape=(len(real), heads, width))
        for b, n in enumerate(real):
            rows = attn[b, :, :, width - n :].tolist()
            expected = REFERENCES[name](rows, **policy.sizes(), step=step)
            if keep is None:
                got = [list(range(n))] * heads
            else:
                kept = int(state.n_real[b])
                got = (keep[b, :, keep.shape[-1] - kept :] - (width - n)).tolist()
            assert got == expected, f"step {step}, row {b}"
        if keep is not None:
            width, real = keep.shape[-1], [int(k) for k in state.n_real]
        new = int(torch.randint(1, 5, (1,), generator=gen)) if step % 4 == 0 else 1
        width, real = width + new, [n + new for n in real]


SIZES = {
    "snapkv": [
        dict(heavy=5, observation=3, kernel=3, pooling="avg"),
        dict(heavy=4, observation=2, kernel=5, pooling="max"),
        dict(heavy=0, observation=4, kernel=1, pooling="avg"),
    ],
    "pyramidkv": [dict(heavy=5, observation=3, kernel=3, pooling="max", beta=2)],
    "tova": [dict(capacity=6), dict(capacity=1)],
    "knorm": [dict(capacity=6), dict(capacity=2)],
    "random": [dict(capacity=6, seed=0), dict(capacity=3, seed=11)],
}


@pytest.mark.parametrize("name, sizes", [(n, s) for n in NEW for s in SIZES[n]])
@pytest.mark.parametrize("heads", [1, 3])
def test_matches_reference_on_padded_streams(name, sizes, heads):
    stream(name, sizes, lengths=[13, 7, 10], heads=heads, steps=25, seed=heads)


@pytest.mark.parametrize("name", NEW)
def test_matches_reference_on_the_uniform_path(name):
    stream(name, SIZES[name][0], lengths=[12, 12], heads=2, steps=25, seed=5, padded=False)


def test_snapkv_hand_example_pools_and_keeps_the_window():
    policy = build_policy("snapkv", heavy=1, observation=2, kernel=3, pooling="avg")
    # older tokens 0..3 get votes 0, 3, 0, 2.5 -> pooled sums 3, 3, 5.5, 2.5 -> token 2 wins
    attn = torch.tensor([[0.0, 3.0, 0.0, 2.5, 9.0, 9.0]]).view(1, 1, 1, 6)
    assert policy.step(policy.new_state(), attn)[0, 0].tolist() == [2, 4, 5]
    peak = build_policy("snapkv", heavy=1, observation=2, kernel=3, pooling="max")
    assert peak.step(peak.new_state(), attn)[0, 0].tolist() == [0, 4, 5]  # maxima 3, 3, 3, 2.5: earliest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_snapkv_window_mean_is_the_library_average_pool_bit_for_bit(dtype):
    """snapkv's average pooling (shifted adds) gives exactly what ``F.avg_pool1d`` gives: every kept
    token depends on it. Probabilities from a softmax, uniform noise, ties and zeros, odd kernels."""
    from buzz_lm_eval.policies.snapkv import window_mean

    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        length = 1 + trial * 13
        scores = torch.softmax(5 * torch.randn(2, 3, length, generator=generator), dim=-1)
        if trial % 2:
            scores = torch.rand(2, 3, length, generator=generator).mul(4).round().div(4)  # ties and zeros
        scores = scores.to(dtype)
        for kernel in (1, 3, 5, 7, 9):
            expected = torch.nn.functional.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)
            assert torch.equal(window_mean(scores, kernel), expected), (trial, kernel)
            sliced = scores[..., : max(1, length - 2)]  # a strided view, as a decode step pools
            expected = torch.nn.functional.avg_pool1d(sliced, kernel, stride=1, padding=kernel // 2)
            assert torch.equal(window_mean(sliced, kernel), expected), (trial, kernel)


def test_snapkv_counts_only_the_last_observation_queries():
    policy = build_policy("snapkv", heavy=1, observation=2, kernel=1)
    attn = torch.zeros(1, 1, 3, 5)
    attn[0, 0, 0, 0] = 10.0  # the first query is outside the observation window
    attn[0, 0, 1, 1] = attn[0, 0, 2, 1] = 1.0
    assert policy.step(policy.new_state(), attn)[0, 0].tolist() == [1, 3, 4]


def test_tova_uses_the_last_query_and_one_set_per_layer():
    policy = build_policy("tova", capacity=2)
    attn = torch.zeros(1, 2, 2, 4)
    attn[0, :, 0, 0] = 5.0  # an earlier query: ignored
    attn[0, 0, 1] = torch.tensor([0.1, 0.5, 0.0, 0.4])
    attn[0, 1, 1] = torch.tensor([0.1, 0.0, 0.6, 0.3])
    assert policy.step(policy.new_state(), attn)[0].tolist() == [[2, 3], [2, 3]]  # sums 0.2 .5 .6 .7


def test_knorm_keeps_the_lowest_norms_per_head():
    policy = build_policy("knorm", capacity=2)
    norms = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.5, 4.0, 0.5, 0.1]]).view(1, 2, 1, 4)
    assert policy.step(policy.new_state(), norms)[0].tolist() == [[1, 3], [0, 3]]


def test_random_key_mix_on_python_ints_is_the_tensor_mix():
    """A draw's key is mixed on Python ints; the slots on int64 tensors: both are splitmix64's
    finaliser, so every key (and every kept set) is what the tensor version gives."""
    from buzz_lm_eval.policies.random_policy import _U64, _signed, mix64, mix64_int

    generator = torch.Generator().manual_seed(0)
    values = [0, 1, (1 << 63) - 1, 1 << 63, _U64] + [
        int(v) & _U64 for v in torch.randint(-(1 << 63), (1 << 63) - 1, (2000,), generator=generator)
    ]
    tensor = mix64(torch.tensor([_signed(v) for v in values]))
    assert [int(v) & _U64 for v in tensor] == [mix64_int(v) for v in values]


def test_random_is_seeded_uniform_and_varies_by_seed_layer_and_step():
    counts = torch.zeros(10)
    choices = set()
    for seed in range(400):
        policy = build_policy("random", capacity=5, seed=seed)
        keep = policy.step(policy.new_state(), None, shape=(1, 1, 10))
        counts[keep[0, 0]] += 1
        choices.add(tuple(keep[0, 0].tolist()))
    assert float(counts.min()) > 150 and float(counts.max()) < 250  # each slot kept about half the time
    assert len(choices) > 150  # of the 252 possible sets
    policy = build_policy("random", capacity=5, seed=3)
    first = policy.step(policy.new_state(), None, shape=(1, 1, 10))
    assert torch.equal(first, policy.step(policy.new_state(), None, shape=(1, 1, 10)))  # reproducible
    state = policy.new_state()
    policy.step(state, None, shape=(1, 1, 3))
    assert not torch.equal(first, policy.step(state, None, shape=(1, 1, 10)))  # the next step draws anew
    other = policy.for_layer(1, 2)
    assert not torch.equal(first, other.step(other.new_state(), None, shape=(1, 1, 10)))


# -- pyramidkv's per-layer budgets ------------------------------------------------------------
@pytest.mark.parametrize("budget, layers", [(256, 32), (64, 5), (40, 2), (100, 1), (34, 7)])
def test_pyramid_budgets_decrease_and_sum_to_budget_times_layers(budget, layers):
    policy = build_policy("pyramidkv", budget=budget)
    budgets = policy.layer_budgets(layers)
    assert sum(budgets) == budget * layers
    assert all(a >= b for a, b in itertools.pairwise(budgets))
    heavy = budget - 1 - policy.observation
    if layers > 1:  # the published ends: 2h - h/beta at the bottom, h/beta at the top
        assert abs(budgets[0] - policy.observation - 1 - (2 * heavy - heavy / 20)) < 1
        assert abs(budgets[-1] - policy.observation - 1 - heavy / 20) < 1
    for i, layer_budget in enumerate(budgets):
        layer = policy.for_layer(i, layers)
        assert layer.name == "snapkv" and layer.heavy + layer.observation + 1 == layer_budget


def test_pyramid_schedule_by_hand():
    policy = build_policy("pyramidkv", heavy=10, observation=2, beta=5)
    # h = 10: top 2, bottom 18, step 16/3 -> 18, 12.67, 7.33, 2 -> floors 18, 12, 7, 2 (+1 to the first)
    assert policy.layer_heavy(4) == [19, 12, 7, 2]


# -- budget rule and bad sizes -----------------------------------------------------------------
def test_budget_rule_for_the_new_policies():
    assert build_policy("snapkv", budget=256).sizes() == {
        "heavy": 223,
        "observation": 32,
        "kernel": 7,
        "pooling": "avg",
    }
    assert build_policy("snapkv", budget=16).sizes()["observation"] == 7  # (N - 1) // 2 when 32 does not fit
    assert build_policy("snapkv", budget=100, observation=10).sizes()["heavy"] == 89
    assert build_policy("pyramidkv", budget=64, beta=4).sizes()["beta"] == 4
    for name in ("tova", "knorm", "random"):
        assert build_policy(name, budget=50).sizes()["capacity"] == 49
    assert build_policy("random", budget=50, seed=7).sizes() == {"capacity": 49, "seed": 7}


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("snapkv", {"kernel": 4}, "kernel must be odd.*got 4"),
        ("snapkv", {"kernel": 0}, "kernel must be >= 1, got 0"),
        ("snapkv", {"pooling": "mean"}, "pooling must be one of avg, max, got 'mean'"),
        ("snapkv", {"observation": 0}, "observation must be >= 1, got 0"),
        ("snapkv", {"budget": 40, "heavy": 3, "observation": 3}, "heavy=3, observation=3 add up to 6.*needs 39"),
        ("snapkv", {"budget": 2}, "budget=2 is too small"),
        ("snapkv", {"seed": 1}, "unknown parameter.*seed.*valid: heavy, observation, kernel, pooling, budget"),
        ("pyramidkv", {"beta": 0}, "beta must be >= 1, got 0"),
        ("tova", {"capacity": 0}, "capacity must be >= 1, got 0"),
        ("tova", {"budget": 10, "capacity": 5}, "capacity=5 add up to 5.*needs 9"),
        ("knorm", {"capacity": 2.5}, "capacity must be an integer, got 2.5"),
        ("random", {"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_sizes_name_the_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_policy(name, **kwargs)


def test_every_policy_declares_a_valid_signal_and_regime():
    for name, cls in POLICIES.items():
        assert cls.signal in SIGNALS and cls.default_evict in EVICT_MODES, name
        assert cls.needs_scores == (cls.signal != "none"), name
    defaults = {name: cls.default_evict for name, cls in POLICIES.items()}
    assert {n for n, mode in defaults.items() if mode == "after_prefill"} == {"snapkv", "pyramidkv", "knorm", "random"}
