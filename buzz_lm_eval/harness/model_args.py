"""``buzz_hf``'s own model_args: their keys, the cache plan they make, and every check that runs
before any weight loads (``buzz-lm-eval`` runs them before lm-eval even indexes its tasks)."""

from __future__ import annotations

import argparse
import inspect
import os

from lm_eval.models.huggingface import HFLM

from ..cache.architectures import layer_windows
from ..cache.positions import check_positions, check_rope_config
from ..cache.regime import check_regime
from ..policies import POLICY_PARAMS, build_policy
from ..policies.base import integral
from ..policies.suggest import did_you_mean

SIZE_KEYS = POLICY_PARAMS  # the policies' own keys (sink, window, heavy, ...), read from the registry
OWN_KEYS = ("cache", "budget", *SIZE_KEYS, "evict", "positions", "prefill_chunk", "score_chunk", "stats_file")
# from_pretrained keywords HFLM forwards and that we let through as well
PASSTHROUGH_KEYS = (
    "attn_implementation",
    "device_map",
    "low_cpu_mem_usage",
    "quantization_config",
    "load_in_8bit",
    "load_in_4bit",
    "cache_dir",
    "local_files_only",
    "token",
    "use_safetensors",
    "offload_state_dict",
)
CHUNK_CAP = 512  # largest default chunk


def pop_sizes(kwargs: dict) -> dict:
    """The policy keys (``SIZE_KEYS``) taken out of ``kwargs``: what ``build_policy`` gets besides the budget."""
    return {key: kwargs.pop(key) for key in SIZE_KEYS if key in kwargs}


def _chunk(name: str, value) -> int | None:
    if value is None:
        return None
    value = integral("buzz_hf", name, value)
    if value < 1:
        raise ValueError(f"buzz_hf: {name} must be >= 1, got {value}")
    return value


