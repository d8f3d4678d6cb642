"""When a sweep may skip a run: its folder holds results produced with the very same settings.

The settings compared are the model args (model, dtype, cache name, budget, chunks ...), every
setting the cache records in ``config.buzz_cache`` (so a changed default is noticed), the tasks,
``--limit``, ``--gen_kwargs``, ``--apply_chat_template``, ``--metadata``, ``--system_instruction``,
``--num_fewshot``, and samples when ``--log_samples`` asks for them. They are read from what
lm-eval stores, plus the requested tasks from the sweep block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from buzz_lm_eval.harness.run_stats import STAT_KEYS
from buzz_lm_eval.report.results_reader import canonical, normalised


def parsed_args(text: str | dict | None) -> dict[str, Any]:
    """``key=value,...`` (or lm-eval's already parsed dict) as a dict of typed values."""
    from lm_eval.utils import simple_parse_args_string

    if isinstance(text, dict):
        return dict(text)
    return simple_parse_args_string(text) if text else {}


def top_level_tasks(data: dict[str, Any]) -> list[str]:
    """The tasks and groups a results file was asked for (subtasks of its groups left out)."""
    groups = data.get("group_subtasks") or {}
    subtasks = {sub for subs in groups.values() if isinstance(subs, list) for sub in subs}
    return sorted((set(data.get("results") or {}) | set(groups)) - subtasks)


def expected(model_args: str, cache: dict[str, Any], tasks: list[str], args: Any) -> dict[str, Any]:
    """The settings a run of this sweep command will store."""
    return {
        "model_args": parsed_args(model_args),
        "cache": cache,
        "tasks": sorted(tasks),
        "limit": normalised(args.limit),
        "gen_kwargs": parsed_args(args.gen_kwargs) or None,
        "apply_chat_template": bool(args.apply_chat_template),
        **prompt_settings(args),
    }


def prompt_settings(args: Any) -> dict[str, Any]:
    """The sweep options that change the prompts or the tasks' data (recorded in the sweep block)."""
    return {
        "metadata": args.metadata or None,
        "system_instruction": args.system_instruction,
        "num_fewshot": args.num_fewshot,
    }


def stored(data: dict[str, Any]) -> dict[str, Any]:
    """The same settings, as a stored results file records them."""
    config, sweep = data.get("config") or {}, data.get("sweep") or {}
    cache = config.get("buzz_cache") or {}
    chat = sweep["apply_chat_template"] if "apply_chat_template" in sweep else data.get("chat_template") is not None
    return {
        "model_args": parsed_args(config.get("model_args")),
        "cache": {key: value for key, value in cache.items() if key not in STAT_KEYS},
        "tasks": sorted(sweep.get("tasks") or top_level_tasks(data)),
        "limit": normalised(config.get("limit")),
        "gen_kwargs": parsed_args(config.get("gen_kwargs")) or None,
        "apply_chat_template": bool(chat),
        # absent from files of sweeps that had no such option: None, which only a run without it matches
        **{key: sweep.get(key) for key in ("metadata", "system_instruction", "num_fewshot")},
    }


def differences(there: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``name (A there, B now)`` for each differing setting; dicts are compared key by key."""
    found = []
    for key in sorted(there.keys() | now.keys()):
        old, new = there.get(key, "absent"), now.get(key, "absent")
        if isinstance(old, dict) and isinstance(new, dict) and key in ("model_args", "cache"):
            found += differences(old, new, f"{key}.")
        elif canonical(old) != canonical(new):
            found.append(f"{prefix}{key} ({canonical(old)} there, {canonical(new)} now)")
    return found


def mismatch(run_dir: Path, settings: dict[str, Any], log_samples: bool) -> list[str]:
    """Why the newest results file in ``run_dir`` does not count as this run (empty: it does)."""
    path = sorted(run_dir.glob("results_*.json"))[-1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path.name} is unreadable ({type(exc).__name__}: {exc})"]
    found = differences(stored(data if isinstance(data, dict) else {}), settings)
    if log_samples and not list(run_dir.glob("samples_*.jsonl")):
        found.append("log_samples (no samples files there, asked for now)")
    return found
