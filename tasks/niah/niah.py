"""buzz_niah: a needle sentence with a number, hidden at depths 0-100% of real text of given token lengths.

The grid comes from the task metadata (``--metadata`` JSON on the command line, or the YAML's
defaults): ``max_seq_lengths`` (prompt lengths in tokens of the model's tokenizer, as RULER uses),
``niah_depths`` (percent of the haystack before the needle), ``niah_samples`` (documents per
cell) and ``niah_seed``. The haystack is the shipped WikiText-2 test text (detokenised as lm-eval's
``wikitext`` task does, headings dropped), or ``niah_haystack_file`` (a UTF-8 text file), or
``niah_haystack_dataset`` (a hub dataset; ``niah_haystack_split``, ``niah_haystack_field``).

Every document records its ``length`` and ``depth``; ``process_results`` scores containment of
the needle's number in the answer, as ``score`` and as the cell metric ``score_L<length>_D<depth>``,
so lm-eval's results hold one mean per (length, depth) cell and the leaderboard can draw the heatmap.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from typing import Any

import datasets
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

from buzz_lm_eval.harness.datasets import wikitext2_test
from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
INTRO = "A magic number is hidden in the following text. Remember it.\n\n"
ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "dusty",
    "eager",
    "fuzzy",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "lucky",
    "misty",
    "noble",
    "quiet",
    "rusty",
    "silver",
    "tidy",
    "velvet",
    "windy",
    "young",
)
NOUNS = (
    "harbor",
    "lantern",
    "meadow",
    "falcon",
    "violin",
    "glacier",
    "orchard",
    "compass",
    "canyon",
    "beacon",
    "teapot",
    "island",
    "ribbon",
    "castle",
    "pebble",
    "comet",
    "garden",
    "kettle",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cell_metric(length: int, depth: int) -> str:
    """The metric name of one grid cell, e.g. ``score_L1024_D50``."""
    return f"score_L{length}_D{depth}"


def _int_list(metadata: dict[str, Any], key: str, default, low: int, high: int | None) -> list[int]:
    values = metadata.get(key, default)
    values = [values] if isinstance(values, int) else values
    valid = f"integers in [{low}, {high}]" if high is not None else f"integers >= {low}"
    if (
        not isinstance(values, (list, tuple))
        or not values
        or any(
            isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high) for v in values
        )
    ):
        raise ValueError(f"buzz_niah: {key}={values!r} is not a non-empty list of {valid}")
    return sorted(set(values))


def grid(metadata: dict[str, Any]) -> tuple[list[int], list[int], int, int]:
    """(lengths, depths, samples per cell, seed) from the task metadata; ValueError when invalid."""
    lengths = _int_list(metadata, "max_seq_lengths", DEFAULT_LENGTHS, 1, None)
    depths = _int_list(metadata, "niah_depths", DEFAULT_DEPTHS, 0, 100)
    samples, seed = metadata.get("niah_samples", 1), metadata.get("niah_seed", 0)
    for key, value, low in (("niah_samples", samples, 1), ("niah_seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"buzz_niah: {key}={value!r} must be an integer >= {low}")
    return lengths, depths, samples, seed


def load_haystack(metadata: dict[str, Any]) -> str:
    """The haystack text: a user's file, a hub dataset's text field, or the shipped WikiText-2 test."""
    path, hub = metadata.get("niah_haystack_file"), metadata.get("niah_haystack_dataset")
    if path and hub:
        raise ValueError("buzz_niah: give niah_haystack_file or niah_haystack_dataset, not both")
    if path:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    if hub:
        field = metadata.get("niah_haystack_field", "text")
        rows = datasets.load_dataset(hub, split=metadata.get("niah_haystack_split", "train"))
        if field not in rows.column_names:
            raise ValueError(f"buzz_niah: dataset {hub!r} has no field {field!r}; fields: {rows.column_names}")
        return "\n".join(text for text in rows[field] if isinstance(text, str))
    pages = wikitext2_test()["test"]
    return "\n".join(wikitext_detokenizer(page) for page in pages)


def sentences(text: str) -> list[str]:
    """Sentences of ``text``, headings (lines starting with '=') and blank lines dropped."""
    lines = (line.strip() for line in text.splitlines())
    prose = " ".join(line for line in lines if line and not line.startswith("="))
    return [part for part in _SENTENCE_END.split(prose) if part]


@functools.cache
def tokenizer_for(name: str, trust_remote_code: bool = False):
    """The tokenizer that measures lengths (cached per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


class Haystack:
    """Sentences of real text; builds prompts of a given token length around a needle."""

    def __init__(self, text: str, tokenizer):
        self.sentences = sentences(text)
        if not self.sentences:
            raise ValueError("buzz_niah: the haystack text has no sentences")
        self.tokenizer = tokenizer
        self._counts: dict[int, int] = {}

    def measure(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def count(self, index: int) -> int:
        """Tokens of sentence ``index`` (computed once, only for the sentences a prompt needs)."""
        if index not in self._counts:
            self._counts[index] = len(self.tokenizer(self.sentences[index], add_special_tokens=False)["input_ids"])
        return self._counts[index]

    def document(self, length: int, depth: int, sample: int, seed: int) -> dict[str, Any]:
        """One document of at most ``length`` prompt tokens, the needle after ``depth`` % of the text.

        Whole sentences from a seeded start (the same for every cell of a sample), then the words of
        the next sentence that still fit, so the prompt fills ``length`` up to a word.
        """
        n = len(self.sentences)
        start = random.Random(f"{seed}-haystack-{sample}").randrange(n)
        rng = random.Random(f"{seed}-needle-{length}-{depth}-{sample}")
        key, value = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", str(rng.randint(1_000_000, 9_999_999))
        needle = f"The magic number for {key} is {value}."
        question = f"What is the magic number for {key}?"
        prefix = f"Answer: The magic number for {key} is"

        def compose(k: int, words: int = 0) -> str:
            kept = [self.sentences[(start + i) % n] for i in range(k)]
            if words:
                kept.append(" ".join(self.sentences[(start + k) % n].split()[:words]))
            kept.insert(round(depth / 100 * len(kept)), needle)
            return f"{INTRO}{' '.join(kept)}\n\n{question}"

        def fits(k: int, words: int = 0) -> bool:
            return self.measure(f"{compose(k, words)} {prefix}") <= length

        fixed = self.measure(f"{compose(0)} {prefix}")
        k, used = 0, fixed
        while used + self.count((start + k) % n) <= length:
            used, k = used + self.count((start + k) % n), k + 1
            if k == n:
                raise ValueError(
                    f"buzz_niah: the haystack is shorter than the length {length} tokens; "
                    "use a longer niah_haystack_file or smaller max_seq_lengths"
                )
        while k > 0 and not fits(k):
            k -= 1
        low, high = 0, len(self.sentences[(start + k) % n].split())  # words of the next sentence that fit
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(k, middle) else (low, middle - 1)
        if k == 0 and low == 0:
            raise ValueError(
                f"buzz_niah: length {length} leaves no room for haystack text: the needle, "
                f"question and answer prefix alone take {fixed} tokens"
            )
        text = compose(k, low)
        return {
            "input": text,
            "gen_prefix": prefix,
            "answer": value,
            "length": length,
            "depth": depth,
            "sample": sample,
            "tokens": self.measure(f"{text} {prefix}"),
        }


def dataset(**metadata: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset``: every (length, depth, sample) document of the grid, as split ``test``."""
    lengths, depths, samples, seed = grid(metadata)
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        name = str(DEFAULT_MODEL_DIR)  # buzz_hf's default model
        logger.warning(
            "buzz_niah: no tokenizer or pretrained in the task metadata; lengths are measured "
            "with the shipped stories260K tokenizer (pass --metadata '{\"tokenizer\": ...}')"
        )
    haystack = Haystack(load_haystack(metadata), tokenizer_for(name, bool(metadata.get("trust_remote_code"))))
    docs = [
        haystack.document(length, depth, sample, seed)
        for length in lengths
        for depth in depths
        for sample in range(samples)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the needle's number appears in the answer, as ``score`` and as the document's cell metric."""
    score = float(doc["answer"] in results[0])
    return {"score": score, cell_metric(doc["length"], doc["depth"]): score}


class NiahTask(ConfigurableTask):
    """The YAML task plus one mean, higher-is-better metric per grid cell (the grid is only known at run time)."""

    def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config: dict | None = None) -> None:
        config = {key: value for key, value in (config or {}).items() if key != "class"}  # lm-eval passes it on
        super().__init__(data_dir, cache_dir, download_mode, config=config)
        lengths, depths, _, _ = grid(self.config.metadata or {})
        for length in lengths:
            for depth in depths:
                self._aggregation_list[cell_metric(length, depth)] = mean
                self._higher_is_better[cell_metric(length, depth)] = True
