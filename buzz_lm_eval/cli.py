"""The ``buzz-lm-eval`` console script.

``buzz-lm-eval [lm_eval arguments]`` runs the stock lm-eval CLI with ``buzz_hf`` registered and
this package's tasks on the include path; the subcommands below add what lm-eval lacks. With
``--model buzz_hf`` its ``--model_args`` are checked before lm-eval starts indexing tasks.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

SUBCOMMANDS = {
    "models": "buzz_lm_eval.harness.offline_models",
    "demo": "buzz_lm_eval.demo",
    "sweep": "buzz_lm_eval.report.sweep",
    "leaderboard": "buzz_lm_eval.report.leaderboard",
    "longbench-export": "buzz_lm_eval.harness.longbench",
}
LM_EVAL_COMMANDS = {
    "run": "evaluate: lm-eval's own options (`buzz-lm-eval run --help`); `run` may be left out",
    "ls": "list tasks, groups and tags (e.g. `buzz-lm-eval ls tasks`)",
    "validate": "check task configurations",
}


def summary(module: str) -> str:
    """The first docstring line of ``module``, read from its source (nothing is imported)."""
    spec = importlib.util.find_spec(module)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    return doc.splitlines()[0].split(":", 1)[-1].strip() if doc else ""


def usage() -> str:
    """The help text: this package's subcommands, then lm-eval's."""
    rows = [(name, summary(module)) for name, module in SUBCOMMANDS.items()] + list(LM_EVAL_COMMANDS.items())
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {text}" for name, text in rows]
    return "\n".join(
        [
            "usage: buzz-lm-eval COMMAND [ARGS]   (COMMAND --help for its options)",
            "",
            "KV-cache eviction (BUZZ and baselines) in lm-evaluation-harness: `--model buzz_hf`.",
            "",
            "commands:",
            *lines[: len(SUBCOMMANDS)],
            "",
            "lm-eval's own commands, with buzz_hf and this package's tasks available:",
            *lines[len(SUBCOMMANDS) :],
            "",
            "example:",
            "  buzz-lm-eval run --model buzz_hf --model_args cache=buzz,budget=128 --tasks buzz_smoke --limit 2",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]) or 0)
    from buzz_lm_eval.harness.lm_eval_cli import run_lm_eval_cli
    from buzz_lm_eval.harness.model_args import check_buzz_model_args

    try:
        check_buzz_model_args(argv)
    except ValueError as error:
        print(f"buzz-lm-eval: {error}", file=sys.stderr)
        return 2
    return int(run_lm_eval_cli(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
