"""RULER through this package: ruler_vt / ruler_cwe stop with a clear error instead of hanging."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
from lm_eval.tasks import TaskManager

from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR

from ..conftest import load_task_module

pytest.importorskip("wonderwords", reason="the `ruler` extra is not installed")

guard = load_task_module("ruler/ruler_guard.py", "buzz_test_ruler_guard")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A tokenizer with one token per word or punctuation mark (an efficient, Llama-like count)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_ruler_vt_and_cwe_resolve_to_the_checked_tasks_and_refuse_the_shipped_tokenizer():
    manager = TaskManager(metadata={"pretrained": str(DEFAULT_MODEL_DIR), "max_seq_lengths": [1024]})
    with pytest.raises(ValueError, match=r"ruler_vt cannot be generated with tokenizer .*stories260K.* at any length"):
        manager.load(["ruler_vt"])
    with pytest.raises(ValueError, match=r"ruler_cwe cannot be generated at max_seq_lengths \[1024\]"):
        manager.load(["ruler_cwe"])
    assert {"niah_single_1", "ruler_vt", "ruler_cwe", "ruler_fwe"} <= set(manager.all_tasks)
    assert "buzz_ruler_offline" in manager.all_groups


def test_short_lengths_are_refused_with_the_minimum_and_random_state_is_kept(word_tokenizer):
    before = random.getstate(), np.random.get_state()[1].copy()
    with pytest.raises(
        ValueError, match=r"ruler_vt cannot be generated at max_seq_lengths \[512\].*use lengths >= \d+"
    ):
        guard.vt_dataset(pretrained=word_tokenizer, max_seq_lengths=[512, 4096])
    with pytest.raises(ValueError, match=r"ruler_cwe cannot be generated at max_seq_lengths \[256\]"):
        guard.cwe_dataset(pretrained=word_tokenizer, max_seq_lengths=[256])
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()


def test_a_feasible_length_builds_lm_evals_own_data(word_tokenizer):
    from lm_eval.tasks.ruler import vt_utils

    tokenizer = guard.get_tokenizer(word_tokenizer)
    example, minimum = guard.vt_minimum(tokenizer)
    assert example <= guard.VT_EXAMPLE_LENGTH < minimum < 1024
    random.seed(0)
    np.random.seed(0)
    ours = guard.vt_dataset(pretrained=word_tokenizer, max_seq_lengths=[minimum + 16])["test"]
    random.seed(0)
    np.random.seed(0)
    theirs = vt_utils.get_vt_dataset(pretrained=word_tokenizer, max_seq_lengths=[minimum + 16])["test"]
    assert len(ours) == 500 and ours[:3] == theirs[:3] and ours["outputs"] == theirs["outputs"]
    assert max(ours["length"]) <= minimum + 16


def test_ruler_cwe_gives_every_build_in_a_process_the_samples_of_a_fresh_process(word_tokenizer):
    """lm-eval's cwe generator draws from a module-level RNG: a sweep builds the task once per run, so
    without the reset its second run scored other documents than its first."""
    from lm_eval.tasks.ruler import cwe_utils

    def build() -> list[str]:
        random.seed(0)
        return guard.cwe_dataset(pretrained=word_tokenizer, max_seq_lengths=[1024])["test"]["input"][:5]

    first = build()
    cwe_utils.RNG.random()  # whatever else drew from it in between
    assert build() == first
    spec = importlib.util.spec_from_file_location("buzz_test_fresh_cwe_utils", cwe_utils.__file__)
    imported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(imported)  # lm-eval's module as a fresh process imports it
    assert guard.cwe_rng_at_import() == imported.RNG.getstate()
    cwe_utils.RNG.setstate(imported.RNG.getstate())
    random.seed(0)
    theirs = cwe_utils.get_cw_dataset(pretrained=word_tokenizer, max_seq_lengths=[1024])["test"]["input"][:5]
    assert theirs == first
