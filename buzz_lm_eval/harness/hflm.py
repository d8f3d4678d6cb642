"""``buzz_hf``: lm-eval's ``HFLM`` with every request type run under a KV-cache policy.

    lm_eval --model buzz_hf --model_args pretrained=M,cache=buzz,budget=256 --tasks buzz_cnndm

- ``generate_until``: ``model.generate`` with a fresh evicting cache per batch (left-padded
  rows are evicted as if alone); prompts are prefilled ``prefill_chunk`` tokens at a time
  (default with a ``budget``: ``default_chunk``), and then prompts longer than the model's
  context are streamed instead of left-truncated.
- ``loglikelihood`` / ``loglikelihood_rolling``: the tokens are streamed through the cache
  ``score_chunk`` at a time (1 = token by token), with no truncation; a rolling document is
  scored as one stream, so perplexity measures the policy. An explicit ``max_length`` brings
  back lm-eval's own truncation and rolling windows at that length.
- ``evict=after_prefill`` (the default of snapkv, pyramidkv, knorm, random): generation
  compresses once after the (left-padded) prompt; a log-likelihood request compresses after
  its context and scores its continuation on the compressed cache (requests are run in groups
  of equal context length).
- ``cache=full`` keeps HFLM's own code paths untouched (identical to ``--model hf``) and runs
  on any model ``hf`` runs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import sys
import time

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..cache import build_cache
from ..cache.compat import cache_kwargs
from .batching import in_groups, temporarily
from .model_args import SIZE_KEYS, check_args, check_stats_file, plan_cache, pop_sizes
from .offline_models import resolve, source_of
from .paths import DEFAULT_MODEL_DIR
from .prefill import prefill_head
from .row_texts import RowTexts, sha1
from .run_stats import RunStats, full_cache_stats

# a child of lm-eval's logger, so the harness's own logging set-up shows our lines
log = logging.getLogger("lm_eval.buzz_hf")

UNBOUNDED = sys.maxsize // 4


def check_parsed_model_args(model_args: dict) -> None:
    """``check_args`` on model_args as lm-eval parsed them (a dict of ``BuzzHFLM`` keyword arguments)."""
    args = inspect.signature(BuzzHFLM.__init__).bind(None, **model_args).arguments
    kwargs = dict(args.pop("kwargs", {}))
    for key in ("self", "stats_file", "device"):
        args.pop(key, None)
    args.update(pop_sizes(kwargs))
    check_args(resolve(args.pop("pretrained", None) or str(DEFAULT_MODEL_DIR)), args, kwargs)


# lm-eval's CLI passes these from its own flags as well as from --model_args
CLI_FLAGS = {"batch_size": "--batch_size", "max_batch_size": "--max_batch_size", "device": "--device"}


@register_model("buzz_hf")
class BuzzHFLM(HFLM):
    """HFLM whose forwards and generations run under a KV-cache eviction policy."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's constructor from a ``--model_args`` string (see ``create_from_arg_obj``)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor from parsed ``--model_args``; a key that the command line also sets
        from its own flag (``batch_size``, ``device``) is a clear error, not a TypeError."""
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        both = sorted(set(arg_dict) & set(extra))
        if both:
            flags = ", ".join(f"{key} (use {CLI_FLAGS.get(key, '--' + key)} {arg_dict[key]})" for key in both)
            raise ValueError(
                f"buzz_hf: {flags}: lm-eval's command line sets these itself, so they cannot also "
                "be given in --model_args"
            )
        return cls(**arg_dict, **extra)

    def __init__(
        self,
        pretrained=None,
        cache: str = "buzz",
        budget: int | None = None,
        evict: str | None = None,
        positions: str | None = None,
        prefill_chunk: int | None = None,
        score_chunk: int | None = None,
        stats_file: str | None = None,
        device: str | None = None,
        **kwargs,
    ):
        # the policy's own keys (sink, window, ...; ``policies.POLICY_PARAMS``) arrive in kwargs
        cache_args = dict(
            cache=cache,
            budget=budget,
            prefill_chunk=prefill_chunk,
            score_chunk=score_chunk,
            evict=evict,
            positions=positions,
            **pop_sizes(kwargs),
        )
        pretrained = str(DEFAULT_MODEL_DIR) if pretrained is None else resolve(pretrained)
        check_stats_file(stats_file)
        check_args(pretrained, cache_args, kwargs)
        self.configure_cache(**cache_args)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.stats_file, self._streaming, self._probing = stats_file, False, False
        self._row_texts = RowTexts()  # the texts behind scored rows, for stats lines
        self._prompt_length, self._stats_key = None, None
        self._pretrained_dir = pretrained
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        if self.evicting and self._max_length:
            log.info(
                "buzz_hf: max_length=%d given: prompts are left-truncated and rolling documents cut into "
                "windows of that length, as lm-eval does; leave it out to stream whole documents through "
                "the cache (the paper's WikiText setup)",
                self._max_length,
            )

    def configure_cache(
        self, cache="buzz", budget=None, prefill_chunk=None, score_chunk=None, evict=None, positions=None, **sizes
    ) -> None:
        """Choose the policy for the next requests and restart the run statistics.

        Used by ``__init__`` and by sweeps that keep one loaded model for many policies.
        """
        if getattr(self, "_response_cache_tag", None) is not None:
            raise ValueError(
                "buzz_hf: lm-eval's response cache (--use_cache) of this model holds the answers of "
                f"{self.describe_run()}; build another model for another cache setting"
            )
        plan = plan_cache(cache, budget, prefill_chunk, score_chunk, evict, positions, **sizes)
        self.policy, self.budget, self.prefill_chunk, self.score_chunk, self.evict, self.positions = plan
        self.run_stats = RunStats()
        self.task_stats: dict[tuple[str | None, str], RunStats] = {}
        limit = self.policy.max_chunk() if budget is None else None  # a budget holds for any chunk
        if limit is not None and max(self.prefill_chunk or 0, self.score_chunk) > limit:
            log.warning(
                "buzz_hf: chunks of %s tokens exceed %d, the most one %s eviction absorbs at threshold=%d: "
                "after such a chunk the cache can hold more than sink + window + threshold + 1 = %d tokens "
                "until later steps thin it",
                max(self.prefill_chunk or 0, self.score_chunk),
                limit,
                self.policy.name,
                self.policy.threshold,
                self.policy.sink + self.policy.window + self.policy.threshold + 1,
            )
        log.info("buzz_hf: %s", self.describe_run())

    # -- settings ---------------------------------------------------------------------------
    @property
    def evicting(self) -> bool:
        return self.policy.evicts

    def describe_run(self) -> str:
        sizes = " ".join(f"{k}={v}" for k, v in self.policy.sizes().items())
        budget = f" (budget={self.budget})" if self.budget is not None else ""
        if not self.evicting:
            return "cache=full: HFLM's own generate/forward paths, no eviction"
        prefill = self.prefill_chunk or "whole prompt"
        return (
            f"cache={self.policy.name} {sizes}{budget}; evict={self.evict}; positions={self.positions}; "
            f"prefill_chunk={prefill}; score_chunk={self.score_chunk}"
        )

    def cache_settings(self) -> dict:
        settings = {key: None for key in ("budget", *SIZE_KEYS)}
        settings.update(self.policy.sizes())
        settings.update(
            policy=self.policy.name,
            budget=self.budget,
            prefill_chunk=self.prefill_chunk,
            score_chunk=self.score_chunk if self.evicting else None,
            evict=self.evict if self.evicting else None,
            positions=self.positions,
        )
        return settings

    @classmethod
    def settings_for(cls, **cache_kwargs) -> dict:
        """The ``cache_settings()`` that ``configure_cache(**cache_kwargs)`` gives, without a model
        (sweeps compare them with stored results before loading anything)."""
        probe, quiet = cls.__new__(cls), log.disabled
        log.disabled = True
        try:
            probe.configure_cache(**cache_kwargs)
        finally:
            log.disabled = quiet
        return probe.cache_settings()

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["model_name_or_path"] = getattr(self.model.config, "name_or_path", None) or None
        source = source_of(getattr(self, "_pretrained_dir", None))
        if source is not None:
            info["model_source"] = source
        per_task: dict[str, dict] = {}
        for (task, kind), stats in self.task_stats.items():
            per_task.setdefault(task or "(no task)", {})[kind] = stats.summary()
        info["buzz_cache"] = {**self.cache_settings(), **self.run_stats.summary(), "per_task": per_task}
        return info

    def response_cache_tag(self) -> str:
        """Names lm-eval's ``--use_cache`` file after the cache setting, so no setting answers for another."""
        settings = json.dumps(self.cache_settings(), sort_keys=True)
        return f"buzz_hf-{self.policy.name}-{sha1(settings)[:10]}"

    def set_cache_hook(self, cache_hook) -> None:
        """Accept lm-eval's response cache only when its file is this cache setting's own."""
        database = getattr(cache_hook, "dbdict", None)
        if database is not None:
            tag = self.response_cache_tag()
            if tag not in str(getattr(database, "filename", "")):
                raise ValueError(
                    f"buzz_hf: lm-eval's response cache {getattr(database, 'filename', '')!r} is keyed by the "
                    f"requests only, not by the cache setting ({self.describe_run()}), so it could hand this run "
                    "the answers of another; run without --use_cache (the buzz-lm-eval startup hook, which names "
                    f"the file after the setting, e.g. '...{tag}.db', is not active in this interpreter)"
                )
            self._response_cache_tag = tag
            log.info("buzz_hf: --use_cache responses of this cache setting: %s", database.filename)
        super().set_cache_hook(cache_hook)

    @property
    def max_length(self) -> int:
        """Unbounded while streaming, unless ``max_length`` was given explicitly in model_args."""
        return UNBOUNDED if self._streaming and not self._max_length else super().max_length

    def streaming(self, enabled: bool):
        """While enabled, lm-eval neither truncates nor windows: the cache bounds the memory."""
        return temporarily(self, "_streaming", enabled)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """lm-eval's ``batch_size=auto`` probe; its forwards never count in the statistics.

        Without requests lm-eval probes at ``max_length``: while streaming, that is the
        model's own context length rather than the unbounded stream.
        """
        with temporarily(self, "_probing", True), self.streaming(self._streaming and requests is not None):
            return super()._detect_batch_size(requests, pos)

    # -- request types ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        with self.streaming(self.evicting and self.prefill_chunk is not None):
            return self.per_task("generate_until", requests, super().generate_until, disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._row_texts = RowTexts()
        with self.streaming(self.evicting):
            return self.per_task("loglikelihood", requests, super().loglikelihood, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.evicting and self.evict == "after_prefill":
            log.warning(
                "buzz_hf: loglikelihood_rolling has no prompt to compress: under evict=after_prefill its "
                "documents are scored on an uncompressed cache (use evict=every_forward to measure %s)",
                self.policy.name,
            )
        self._row_texts = RowTexts()
        if self.stats_file:
            texts = [request.args[0] for request in requests]
            self._row_texts.add_documents([self.tok_encode(text) for text in texts], texts)
        with self.streaming(self.evicting):
            return self.per_task("loglikelihood_rolling", requests, super().loglikelihood_rolling, disable_tqdm)

    def per_task(self, kind: str, requests, run, disable_tqdm: bool) -> list:
        """``run`` the requests of each task in turn (lm-eval hands all tasks in one call), so the
        statistics are recorded per (task, request type); results come back in the original order."""

        def run_task(task, members):
            with temporarily(self, "_stats_key", (task, kind)):
                return run(members, disable_tqdm)

        return in_groups(requests, lambda request: getattr(request, "task_name", None), run_task)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Under after_prefill: requests in groups of one context length, compressed after the context."""
        if self.stats_file:
            self._row_texts.add_requests(requests)
        if not (self.evicting and self.evict == "after_prefill"):
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")

        def run_length(prompt_length, members):
            with self.prompt(prompt_length):
                scored = super(BuzzHFLM, self)._loglikelihood_tokens(members, True, override_bs)
            bar.update(len(members))
            return scored

        results = in_groups(
            requests, lambda request: self.context_in_input(*request[1:]), run_length, longest_first=True
        )
        bar.close()
        return results

    def context_in_input(self, context: list[int], continuation: list[int]) -> int:
        """Context tokens in the model input HFLM builds, ``(context + continuation)[-(max_length + 1):][:-1]``."""
        fed = min(len(context) + len(continuation), self.max_length + 1) - 1
        return max(1, fed - len(continuation) + 1)

    def prompt(self, length: int):
        """While set, ``_model_call`` compresses after the first ``length`` tokens of every row."""
        return temporarily(self, "_prompt_length", length)

    def tok_batch_encode(self, strings, *args, **kwargs):
        self._batch_texts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        cache = None
        start = time.perf_counter()
        if self.evicting:
            cache = build_cache(
                self.model,
                self.policy,
                evict=self.evict,
                prompt_length=context.shape[1],  # the left-padded width
                positions=self.positions,
            )
            generation_kwargs.update(cache_kwargs(self.model, cache))
            if self.prefill_chunk is not None:
                with self.inference():
                    prefill_head(
                        self.model, context, generation_kwargs.get("attention_mask"), cache, self.prefill_chunk
                    )
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        seconds = time.perf_counter() - start
        seen = out.shape[1] - 1
        texts = getattr(self, "_batch_texts", [])
        self.record("generate_until", cache, out.shape[0], seen, out.numel() - out.shape[0], seconds, texts)
        return out

    def inference(self) -> contextlib.ExitStack:
        """No gradients, and HFLM's autocast when it runs in mixed precision."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            )
        )
        return stack

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self.evicting or attn_mask is not None or labels is not None:
            start = time.perf_counter()
            logits = super()._model_call(inps, attn_mask, labels)
            seconds = time.perf_counter() - start
            self.record("loglikelihood", None, inps.shape[0], inps.shape[1], inps.numel(), seconds, inps)
            return logits
        cache = build_cache(
            self.model, self.policy, evict=self.evict, prompt_length=self._prompt_length, positions=self.positions
        )
        start = time.perf_counter()
        with self.inference():
            forward = cache_kwargs(self.model, cache)
            logits = [self.model(input_ids=part, **forward).logits for part in self.score_parts(inps)]
        seconds = time.perf_counter() - start
        self.record("loglikelihood", cache, inps.shape[0], inps.shape[1], inps.numel(), seconds, inps)
        return torch.cat(logits, dim=1)

    def score_parts(self, inps: torch.Tensor) -> list[torch.Tensor]:
        """``score_chunk``-token forwards; under a prompt length, the first ones end exactly there."""
        if self._prompt_length is None:
            return list(inps.split(self.score_chunk, 1))
        head, tail = inps[:, : self._prompt_length], inps[:, self._prompt_length :]
        return [*head.split(self.score_chunk, 1), *(tail.split(self.score_chunk, 1) if tail.shape[1] else [])]

    # -- statistics -----------------------------------------------------------------------------
    def record(self, kind: str, cache, rows: int, seen: int, tokens: int, seconds: float, contexts) -> None:
        """Fold one batch's cache statistics into the run and its (task, request type); append it
        to ``stats_file`` if set, with the cache settings, task and process that produced it, and
        the SHA-1 of each row's context (``contexts``: the prompt strings of a generation batch, or
        the token rows of a scored one), the key that joins it with ``--log_samples``."""
        task, kind = self._stats_key or (None, kind)
        if self._probing:
            return
        if cache is not None:
            stats = cache.stats()
        else:
            stats = full_cache_stats(self.model.config, rows, seen, self.model.dtype.itemsize)
        entry = self.run_stats.add(stats, rows, tokens, seconds)
        self.task_stats.setdefault((task, kind), RunStats()).add(stats, rows, tokens, seconds)
        if self.stats_file and self.rank == 0:
            if isinstance(contexts, torch.Tensor):
                rows_sha1 = self._row_texts.of_rows(contexts)
            else:
                rows_sha1 = [sha1(text) for text in contexts]
            line = {"request_type": kind, "task": task, "policy": self.policy.name, "cache": self.cache_settings()}
            line.update(time=time.time(), host=socket.gethostname(), pid=os.getpid(), **entry, context_sha1=rows_sha1)
            with open(self.stats_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
