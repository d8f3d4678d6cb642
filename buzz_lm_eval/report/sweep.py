"""``buzz-lm-eval sweep``: a grid of KV-cache policies and budgets through lm-eval, one model load.

    buzz-lm-eval sweep --model_args pretrained=M,dtype=bfloat16 --policies full,streaming,h2o,buzz \\
        --budgets 128,256,512 --tasks buzz_cnndm,buzz_10qa --output results/run1

Every (policy, budget) is one ``lm_eval.simple_evaluate`` call on the same ``buzz_hf`` model
(``configure_cache`` switches the policy); ``full`` runs once, without a budget. Each run writes
``OUTPUT/<policy>_b<budget>/results_<date>.json`` (``OUTPUT/full/...`` for full; with ``--evict MODE``
``OUTPUT/<policy>_b<budget>_<MODE>/``, otherwise each policy runs in its own default regime), the file
``lm_eval --model buzz_hf --output_path`` would write, plus a ``sweep`` block (command, tasks,
hardware, date, wall seconds); with ``--log_samples`` lm-eval's ``samples_<task>_<date>.jsonl``
files lie next to it. A run whose directory already holds results of the same settings
(``sweep_resume``) is skipped, so a killed sweep resumes where it stopped; results of other
settings stop the sweep before the model loads, naming each difference (never silently reused).

Unknown policies and tasks, and budgets a policy cannot split, are reported up front and skipped;
so is a run that fails (one line; ``--verbose`` adds the traceback). Ctrl-C stops with one line
naming the finished runs and the command that resumes (exit code 130). Otherwise the exit code is
1 when anything was skipped or failed, 2 for bad ``--model_args`` or conflicting results, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from buzz_lm_eval.harness.files import check_writable_folder, write_atomic
from buzz_lm_eval.harness.hflm import BuzzHFLM
from buzz_lm_eval.harness.offline_models import resolve
from buzz_lm_eval.policies import POLICY_NAMES, build_policy
from buzz_lm_eval.report import sweep_resume
from buzz_lm_eval.report.leaderboard import task_metrics
from buzz_lm_eval.report.machine import hardware
from buzz_lm_eval.report.sweep_args import parse_args, split_model_args


@dataclasses.dataclass(frozen=True)
class Run:
    """One grid point: a policy, its KV budget (None for full) and the eviction regime (None: its own)."""

    policy: str
    budget: int | None
    evict: str | None = None

    @property
    def name(self) -> str:
        base = self.policy if self.budget is None else f"{self.policy}_b{self.budget}"
        return base if self.evict is None else f"{base}_{self.evict}"


@dataclasses.dataclass
class Sweep:
    """What every run of one sweep shares."""

    args: argparse.Namespace
    base_args: str
    model: str
    tasks: list[str]
    task_manager: Any
    command: str
    hardware: dict[str, Any]


def report(message: str) -> None:
    """One diagnostic line on stderr."""
    print(f"sweep: {message}", file=sys.stderr, flush=True)


def plan_grid(policies: list[str], budget_list: list[int], evict: str | None = None) -> tuple[list[Run], list[str]]:
    """The valid runs, and one message per invalid policy or (policy, budget)."""
    runs, problems = [], []
    for policy in policies:
        if policy not in POLICY_NAMES:
            problems.append(f"skipping unknown policy {policy!r}; valid policies: {', '.join(POLICY_NAMES)}")
            continue
        grid = [Run(policy, None)] if policy == "full" else [Run(policy, b, evict) for b in budget_list]
        if not grid:
            problems.append(f"skipping policy {policy!r}: it needs --budgets")
        for run in grid:
            try:
                build_policy(run.policy, budget=run.budget)
                runs.append(run)
            except ValueError as exc:
                problems.append(f"skipping {run.name}: {exc}")
    return runs, problems


def resolve_tasks(requested: list[str], task_manager) -> tuple[list[str], list[str]]:
    """Known task names (globs expanded by lm-eval), and one message per unknown name."""
    tasks, problems = [], []
    for name in requested:
        matched = task_manager.match_tasks([name])
        if matched:
            tasks.extend(t for t in matched if t not in tasks)
        else:
            problems.append(f"skipping unknown task {name!r} (not in lm-eval's task index)")
    return tasks, problems


def cache_kwargs(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    """The cache settings of one run (``BuzzHFLM.configure_cache`` keywords)."""
    return {
        "cache": run.policy,
        "budget": run.budget,
        "evict": run.evict,
        "prefill_chunk": args.prefill_chunk,
        "score_chunk": args.score_chunk,
        "positions": None if run.policy == "full" else args.positions,
    }


def run_model_args(sweep: Sweep, run: Run) -> str:
    """The ``--model_args`` of the equivalent ``lm_eval --model buzz_hf`` command."""
    extra = [f"{key}={value}" for key, value in cache_kwargs(sweep.args, run).items() if value is not None]
    return ",".join([sweep.base_args, *extra])


def expected_settings(sweep: Sweep, run: Run) -> dict[str, Any]:
    """What this run's results file will record (compared with a stored one to resume)."""
    cache = BuzzHFLM.settings_for(**cache_kwargs(sweep.args, run))
    return sweep_resume.expected(run_model_args(sweep, run), cache, sweep.tasks, sweep.args)


