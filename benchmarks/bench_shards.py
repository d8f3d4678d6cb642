"""Split one sweep grid into shards, or give one process every thread: which finishes first?

    python benchmarks/bench_shards.py --threads 2          # 2 shards x 1 thread vs 1 process x 2 threads

Runs the same grid twice with ``buzz-lm-eval sweep``: once as ``--threads`` concurrent processes
(``--shard k/n``, one thread each), once as one process with ``--threads`` threads; prints both
wall times, their ratio, and whether the two leaderboards hold the same scores (they must: the
shards run the same cells). Default grid: CNN/DM, 4 articles, full and three policies at 256 on
SmolLM2-135M-Instruct (``buzz-lm-eval models fetch smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep_command(args, output: Path, shard: str | None) -> list[str]:
    command = [sys.executable, "-m", "buzz_lm_eval.cli", "sweep", "--model_args", args.model_args]
    command += ["--tasks", args.tasks, "--policies", args.policies, "--budgets", args.budgets]
    command += ["--limit", str(args.limit), "--output", str(output)]
    command += ["--apply_chat_template"] if args.apply_chat_template else []
    return command + (["--shard", shard] if shard else [])


def timed(commands: list[list[str]], threads: int) -> float:
    """Wall seconds for ``commands`` run concurrently, each with ``threads`` intra-op threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for process, command in zip(processes, commands, strict=True):
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - start


def scores(output: Path) -> dict:
    """(task, policy, budget) -> metric values, from the folder's leaderboard."""
    subprocess.run(
        [sys.executable, "-m", "buzz_lm_eval.cli", "leaderboard", str(output)], check=True, capture_output=True
    )
    board = json.loads((output / "leaderboard.json").read_text())
    return {(r["task"], r["policy"], str(r["budget"]), r["metric"]): r["value"] for r in board["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_args", default="pretrained=smollm2-135m-instruct,device=cpu")
    parser.add_argument("--tasks", default="buzz_cnndm_smoke")
    parser.add_argument("--policies", default="full,streaming,h2o,buzz")
    parser.add_argument("--budgets", default="256")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--apply_chat_template", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2, help="shards, and threads of the single process")
    args = parser.parse_args()
    n = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        sharded, single = Path(tmp, "sharded"), Path(tmp, "single")
        shard_s = timed([sweep_command(args, sharded, f"{k}/{n}") for k in range(1, n + 1)], threads=1)
        single_s = timed([sweep_command(args, single, None)], threads=n)
        same = scores(sharded) == scores(single)
    print("| layout | wall s | x single |\n|---|---:|---:|")
    print(f"| {n} shards x 1 thread | {shard_s:.0f} | {shard_s / single_s:.2f} |")
    print(f"| 1 process x {n} threads | {single_s:.0f} | 1.00 |")
    print(f"- grid: {args.tasks} limit {args.limit}, {args.policies} at {args.budgets}; {args.model_args}")
    print(f"- the two leaderboards hold {'the same' if same else 'DIFFERENT'} scores")


if __name__ == "__main__":
    main()
