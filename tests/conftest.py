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

from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR, load_task_module  # noqa: F401  (tests import it from here)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=24),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16),
}


# what every summary of cache statistics holds: ``EvictingCache.stats()`` and buzz_hf's per run
CACHE_STATS = (
    "kept_tokens_peak",
    "kept_tokens_mean",
    "kv_bytes_peak",
    "kv_bytes_mean",
    "compression_ratio",
    "evict_seconds",
)
DEVICE = torch.device("cpu")  # set from ``--device`` in pytest_configure


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` moved to the device the tests run on."""
    return tensor.to(DEVICE)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised decoder of ``arch`` (GQA, 2 layers) on the test device, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=dtype).to(DEVICE)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def stories():
    """The shipped stories260K model (real weights, TinyStories English) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).to(DEVICE).eval()
    return model, tokenizer


def eager_logits_and_probs(model, ids):
    """The model's own eager attention on ``ids``: logits and per-layer probabilities."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return out.logits, out.attentions


@pytest.fixture
def attention_calls(monkeypatch):
    """The query counts of every one-pass attention-with-scores call made while the test runs."""
    from buzz_lm_eval.cache import attention

    calls, real = [], attention.attention_with_scores
    monkeypatch.setattr(
        attention, "attention_with_scores", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k)
    )
    return calls


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device for the model tests (cache, policies on models, buzz_hf, CLI); cuda skips all without CUDA",
    )
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_configure(config):
    """The test device; tiny models run fastest on one thread (and pytest -n N runs N workers), in
    the lm_eval subprocesses too; never reach the hub from tests."""
    global DEVICE
    DEVICE = torch.device(config.getoption("--device"))
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """``--device cuda`` on a machine without CUDA skips every test, saying so (never a CPU run in disguise)."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="--device cuda was asked for, but torch sees no CUDA device here")
        for item in items:
            item.add_marker(skip)
    skip_slow(config, items)


def skip_slow(config, items):
    """Tests marked ``slow`` (lm_eval subprocesses, whole task groups) run only with ``--slow``."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_lm_eval(
    tmp_path: Path,
    model: str,
    model_args: str,
    task: str,
    limit: int = 1,
    extra=(),
    pretrained: str | None = str(DEFAULT_MODEL_DIR),
) -> tuple[Path, str]:
    """Run the installed ``lm_eval`` console script offline; (its results JSON path, its stderr)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / model / model_args.replace(",", "_").replace("=", "-").replace("/", "")[-40:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ",".join(filter(None, [pretrained and f"pretrained={pretrained}", model_args]))
    cmd = [
        str(script),
        "--model",
        model,
        "--model_args",
        args,
        "--tasks",
        task,
        "--limit",
        str(limit),
        "--device",
        DEVICE.type,
        "--output_path",
        str(out),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = out.rglob("results_*.json")
    return path, done.stderr


def lm_eval_cli(tmp_path: Path, model: str, model_args: str, task: str, limit: int = 1) -> dict:
    """Run the installed ``lm_eval`` console script offline and return its results JSON."""
    path, _ = run_lm_eval(tmp_path, model, model_args, task, limit)
    return json.loads(path.read_text())