def default_chunk(budget: int | None) -> int | None:
    """The prefill and score chunk when a ``budget`` is given and no chunk (``evict=every_forward``):
    ``budget // 4``, in [1, 512].

    The kept tokens then peak at ``budget - 1 + chunk`` (at most 1.25 x budget) while a chunk is
    in flight, and prompts longer than the model's context are streamed, not truncated.
    """
    return None if budget is None else max(1, min(budget // 4, CHUNK_CAP))


def plan_cache(cache="buzz", budget=None, prefill_chunk=None, score_chunk=None, evict=None, positions=None, **sizes):
    """(policy, budget, prefill_chunk, score_chunk, evict, positions) from buzz_hf's cache settings;
    ValueError if bad."""
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"buzz_hf: unknown cache setting(s) {', '.join(unknown)}; valid: {', '.join(OWN_KEYS)}")
    policy = build_policy(cache, budget=budget, **{k: v for k, v in sizes.items() if v is not None})
    policy.check_bounded()
    if not policy.evicts:
        ignored = [f"{key}={value}" for key, value in (("evict", evict), ("positions", positions)) if value is not None]
        if ignored:
            raise ValueError(
                f"buzz_hf: cache=full never evicts, so {' and '.join(ignored)} would have no effect; "
                "leave them out, or pick an evicting cache"
            )
    budget = None if budget is None else integral("buzz_hf", "budget", budget)
    evict = check_regime(evict, None, policy)
    positions = check_positions(positions) if policy.evicts else None
    prefill = _chunk("prefill_chunk", prefill_chunk)
    if prefill is None and policy.evicts and evict == "every_forward":
        prefill = default_chunk(budget)  # after_prefill reads the prompt whole before it compresses
    score = _chunk("score_chunk", score_chunk) or prefill or 64
    return policy, budget, prefill, score, evict, positions


def check_model_args(kwargs: dict) -> None:
    """Reject model_args that neither HFLM, from_pretrained pass-through, nor buzz_hf know."""
    named = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    valid = named | set(OWN_KEYS) | set(PASSTHROUGH_KEYS)
    spaced = sorted(key for key in kwargs if key != key.strip())
    if spaced:
        shown = ", ".join(repr(key) for key in spaced)
        raise ValueError(
            f"buzz_hf: model_args key(s) {shown} have spaces around them (lm-eval keeps spaces in "
            "keys): write the model_args without spaces, e.g. cache=buzz,budget=64"
        )
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        names = ", ".join(f"{key}{did_you_mean(key, valid)}" for key in unknown)
        raise ValueError(
            f"buzz_hf: unknown model_args {names}; buzz_hf's own keys: {', '.join(OWN_KEYS)}; "
            "every `--model hf` model_arg (dtype, max_length, batch_size, revision, ...) is accepted too"
        )


def check_args(pretrained, cache_args: dict, kwargs: dict) -> None:
    """Every check ``buzz_hf`` makes before loading weights (``buzz-lm-eval`` runs them before lm-eval starts)."""
    check_model_args(kwargs)
    policy, *_, positions = plan_cache(**cache_args)
    check_pretrained(pretrained, kwargs, policy.evicts, positions)


def check_stats_file(path: str | None) -> None:
    """Fail before the model loads when ``stats_file`` cannot be appended to."""
    if path is None:
        return
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ValueError(
            f"buzz_hf: stats_file={path!r} cannot be written ({exc.strerror or exc}); "
            "give a file in an existing, writable folder"
        ) from exc


def check_pretrained(pretrained, kwargs: dict, evicting: bool, positions: str | None = None) -> None:
    """Fail before loading weights: a local path that does not exist, or (evicting policies only)
    an architecture the cache cannot serve. ``cache=full`` runs on any model ``hf`` runs."""
    if not isinstance(pretrained, str):
        if evicting:
            layer_windows(pretrained.config.get_text_config(decoder=True))
            if positions == "shifted":
                check_rope_config(pretrained.config.get_text_config(decoder=True))
        return
    if not os.path.isdir(pretrained) and not is_hub_id(pretrained):
        raise ValueError(
            f"buzz_hf: pretrained={pretrained!r}: no such directory (and not a Hugging Face hub id "
            "such as 'org/name'); leave pretrained out for the shipped stories260K"
        )
    if evicting:
        text_config = load_config(pretrained, kwargs).get_text_config(decoder=True)
        layer_windows(text_config)
        if positions == "shifted":
            check_rope_config(text_config)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repository id (``org/name`` or ``name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_config(pretrained: str, kwargs: dict):
    """Only the model's config, read the way HFLM will read it (to check it before any weight loads)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        pretrained,
        revision=kwargs.get("revision") or "main",
        trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
        subfolder=kwargs.get("subfolder") or "",
    )
    return config


def check_buzz_model_args(argv: list[str]) -> None:
    """With ``--model buzz_hf``, run buzz_hf's checks on ``--model_args`` (parsed as lm-eval parses
    them), refuse keys that lm-eval's own flags also set, and check that ``--output_path`` can be
    written: all before lm-eval indexes its tasks or loads a weight."""
    try:
        from lm_eval._cli.utils import MergeDictAction
    except ImportError:  # another lm-eval layout: buzz_hf still checks everything when it is built
        return
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", "-M")
    parser.add_argument("--model_args", "-a", nargs="+", action=MergeDictAction)
    parser.add_argument("--output_path", "-o")
    parser.add_argument("--device")
    known, _ = parser.parse_known_args(argv)
    if known.output_path:
        from .files import check_writable_folder

        check_writable_folder(known.output_path, "--output_path")
    if known.model != "buzz_hf":
        return
    model_args = known.model_args or {}
    # lm-eval always passes --batch_size (default 1), and --device when given, next to --model_args
    flagged = ["batch_size"] if "batch_size" in model_args else []
    flagged += ["device"] if "device" in model_args and known.device else []
    if flagged:
        flags = ", ".join(f"{key} (use --{key} {model_args[key]})" for key in flagged)
        raise ValueError(
            f"buzz_hf: {flags}: lm-eval's command line sets these from its own flags, so give "
            "them as flags, not in --model_args"
        )
    from .hflm import check_parsed_model_args

    check_parsed_model_args(model_args)
