"""Startup hook, run by ``buzz_lm_eval_startup.pth`` at every interpreter start.

lm-eval 0.4.13 has no plugin entry point, so this installs a tiny import watcher (no torch,
no lm-eval import; microseconds) that acts only when lm-eval itself is imported:

- after ``lm_eval.models`` runs, it registers ``buzz_hf`` lazily by "module:Class" string, so
  the built-in models stay registered (``get_model`` imports ``lm_eval.models`` first);
- after ``lm_eval.tasks.manager`` runs, every ``TaskManager`` also indexes this package's
  task directory, so ``--tasks buzz_*`` works without ``--include_path``, and a fetched offline
  model's name in the task metadata (``pretrained``/``tokenizer``, which lm-eval copies from
  ``--model_args`` for tasks that measure lengths with the tokenizer) becomes its directory;
- after ``lm_eval.api.model`` runs, ``--use_cache`` keeps one response file per cache setting
  for models that name theirs (``response_cache_tag``), so no setting answers for another;
- after ``lm_eval.api.task`` runs, lm-eval's per-task "Custom kwargs can be passed to
  ``--metadata``" warning is shown once per process;
- after ``lm_eval.loggers.evaluation_tracker`` runs, ``buzz_hf`` runs on the shipped model
  (no ``pretrained=``) are named after it instead of a random id (the output folder's name).

It never raises, and installing it twice is a no-op.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys

MODEL_TARGET = "buzz_lm_eval.harness.hflm:BuzzHFLM"


def register_model() -> None:
    from lm_eval.api.registry import model_registry

    if "buzz_hf" not in model_registry:
        model_registry.register("buzz_hf", target=MODEL_TARGET)


def wrap_method(cls, name: str, make) -> None:
    """Replace ``cls.<name>`` by ``make(original)``, once: wrapping an already wrapped one is a no-op."""
    original = getattr(cls, name)
    if getattr(original, "_buzz_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._buzz_wrapped = True
    setattr(cls, name, wrapper)


def add_task_path(manager_module) -> None:
    """Wrap ``TaskManager.__init__`` so our tasks are always on its include path and offline model
    names in its metadata point at their fetched directories."""

    def make(original):
        def __init__(self, *args, **kwargs):
            from buzz_lm_eval.harness.paths import tasks_dir

            if len(args) >= 2:
                args = (args[0], with_tasks(args[1], tasks_dir()), *args[2:])
            else:
                kwargs["include_path"] = with_tasks(kwargs.get("include_path"), tasks_dir())
            if len(args) >= 4:
                args = (*args[:3], with_model_dirs(args[3]), *args[4:])
            elif "metadata" in kwargs:
                kwargs["metadata"] = with_model_dirs(kwargs["metadata"])
            original(self, *args, **kwargs)

        return __init__

    wrap_method(manager_module.TaskManager, "__init__", make)


def with_model_dirs(metadata):
    """Task ``metadata`` with a fetched offline model's name (``pretrained``, ``tokenizer``) replaced by
    its directory, so a task that loads the tokenizer never asks the hub for it."""
    if not isinstance(metadata, dict):
        return metadata
    from buzz_lm_eval.harness.offline_models import MODELS, is_fetched, model_dir

    resolved = dict(metadata)
    for key in ("pretrained", "tokenizer"):
        name = resolved.get(key)
        if isinstance(name, str) and name.lower() in MODELS and is_fetched(name.lower()):
            resolved[key] = str(model_dir(name.lower()))
    return resolved


def with_tasks(include_path, ours):
    """``include_path`` (None, a path or a list) plus ``ours``, unless already there."""
    from pathlib import Path

    paths = (
        []
        if include_path is None
        else list(include_path)
        if isinstance(include_path, (list, tuple))
        else [include_path]
    )
    if all(Path(p).resolve() != ours for p in paths):
        paths.append(str(ours))
    return paths


def key_response_cache(model_module) -> None:
    """Wrap ``CachingLM.__init__``: an LM with ``response_cache_tag()`` gets its own database file."""

    def make(original):
        def __init__(self, lm, cache_db, *args, **kwargs):
            tag = getattr(lm, "response_cache_tag", None)
            if callable(tag):
                root, ext = os.path.splitext(cache_db)
                cache_db = f"{root}.{tag()}{ext}"
            original(self, lm, cache_db, *args, **kwargs)

        return __init__

    wrap_method(model_module.CachingLM, "__init__", make)


class OnceFilter:
    """A logging filter (any object with ``filter``) letting a record containing ``text`` through once."""

    def __init__(self, text: str):
        self.text, self.seen = text, False

    def filter(self, record) -> bool:
        if self.text not in str(record.msg):
            return True
        first, self.seen = not self.seen, True
        return first


def quiet_task_warnings(task_module) -> None:
    """lm-eval warns about ``--metadata`` for every task with a custom dataset: once is enough."""
    text = "Custom kwargs can be passed to `--metadata`"
    logger = task_module.eval_logger
    if not any(isinstance(f, OnceFilter) and f.text == text for f in logger.filters):
        logger.addFilter(OnceFilter(text))


def name_default_model(tracker_module) -> None:
    """Name ``buzz_hf`` runs without ``pretrained=`` after the shipped model, not a random id, and runs
    on an offline model (``pretrained=smollm2-135m-instruct`` or its fetched directory) after its
    display name (``SmolLM2-135M-Instruct``), which is also their ``--output_path`` folder."""
    import inspect

    cls = tracker_module.GeneralConfigTracker

    def make(original):
        signature = inspect.signature(original)

        def log_experiment_args(self, *args, **kwargs):
            original(self, *args, **kwargs)
            given = signature.bind(self, *args, **kwargs).arguments
            if given.get("model_source") != "buzz_hf":
                return
            named = cls._get_model_name(given.get("model_args"))
            if named is None:
                from buzz_lm_eval.harness.paths import DEFAULT_MODEL_NAME

                self.model_name = self.model_name_sanitized = DEFAULT_MODEL_NAME
                return
            from buzz_lm_eval.harness.offline_models import display_name

            display = display_name(named)
            if display is not None:
                self.model_name = self.model_name_sanitized = display

        return log_experiment_args

    wrap_method(cls, "log_experiment_args", make)
    check_output_path(tracker_module)


def check_output_path(tracker_module) -> None:
    """When lm-eval sets up its tracker (before it indexes tasks or loads the model): an
    ``--output_path`` that cannot be written fails (lm-eval itself would compute everything, then
    only warn and save nothing), and so, under the ``lm_eval`` script, do bad ``buzz_hf`` model_args
    (an offline model not fetched yet, say), as ``buzz-lm-eval`` checks them."""

    def make(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if getattr(self, "output_path", None):
                from buzz_lm_eval.harness.files import check_writable_folder

                check_writable_folder(self.output_path, "--output_path")
            if os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval"):
                from buzz_lm_eval.harness.model_args import check_buzz_model_args

                check_buzz_model_args(sys.argv[1:])

        return __init__

    wrap_method(tracker_module.EvaluationTracker, "__init__", make)


AFTER_IMPORT = {
    "lm_eval.models": lambda module: register_model(),
    "lm_eval.tasks.manager": add_task_path,
    "lm_eval.api.model": key_response_cache,
    "lm_eval.api.task": quiet_task_warnings,
    "lm_eval.loggers.evaluation_tracker": name_default_model,
}


class _Watcher:
    """A meta-path finder that finds nothing itself; it wraps the loader of the watched modules."""

    buzz_lm_eval_watcher = True

    def find_spec(self, name, path, target=None):
        if name not in AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            try:
                AFTER_IMPORT[name](module)
            except Exception as error:  # never break lm-eval because of the plugin
                print(f"buzz-lm-eval: startup hook skipped for {name}: {error}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the watcher first on ``sys.meta_path`` (idempotent); act now if lm-eval is loaded."""
    try:
        if not any(getattr(f, "buzz_lm_eval_watcher", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _Watcher())
        for name, action in AFTER_IMPORT.items():
            if name in sys.modules:
                action(sys.modules[name])
    except Exception as error:
        print(f"buzz-lm-eval: startup hook not installed: {error}", file=sys.stderr)


install()
