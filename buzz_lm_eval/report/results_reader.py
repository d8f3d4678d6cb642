"""Reading lm-eval results files for the leaderboard: which files, which model, which settings.

A results file is recognised by its content (a JSON object whose first key is ``"results"``, as
lm-eval writes it), so ``--output_path x.json`` files (``x_<date>.json``) count as well as
``results_<date>.json``. A model is identified by what lm-eval records (path or hub id, revision,
weights hash, adapters), never by a folder name. Settings that decide comparability are split in
two: the run's (``task_settings``: dtype, task version, limit, few-shot, chat template, generation
kwargs, max_length, predict-only, and the task metadata given with ``--metadata``, such as RULER's
and NIAH's lengths) and the cache's (every non-statistic key of ``config.buzz_cache``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buzz_lm_eval.harness.run_stats import STAT_KEYS, combine

HF_MODELS = frozenset({"hf", "hf-auto", "huggingface"})
STAT_FIELDS = (
    "compression_ratio",
    "kv_bytes_peak",
    "kv_bytes_mean",
    "kept_tokens_peak",
    "kept_tokens_mean",
    "tokens_per_second",
)
RESULTS_HEAD = re.compile(rb'^\s*\{\s*"results"\s*:')
OWN_OUTPUTS = frozenset({"leaderboard.json", "paired.json"})


class SkipFile(Exception):
    """A results file that cannot contribute rows; the message says why."""


@dataclass(frozen=True)
class ModelId:
    """What lm-eval records about a model: two different ones never share a row."""

    path: str
    revision: str
    sha: str | None
    peft: str | None
    delta: str | None


@dataclass(frozen=True)
class Run:
    """One lm-eval results file: its model, cache settings (``policy`` and ``budget`` included)."""

    source: str
    date: float | None
    model: ModelId
    policy: str
    budget: int | None
    cache: dict[str, Any]
    data: dict[str, Any]


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes shown as ``\\xNN`` escapes (always encodable)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def number(value: Any) -> float | int | None:
    """``value`` if it is a finite int/float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def canonical(value: Any) -> str:
    """A stable text form of a settings value, for keys and comparisons."""
    return json.dumps(value, sort_keys=True, default=str)


def is_results_file(path: Path) -> bool:
    """``results_*.json`` by name, any other ``*.json`` when it starts like lm-eval's output."""
    if path.name.startswith("results_"):
        return True
    try:
        with path.open("rb") as handle:
            return bool(RESULTS_HEAD.match(handle.read(4096)))
    except OSError:
        return False


def find_results(root: Path) -> tuple[list[Path], list[Path]]:
    """(results files, other JSON files) under ``root``, sorted; the leaderboard's own output is left out."""
    found, others = [], []
    for path in sorted(root.rglob("*.json")):
        if path.name in OWN_OUTPUTS or not path.is_file():
            continue
        (found if is_results_file(path) else others).append(path)
    return found, others


def load_results(path: Path) -> dict[str, Any]:
    """Parse ``path`` and check it looks like an lm-eval results file with results in it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as exc:
        raise SkipFile("JSON nested too deeply to read (RecursionError); not an lm-eval results file") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SkipFile(f"unreadable or invalid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise SkipFile("not an lm-eval results file (no 'results' section)")
    if not data["results"]:
        raise SkipFile("no results (its 'results' section is empty)")
    if not isinstance(data.get("config"), dict):
        raise SkipFile("no 'config' section, so model and cache are unknown")
    if not any("," in key for values in data["results"].values() if isinstance(values, dict) for key in values):
        raise SkipFile("no metric values in its 'results' section")
    return data


def model_args(config: dict[str, Any]) -> dict[str, Any]:
    """``config.model_args`` as a dict (lm-eval keeps either the dict or ``key=value,...``)."""
    args = config.get("model_args")
    if isinstance(args, str):
        return dict(part.strip().split("=", 1) for part in args.split(",") if "=" in part)
    return args if isinstance(args, dict) else {}


def model_id(data: dict[str, Any]) -> ModelId:
    """The model's identity from lm-eval's fields (``pretrained``, revision, weights hash, adapters)."""
    config, args = data["config"], model_args(data["config"])
    source = config.get("model_source")
    if isinstance(source, dict) and source.get("model"):  # an offline model (offline_models.py)
        name = (
            f"{source['model']} ({source.get('quantisation')} GGUF, {source.get('package')}=={source.get('version')})"
        )
        return ModelId(name, "main", str(source.get("sha256")), None, None)
    path = (
        args.get("pretrained")
        or config.get("model_name_or_path")
        or data.get("model_name")
        or config.get("model")
        or "unknown"
    )
    revision = config.get("model_revision") or args.get("revision") or "main"
    shas = [config.get(key) for key in ("model_sha", "peft_sha", "delta_sha") if config.get(key)]
    return ModelId(
        str(path),
        str(revision),
        "+".join(map(str, shas)) or None,
        args.get("peft") and str(args["peft"]),
        args.get("delta") and str(args["delta"]),
    )


def cache_of(data: dict[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    """(policy, budget, every cache setting) from ``config.buzz_cache``; stock hf runs are ``full``."""
    config = data["config"]
    cache = config.get("buzz_cache")
    if cache is None:
        if config.get("model") in HF_MODELS:
            return "full", None, {"policy": "full"}
        raise SkipFile(f"no config.buzz_cache and model is {config.get('model')!r}, not hf")
    if not isinstance(cache, dict) or not isinstance(cache.get("policy"), str):
        raise SkipFile("config.buzz_cache has no 'policy' string")
    budget = cache.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise SkipFile(f"config.buzz_cache.budget is {budget!r}, not an integer or null")
    settings = {key: value for key, value in cache.items() if key not in STAT_KEYS}
    return cache["policy"], None if cache["policy"] == "full" else budget, settings


def load_run(path: Path, root: Path) -> Run:
    """Read one results file into a Run (raises SkipFile)."""
    data = load_results(path)
    policy, budget, cache = cache_of(data)
    date = number(data.get("date"))
    return Run(printable(path.relative_to(root).as_posix()), date, model_id(data), policy, budget, cache, data)


def leaf_tasks(data: dict[str, Any], task: str) -> list[str]:
    """``task`` itself, or the tasks a group is made of (recursively, from ``group_subtasks``)."""
    groups = data.get("group_subtasks") or {}
    subtasks = groups.get(task) if isinstance(groups, dict) else None
    if not subtasks or not isinstance(subtasks, list):
        return [task]
    return [leaf for sub in subtasks if sub != task for leaf in leaf_tasks(data, sub)]


def normalised(value: Any) -> Any:
    """Integral floats as ints (lm-eval stores ``--limit 10`` as 10.0 or 10)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def is_predict_only(data: dict[str, Any], task: str) -> bool:
    """lm-eval's ``--predict_only`` replaces every metric with ``bypass``."""
    leaves = [data["results"].get(leaf) for leaf in leaf_tasks(data, task)] + [data["results"].get(task)]
    return any(isinstance(v, dict) and any(k.startswith("bypass,") for k in v) for v in leaves)


