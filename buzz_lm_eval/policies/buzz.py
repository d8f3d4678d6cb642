"""``buzz``: sinks, a recent window, and a beehive of segmented heavy hitters in between.

The middle region (between the ``sink`` first and the ``window`` last tokens) is evicted once
it holds more than ``threshold`` tokens. Its earlier samples are thinned to every
``(stride + 1) // 2``-th one; its fresh tokens are cut into segments of ``stride`` tokens
and only each segment's top-scoring token (the earliest on ties) survives.
"""

from __future__ import annotations

import torch

from .base import Picked, Policy, Selection, StepInput, check_sizes, span
from .budget import split_budget

# The authors' defaults, and their window:threshold ratio used to split a budget.
DEFAULTS = {"sink": 4, "window": 160, "threshold": 400, "stride": 5}


class BuzzPolicy(Policy):
    """BUZZ with accumulated scores (the paper's ``BuzzKVCacheWithAccumulation``).

    Budget N: ``sink`` (default 4) stays, and ``window + threshold = N - 1 - sink`` is split
    160:400 like the authors' defaults. A decode step then holds at most
    ``sink + window + threshold + 1 = N`` tokens, which needs the middle to shrink back to
    ``<= threshold`` after each eviction: ``from_budget`` checks that for the given stride.

    With ``stride < 3`` earlier samples are never thinned (every ``(stride + 1) // 2 = 1``-st is
    kept), so the cache grows without bound whatever the sizes; the authors' code accepts that
    and grows. ``from_budget`` and ``buzz_hf`` refuse it (``check_bounded``); explicit sizes
    still build it, for the spec's worked example and reproducing the authors' runs.
    """

    name = "buzz"
    params = ("sink", "window", "threshold", "stride")
    needs_scores = True
    accumulates = True

    def __init__(self, sink: int = 4, window: int = 160, threshold: int = 400, stride: int = 5):
        sizes = {"sink": sink, "window": window, "threshold": threshold, "stride": stride}
        check_sizes(self.name, sizes, {"sink": 0})
        self.sink, self.window, self.threshold, self.stride = sink, window, threshold, stride
        self.thin = (stride + 1) // 2

    @classmethod
    def from_budget(cls, budget: int, sink=None, window=None, threshold=None, stride=None) -> BuzzPolicy:
        stride = DEFAULTS["stride"] if stride is None else stride
        cls(stride=stride).check_bounded()
        given = {"sink": sink, "window": window, "threshold": threshold}
        weights = {"window": DEFAULTS["window"], "threshold": DEFAULTS["threshold"]}
        policy = cls(**split_budget(cls.name, budget, given, {"sink": DEFAULTS["sink"]}, weights), stride=stride)
        worst = policy.worst_middle_after_eviction()
        if worst > policy.threshold:
            raise ValueError(
                f"{cls.name}: budget={budget} cannot be kept at stride={stride}: with threshold="
                f"{policy.threshold} the middle can still hold {worst} tokens after an eviction "
                f"(choose a larger budget, or a larger threshold)"
            )
        return policy

    def check_bounded(self) -> None:
        """Refuse ``stride < 3``: earlier samples are then never thinned and the cache grows without bound."""
        if self.thin < 2:
            raise ValueError(
                f"{self.name}: stride={self.stride} never thins earlier samples (the thinning step "
                f"(stride + 1) // 2 is {self.thin}: every one is kept), so the cache grows without bound whatever the "
                f"budget or threshold (the authors' code accepts this stride and grows too); use stride >= 3 "
                f"(the authors' default is {DEFAULTS['stride']})"
            )

    def worst_middle_after_eviction(self) -> int:
        """Largest middle size an eviction can leave when it fires at ``threshold + 1`` tokens.

        With ``old`` earlier samples among the ``m = threshold + 1``, ``ceil(old / thin) +
        ceil((m - old) / stride)`` remain. Moving ``stride`` tokens from fresh to old adds at least
        one sample (``thin <= stride``) and removes one segment, so the largest value lies among
        the last ``stride`` values of ``old``, where one segment is left: ``ceil((m - 1) / thin) + 1``
        (closed form: no loop over the threshold, whatever its size).
        """
        m = self.threshold + 1
        return -(-(m - 1) // self.thin) + 1

    def max_chunk(self) -> int:
        """Largest forward after which one eviction brings the middle back to ``<= threshold``.

        The worst case starts from a middle of ``threshold`` earlier samples: they thin to
        ``ceil(threshold / thin)`` and a chunk of c fresh tokens keeps ``ceil(c / stride)``.
        """
        return self.stride * (self.threshold - -(-self.threshold // self.thin))

    # -- selection ------------------------------------------------------------------------
    def segment_scores(self, state, current: torch.Tensor | None) -> torch.Tensor | None:
        """Scores that pick each fresh segment's survivor (accumulated S for ``buzz``)."""
        return state.scores

    def select(self, state, inp: StepInput, current):
        n_old = state.n_old if state.n_old is not None else torch.zeros_like(inp.n)
        active = (inp.n > self.sink + self.window) & (inp.n - self.sink - self.window > self.threshold)
        if not bool(active.any()):
            return None
        rel, mid = inp.rel, inp.rel - self.sink
        recent = rel >= inp.n - self.window
        old = (mid >= 0) & (mid < n_old)
        old_kept = old & (mid % self.thin == 0)
        fresh = (mid >= n_old) & ~recent
        fresh_kept = self.pick_fresh(fresh, mid - n_old, self.segment_scores(state, current), inp)
        sink = (rel >= 0) & (rel < self.sink)
        keep = sink | old_kept | fresh_kept | recent
        kept_middle = (old_kept | fresh_kept)[:, :1].sum(dim=-1, keepdim=True)
        return Selection(
            keep=torch.where(active, keep, rel >= 0),
            reset=(sink | old_kept) & active,
            n_old=torch.where(active, kept_middle, n_old),
        )

    def pick(self, state, length, current, device):
        middle = length - self.sink - self.window
        if length <= self.sink + self.window or middle <= self.threshold:
            return None
        start, stop = self.sink + (state.n_old_all or 0), length - self.window
        fresh = self.segment_winners(self.segment_scores(state, current), start, stop, device)
        rows = fresh.shape[:2]
        older = torch.cat([span(0, self.sink, device), span(self.sink, start, device, self.thin)], dim=-1)
        indices = torch.cat([older.expand(*rows, -1), fresh, span(stop, length, device).expand(*rows, -1)], dim=-1)
        return Picked(indices, reset_below=start, n_old=older.shape[-1] - self.sink + fresh.shape[-1])

    def segment_winners(self, scores, start: int, stop: int, device) -> torch.Tensor:
        """Per segment of ``stride`` tokens in [start, stop), the top-scoring index (earliest on ties)."""
        count = -(-(stop - start) // self.stride)
        padding = count * self.stride - (stop - start)
        region = torch.nn.functional.pad(scores[..., start:stop], (0, padding), value=float("-inf"))
        best = region.view(*region.shape[:2], count, self.stride).argmax(dim=-1)
        return best + span(start, stop, device, self.stride)

    def pick_fresh(self, fresh, offset, scores, inp: StepInput) -> torch.Tensor:
        """Per segment of ``stride`` fresh tokens, keep the top-scoring one (earliest on ties)."""
        heads = scores.shape[1]
        buckets = inp.length // self.stride + 2
        segment = torch.where(fresh, offset.div(self.stride, rounding_mode="floor"), buckets - 1)
        segment = segment.clamp(0, buckets - 1).expand(inp.batch, heads, inp.length)
        fresh = fresh.expand_as(segment)
        masked = torch.where(fresh, scores, float("-inf"))
        best = masked.new_full((inp.batch, heads, buckets), float("-inf"))
        best = best.scatter_reduce(-1, segment, masked, reduce="amax")
        is_best = fresh & (masked == best.gather(-1, segment))
        index = torch.arange(inp.length, device=inp.device).expand_as(segment)
        first = torch.full_like(best, inp.length, dtype=torch.long)
        first = first.scatter_reduce(-1, segment, torch.where(is_best, index, inp.length), reduce="amin")
        return is_best & (index == first.gather(-1, segment))
