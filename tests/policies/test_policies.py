"""Policies against the spec: hand-made cases, a slow reference, the size bound and the budget rule."""

from __future__ import annotations

import pytest
import torch

from buzz_lm_eval.policies import POLICY_NAMES, build_policy


def attn_of(*scores, q=1):
    """A [1, H, q, L] attention tensor whose sum over q is ``scores`` (one list per head)."""
    s = torch.tensor(scores, dtype=torch.float32)
    return (s / q).unsqueeze(1).expand(-1, q, -1).unsqueeze(0).contiguous()


def kept(keep):
    return None if keep is None else keep[0].tolist()


# -- the spec's worked example -------------------------------------------------------------
def test_worked_example_and_its_next_round():
    policy = build_policy("buzz", sink=1, window=2, threshold=4, stride=2)
    state = policy.new_state()
    keep = policy.step(state, attn_of([9, 0.1, 0.5, 0.7, 0.2, 0.3, 1, 1]))
    assert kept(keep) == [[0, 2, 3, 5, 6, 7]]
    assert int(state.n_old) == 3
    # sink reset to 0, fresh picks and window keep S
    assert state.scores[0, 0].tolist() == pytest.approx([0, 0.5, 0.7, 0.3, 1, 1])
    # two more tokens: middle = 3 old + 2 fresh = 5 > 4; r = 1 keeps all old samples
    keep = policy.step(state, attn_of([0, 0, 0, 0, 0, 0, 0.4, 0.9]))
    # layout: sink 0 | old 1,2,3 | fresh 4,5 (scores 1+0, 1+0 -> tie, earliest) | window 6,7
    assert kept(keep) == [[0, 1, 2, 3, 4, 6, 7]]
    assert int(state.n_old) == 4
    # old samples' scores are reset, the fresh pick keeps its score
    assert state.scores[0, 0].tolist() == pytest.approx([0, 0, 0, 0, 1, 0.4, 0.9])


def test_buzz_thins_old_samples_every_third_with_stride_five():
    policy = build_policy("buzz", sink=1, window=1, threshold=8, stride=5)
    state = policy.new_state()
    state.n_old = torch.tensor([[[7]]])
    # L = 1 sink + 7 old + 3 fresh + 1 window = 12, middle 10 > 8
    keep = policy.step(state, attn_of([1] * 8 + [0.1, 0.9, 0.2] + [1]))
    assert kept(keep) == [[0, 1, 4, 7, 9, 11]]  # old 0,3,6 -> positions 1,4,7; fresh max at 9
    assert int(state.n_old) == 4


def test_buzz_ties_pick_the_earliest_and_short_last_segment():
    policy = build_policy("buzz", sink=0, window=1, threshold=3, stride=3)
    state = policy.new_state()
    # middle = 7 tokens: segments {0,1,2} tie at 0.5, {3,4,5} max at 4, {6} shorter last segment
    keep = policy.step(state, attn_of([0.5, 0.5, 0.5, 0.1, 0.8, 0.1, 0.3, 2.0]))
    assert kept(keep) == [[0, 4, 6, 7]]


def test_buzz_picks_per_head_and_stays_below_threshold_when_quiet():
    policy = build_policy("buzz", sink=1, window=1, threshold=2, stride=2)
    state = policy.new_state()
    assert policy.step(state, attn_of([1, 1, 1, 1], [1, 1, 1, 1])) is None  # middle 2 <= T
    keep = policy.step(state, attn_of([1, 0, 9, 0, 9, 1], [1, 9, 0, 9, 0, 1]))
    assert kept(keep) == [[0, 2, 4, 5], [0, 1, 3, 5]]


