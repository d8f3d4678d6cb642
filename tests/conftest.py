"""Shared fixtures: the shipped real model and tiny random models of several architectures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from buzz_lm_eval.paths import DEFAULT_MODEL_DIR

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=24),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised decoder of ``arch`` (GQA, 2 layers), float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def stories():
    """The shipped stories260K model (real weights, TinyStories English) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_configure(config):
    """Tiny models run fastest on one thread; never reach the hub from tests."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (lm_eval subprocesses, whole task groups) run only with ``--slow``."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_lm_eval(tmp_path: Path, model: str, model_args: str, task: str, limit: int = 1, extra=(),
                pretrained: str | None = str(DEFAULT_MODEL_DIR)) -> tuple[Path, str]:
    """Run the installed ``lm_eval`` console script offline; (its results JSON path, its stderr)."""
    script = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / model / model_args.replace(",", "_").replace("=", "-").replace("/", "")[-40:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ",".join(filter(None, [pretrained and f"pretrained={pretrained}", model_args]))
    cmd = [str(script), "--model", model, "--model_args", args, "--tasks", task,
           "--limit", str(limit), "--device", "cpu", "--output_path", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = out.rglob("results_*.json")
    return path, done.stderr


def lm_eval_cli(tmp_path: Path, model: str, model_args: str, task: str, limit: int = 1) -> dict:
    """Run the installed ``lm_eval`` console script offline and return its results JSON."""
    path, _ = run_lm_eval(tmp_path, model, model_args, task, limit)
    return json.loads(path.read_text())
