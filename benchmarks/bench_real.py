"""The speed goals on a real model's shapes: SmolLM2-135M-Instruct (30 layers, 9 query and 3 KV heads
of dim 64), its fetched weights, or random weights of the same shapes when it has not been fetched.

Every goal is measured side by side in one run (cases interleaved chunk by chunk and step by step,
so a busy spell slows all of them alike) and printed as PASS or FAIL:

- decode: each policy holding L/4 tokens (budget L/4, its own regime, prefilled as ``buzz_hf``
  prefills by default) steps at <= 1.0x the full cache holding L at L = 4096 and <= 0.7x at 8192,
  and at <= 1.03x the full cache holding the same L/4 tokens (medians of per-step ratios);
- eviction: <= 5% of the decode step at 4k and 8k (the policy's own ``evict_seconds``);
- prefill: <= 1.10x the full cache's one forward (``buzz_hf cache=full``), at 1k, 4k and 8k, with
  the prompt in one forward and in ``buzz_hf``'s default chunks (best of ``--repeats``);
- batch 8: the decode goals at 4k (``--batch-length``) and the prefill goals at 1k, eight
  prompts per batch;
- generation: ``buzz_hf``'s ``generate_until`` on shipped CNN/DM articles and 10-document QA
  prompts (``--gen-tasks``) at batch 1 and 8 (``--gen-batches``): every policy's generated tokens
  per second >= the full cache's.

Runs that leave a part out (shorter lengths, fewer batches) print which goals they did not judge.
"""

from __future__ import annotations

import time

import torch
from bench_run import SHAPES, Spec, best_prefills, paired_ratio, run_cases
from bench_targets import verdict
from transformers import AutoConfig, AutoModelForCausalLM

from buzz_lm_eval.harness.model_args import plan_cache
from buzz_lm_eval.harness.offline_models import is_fetched, model_dir
from buzz_lm_eval.policies import POLICY_NAMES

MODEL = "smollm2-135m-instruct"
POLICIES = [name for name in POLICY_NAMES if name != "full"]
DECODE_GOALS = {4096: 1.0, 8192: 0.7}  # step x the full cache holding L, at most (shorter L: 4096's)
SAME_TOKENS = 1.03  # step x the full cache holding the policy's L/4 tokens, at most
EVICT_SHARE = 5.0  # % of a decode step, at most
PREFILL = 1.10  # x the full cache's one-forward prefill, at most
PREFILL_LENGTHS = (1024, 4096, 8192)
BATCH = 8


