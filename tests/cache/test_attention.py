"""The one-pass attention-with-scores kernel against a direct eager computation."""

import pytest
import torch

from buzz_lm_eval.cache import attention, build_cache, mask_reads, score_attention
from buzz_lm_eval.cache.score_attention import attention_with_scores, softcapped_attention

from ..conftest import tiny_model
from .test_cache import random_batch


def eager(query, key, value, visible, scaling, softcap=None, key_class=None):
    """Reference: whole [B, H_q, q, L] probabilities (padding rows 0) and the [B, q, H_q, D] output.

    With ``key_class`` the query is one query's [B, H_q, C, D] variants: key j takes variant
    ``key_class[..., j]``'s logit."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    logits = query.float() @ key.float().transpose(-1, -2) * scaling
    if key_class is not None:
        runs = key_class.long().expand(key.shape[0], -1, -1).repeat_interleave(query.shape[1] // key_class.shape[1], 1)
        logits, query = logits.gather(2, runs.unsqueeze(2)), query[:, :, :1]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    q_len, length = query.shape[2], key.shape[2]
    if visible is None:
        visible = torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len)
    elif visible.shape[1] > 1:
        visible = visible.repeat_interleave(groups, 1)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs, (probs @ value.float()).transpose(1, 2)


def group_sum(probs, kv_heads, window=None):
    """Probabilities summed over (the last ``window``) queries and the query heads of each group."""
    batch, heads, q_len, length = probs.shape
    counted = probs if window is None else probs[:, :, -window:]
    return counted.sum(2).view(batch, kv_heads, heads // kv_heads, length).sum(2)


def hf_query(batch, heads, q_len, dim, scale=1.0):
    """A query laid out as a model's projection leaves it: [B, q, H, D] seen as [B, H, q, D]."""
    return (torch.randn(batch, q_len, heads, dim) * scale).transpose(1, 2)


def views(batch, kv_heads, length, dim, spare=5):
    """Keys and values as slices of larger buffers: strided, non-contiguous views."""
    keys, values = torch.randn(batch, kv_heads, length + spare, dim), torch.randn(batch, kv_heads, length + spare, dim)
    key, value = keys[:, :, :length], values[:, :, :length]
    assert not key.is_contiguous() and not value.is_contiguous()
    return key, value


