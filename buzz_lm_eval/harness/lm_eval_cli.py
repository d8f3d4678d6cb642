"""Running the stock lm-eval CLI with ``buzz_hf`` and this package's tasks available."""

from __future__ import annotations

import sys

from . import startup


def run_lm_eval_cli(argv: list[str]) -> int:
    """``lm_eval ARGS`` in this process (the startup hook is installed even under ``python -S``)."""
    startup.install()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
