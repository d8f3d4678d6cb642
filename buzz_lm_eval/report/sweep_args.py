"""``buzz-lm-eval sweep``'s command line: its options, and the ``--model_args`` it passes on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from buzz_lm_eval.cache.positions import POSITION_MODES
from buzz_lm_eval.harness.model_args import OWN_KEYS
from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR
from buzz_lm_eval.policies.base import EVICT_MODES


def names(text: str) -> list[str]:
    """Comma-separated names, stripped, without blanks or repeats, in order."""
    return list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def budgets(text: str) -> list[int]:
    """Comma-separated integer budgets."""
    try:
        return [int(part) for part in names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"budgets must be integers: {text!r}") from exc


def positive_int(text: str) -> int:
    """An integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def shard(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be K/N, e.g. 1/2, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="buzz-lm-eval sweep",
        description="Run a grid of KV-cache policies and budgets through lm-eval, loading the model once.",
    )
    parser.add_argument(
        "--model_args",
        default="",
        help=f"buzz_hf/hf model_args without cache settings (default pretrained: the shipped {DEFAULT_MODEL_DIR.name})",
    )
    parser.add_argument("--policies", type=names, required=True, help="e.g. full,streaming,h2o,buzz")
    parser.add_argument("--budgets", type=budgets, default=[], help="KV-token budgets, e.g. 128,256,512")
    parser.add_argument("--tasks", type=names, required=True, help="lm-eval task or group names")
    parser.add_argument("--output", type=Path, required=True, help="directory for the results files")
    parser.add_argument("--limit", type=float, help="documents per task (below 1: a fraction)")
    parser.add_argument("--prefill_chunk", type=positive_int, help="buzz_hf prefill_chunk")
    parser.add_argument("--score_chunk", type=positive_int, help="buzz_hf score_chunk")
    parser.add_argument(
        "--positions",
        choices=POSITION_MODES,
        default="shifted",
        help="RoPE positions of kept tokens (buzz_hf positions; default shifted, the authors' rule)",
    )
    parser.add_argument("--evict", choices=EVICT_MODES, help="buzz_hf evict for every run (default: each policy's own)")
    parser.add_argument("--apply_chat_template", action="store_true", help="as in lm_eval")
    parser.add_argument("--gen_kwargs", help="as in lm_eval, e.g. max_gen_toks=64")
    parser.add_argument(
        "--metadata",
        type=json.loads,
        default={},
        help="task metadata JSON as in lm_eval, e.g. '{\"max_seq_lengths\":[1024,2048]}'",
    )
    parser.add_argument("--system_instruction", help="as in lm_eval")
    parser.add_argument("--num_fewshot", type=int, help="as in lm_eval")
    parser.add_argument(
        "--log_samples",
        action="store_true",
        help="as in lm_eval: samples_<task>_<date>.jsonl next to each results file",
    )
    parser.add_argument(
        "--shard",
        type=shard,
        default=(1, 1),
        metavar="K/N",
        help="run only every N-th run of the grid, starting with the K-th (1-based), so N processes, "
        "GPUs or array jobs share one grid into one --output; the leaderboard merges them",
    )
    parser.add_argument("--verbose", action="store_true", help="print the full traceback of a failed run")
    return parser.parse_args(argv)


def split_model_args(model_args: str) -> tuple[str, dict[str, Any]]:
    """(model_args string with pretrained=, parsed kwargs); cache settings are the sweep's own."""
    from lm_eval.utils import simple_parse_args_string

    kwargs = simple_parse_args_string(model_args)
    reserved = sorted(set(kwargs) & set(OWN_KEYS))
    if reserved:
        raise ValueError(
            f"--model_args must not set {', '.join(reserved)}: the sweep sets the cache "
            "(use --policies/--budgets/--positions/--prefill_chunk/--score_chunk)"
        )
    if "pretrained" not in kwargs:
        kwargs["pretrained"] = str(DEFAULT_MODEL_DIR)
        model_args = ",".join(filter(None, [f"pretrained={DEFAULT_MODEL_DIR}", model_args.strip(",")]))
    return model_args, kwargs
