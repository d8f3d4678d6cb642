"""``buzz-lm-eval demo``: watch a BUZZ cache evict during a real ``generate()``, offline.

Runs the shipped stories260K model (a real Llama trained on TinyStories, 292,800 parameters as
shipped, see ``assets/SOURCES.md``: it writes simple children's-story English) on one prompt, with
the full cache and with each policy at the same budget, and prints the continuation and the cache
statistics.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cache import build_cache
from .cache.compat import cache_kwargs
from .harness.offline_models import resolve
from .harness.paths import DEFAULT_MODEL_DIR

PROMPT = "Once upon a time, there was a little girl named Lily. She had a red ball and a small dog."


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="buzz-lm-eval demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pretrained",
        default=str(DEFAULT_MODEL_DIR),
        help="model directory, hub id, or an offline model name (`buzz-lm-eval models`)",
    )
    parser.add_argument("--policies", default="full,streaming,h2o,buzz", help="comma-separated cache policies")
    parser.add_argument("--budget", type=int, default=48, help="KV-token budget for every evicting policy")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.pretrained = resolve(args.pretrained)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrained)
    model = AutoModelForCausalLM.from_pretrained(args.pretrained, dtype=torch.float32).to(args.device).eval()
    inputs = tokenizer([args.prompt], return_tensors="pt").to(args.device)
    print(f"model: {args.pretrained} on {args.device}; prompt: {args.prompt!r}\n")
    rows = []
    for name in args.policies.split(","):
        cache = build_cache(model, name, **({} if name == "full" else {"budget": args.budget}))
        out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=args.new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"--- {cache.policy!r}\n{text.strip()}\n")
        rows.append((name, cache.stats()))
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, dict]]) -> None:
    header = ("policy", "tokens seen", "kept peak", "kept mean", "KV bytes peak", "compression", "evict s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, s in rows:
        cells = (
            name,
            s["tokens_seen"],
            s["kept_tokens_peak"],
            f"{s['kept_tokens_mean']:.1f}",
            s["kv_bytes_peak"],
            f"{s['compression_ratio']:.2f}x",
            f"{s['evict_seconds']:.3f}",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
