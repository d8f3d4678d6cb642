"""Shared fixtures: the shipped real model and tiny random models of several architectures."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from buzz_lm_eval.paths import DEFAULT_MODEL_DIR

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=24),
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


def pytest_configure(config):
    """Tiny models run fastest on one thread; never reach the hub from tests."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
