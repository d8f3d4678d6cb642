"""Where the files shipped inside the package live (never relative to the current directory)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # buzz_lm_eval/, this file being in buzz_lm_eval/harness/
DATA_DIR = PACKAGE_DIR / "data"
DEFAULT_MODEL_DIR = PACKAGE_DIR / "assets" / "stories260K"
# lm-eval's name (and output folder) for runs on the shipped model; see buzz_lm_eval/assets/SOURCES.md
DEFAULT_MODEL_NAME = DEFAULT_MODEL_DIR.name


def tasks_dir() -> Path:
    """The task YAML directory: inside the wheel, or ``tasks/`` beside the package in a checkout."""
    for candidate in (PACKAGE_DIR / "tasks", PACKAGE_DIR.parent / "tasks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"buzz-lm-eval task directory not found next to {PACKAGE_DIR}")


def load_task_module(relative: str, name: str):
    """A utils file of the shipped tasks as module ``name`` (task folders are files, not an importable package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, tasks_dir() / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
