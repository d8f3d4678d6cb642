"""Which decoder architectures an evicting cache can serve, and each layer's sliding window."""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "granite",
    "mixtral",
    "gemma2",
    "gemma3_text",
)
_MLA = (
    "multi-head latent attention caches compressed KV latents and expands them after the cache "
    "update, so the score-capturing attention never sees the cached tensors and nothing would be evicted"
)
# Model types an evicting cache would serve silently wrong, and why.
REFUSED_MODEL_TYPES = {
    "gpt_oss": "its attention adds learned per-head sink logits (s_aux) to the softmax, which the "
    "score-capturing attention would drop, so every output would be wrong",
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
}
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(config) -> list[int | None]:
    """Per decoder layer, the sliding window (None for full attention); ValueError if unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(
            f"buzz-lm-eval refuses model type {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"buzz-lm-eval cannot serve model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    n_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" or model_type == "qwen3":
        window = window if getattr(config, "use_sliding_window", False) else None
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * n_layers
    unknown = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise ValueError(f"model type {model_type!r} has layer types {unknown} that an evicting cache cannot serve")
    return [window if kind == "sliding_attention" else None for kind in types]