def padded_mask(batch, heads, q_len, length, pad):
    """Causal visibility where the last batch row's first ``pad`` tokens are padding."""
    causal = torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len)
    visible = causal.expand(batch, heads, q_len, length).clone()
    visible[-1, :, :, :pad] = False
    return visible


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of the minimum size, so that a few queries span several blocks."""
    tiny_blocks(monkeypatch)


def tiny_blocks(monkeypatch) -> None:
    """The smallest query blocks: ``ceil(dim / groups)`` queries, one (row, KV head) pair per pass."""
    monkeypatch.setattr(score_attention, "SCORE_BLOCK_ELEMENTS_CPU", 1)
    monkeypatch.setattr(score_attention, "MIN_ROWS_PER_DIM", 1)


@pytest.mark.parametrize("q_len, length", [(1, 40), (21, 21), (21, 50)])
@pytest.mark.parametrize("mask_heads", [None, 1, 2])
def test_strided_views_and_blocks_match_eager_attention(small_blocks, q_len, length, mask_heads):
    torch.manual_seed(0)
    query, (key, value) = hf_query(2, 4, q_len, 8), views(2, 2, length, 8)
    visible = None if mask_heads is None else padded_mask(2, mask_heads, q_len, length, pad=3)
    if mask_heads == 2:
        visible[0, 1, :, 2] = False  # an evicted-looking slot hidden from one KV head only
    output, scores = attention_with_scores(query, key, value, visible, 0.3)
    probs, expected = eager(query, key, value, visible, 0.3)
    assert output.shape == (2, q_len, 4, 8)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(scores, group_sum(probs, 2), atol=1e-5)
    assert scores.dtype == torch.float32 and scores.shape == (2, 2, length)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("class_heads", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_keys_in_lag_runs_are_scored_by_their_runs_query(monkeypatch, class_heads, blocks, masked):
    """One decode query in 3 variants (one per lag run): each key is scored by its own run's.
    Unmasked, the decode path runs; with a mask (a sliding window hiding the oldest keys of one
    row) the block kernel does (small blocks: one (row, KV head) pair per pass, as at long contexts)."""
    if blocks == "small":
        tiny_blocks(monkeypatch)
    torch.manual_seed(7)
    variants, (key, value) = torch.randn(2, 4, 3, 8), views(2, 2, 30, 8)
    key_class = torch.randint(0, 3, (2, class_heads, 30))
    visible = padded_mask(2, 1, 1, 30, pad=6) if masked else None
    output, scores = attention_with_scores(variants, key, value, visible, 0.3, key_class=key_class)
    probs, expected = eager(variants, key, value, visible, 0.3, key_class=key_class)
    assert output.shape == (2, 1, 4, 8)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(scores, group_sum(probs, 2), atol=1e-5)
    _, first_only = eager(variants[:, :, :1], key, value, None, 0.3)
    assert not torch.allclose(output, first_only, atol=1e-3)  # the runs really change the result


@pytest.mark.parametrize("runs", [None, 2, 3])  # 2 runs take a select, more a gather
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_takes_the_keys_first_path_and_matches_eager(monkeypatch, runs, softcap, dtype):
    """One query seeing every key (or its lag-run variants) is computed as K q^T; the block kernel
    is not called, and output and scores are eager attention's."""
    monkeypatch.setattr(score_attention, "_pass", None)  # the block kernel would fail if called
    torch.manual_seed(9)
    variants, (key, value) = torch.randn(2, 4, runs or 1, 8) * 3, views(2, 2, 40, 8)
    key_class = None if runs is None else torch.randint(0, runs, (2, 2, 40))
    cast = [t.to(dtype) for t in (variants, key, value)]
    output, scores = attention_with_scores(*cast, None, 0.3, softcap=softcap, key_class=key_class)
    probs, expected = eager(*cast, None, 0.3, softcap=softcap, key_class=key_class)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert output.shape == (2, 1, 4, 8) and output.dtype == dtype and scores.dtype == torch.float32
    assert torch.allclose(output.float(), expected, atol=tolerance)
    assert torch.allclose(scores, group_sum(probs, 2), atol=tolerance)


def test_only_a_plain_causal_chunk_mask_is_dropped():
    """The library's mask of an unpadded chunk is recognised (the kernel then skips future keys);
    a padded mask, a hidden key, or a single query's mask is kept."""
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4).expand(2, 1, 5, 9)
    assert mask_reads.plain_causal(causal)
    assert not mask_reads.plain_causal(padded_mask(2, 1, 5, 9, pad=2))
    hidden = causal.clone()
    hidden[1, 0, 4, 7] = False  # a new key hidden from one query
    assert not mask_reads.plain_causal(hidden)
    assert not mask_reads.plain_causal(causal[:, :, -1:])
    torch.manual_seed(8)
    query, (key, value) = hf_query(2, 4, 5, 8), views(2, 2, 9, 8)
    with_mask, without = (
        attention_with_scores(query, key, value, causal, 0.3),
        attention_with_scores(query, key, value, None, 0.3),
    )
    assert torch.equal(with_mask[0], without[0]) and torch.equal(with_mask[1], without[1])


def test_padding_queries_see_nothing_and_count_nothing(small_blocks):
    torch.manual_seed(1)
    query, (key, value) = hf_query(2, 4, 12, 8), views(2, 2, 12, 8)
    visible = padded_mask(2, 1, 12, 12, pad=5)  # batch row 1: queries 0-4 are padding
    output, scores = attention_with_scores(query, key, value, visible, 0.3)
    assert torch.isfinite(output).all() and torch.isfinite(scores).all()
    assert float(output[1, :5].abs().max()) == 0.0
    assert float(scores[1, :, :5].abs().max()) == 0.0
    # every real query's probabilities sum to 1: the scores add up to (real queries x group size)
    assert torch.allclose(scores.sum(dim=(1, 2)), torch.tensor([12.0 * 4, 7.0 * 4]), atol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 30])