def test_buzz_fast_uses_only_the_current_forward():
    accumulated, fast = (build_policy(n, sink=0, window=1, threshold=1, stride=2) for n in ("buzz", "buzz_fast"))
    states = accumulated.new_state(), fast.new_state()
    for policy, state in zip((accumulated, fast), states, strict=True):
        assert policy.step(state, attn_of([5, 0])) is None
    a = accumulated.step(states[0], attn_of([0, 1, 0]))
    f = fast.step(states[1], attn_of([0, 1, 0]))
    assert kept(a) == [[0, 2]] and kept(f) == [[1, 2]]
    assert states[1].scores is None


def test_buzz_nomax_needs_no_scores():
    policy = build_policy("buzz_nomax", sink=1, window=1, threshold=3, stride=2)
    keep = policy.step(policy.new_state(), None, shape=(2, 3, 7))
    assert keep.shape == (2, 3, 5)  # segments {1,2} {3,4} {5} keep their first token
    assert keep[1, 2].tolist() == [0, 1, 3, 5, 6]


def test_prefill_chunk_sums_attention_over_queries():
    policy = build_policy("h2o", heavy=1, recent=1)
    state = policy.new_state()
    keep = policy.step(state, attn_of([0.2, 0.7, 0.1, 0.4], q=3))
    assert kept(keep) == [[1, 3]]
    assert state.scores[0, 0].tolist() == pytest.approx([0.7, 0.4])


# -- baselines -------------------------------------------------------------------------------
def test_local_and_streaming_positions():
    local, streaming = build_policy("local", window=3), build_policy("streaming", sink=2, window=3)
    assert local.step(local.new_state(), None, shape=(1, 1, 3)) is None
    assert kept(local.step(local.new_state(), None, shape=(1, 2, 6))) == [[3, 4, 5]] * 2
    assert streaming.step(streaming.new_state(), None, shape=(1, 1, 5)) is None
    assert kept(streaming.step(streaming.new_state(), None, shape=(1, 1, 8))) == [[0, 1, 5, 6, 7]]


def test_h2o_accumulates_and_breaks_ties_early():
    policy = build_policy("h2o", heavy=2, recent=1)
    state = policy.new_state()
    assert policy.step(state, attn_of([1, 1, 1])) is None
    keep = policy.step(state, attn_of([0, 0.5, 0.5, 0.2]))
    # S = [1, 1.5, 1.5, 0.2]: heavy among 0..2 are 1 and 2; recent is 3
    assert kept(keep) == [[1, 2, 3]]
    keep = policy.step(state, attn_of([0.5, 0, 0.1, 0.1]))
    # S = [2.0, 1.5, 0.3, 0.1]: heavy 0,1 (tie-free); recent 3
    assert kept(keep) == [[0, 1, 3]]
    tie = build_policy("h2o", heavy=1, recent=1)
    assert kept(tie.step(tie.new_state(), attn_of([0.3, 0.3, 0.3]))) == [[0, 2]]


def test_full_never_evicts():
    policy = build_policy("full")
    state = policy.new_state()
    for length in (1, 100, 5000):
        assert policy.step(state, None, shape=(2, 4, length)) is None


# -- a slow reference of the buzz rule, on random inputs --------------------------------------
def reference_buzz(scores, n_old, sink, window, threshold, stride, pick=None):
    """One round of the spec's buzz rule for one row/head, written as plainly as possible.

    Returns (kept indices, indices whose score restarts at 0, new n_old).
    """
    length = len(scores)
    if length <= sink + window or length - sink - window <= threshold:
        return list(range(length)), [], n_old
    r = (stride + 1) // 2
    old = [sink + i for i in range(n_old) if i % r == 0]
    pick = scores if pick is None else pick
    fresh = []
    for start in range(sink + n_old, length - window, stride):
        segment = range(start, min(start + stride, length - window))
        fresh.append(max(segment, key=lambda j: (pick[j], -j)))
    sinks = list(range(sink))
    return sinks + old + fresh + list(range(length - window, length)), sinks + old, len(old) + len(fresh)