def results_files(run_dir: Path) -> list[Path]:
    """The lm-eval results files already in a run's directory."""
    return sorted(run_dir.glob("results_*.json"))


def load_model(kwargs: dict[str, Any]):
    """The one ``buzz_hf`` model of the sweep (its cache is set per run)."""
    return BuzzHFLM(cache="full", **kwargs)


def evaluate(lm, sweep: Sweep, run: Run) -> tuple[dict[str, Any], dict[str, list]]:
    """One run through ``simple_evaluate``: (results as lm-eval's CLI would save them, without the
    sweep block; the samples by task, empty without ``--log_samples``)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import hash_string

    args = sweep.args
    lm.configure_cache(**cache_kwargs(args, run))
    tracker = EvaluationTracker()
    results = simple_evaluate(
        model=lm,
        model_args=run_model_args(sweep, run),
        tasks=sweep.tasks,
        task_manager=sweep.task_manager,
        limit=args.limit,
        log_samples=args.log_samples,
        evaluation_tracker=tracker,
        device=str(lm.device),
        batch_size=lm.batch_size,
        apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs,
        system_instruction=args.system_instruction,
        num_fewshot=args.num_fewshot,
    )
    # simple_evaluate names an LM object by its checkpoint; config.buzz_cache comes from get_model_info
    results["config"]["model"] = "buzz_hf"
    tracker.general_config_tracker.model_source = "buzz_hf"
    tracker.general_config_tracker.log_end_time()
    samples = results.pop("samples", None) or {}
    hashes = {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
        for task, rows in samples.items()
    }  # as lm-eval's own tracker records them
    return {**results, "task_hashes": hashes, **dataclasses.asdict(tracker.general_config_tracker)}, samples


def samples_files(samples: dict[str, list], date_id: str) -> dict[str, bytes]:
    """lm-eval's ``samples_<task>_<date>.jsonl`` files, rendered by its own tracker, by name."""
    from lm_eval.loggers import EvaluationTracker

    counts = {f"samples_{task}_{date_id}.jsonl": len(rows) for task, rows in samples.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tracker = EvaluationTracker(output_path=str(Path(tmp) / "results.json"))  # .json: no model subfolder
        tracker.date_id = date_id
        for task, rows in samples.items():
            tracker.save_results_samples(task_name=task, samples=rows)
        files = {path.name: path.read_bytes() for path in Path(tmp).glob("samples_*.jsonl")}
    broken = [name for name, count in counts.items() if files.get(name, b"").count(b"\n") != count]
    if broken:  # lm-eval logs a warning and goes on when it cannot write a samples file
        raise RuntimeError(f"lm-eval did not render every sample of {', '.join(broken)}")
    return files


def save(run_dir: Path, results: dict[str, Any], samples: dict[str, list]) -> Path:
    """Write the samples files, then ``results_<date>.json`` (lm-eval's naming and JSON encoding),
    each atomically: a folder with a results file is complete."""
    from lm_eval.utils import handle_non_serializable

    date_id = datetime.now().isoformat().replace(":", "-")
    for name, payload in samples_files(samples, date_id).items():
        write_atomic(run_dir / name, payload)
    path = run_dir / f"results_{date_id}.json"
    write_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return path


def headline(results: dict[str, Any]) -> str:
    """The first evaluated metric of each task and the compression ratio, for the log line (not
    RULER's -1 for a length the run left out: ``task_metrics``)."""
    parts = []
    for task, values in results["results"].items():
        metric = next(((m, v) for m, _, v, _ in task_metrics(values) if isinstance(v, (int, float))), None)
        if metric:
            parts.append(f"{task} {metric[0]}={metric[1]:.4g}")
    ratio = results["config"]["buzz_cache"].get("compression_ratio")
    return ", ".join(parts + ([f"compression {ratio:.2f}x"] if ratio else []))


def execute(lm, sweep: Sweep, run: Run) -> str:
    """Evaluate and save one run (unless another process saved it meanwhile); returns its log line."""
    run_dir = sweep.args.output / run.name
    done, conflicts = split_done(sweep, [run])  # another process (a second sweep into this folder) may
    if conflicts:  # have saved it since this sweep was planned: keep what it wrote
        raise RuntimeError(conflicts[0])
    if done:
        return f"{run.name}: skipped, saved by another process since this sweep started"
    for leftover in sorted(run_dir.glob("samples_*.jsonl")):  # no results file: an interrupted run's
        report(f"{run.name}: removing {leftover.name}, left by an interrupted run")
        leftover.unlink()
    started, wall = datetime.now(timezone.utc).isoformat(), time.perf_counter()
    results, samples = evaluate(lm, sweep, run)
    results["sweep"] = {
        "command": sweep.command,
        "run": run.name,
        "model": sweep.model,
        "tasks": sweep.tasks,
        "apply_chat_template": sweep.args.apply_chat_template,
        **sweep_resume.prompt_settings(sweep.args),
        "hardware": sweep.hardware,
        "date": started,
        "wall_seconds": round(time.perf_counter() - wall, 3),
    }
    path = save(run_dir, results, samples)
    return f"{run.name}: done in {results['sweep']['wall_seconds']:.1f} s; {headline(results)} -> {path}"


def run_grid(lm, sweep: Sweep, pending: list[Run], total: int, finished: list[str]) -> list[str]:
    """Every pending run under a progress bar, appending to ``finished``; returns the failed ones."""
    from tqdm.auto import tqdm

    failed = []
    with tqdm(total=total, initial=total - len(pending), desc="sweep", unit="run") as bar:
        for run in pending:
            bar.set_postfix_str(run.name)
            try:
                tqdm.write(execute(lm, sweep, run), file=sys.stderr)
                finished.append(run.name)
            except Exception as exc:  # one broken run must not stop the grid
                if sweep.args.verbose:
                    traceback.print_exc()
                reason = (str(exc).strip().splitlines() or [""])[0]
                hint = "" if sweep.args.verbose else " (--verbose shows the traceback)"
                tqdm.write(
                    f"sweep: {run.name} FAILED ({type(exc).__name__}: {reason}); continuing{hint}", file=sys.stderr
                )
                failed.append(run.name)
            bar.update()
    return failed


def validate(args: argparse.Namespace, metadata: dict[str, Any]) -> tuple[list[Run], list[str], Any, list[str]]:
    """(valid runs, valid tasks, TaskManager, problems), reporting every problem."""
    from lm_eval.tasks import TaskManager

    runs, problems = plan_grid(args.policies, args.budgets, args.evict)
    k, n = args.shard
    runs = runs[k - 1 :: n]
    task_manager = TaskManager(metadata=metadata)
    tasks, task_problems = resolve_tasks(args.tasks, task_manager)
    for problem in problems + task_problems:
        report(problem)
    return runs, tasks, task_manager, problems + task_problems


def split_done(sweep: Sweep, runs: list[Run]) -> tuple[list[Run], list[str]]:
    """(runs whose folder holds results of the same settings, one message per conflicting folder)."""
    done, conflicts = [], []
    for run in runs:
        run_dir = sweep.args.output / run.name
        if not results_files(run_dir):
            continue
        found = sweep_resume.mismatch(run_dir, expected_settings(sweep, run), sweep.args.log_samples)
        if found:
            conflicts.append(f"{run_dir} holds results of other settings: {'; '.join(found)}")
        else:
            done.append(run)
    return done, conflicts


def sweep_main(argv: list[str], finished: list[str]) -> int:
    """The sweep itself; names of runs with results are appended to ``finished``."""
    args = parse_args(argv)
    try:
        base_args, kwargs = split_model_args(args.model_args)
    except ValueError as exc:
        report(str(exc))
        return 2
    try:
        check_writable_folder(args.output, "--output")
        resolve(kwargs["pretrained"])  # an offline model that is not fetched: say how, before anything loads
    except ValueError as exc:
        report(str(exc))
        return 2
    runs, tasks, task_manager, problems = validate(args, dict(kwargs) | args.metadata)
    if not runs or not tasks:
        report("nothing valid to run: " + ("no valid (policy, budget)" if not runs else "no known task"))
        return 1
    command = shlex.join(["buzz-lm-eval", "sweep", *argv])
    sweep = Sweep(args, base_args, kwargs["pretrained"], tasks, task_manager, command, hardware())
    done, conflicts = split_done(sweep, runs)
    if conflicts:
        for conflict in conflicts:
            report(conflict)
        report("stopped before loading the model: use another --output, or remove those folders to rerun them")
        return 2
    for run in done:
        report(f"{run.name}: skipped, {results_files(args.output / run.name)[-1]} has the same settings")
        finished.append(run.name)
    pending = [run for run in runs if run not in done]
    failed = run_grid(load_model(kwargs), sweep, pending, len(runs), finished) if pending else []
    print(
        f"sweep: {len(runs) - len(failed)} of {len(runs)} runs have results under {args.output}/"
        f" ({len(pending) - len(failed)} new, {len(done)} already there, {len(failed)} failed)"
    )
    print(f"leaderboard: buzz-lm-eval leaderboard {shlex.quote(str(args.output))}")
    return 1 if problems or failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; 0 when every requested run has results, 1 when some were skipped or failed,
    2 for bad --model_args or conflicting results, 130 on Ctrl-C (with the command to resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    finished: list[str] = []
    try:
        return sweep_main(argv, finished)
    except KeyboardInterrupt:
        names = ", ".join(finished) or "none"
        print(
            f"\nsweep: interrupted; runs with results: {names}; resume with: "
            f"{shlex.join(['buzz-lm-eval', 'sweep', *argv])}",
            file=sys.stderr,
            flush=True,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
