"""The ``buzz-lm-eval`` console script.

``buzz-lm-eval [lm_eval arguments]`` runs the stock lm-eval CLI with ``buzz_hf`` registered and
this package's tasks on the include path; the subcommands below add what lm-eval lacks.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": "buzz_lm_eval.demo",
    "sweep": "buzz_lm_eval.sweep",
    "leaderboard": "buzz_lm_eval.leaderboard",
    "longbench-export": "buzz_lm_eval.longbench",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]) or 0)
    from buzz_lm_eval.harness import run_lm_eval_cli

    return int(run_lm_eval_cli(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