@pytest.mark.parametrize("name", ["buzz", "buzz_fast"])
@pytest.mark.parametrize("seed", range(4))
def test_buzz_matches_reference_over_many_steps(name, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(sink=2, window=5, threshold=9, stride=[3, 4, 5, 2][seed])
    policy = build_policy(name, **sizes)
    state = policy.new_state()
    scores, n_old = [], 0
    for step in range(60):
        new = int(torch.randint(1, 6, (1,), generator=gen)) if step % 7 == 0 else 1
        current = (torch.rand(len(scores) + new, generator=gen) * 4).round() / 4  # frequent ties
        scores = [a + b for a, b in zip(scores + [0.0] * new, current.tolist(), strict=True)]
        pick = current.tolist() if name == "buzz_fast" else None
        expected, reset, n_old = reference_buzz(scores, n_old, **sizes, pick=pick)
        keep = policy.step(state, current.view(1, 1, 1, -1))
        got = list(range(len(scores))) if keep is None else keep[0, 0].tolist()
        assert got == expected, f"step {step}"
        assert int(0 if state.n_old is None else state.n_old) == n_old
        scores = [0.0 if j in reset else scores[j] for j in expected]
        if name == "buzz":
            assert state.scores[0, 0].tolist() == pytest.approx(scores)


# -- the size bound and the budget rule -------------------------------------------------------
def run_decode(policy, prompt, steps, heads=2, seed=0):
    """Feed a prompt then one token per step; return the most tokens held before an eviction."""
    gen = torch.Generator().manual_seed(seed)
    state, length, peak = policy.new_state(), 0, 0
    for new in [prompt] + [1] * steps:
        length += new
        peak = max(peak, length)
        attn = torch.rand(1, heads, 1, length, generator=gen)
        keep = policy.step(state, attn if policy.needs_scores else None, shape=(1, heads, length))
        length = length if keep is None else keep.shape[-1]
    return peak, length


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "full"])
@pytest.mark.parametrize("budget", [16, 64, 257])
def test_budget_bounds_every_decode_step(name, budget):
    policy = build_policy(name, budget=budget)
    parts = ("sink", "window", "threshold", "heavy", "recent", "observation", "capacity")
    assert sum(policy.sizes().get(k, 0) for k in parts) == budget - 1
    peak, _ = run_decode(policy, prompt=1, steps=4 * budget)
    assert peak == budget  # uses the whole budget, never more


def test_buzz_never_exceeds_its_size_bound_after_eviction():
    policy = build_policy("buzz", sink=4, window=16, threshold=40, stride=5)
    _, length = run_decode(policy, prompt=30, steps=500)
    assert length <= 4 + 16 + 40 + 1


def test_budget_split_and_explicit_sizes():
    buzz = build_policy("buzz", budget=256)
    assert buzz.sizes() == {"sink": 4, "window": 71, "threshold": 180, "stride": 5}
    assert build_policy("buzz", budget=256, window=100).sizes()["threshold"] == 151
    assert build_policy("streaming", budget=100).sizes() == {"sink": 4, "window": 95}
    assert build_policy("h2o", budget=100).sizes() == {"heavy": 50, "recent": 49}
    assert build_policy("local", budget=100).sizes() == {"window": 99}
    with pytest.raises(ValueError, match="add up to"):
        build_policy("buzz", budget=256, sink=4, window=100, threshold=100)
    with pytest.raises(ValueError, match="budget=5 is too small"):
        build_policy("buzz", budget=5)
    with pytest.raises(ValueError, match="stride=2 never thins earlier samples.*use stride >= 3"):
        build_policy("buzz", budget=256, stride=2)


def test_integral_floats_count_as_integers():
    """lm-eval's CLI reads ``window=160`` as 160 but ``window=-5`` as -5.0: integral floats are integers."""
    policy = build_policy("buzz", budget=128.0, stride=3.0)
    assert policy.sizes() == build_policy("buzz", budget=128, stride=3).sizes()
    assert all(type(value) is int for value in policy.sizes().values())


