"""Attention that also returns the probabilities each key received, from one pass over the keys.

``attention_with_scores`` is the inference kernel behind score-capturing policies (and Gemma 2's
capped logits, which torch's sdpa cannot apply); ``softcapped_attention`` is its differentiable
counterpart for modules in training mode.
"""

from __future__ import annotations

import threading

import torch

from ..policies.base import cached_arange
from .mask_reads import plain_causal

SCORE_BLOCK_ELEMENTS = 1 << 24  # logits elements of one query block off the CPU (memory bound)
SCORE_BLOCK_ELEMENTS_CPU = 1 << 21  # on CPU: a pass's logits (8 MiB) stay in the last-level cache; on
# the benchmark's 2-core CPU (1 MiB L2 per core, 32 MiB L3) 8 MiB beat 2 MiB side by side: at 4k, four
# (row, KV head) pairs per GEMM instead of one, with fewer, larger operations
MIN_ROWS_PER_DIM = 4  # a block has >= 4 x head_dim rows per KV head: thinner QK^T GEMMs (inner size
# head_dim) run well below the machine's rate, which costs more than a block spilling into L3
_HIDDEN = torch.finfo(torch.float32).min  # finite: a row that sees nothing stays NaN-free
WORKSPACE_ELEMENTS_CPU = 1 << 26  # a CPU thread keeps a logits workspace of up to 256 MiB of float32
_workspace = threading.local()  # CPU: each thread's logits buffer, reused by every block and call