NOT_METADATA = frozenset({"version", "config_source"})  # task metadata lm-eval adds that sets nothing


def task_metadata(data: dict[str, Any], leaves: list[str]) -> dict[str, Any]:
    """The metadata that shapes the tasks' data (``--metadata``, a task YAML's ``metadata``), by leaf
    task when they differ: without the version, the YAML's path and the model arguments lm-eval
    copies into every task's metadata."""
    configs, given = data.get("configs") or {}, model_args(data["config"])
    found = {
        leaf: {
            key: value
            for key, value in ((configs.get(leaf) or {}).get("metadata") or {}).items()
            if key not in NOT_METADATA and key not in given
        }
        for leaf in leaves
    }
    distinct = {canonical(value) for value in found.values()}
    return next(iter(found.values())) if len(distinct) == 1 else found


def task_settings(data: dict[str, Any], task: str) -> dict[str, Any]:
    """The run's settings for ``task`` that decide comparability (cache settings aside)."""
    config, configs = data["config"], data.get("configs") or {}
    leaves = leaf_tasks(data, task)
    metadata = task_metadata(data, leaves)
    generation = {leaf: (configs.get(leaf) or {}).get("generation_kwargs") for leaf in leaves}
    chat = data.get("chat_template_sha") or (data.get("chat_template") and canonical(data["chat_template"]))
    return {
        "dtype": config.get("model_dtype") or model_args(config).get("dtype"),
        "task_version": (data.get("versions") or {}).get(task),
        "limit": normalised(config.get("limit")),
        "num_fewshot": (data.get("n-shot") or {}).get(task),
        "chat_template": chat or None,
        "system_instruction": data.get("system_instruction_sha"),
        "fewshot_as_multiturn": data.get("fewshot_as_multiturn") if chat else None,
        "generation_kwargs": generation[leaves[0]]
        if len({canonical(g) for g in generation.values()}) == 1
        else generation,
        "max_length": data.get("max_length"),
        "predict_only": is_predict_only(data, task),
        **({"task_metadata": metadata} if metadata else {}),  # none: no key, so earlier comparison ids stay
    }


def task_stats(run: Run, task: str) -> tuple[dict[str, float | None], str | None]:
    """(statistics, scope) for ``task``: its own (``"task"``; a group: its subtasks' combined) from
    ``buzz_cache.per_task``, else the whole run's (``"run"``, files written before per-task
    statistics), else none (stock hf runs)."""
    cache = run.data["config"].get("buzz_cache")
    if not isinstance(cache, dict):
        return dict.fromkeys(STAT_FIELDS), None
    per_task = cache.get("per_task")
    if isinstance(per_task, dict):
        summaries = [summary for leaf in leaf_tasks(run.data, task) for summary in (per_task.get(leaf) or {}).values()]
        try:
            merged = combine(summaries) if summaries else None
        except (KeyError, TypeError, ValueError):
            merged = None
        if merged is not None:
            return {field: number(merged.get(field)) for field in STAT_FIELDS}, "task"
        return dict.fromkeys(STAT_FIELDS), None
    return {field: number(cache.get(field)) for field in STAT_FIELDS}, "run"