def load(args) -> tuple[object, str]:
    """The fetched SmolLM2 (real weights) or a random-weight Llama of its shapes; and its label."""
    if is_fetched(MODEL):
        model = AutoModelForCausalLM.from_pretrained(model_dir(MODEL), dtype=args.dtype)
        return model.to(args.device).eval(), "SmolLM2-135M-Instruct"
    config = AutoConfig.for_model(  # SmolLM2-135M-Instruct's config
        "llama", **SHAPES["smollm2"], vocab_size=49152, max_position_embeddings=8192, rope_theta=1e5
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return model.to(args.device).eval(), "SmolLM2-135M shapes, random weights (not fetched)"


def policy_spec(name: str, policy: str, length: int, batch: int = 1, one_forward: bool = False) -> Spec:
    """``policy`` at budget ``length // 4`` in its own regime, prefilled as ``buzz_hf`` does by default
    (``one_forward``: the whole prompt in one forward)."""
    _, budget, chunk, _, evict, _ = plan_cache(cache=policy, budget=length // 4)
    chunk = length if one_forward or chunk is None else chunk
    return Spec(name, policy, budget, length, evict, batch=batch, chunk=chunk)


def decode_section(model, name: str, length: int, batch: int, args) -> list[dict]:
    """Every policy at L/4 with both full references, side by side; ratios per decode round."""
    full = Spec(name, "full", None, length, batch=batch, chunk=length)
    quarter = Spec(name, "full", None, length // 4, batch=batch, chunk=length // 4)
    specs = [full, quarter] + [policy_spec(name, policy, length, batch) for policy in POLICIES]
    rows = run_cases(model, specs, args.steps, args)
    full_row, quarter_row = rows[0], rows[1]
    for row in rows[2:]:
        row["x_full_L"] = paired_ratio(row, full_row)
        row["x_full_quarter"] = paired_ratio(row, quarter_row)
    return rows


def decode_lines(rows: list[dict], length: int, batch: int) -> list[str]:
    goal, lines = DECODE_GOALS.get(length, DECODE_GOALS[4096]), []
    full_ms, quarter_ms = rows[0]["step_ms_median"], rows[1]["step_ms_median"]
    where = f"at {length}, batch {batch}"
    lines.append(f"- info: full cache step {where}: {full_ms:.1f} ms holding {length}, {quarter_ms:.1f} ms at L/4")
    for row in rows[2:]:
        label = f"{row['policy']} ({row['evict']}) holding {length // 4} {where}"
        ratio = row["x_full_L"]
        lines.append(f"- {verdict(ratio <= goal)} {label}: step x full holding {length} {ratio:.2f} (<= {goal})")
        lines.append(
            f"- {verdict(row['x_full_quarter'] <= SAME_TOKENS)} {label}: step x full holding {length // 4} "
            f"{row['x_full_quarter']:.3f} (<= {SAME_TOKENS})"
        )
        lines.append(
            f"- {verdict(row['evict_share_pct'] <= EVICT_SHARE)} {label}: eviction {row['evict_share_pct']:.1f}% "
            f"of the step ({row['evict_ms']:.2f} of {row['step_ms']:.1f} ms; {row['evictions']} of {row['steps']} "
            f"steps evicted; <= {EVICT_SHARE}%)"
        )
    return lines


def prefill_section(model, name: str, length: int, batch: int, args) -> list[dict]:
    """The full cache's one forward, then every policy in one forward and in buzz_hf's default chunks."""
    specs = [Spec(name, "full", None, length, batch=batch, chunk=length)]
    for policy in POLICIES:
        one, chunked = (
            policy_spec(name, policy, length, batch, one_forward=True),
            policy_spec(name, policy, length, batch),
        )
        specs += [one] + ([chunked] if chunked.chunk != one.chunk else [])
    rows = best_prefills(model, specs, args.repeats, args)
    for row, spec in zip(rows, specs, strict=True):
        row["chunk"], row["batch"] = spec.chunk, batch
    return rows


def prefill_lines(rows: list[dict]) -> list[str]:
    full = rows[0]
    lines = [f"- info: full cache prefill of {full['length']} x {full['batch']}: {full['prefill_s']:.2f} s (best)"]
    for row in rows[1:]:
        how = "one forward" if row["chunk"] == row["length"] else f"chunks of {row['chunk']}"
        lines.append(
            f"- {verdict(row['prefill_x_full'] <= PREFILL)} {row['policy']} ({row['evict']}) prefill of "
            f"{row['length']} x {row['batch']} in {how}: {row['prefill_x_full']:.2f}x the full cache's (<= {PREFILL}; "
            f"slowest run +{row['prefill_spread_pct']:.0f}%)"
        )
    return lines


def generation_rows(args, batch: int) -> list[dict]:
    """``buzz_hf.generate_until`` on the shipped CNN/DM and 10-document QA prompts (chat template), each
    policy at budget 256 (CNN/DM) and 512 (QA), ``batch`` prompts per batch; generated tokens per second."""
    from lm_eval.api.instance import Instance

    from buzz_lm_eval.harness import datasets
    from buzz_lm_eval.harness.hflm import BuzzHFLM
    from buzz_lm_eval.harness.paths import load_task_module

    lm = BuzzHFLM(pretrained=MODEL, device=args.device, batch_size=batch, dtype=str(args.dtype).split(".")[-1])
    litm = load_task_module("lost_in_the_middle/litm.py", "bench_litm")
    articles = [r["article"] for r in datasets.cnndm_validation()["validation"]][:batch]
    summarise = [f"Text: {a}\n\nSUMMARIZE the previous text to 50 words!" for a in articles]  # the task's prompt
    questions = [litm.doc_to_text(r) for r in datasets.nq10(4)["test"]][:batch]
    workloads = [w for w in [("cnndm", 256, summarise), ("qa10", 512, questions)] if w[0] in args.gen_tasks]
    rows = []
    for task, budget, texts in workloads:
        prompts = [lm.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        for policy in ["full", *POLICIES]:
            lm.configure_cache(cache=policy, budget=None if policy == "full" else budget)
            requests = [
                Instance("generate_until", doc={}, arguments=(p, {"max_gen_toks": args.gen_tokens, "until": []}), idx=i)
                for i, p in enumerate(prompts)
            ]
            start = time.perf_counter()
            outputs = lm.generate_until(requests, disable_tqdm=True)
            seconds = time.perf_counter() - start
            tokens = sum(len(lm.tok_encode(text)) for text in outputs)
            rows.append(
                {
                    "task": task,
                    "policy": policy,
                    "budget": budget,
                    "batch": batch,
                    "seconds": seconds,
                    "tokens": tokens,
                    "tokens_per_s": tokens / seconds,
                    "docs_per_min": 60 * len(prompts) / seconds,
                }
            )
    return rows


def generation_lines(rows: list[dict]) -> list[str]:
    full = {(r["task"], r["batch"]): r for r in rows if r["policy"] == "full"}
    return [generation_line(row, full[(row["task"], row["batch"])]) for row in rows]


def generation_line(row: dict, ref: dict) -> str:
    """One generation row: info for the full cache, a verdict against it for a policy."""
    label = f"{row['task']} batch {row['batch']} {row['policy']}"
    speed = f"{row['tokens_per_s']:.1f} generated tokens/s"
    if row is ref:
        return f"- info: {label}: {speed}, {row['docs_per_min']:.1f} docs/min"
    mark = verdict(row["tokens_per_s"] >= ref["tokens_per_s"])
    return f"- {mark} {label} (budget {row['budget']}): {speed} vs full {ref['tokens_per_s']:.1f} (>= full)"


def show(lines: list[str]) -> list[str]:
    print("\n".join(lines), flush=True)
    return lines


def not_judged(args) -> list[str]:
    """The goals this run's options left out, so a shorter run never reads as a complete one."""
    missing = [f"decode at {n}" for n in DECODE_GOALS if n not in args.decode_lengths]
    missing += [f"prefill at {n}" for n in PREFILL_LENGTHS if n not in args.prefill_lengths]
    if not args.batch_goals:
        missing.append(f"batch {BATCH}")
    elif args.batch_length != 4096:
        missing.append(f"batch {BATCH} decode at 4096 (ran at {args.batch_length})")
    if not args.generation:
        missing.append("generation")
    else:
        missing += [f"generation at batch {b}" for b in (1, BATCH) if b not in args.gen_batches]
        missing += [f"generation on {t}" for t in ("cnndm", "qa10") if t not in args.gen_tasks]
    return [f"- not judged in this run: {', '.join(missing)}"] if missing else []


def run(args, save=lambda out: None) -> dict:
    """Every section; returns the rows and the goal lines (``save`` gets them after each section,
    so a run stopped part-way keeps what it measured)."""
    model, name = load(args)
    print(f"- model: {name}, dtype {str(args.dtype).split('.')[-1]}, {args.steps} timed decode steps\n", flush=True)
    lines, out = [], {"model": name}
    for length in args.decode_lengths:
        rows = decode_section(model, name, length, 1, args)
        out[f"decode_{length}"], lines = rows, lines + show(decode_lines(rows, length, 1))
        save({**out, "lines": lines})
    for length in args.prefill_lengths:
        rows = prefill_section(model, name, length, 1, args)
        out[f"prefill_{length}"], lines = rows, lines + show(prefill_lines(rows))
        save({**out, "lines": lines})
    if args.batch_goals:
        rows = decode_section(model, name, args.batch_length, BATCH, args)
        out[f"decode_{args.batch_length}_batch{BATCH}"] = rows
        lines += show(decode_lines(rows, args.batch_length, BATCH))
        rows = prefill_section(model, name, 1024, BATCH, args)
        out[f"prefill_1024_batch{BATCH}"], lines = rows, lines + show(prefill_lines(rows))
        save({**out, "lines": lines})
    if args.generation and args.gen_batches and args.gen_tasks:
        del model
        rows = [row for batch in args.gen_batches for row in generation_rows(args, batch)]
        out["generation"], lines = rows, lines + show(generation_lines(rows))
    lines += not_judged(args)
    passed = sum("**PASS**" in line for line in lines)
    failed = sum("**FAIL**" in line for line in lines)
    out["lines"], out["summary"] = lines, f"{passed} PASS, {failed} FAIL"
    return out
