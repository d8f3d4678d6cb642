"""Feasibility checks in front of two of lm-eval 0.4.13's RULER generators.

``ruler_vt`` and ``ruler_cwe`` grow a sample until it fills the length; when even their smallest
sample does not fit (a tokenizer that spends many tokens per word, or a short length), they fall
back to zero noise lines / words: ``ruler_vt`` then retries forever, ``ruler_cwe`` builds samples
with no answer (the run fails after every model call) or retries forever. These functions measure
the smallest sample first, with lm-eval's own generator and the model's tokenizer, and raise a
ValueError naming the lengths and the minimum; otherwise they hand over to lm-eval unchanged
(the random states are restored, so the data is exactly what lm-eval alone would build). ``ruler_cwe``
starts from its generator's state at import on every build, so every run of a process gets the
samples a fresh process gets.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import numpy as np
from lm_eval.tasks.ruler import cwe_utils, vt_utils
from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name

TRIALS = 8  # draws per measurement; the largest counts (names and words are random)
VT_EXAMPLE_LENGTH, VT_ANSWER_TOKENS = 500, 30  # vt_utils.get_dataset: in-context example size, answer room
VT_NOISES, VT_EXAMPLE_NOISES = 10, 5  # vt_utils' smallest step of noise lines (main sample, example)
CWE_WORDS, CWE_ANSWER_TOKENS = 10, 120  # cwe_utils: smallest word list, answer room


@contextmanager
def random_states_kept():
    """Draw freely inside; afterwards the generators' random states are as before."""
    states = random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cwe_utils.RNG.setstate(states[2])


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def vt_minimum(tokenizer) -> tuple[int, int]:
    """(tokens of ruler_vt's smallest in-context example with its answer room, smallest length)."""
    with random_states_kept():
        example = max(
            _tokens(tokenizer, f"{text} {answer}")
            for text, answer in (
                vt_utils.generate_input_output(VT_EXAMPLE_NOISES, 1, 4, is_icl=True) for _ in range(TRIALS)
            )
        )
        sample = max(
            _tokens(tokenizer, f"{text} {answer}")
            for text, answer in (vt_utils.generate_input_output(VT_NOISES, 1, 4, is_icl=False) for _ in range(TRIALS))
        )
    return example + VT_ANSWER_TOKENS, sample + VT_ANSWER_TOKENS + VT_EXAMPLE_LENGTH


def cwe_minimum(tokenizer, length: int) -> int:
    """Smallest length at which ruler_cwe's 10-word list fits (its format depends on ``length``)."""
    with random_states_kept():
        sizes = []
        for _ in range(TRIALS):
            example, text, answer = cwe_utils.generate_input_output(CWE_WORDS, length)
            listed = " ".join(f"{i + 1}. {word}" for i, word in enumerate(answer))
            sizes.append(_tokens(tokenizer, f"{example}\n{text} {listed}"))
    return max(sizes) + CWE_ANSWER_TOKENS


def _setup(kwargs: dict[str, Any]) -> tuple[Any, str, list[int]]:
    name = resolve_tokenizer_name(kwargs)
    return get_tokenizer(name), name, list(kwargs.get("max_seq_lengths", DEFAULT_SEQ_LENGTHS))


def vt_dataset(**kwargs: Any):
    """lm-eval's ruler_vt data, or a ValueError when its generator could not finish."""
    tokenizer, name, lengths = _setup(kwargs)
    example, minimum = vt_minimum(tokenizer)
    if example > VT_EXAMPLE_LENGTH:
        raise ValueError(
            f"ruler_vt cannot be generated with tokenizer {name!r} at any length: lm-eval sizes its "
            f"in-context example to {VT_EXAMPLE_LENGTH} tokens, and the smallest one takes {example} with "
            "this tokenizer, so lm-eval's generator would retry forever; leave ruler_vt out for this model"
        )
    too_short = [length for length in lengths if length < minimum]
    if too_short:
        raise ValueError(
            f"ruler_vt cannot be generated at max_seq_lengths {too_short} with tokenizer {name!r}: its "
            f"smallest sample needs about {minimum} tokens (lm-eval's generator would retry forever); "
            f"use lengths >= {minimum}"
        )
    return vt_utils.get_vt_dataset(**kwargs)


def cwe_dataset(**kwargs: Any):
    """lm-eval's ruler_cwe data, or a ValueError when its samples would have no answer words."""
    tokenizer, name, lengths = _setup(kwargs)
    minima = {length: cwe_minimum(tokenizer, length) for length in lengths}
    too_short = {length: minimum for length, minimum in minima.items() if length < minimum}
    if too_short:
        raise ValueError(
            f"ruler_cwe cannot be generated at max_seq_lengths {sorted(too_short)} with tokenizer {name!r}: "
            f"its smallest word list needs {', '.join(f'{m} tokens at {n}' for n, m in too_short.items())} "
            "(lm-eval would build samples with no answer words, or retry forever); use longer lengths"
        )
    cwe_utils.RNG.setstate(cwe_rng_at_import())  # the same samples in every run of a process
    return cwe_utils.get_cw_dataset(**kwargs)


def cwe_rng_at_import() -> tuple:
    """The state lm-eval's ``cwe_utils.RNG`` has right after its module is imported: seeded 42, then
    one shuffle of the word list (its draws depend only on the list's length).

    The generator draws from that module-level RNG, so without this every later build in one process
    (each run of a sweep builds the task again) gets other samples than the first: runs of one
    sweep, and runs of different sweeps, would be scored on different documents."""
    fresh = random.Random(42)
    fresh.shuffle(list(range(len(cwe_utils.WORDS))))
    return fresh.getstate()