@pytest.mark.parametrize("name", ["buzz", "buzz_fast", "buzz_nomax"])
@pytest.mark.parametrize("stride", [1, 2])
def test_stride_below_three_grows_without_bound_and_is_refused_with_a_budget(name, stride):
    policy = build_policy(name, sink=1, window=2, threshold=8, stride=stride)  # explicit sizes: paper mode
    _, length = run_decode(policy, prompt=12, steps=300)
    assert length > 100  # bounded would be <= 1 + 2 + 8 + 1; old samples are never thinned, so it grows
    with pytest.raises(ValueError, match="grows without bound"):
        policy.check_bounded()
    for budget in (64, 4096):
        with pytest.raises(ValueError, match=f"stride={stride} never thins.*use stride >= 3"):
            build_policy(name, budget=budget, stride=stride)
    build_policy(name, budget=64, stride=3).check_bounded()  # the advice works


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("buzzz", {}, r"unknown cache policy 'buzzz' \(did you mean 'buzz'\?\); valid policies: full, local"),
        ("buzz", {"heavy": 3}, "unknown parameter.*heavy; valid: sink, window, threshold, stride, budget"),
        ("buzz", {"widow": 3}, r"unknown parameter\(s\) widow \(did you mean 'window'\?\)"),
        ("streaming", {"window": -5.0}, "streaming: window must be >= 1, got -5$"),
        ("buzz", {"budget": 64.5}, "buzz: budget must be an integer, got 64.5"),
        ("buzz", {"window": -1}, "window must be >= 1, got -1"),
        ("buzz", {"sink": -4}, "sink must be >= 0, got -4"),
        ("buzz", {"stride": 0}, "stride must be >= 1, got 0"),
        ("h2o", {"recent": 0}, "recent must be >= 1, got 0"),
        ("local", {"window": 2.5}, "window must be an integer, got 2.5"),
        ("full", {"budget": 10}, "full has no budget"),
        ("streaming", {"budget": 1}, "budget must be an integer >= 2, got 1"),
    ],
)
def test_bad_parameters_name_the_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_policy(name, **kwargs)


def test_step_rejects_missing_scores_and_bad_shapes():
    policy = build_policy("h2o", heavy=1, recent=1)
    with pytest.raises(ValueError, match="needs attention scores"):
        policy.step(policy.new_state(), None, shape=(1, 1, 4))
    with pytest.raises(ValueError, match=r"attn must be \[B, H_kv, q, L\]"):
        policy.step(policy.new_state(), torch.rand(1, 4))