def test_query_window_counts_only_the_last_queries(small_blocks, window):
    torch.manual_seed(2)
    query, (key, value) = hf_query(1, 4, 20, 8), views(1, 2, 33, 8)
    output, scores = attention_with_scores(query, key, value, None, 0.3, window=window)
    probs, expected = eager(query, key, value, None, 0.3)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(scores, group_sum(probs, 2, window=min(window, 20)), atol=1e-5)


def test_softcap_on_strided_views_across_blocks(small_blocks):
    torch.manual_seed(3)
    query, (key, value) = hf_query(2, 4, 13, 8, scale=4.0), views(2, 2, 20, 8)
    key = key * 4
    visible = padded_mask(2, 2, 13, 20, pad=9)
    output, scores = attention_with_scores(query, key, value, visible, 0.3, softcap=2.0)
    probs, expected = eager(query, key, value, visible, 0.3, softcap=2.0)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(scores, group_sum(probs, 2), atol=1e-5)


def test_long_contexts_run_a_few_pairs_per_pass():
    """At a long context a minimal query block of every (row, KV head) pair would not fit the block
    budget: the pairs then run a few at a time (each pass's logits stay in cache). A decode
    step's one query (or one per lag run) is a small block: every pair runs in one pass."""
    cpu = torch.device("cpu")  # the benchmark's tiny model: 4 KV heads of dim 32, 2 query heads each
    assert score_attention._pairs_per_pass(2, 512, 1024, 32, cpu) >= 4  # all four pairs in one pass
    assert score_attention._pairs_per_pass(2, 512, 16384, 32, cpu) < 4
    assert score_attention._pairs_per_pass(2, 512, 10**7, 32, cpu) == 1
    assert score_attention._pairs_per_pass(2, 4, 16384, 32, cpu) >= 4
    assert score_attention._block_queries(2, 16384, 32, 2, cpu) == 4 * 32 // 2  # never thinner than 4 x dim rows


def test_one_block_and_many_blocks_agree(monkeypatch):
    torch.manual_seed(4)
    query, (key, value) = hf_query(1, 8, 40, 16), views(1, 4, 64, 16)
    whole = attention_with_scores(query, key, value, padded_mask(1, 4, 40, 64, pad=2), 0.25, window=17)
    tiny_blocks(monkeypatch)
    assert score_attention._block_queries(4 * 2, 64, 16, 2, query.device) == 8
    blocks = attention_with_scores(query, key, value, padded_mask(1, 4, 40, 64, pad=2), 0.25, window=17)
    assert torch.allclose(whole[0], blocks[0], atol=1e-6) and torch.allclose(whole[1], blocks[1], atol=1e-5)


def test_bfloat16_inputs_keep_float32_scores():
    torch.manual_seed(5)
    query, (key, value) = hf_query(1, 4, 9, 16), views(1, 2, 30, 16)
    output, scores = attention_with_scores(query.bfloat16(), key.bfloat16(), value.bfloat16(), None, 0.25)
    probs, expected = eager(query.bfloat16(), key.bfloat16(), value.bfloat16(), None, 0.25)
    assert output.dtype == torch.bfloat16 and scores.dtype == torch.float32
    assert torch.allclose(output.float(), expected, atol=2e-2)
    assert torch.allclose(scores, group_sum(probs, 2), atol=2e-2)


def test_kernel_runs_without_autograd_and_training_path_has_gradients():
    torch.manual_seed(6)
    query = hf_query(1, 4, 6, 8).requires_grad_()
    key, value = torch.randn(1, 2, 6, 8, requires_grad=True), torch.randn(1, 2, 6, 8, requires_grad=True)
    output, scores = attention_with_scores(query, key, value, None, 0.3, softcap=2.0)
    assert not output.requires_grad and not scores.requires_grad
    trained = softcapped_attention(query, key, value, None, 0.3, 2.0)
    assert torch.allclose(trained, output, atol=1e-5)
    trained.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (query, key, value))


def eager_with_scores(query, key, value, visible, scaling, window=None, softcap=None, key_class=None):
    """``attention_with_scores`` computed the direct way: the reference for whole-model runs."""
    probs, output = eager(query, key, value, visible, scaling, softcap, key_class)
    return output.to(value.dtype), group_sum(probs, key.shape[1], window)


