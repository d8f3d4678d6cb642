"""``EvictingCache`` (one ``EvictingLayer`` per decoder layer) and ``build_cache``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.cache_utils import Cache

from ..policies import Policy, build_policy
from .architectures import layer_windows
from .attention import prepare_model
from .layer import ONE_CACHE, EvictingLayer
from .layer_group import group_of
from .mask_reads import forget
from .positions import KeyRotation, check_positions, key_rotations
from .regime import Schedule, check_regime

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class EvictingCache(Cache):
    """A Cache of ``EvictingLayer``s, one per decoder layer, each running ``policy.for_layer(i, n)``;
    layers that share one policy object drop their decode tokens as one batch (``layer_group.py``).

    One cache serves one ``generate`` call (or one stream of plain forwards); ``reset()`` makes it
    new again. Handing a used cache to another ``generate`` is refused (transformers >= 5.17
    marks the caches it is handed; older 5.x are caught when the prompt is no longer than what
    the cache has seen, or has another batch size).
    """

    _handed_to_generate = False
    _resumable = False

    def __init__(
        self,
        policy: Policy,
        sliding_windows: list[int | None],
        sync_timing: bool = False,
        rotations: list[KeyRotation] | None = None,
        evict: str = "every_forward",
        prompt_length: int | None = None,
        batch_layers: bool = True,
    ):
        n = len(sliding_windows)
        rotations = rotations or [None] * n
        super().__init__(
            layers=[
                EvictingLayer(policy.for_layer(i, n), window, sync_timing, rotation, Schedule(evict, prompt_length))
                for i, (window, rotation) in enumerate(zip(sliding_windows, rotations, strict=True))
            ]
        )
        self.policy, self.evict = policy, evict
        group = group_of(self.layers) if batch_layers else None
        for i, layer in enumerate(self.layers):
            layer.group, layer.group_index = group, i
        self.positions = None if not policy.evicts else "original" if rotations[0] is None else "shifted"

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            forget()  # a new forward: its mask may be an old object rewritten (see ``mask_reads``)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def _is_user_defined(self) -> bool:
        return self._handed_to_generate

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        """``generate`` sets this on every cache it is handed: a used cache is refused there."""
        if value and self.get_seq_length() > 0 and not self._resumable:
            raise ValueError(f"EvictingCache: this cache has already seen {self.get_seq_length()} tokens; {ONE_CACHE}")
        self._handed_to_generate, self._resumable = value, False

    def hand_over(self) -> None:
        """Let the next ``generate`` take this cache although it holds the start of its prompt
        (``generate`` reads only the prompt's tokens after them)."""
        self._resumable = True

    def stats(self) -> dict[str, int | float | list[int]]:
        """Whole-run statistics as plain ints and floats (see README for definitions)."""
        layers = [layer for layer in self.layers if layer.stats.forwards]
        if not layers:
            return {
                "tokens_seen": 0,
                "kept_tokens_peak": 0,
                "kept_tokens_mean": 0.0,
                "kv_bytes_peak": 0,
                "kv_bytes_mean": 0.0,
                "kv_bytes_allocated_peak": 0,
                "compression_ratio": 1.0,
                "evict_seconds": 0.0,
                "forwards": 0,
                "prompt_tokens_compressed": 0.0,
                "kept_tokens_after_compression": 0.0,
                "kept_tokens_peak_per_layer": [0] * len(self.layers),
            }
        seen = max(layer.seen for layer in layers)
        peak_bytes = sum(layer.stats.peak_tokens * layer.stats.bytes_per_token for layer in layers)
        mean_tokens = [layer.stats.kept_tokens_sum / layer.stats.forwards for layer in layers]
        full_bytes = sum(layer.seen * layer.stats.bytes_per_token for layer in layers)
        return {
            "tokens_seen": seen,
            "kept_tokens_peak": max(layer.stats.peak_tokens for layer in layers),
            "kept_tokens_mean": sum(mean_tokens) / len(layers),
            "kv_bytes_peak": peak_bytes,
            "kv_bytes_mean": sum(t * layer.stats.bytes_per_token for t, layer in zip(mean_tokens, layers, strict=True)),
            "kv_bytes_allocated_peak": sum(layer.stats.allocated_bytes_peak for layer in layers),
            "compression_ratio": full_bytes / peak_bytes if peak_bytes else 1.0,
            "evict_seconds": sum(layer.stats.evict_seconds for layer in layers),
            "forwards": layers[0].stats.forwards,
            # after_prefill: per row, tokens held when the prompt was compressed and right after (0 if never)
            "prompt_tokens_compressed": sum(layer.stats.prompt_tokens for layer in layers) / len(layers),
            "kept_tokens_after_compression": sum(layer.stats.compressed_tokens for layer in layers) / len(layers),
            "kept_tokens_peak_per_layer": [layer.stats.peak_tokens for layer in self.layers],
        }


def build_cache(
    model: PreTrainedModel,
    policy: str | Policy = "buzz",
    *,
    positions: str | None = None,
    evict: str | None = None,
    prompt_length: int | None = None,
    sync_timing: bool = False,
    batch_layers: bool = True,
    **policy_args: int | float | str | None,
) -> EvictingCache:
    """A fresh evicting cache for one batch of requests to ``model`` (prepared once for score capture).

    ``positions``: ``"shifted"`` (default; the authors' rule) or ``"original"`` RoPE positions for
    kept tokens; ``full`` never evicts, so it ignores them.
    ``evict``: ``every_forward`` or ``after_prefill`` (default: the policy's published regime);
    under ``after_prefill`` each layer evicts once, after the forward reaching ``prompt_length``
    tokens (default: after the first forward), then grows (see ``regime.py``).
    ``sync_timing`` makes ``evict_seconds`` exact on CUDA by synchronising around each eviction
    (benchmarks); otherwise it is host time, which on a GPU undercounts queued kernels.
    ``batch_layers``: decode steps that drop one token per layer drop for every layer at once after
    the last layer's attention (``layer_group.py``; the same kept tokens, keys and logits);
    False evicts layer by layer.
    """
    windows = layer_windows(model.config.get_text_config(decoder=True))
    positions = check_positions(positions)
    if not isinstance(policy, Policy):
        policy = build_policy(policy, **policy_args)
    elif policy_args:
        raise ValueError("pass either a Policy object or a policy name with its parameters, not both")
    evict = check_regime(evict, prompt_length, policy)
    rotations = None
    if policy.evicts and positions == "shifted":
        rotations = key_rotations(model, len(windows))
    if policy.evicts:
        prepare_model(model)  # `full` keeps the model's own attention: bit-exact by construction
    return EvictingCache(policy, windows, sync_timing, rotations, evict, prompt_length, batch_layers)