# -- padding: each row as if alone --------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "full"])
def test_padded_rows_evict_as_if_alone(name):
    policy = build_policy(name, budget=12)
    gen = torch.Generator().manual_seed(1)
    lengths, total = [20, 14], 20
    batch_state, single_states = policy.new_state(), [policy.new_state(), policy.new_state()]
    mask = torch.tensor([[True] * 20, [False] * 6 + [True] * 14])
    attn = torch.rand(2, 2, 1, total, generator=gen) * mask[:, None, None, :]
    singles = [
        policy.step(single_states[b], attn[b : b + 1, :, :, total - n :], shape=(1, 2, n))
        for b, n in enumerate(lengths)
    ]
    keep = policy.step(batch_state, attn if policy.needs_scores else None, mask, shape=(2, 2, total))
    width = keep.shape[-1]
    for b, n in enumerate(lengths):
        real = int(batch_state.n_real[b])
        alone = singles[b][0] if singles[b] is not None else torch.arange(n).expand(2, n)
        assert torch.equal(keep[b, :, width - real :] - (total - n), alone)


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "full"])
def test_padding_aware_path_equals_the_uniform_path(name):
    """The same rule written twice (masked rows vs one shared geometry) agrees step by step."""
    policy = build_policy(name, budget=20)
    gen = torch.Generator().manual_seed(7)
    fast, masked, length = policy.new_state(), policy.new_state(), 0
    for step in range(80):
        length += 6 if step % 9 == 0 else 1
        attn = (torch.rand(2, 3, 1, length, generator=gen) * 4).round() / 4
        attn = attn if policy.needs_scores or name == "buzz_fast" else None
        a = policy.step(fast, attn, shape=(2, 3, length))
        b = policy.step(masked, attn, torch.ones(2, length, dtype=torch.bool), shape=(2, 3, length))
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"step {step}"
        if fast.scores is not None:
            assert torch.equal(fast.scores, masked.scores)
        length = length if a is None else a.shape[-1]


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "full"])
def test_naming_the_one_dropped_token_equals_the_kept_list(name):
    """``step_one`` (the decode fast path) names exactly the index ``step`` leaves out, and leaves
    the same state; on any other step it declines and touches nothing."""
    policy = build_policy(name, budget=20)
    gen = torch.Generator().manual_seed(3)
    one, listed, length, named = policy.new_state(), policy.new_state(), 0, 0
    for step in range(60):
        length += 4 if step % 11 == 0 else 1
        attn = (torch.rand(2, 3, 1, length, generator=gen) * 4).round() / 4  # many ties
        attn = attn if policy.needs_scores else None
        dropped = policy.step_one(one, attn, (2, 3, length), torch.device("cpu"))
        if dropped is None:
            assert one.forwards == listed.forwards  # declined before touching the state
            dropped_ok = policy.step(one, attn, shape=(2, 3, length))
        keep = policy.step(listed, attn, shape=(2, 3, length))
        if dropped is not None:
            named += 1
            assert keep is not None and keep.shape[-1] == length - 1
            missing = torch.ones(2, 3, length, dtype=torch.bool).scatter_(-1, keep, False)
            assert torch.equal(missing.int().argmax(-1, keepdim=True), dropped.expand(2, 3, 1))
        else:
            assert (keep is None) == (dropped_ok is None) and (keep is None or torch.equal(keep, dropped_ok))
        assert one.forwards == listed.forwards
        assert (one.scores is None) == (listed.scores is None)
        assert one.scores is None or torch.equal(one.scores, listed.scores)
        length = length if keep is None else keep.shape[-1]
    assert named >= 40 if policy.drop_size() is not None else named == 0  # buzz: batches, never one


@pytest.mark.parametrize("budget, chunk", [(128, 290), (256, 600)])
def test_buzz_max_chunk_is_the_largest_chunk_that_keeps_the_budget(budget, chunk):
    policy = build_policy("buzz", budget=budget)
    assert policy.max_chunk() == chunk
    before = policy.sink + policy.threshold + policy.window  # the worst start: a middle of old samples
    for size, within in ((chunk, True), (chunk + policy.stride, False)):
        state = policy.new_state()
        state.scores, state.n_old_all = torch.zeros(1, 1, before), policy.threshold
        state.n_old = torch.full((1, 1, 1), policy.threshold)
        keep = policy.step(state, torch.rand(1, 1, 1, before + size, generator=torch.Generator().manual_seed(0)))
        assert (keep.shape[-1] <= budget - 1) == within, (size, keep.shape[-1])


def test_dropping_one_of_the_top_ranked_matches_the_full_sort():
    """``top_indices`` keeping all but one takes a shortcut (argmin); ties must still go to the earliest."""
    from buzz_lm_eval.policies.ranked import top_indices

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        length = int(torch.randint(2, 40, (1,), generator=generator))
        scores = torch.randint(0, 3, (2, 3, length), generator=generator).float()  # many ties
        full_sort = scores.sort(dim=-1, descending=True, stable=True).indices[..., : length - 1].sort(dim=-1).values
        assert torch.equal(top_indices(scores, length - 1), full_sort)