def kept_and_generated(model, policy, batch, chunk):
    """Positions kept by every layer and greedy tokens: a chunked prefill, then decode steps."""
    cache = build_cache(model, policy, budget=24)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            logits = model(
                input_ids=ids[:, start : start + chunk], attention_mask=mask[:, : start + chunk], past_key_values=cache
            ).logits
        tokens = [logits[:, -1:].argmax(-1)]
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(input_ids=tokens[-1], attention_mask=mask, past_key_values=cache).logits
            tokens.append(logits[:, -1:].argmax(-1))
    return [layer.kept()[2].clone() for layer in cache.layers], torch.cat(tokens, dim=1)


@pytest.mark.parametrize("policy", ["h2o", "buzz", "snapkv", "pyramidkv", "tova"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_policies_keep_the_same_tokens_as_with_eager_scores(monkeypatch, policy, arch):
    model = tiny_model(arch, seed=3)
    batch = random_batch([70, 52], seed=4)  # left padding: padding queries in the first chunks
    kept, generated = kept_and_generated(model, policy, batch, chunk=16)
    monkeypatch.setattr(attention, "attention_with_scores", eager_with_scores)
    kept_eager, generated_eager = kept_and_generated(model, policy, batch, chunk=16)
    assert torch.equal(generated, generated_eager)
    assert all(torch.equal(a, b) for a, b in zip(kept, kept_eager, strict=True))


def test_gemma2_in_training_mode_gets_gradients_through_capped_attention():
    from .test_families import family_model

    model = family_model("gemma2", seed=2)
    ids = random_batch([19])["input_ids"]
    build_cache(model, "h2o", heavy=100, recent=100)  # switches the model to the score-capturing attention
    assert model.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()  # no dropout in this config: the same function, now differentiable
    trained = model(input_ids=ids).logits
    assert torch.allclose(trained, evaluated, atol=1e-5)
    trained.sum().backward()
    assert all(p.grad is not None for p in model.model.layers[0].self_attn.q_proj.parameters())


def test_fewer_keys_than_queries_is_refused():
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="5 keys for 6 queries"):
        attention_with_scores(query, key, key, None, 0.3)


@pytest.mark.parametrize("limit", [None, 64])  # 64 elements: every block larger, allocated per block
def test_logits_workspace_is_reused_and_never_aliases_results(monkeypatch, limit):
    """On CPU the blocks' logits live in one per-thread workspace, reused from call to call; what a
    call returns must not alias it, so a later call leaves earlier results as they were."""
    if limit is not None:
        monkeypatch.setattr(score_attention, "WORKSPACE_ELEMENTS_CPU", limit)
    torch.manual_seed(8)
    first_inputs, second_inputs = [(hf_query(1, 4, 12, 8), *views(1, 2, 20, 8)) for _ in range(2)]
    first = attention_with_scores(*first_inputs, None, 0.3)
    kept = [t.clone() for t in first]
    buffer = getattr(score_attention._workspace, "buffer", None)
    second = attention_with_scores(*second_inputs, None, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, kept, strict=True))
    for inputs, (output, scores) in ((first_inputs, first), (second_inputs, second)):
        probs, expected = eager(*inputs, None, 0.3)
        assert torch.allclose(output, expected, atol=1e-5) and torch.allclose(scores, group_sum(probs, 2), atol=1e-5)
    if limit is None:
        assert score_attention._workspace.buffer is buffer is not None  # reused, not grown


@pytest.mark.parametrize("first_mode", [torch.inference_mode, torch.no_grad])
def test_logits_workspace_serves_calls_in_and_out_of_inference_mode(monkeypatch, first_mode):
    """A workspace made under ``torch.inference_mode`` must stay writable outside it (lm-eval and
    the benchmark run their forwards in different modes in one process)."""
    monkeypatch.setattr(score_attention._workspace, "buffer", None)
    torch.manual_seed(8)
    inputs = (hf_query(1, 4, 12, 8), *views(1, 2, 20, 8))
    probs, expected = eager(*inputs, None, 0.3)
    for mode in (first_mode, torch.no_grad if first_mode is torch.inference_mode else torch.inference_mode):
        with mode():
            output, scores = attention_with_scores(*inputs, None, 0.3)
        assert torch.allclose(output, expected, atol=1e-5) and torch.allclose(scores, group_sum(probs, 2), atol=1e-5)
