"""Startup hook, run by ``buzz_lm_eval_startup.pth`` at every interpreter start.

lm-eval 0.4.13 has no plugin entry point, so this installs a tiny import watcher (no torch,
no lm-eval import; microseconds) that acts only when lm-eval itself is imported:

- after ``lm_eval.models`` runs, it registers ``buzz_hf`` lazily by "module:Class" string, so
  the built-in models stay registered (``get_model`` imports ``lm_eval.models`` first);
- after ``lm_eval.tasks.manager`` runs, every ``TaskManager`` also indexes this package's
  task directory, so ``--tasks buzz_*`` works without ``--include_path``.

It never raises, and installing it twice is a no-op.
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys

MODEL_TARGET = "buzz_lm_eval.hflm:BuzzHFLM"


def register_model() -> None:
    from lm_eval.api.registry import model_registry

    if "buzz_hf" not in model_registry:
        model_registry.register("buzz_hf", target=MODEL_TARGET)


def add_task_path(manager_module) -> None:
    """Wrap ``TaskManager.__init__`` so our tasks are always on its include path."""
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_buzz_tasks", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        from buzz_lm_eval.paths import tasks_dir

        if len(args) >= 2:
            args = (args[0], with_tasks(args[1], tasks_dir()), *args[2:])
        else:
            kwargs["include_path"] = with_tasks(kwargs.get("include_path"), tasks_dir())
        original(self, *args, **kwargs)

    __init__._buzz_tasks = True
    cls.__init__ = __init__


def with_tasks(include_path, ours):
    """``include_path`` (None, a path or a list) plus ``ours``, unless already there."""
    from pathlib import Path

    paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
    if all(Path(p).resolve() != ours for p in paths):
        paths.append(str(ours))
    return paths


AFTER_IMPORT = {
    "lm_eval.models": lambda module: register_model(),
    "lm_eval.tasks.manager": add_task_path,
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