def attention_with_scores(
    query,
    key,
    value,
    visible,
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
    key_class: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the probabilities each key received, from one pass over the keys.

    Queries are processed in blocks sized to stay in cache (no [B, H, q, L] tensor is ever
    whole); each block's logits give both its output and its probabilities, summed over queries
    and over the query heads of each KV group (HF ``repeat_kv`` order). Returns the output as the
    sdpa function does ([B, q, H_q, D]) and the [B, H_kv, L] float32 scores. With ``window`` only
    the last ``window`` queries count in the scores (a policy's ``query_window``). ``softcap``
    caps the logits as Gemma 2's eager attention does (``cap * tanh(logits / cap)`` before the
    mask). ``visible`` is a [B, 1|H_kv, q, L] bool mask or None (plain causal). The keys end with
    the queries' own tokens and attention is causal: query i never sees keys past ``L - q + i``,
    which are skipped. Rows of padding queries (nothing visible) see nothing: their output and
    probabilities are 0. ``key``/``value`` may be strided views (a slice of a larger buffer).
    Inference only: computed without autograd.

    ``key_class`` [B, 1|H_kv, L] (a single query): the keys lag in runs (``ShiftedKeys``) and
    ``query`` is [B, H_q, C, D], that query rotated once per run; each key is scored by its run's.
    A single query without a mask (an unpadded decode step) takes ``_decode``, no query blocks.
    """
    if visible is None and (key_class is not None or query.shape[2] == 1) and (window is None or window > 0):
        return _decode(query, key, value, scaling, softcap, key_class)
    if key_class is not None:
        return _one_pass(query, key, value, visible, scaling, window, softcap, key_class)
    if key.shape[2] < query.shape[2]:
        raise ValueError(
            f"attention_with_scores needs the queries' own keys among the keys: "
            f"{key.shape[2]} keys for {query.shape[2]} queries"
        )
    visible = None if visible is not None and plain_causal(visible) else visible  # skip future keys, no bias
    return _one_pass(query, key, value, visible, scaling, window, softcap)


@torch.no_grad()
def _one_pass(query, key, value, visible, scaling, window, softcap, key_class=None):
    """``_pass`` over all (row, KV head) pairs at once, or, when even a minimal query block of all
    of them would not fit the block budget (long contexts), over a few pairs at a time: each
    pair's logits then stay in cache instead of streaming through memory."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups, pairs = q_heads // kv_heads, batch * kv_heads
    per_pass = _pairs_per_pass(groups, q_len, length, dim, query.device)
    if per_pass >= pairs:
        return _pass(query, key, value, visible, scaling, window, softcap, key_class)
    # every pair as a row of its own with one KV head (views of K/V; a shared mask stays shared)
    query = query.reshape(pairs, groups, q_len, dim)
    key, value = key.reshape(pairs, 1, length, dim), value.reshape(pairs, 1, length, value.shape[-1])
    if visible is not None and visible.shape[:2] != (1, 1):
        visible = visible.expand(batch, kv_heads, *visible.shape[2:]).reshape(pairs, 1, *visible.shape[2:])
    if key_class is not None:
        key_class = key_class.expand(batch, kv_heads, length).reshape(pairs, 1, length)
    parts = [
        _pass(
            query[lo : lo + per_pass],
            key[lo : lo + per_pass],
            value[lo : lo + per_pass],
            visible if visible is None or visible.shape[0] == 1 else visible[lo : lo + per_pass],
            scaling,
            window,
            softcap,
            None if key_class is None else key_class[lo : lo + per_pass],
        )
        for lo in range(0, pairs, per_pass)
    ]
    output = torch.cat([out for out, _ in parts]).view(batch, kv_heads, -1, groups, value.shape[-1])
    scores = torch.cat([part for _, part in parts]).view(batch, kv_heads, length)
    return output.transpose(1, 2).reshape(batch, output.shape[2], q_heads, -1), scores


def _pass(query, key, value, visible, scaling, window, softcap, key_class=None):
    """The kernel over every (row, KV head) pair of its inputs (``attention_with_scores``' contract)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups, pairs = q_heads // kv_heads, batch * kv_heads
    # rows (query, group) of each KV head: a query block is a contiguous row range (a view at q=1)
    rows = query.view(batch, kv_heads, groups, q_len, dim).transpose(2, 3).reshape(pairs, q_len * groups, dim)
    rows = rows * (scaling / (softcap or 1.0))  # scaled once here: a plain bmm is faster than baddbmm's alpha
    runs = None
    if key_class is not None:  # rows are (run, group) of the one query; each key takes its run's row
        runs = (
            key_class.long()
            .expand(batch, kv_heads, length)
            .reshape(pairs, 1, 1, length)
            .expand(pairs, 1, groups, length)
        )
        q_len = 1
    past = length - q_len
    keys_t, values = key.flatten(0, 1).transpose(1, 2), value.flatten(0, 1)  # views: K/V never copied
    block = _block_queries(pairs * groups, length, dim, groups, query.device)
    flags, weights = _visibility_and_weights(visible, batch, kv_heads, groups)
    # each query row's weight in the column sums (a GEMV: twice as fast on CPU as a row reduction)
    row_weights = weights
    if row_weights is None:
        row_weights = torch.ones(1, 1, q_len * groups, dtype=torch.float32, device=query.device).expand(pairs, 1, -1)
    future = _future_bias(min(block, q_len), query.device) if visible is None and q_len > 1 else None
    total = None
    output = value.new_empty(pairs, q_len * groups, value.shape[-1])
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        size, seen = stop - start, past + stop  # keys past ``seen`` are in every row's future
        if runs is None:
            block_rows = rows[:, start * groups : stop * groups]
            logits = torch.bmm(block_rows, keys_t[:, :, :seen], out=_logits_buffer(pairs, size * groups, seen, rows))
        else:
            logits = torch.bmm(rows, keys_t, out=_logits_buffer(pairs, rows.shape[1], length, rows))
            logits = logits.view(pairs, -1, groups, length).gather(1, runs).view(pairs, groups, length)
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if softcap is not None:
            logits.tanh_().mul_(softcap)
        if flags is not None:  # additive bias: 0 where visible, a huge negative where not
            bias = flags[:, :, start:stop, None, :seen].to(torch.float32).sub_(1.0).mul_(-_HIDDEN)
            logits.view(batch, kv_heads, size, groups, seen).add_(bias)
        elif future is not None:
            logits.view(pairs, size, groups, seen)[..., past + start :].add_(future[:size, :, :size])
        probs = torch.softmax(logits, dim=-1, out=logits)
        counted = groups * max(0, q_len - window - start) if window is not None else 0
        if counted < size * groups:
            part = torch.bmm(row_weights[:, :, start * groups + counted : stop * groups], probs[:, counted:]).squeeze(1)
            total = _accumulate(total, part, length)
        torch.bmm(probs.to(value.dtype), values[:, :seen], out=output[:, start * groups : stop * groups])
    output = output.view(batch, kv_heads, q_len, groups, -1)
    if weights is not None:  # padding queries: their (finite) rows were computed, then dropped
        output *= weights.view(batch, kv_heads, q_len, groups, 1).to(output.dtype)
    total = total if total is not None else torch.zeros(pairs, length, dtype=torch.float32, device=query.device)
    return output.transpose(1, 2).reshape(batch, q_len, q_heads, -1), total.view(batch, kv_heads, length)


@torch.no_grad()
def _decode(query, key, value, scaling, softcap, key_class):
    """One query that sees every key (a decode step without padding), or its lag-run variants.

    The logits are computed as K q^T: the keys, the only large operand, enter the GEMM in the
    layout they are stored in ([L, D] rows), so it streams them once instead of first packing a
    transposed copy, as q K^T does with so few query rows (in a `wide` decode step on CPU, 1024
    keys of head dim 128 in 2 lag runs: ~0.9 ms per layer where the block kernel took ~1.3 ms).
    """
    batch, q_heads, variants, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups, pairs = q_heads // kv_heads, batch * kv_heads
    rows = query.reshape(batch, kv_heads, groups, variants, dim).transpose(2, 3).reshape(pairs, variants * groups, dim)
    alpha = scaling / (softcap or 1.0)
    logits = torch.baddbmm(rows.new_zeros(()), key.flatten(0, 1), rows.transpose(1, 2), beta=0, alpha=alpha)
    if key_class is not None:  # [pairs, L, run x group]: each key takes its run's G logits, one contiguous row
        first = cached_arange(pairs * length, query.device).view(batch, kv_heads, length)  # each key's run-0 row
        pick = torch.add(key_class, first, alpha=variants)  # alpha scales ``first``: row = key x runs + run
        logits = logits.view(-1, groups).index_select(0, pick.view(-1))
    probs = logits.view(pairs, length, groups).transpose(1, 2).float().contiguous()  # [pairs, G, L]
    if softcap is not None:
        probs.tanh_().mul_(softcap)
    torch.softmax(probs, dim=-1, out=probs)
    output = torch.bmm(probs.to(value.dtype), value.flatten(0, 1))  # [pairs, G, D]
    return output.view(batch, 1, q_heads, -1), probs.sum(1).view(batch, kv_heads, length)


def _logits_buffer(pairs: int, rows: int, keys: int, like: torch.Tensor) -> torch.Tensor:
    """A [pairs, rows, keys] tensor for a block's logits: on CPU a view of this thread's workspace.

    glibc serves a fresh multi-MiB block with new pages: allocated per block, a 4k-token chunk of
    the benchmark's tiny model took ~5,700 page faults and 24 ms per layer instead of 16 ms. The
    workspace grows as needed (up to ``WORKSPACE_ELEMENTS_CPU``; larger blocks, at contexts where
    a single pair's thinnest block is larger, are allocated per block) and lives with the thread,
    made outside inference mode (an inference tensor cannot be written outside it). Elsewhere the
    caching allocator already reuses blocks.
    """
    size = pairs * rows * keys
    if like.device.type != "cpu" or size > WORKSPACE_ELEMENTS_CPU:
        return like.new_empty(pairs, rows, keys)
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.dtype != like.dtype or buffer.numel() < size:
        grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == like.dtype else 1 << 16
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffer = _workspace.buffer = like.new_empty(min(WORKSPACE_ELEMENTS_CPU, max(size, grown)))
    return buffer[:size].view(pairs, rows, keys)


def _accumulate(total: torch.Tensor | None, part: torch.Tensor, length: int) -> torch.Tensor:
    """``total`` [pairs, length] plus ``part`` [pairs, seen] on its first ``seen`` keys."""
    if total is None:
        if part.shape[-1] == length:
            return part  # a single block: no zero-filled buffer to add into
        total = part.new_zeros(part.shape[0], length)
    total[:, : part.shape[-1]] += part
    return total


def _visibility_and_weights(visible, batch: int, kv_heads: int, groups: int):
    """``visible`` as 0/1 bytes and each row's weight ([B*H_kv, 1, q*G] float32: 0 for padding).

    A padding query sees nothing: its logits all get the same finite bias (no NaN) and its row
    is weighted 0. None, None for plain causal attention.
    """
    if visible is None:
        return None, None
    flags = visible.view(torch.uint8)  # byte reductions are vectorised; bool ones are not
    q_len = visible.shape[2]
    live = flags.amax(dim=-1, keepdim=True).expand(batch, kv_heads, q_len, groups)
    return flags, live.to(torch.float32).reshape(batch * kv_heads, 1, q_len * groups)


def _future_bias(size: int, device) -> torch.Tensor:
    """[size, 1, size] float32: 0 on and below the diagonal, a huge negative above it."""
    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(size, 1, size, device=device).masked_fill_(upper.unsqueeze(1), _HIDDEN)


def _pairs_per_pass(groups: int, q_len: int, length: int, dim: int, device: torch.device) -> int:
    """(row, KV head) pairs whose minimal query block (see ``_block_queries``) fits the block budget."""
    rows = groups * min(q_len, _min_block_queries(dim, groups))
    return max(1, _block_elements(device) // (rows * length))


def _block_queries(rows_per_query: int, length: int, dim: int, groups: int, device: torch.device) -> int:
    """Queries per block: its logits stay in cache on CPU (memory is the bound elsewhere), but
    at least ``MIN_ROWS_PER_DIM x dim`` rows per KV head, so that the GEMMs run at speed."""
    return max(_min_block_queries(dim, groups), _block_elements(device) // max(1, rows_per_query * length))


def _min_block_queries(dim: int, groups: int) -> int:
    """Queries of the smallest block: ``MIN_ROWS_PER_DIM x dim`` rows per KV head, rounded up."""
    return -(-MIN_ROWS_PER_DIM * dim // groups)


def _block_elements(device: torch.device) -> int:
    return SCORE_BLOCK_ELEMENTS_CPU if device.type == "cpu" else SCORE_BLOCK_ELEMENTS


def softcapped_attention(query, key, value, visible, scaling: float, softcap: float, dropout: float = 0.0):
    """Gemma 2's eager capped attention with autograd (training); [B, q, H_q, D] like sdpa's."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = torch.tanh(query @ key.transpose(-1, -2) * (scaling / softcap)) * softcap
    if visible is None:
        length, q_len = key.shape[2], query.shape[2]
        visible = torch.ones(1, 1, q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)
    probs = logits.masked_fill(~expand_to_query_heads(visible, query), float("-inf")).softmax(-1).nan_to_num(0.0)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return (probs.to(value.dtype) @ value).transpose(1, 2)


def expand_to_query_heads(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """A [B, H_kv, q, L] mask repeated for the query heads of each group (HF ``repeat_kv`` order)."""
    if mask is None or mask.shape[1] in (1, query.shape[1]):
        return mask
    return mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
