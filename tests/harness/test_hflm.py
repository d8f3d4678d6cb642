"""``buzz_hf``: exactness against ``hf``, streaming under eviction, bad model_args, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook
from lm_eval.models.huggingface import HFLM
from sqlitedict import SqliteDict
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from buzz_lm_eval.cache import build_cache
from buzz_lm_eval.harness.hflm import BuzzHFLM
from buzz_lm_eval.harness.paths import DEFAULT_MODEL_DIR

from .. import conftest
from ..conftest import lm_eval_cli, run_lm_eval

MODEL = str(DEFAULT_MODEL_DIR)
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 3


def requests(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def stock():
    return HFLM(pretrained=MODEL, device=conftest.DEVICE.type, batch_size=2)


def buzz(**kw):
    return BuzzHFLM(pretrained=MODEL, device=conftest.DEVICE.type, batch_size=2, **kw)


def test_full_cache_reproduces_hf_exactly(stock):
    full = buzz(cache="full")
    ll = requests("loglikelihood", (STORY, " She was happy."), ("Tom had a dog.", " The dog ran."))
    assert full.loglikelihood(ll) == stock.loglikelihood(ll)
    rolling = requests("loglikelihood_rolling", (STORY * 8,))
    assert full.loglikelihood_rolling(rolling) == stock.loglikelihood_rolling(rolling)
    gen = requests(
        "generate_until", (STORY, {"until": ["\n\n"], "max_gen_toks": 30}), ("Tom had", {"max_gen_toks": 30})
    )
    assert full.generate_until(gen) == stock.generate_until(gen)
    info = full.get_model_info()["buzz_cache"]
    assert info["policy"] == "full" and info["compression_ratio"] == 1.0 and info["sequences"] > 0


def test_loglikelihood_is_streamed_through_the_evicting_cache():
    lm = buzz(cache="streaming", sink=4, window=16, score_chunk=1)
    context, continuation = STORY, " She was happy."
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    # the same stream by hand: token by token through a streaming cache
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + continuation_ids], device=lm.device)
    n_cont = len(continuation_ids)
    cache = build_cache(lm.model, "streaming", sink=4, window=16)
    with torch.no_grad():
        logits = torch.cat([lm.model(input_ids=t, past_key_values=cache).logits for t in ids[:, :-1].split(1, 1)], 1)
    expected = logits[0, -n_cont:].log_softmax(-1).gather(-1, ids[0, -n_cont:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)
    full_logprob = buzz(cache="full").loglikelihood(requests("loglikelihood", (context, continuation)))[0][0]
    assert logprob != pytest.approx(full_logprob, abs=1e-3)  # eviction changes the score
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["kept_tokens_peak"] <= 4 + 16 + 1 and stats["compression_ratio"] > 2


def test_rolling_document_is_one_stream_longer_than_the_context(stock):
    lm = buzz(cache="buzz", budget=64, score_chunk=32)
    document = STORY * 12
    n_tokens = len(lm.tok_encode(document))
    assert n_tokens > stock.max_length
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", (document,)))
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["batches"] == 1 and stats["tokens_processed"] == n_tokens  # one window, nothing cut
    assert stats["kept_tokens_peak"] <= 64 - 1 + 32


def test_generation_streams_long_prompts_when_prefill_is_chunked(stock):
    long_prompt = STORY * 12
    gen = requests("generate_until", (long_prompt, {"until": ["\n\n"], "max_gen_toks": 16}))
    lm = buzz(cache="buzz", budget=48, prefill_chunk=16)
    lm.generate_until(gen)
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["tokens_processed"] > stock.max_length  # the whole prompt, not truncated
    assert stats["kept_tokens_peak"] <= 48 - 1 + 16
    truncated = buzz(cache="buzz", sink=4, window=16, threshold=27)  # explicit sizes, no chunk: one forward
    truncated.generate_until(gen)
    assert truncated.get_model_info()["buzz_cache"]["tokens_processed"] <= stock.max_length


def test_a_budget_alone_prefills_in_chunks_and_holds(stock):
    """No prefill_chunk with a budget: chunks of budget // 4, so the budget holds and nothing is truncated."""
    long_prompt = STORY * 12
    lm = buzz(cache="buzz", budget=48)
    assert (lm.prefill_chunk, lm.score_chunk) == (12, 12)
    lm.generate_until(requests("generate_until", (long_prompt, {"until": ["\n\n"], "max_gen_toks": 16})))
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["tokens_processed"] > stock.max_length
    assert stats["kept_tokens_peak"] <= 48 - 1 + 12 and stats["prefill_chunk"] == 12
    assert buzz(cache="h2o", budget=4096).prefill_chunk == 512  # capped
    assert buzz(cache="buzz", budget=48, prefill_chunk=20).score_chunk == 20  # given chunks stay


def test_explicit_max_length_cuts_rolling_documents_into_windows():
    lm = buzz(cache="streaming", budget=32, max_length=128)
    document = STORY * 12
    n_tokens = len(lm.tok_encode(document))
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", (document,)))
    assert lm.get_model_info()["buzz_cache"]["sequences"] == math.ceil(n_tokens / 128) > 1


def test_the_cache_is_passed_as_the_installed_transformers_wants():
    lm = buzz(cache="buzz", budget=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")  # deprecated since transformers 5.24
        lm.loglikelihood(requests("loglikelihood", (STORY, " She was happy.")))
        lm.generate_until(requests("generate_until", (STORY, {"max_gen_toks": 6})))
    assert lm.get_model_info()["buzz_cache"]["sequences"] == 2


def test_stats_file_gets_one_line_per_batch(tmp_path):
    path = tmp_path / "stats.jsonl"
    lm = buzz(cache="h2o", budget=32, stats_file=str(path))
    lm.generate_until(requests("generate_until", (STORY, {"max_gen_toks": 8}), ("Tom", {"max_gen_toks": 8})))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["rows"] == 2 and len(lines[0]["context_sha1"]) == 2
    assert lines[0]["policy"] == "h2o" and lines[0]["request_type"] == "generate_until"


@pytest.mark.parametrize("cache", ["full", "h2o", "snapkv"])
def test_scored_stats_lines_name_each_rows_context(tmp_path, cache):
    """loglikelihood rows carry the SHA-1 of their context string, rolling rows that of their
    document: the strings --log_samples shows in a sample's arguments."""
    path = tmp_path / "stats.jsonl"
    lm = buzz(cache=cache, **({} if cache == "full" else {"budget": 32}), stats_file=str(path))
    pairs = [(STORY, " She was happy."), ("Tom had a dog.", " The dog ran."), ("Tom had a dog.", " It slept.")]
    documents = [STORY * 4, "Tom had a dog. " * 30]
    lm.loglikelihood(requests("loglikelihood", *pairs))
    lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(d,) for d in documents]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    labels = [sha for line in lines for sha in line["context_sha1"]]
    assert all(len(line["context_sha1"]) == line["rows"] for line in lines)
    assert None not in labels
    expected = {hashlib.sha1(text.encode()).hexdigest() for text in [p[0] for p in pairs] + documents}
    assert set(labels) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache": "lru"}, "unknown cache policy 'lru'; valid policies: full, local, streaming, h2o, buzz"),
        (
            {"cache": "buzz", "heavy": 10},
            "buzz: unknown parameter.*heavy.*valid: sink, window, threshold, stride, budget",
        ),
        ({"cache": "buzz", "window": -3}, "window must be >= 1, got -3"),
        ({"cache": "h2o", "budget": 0}, "budget must be an integer >= 2, got 0"),
        ({"cache": "buzz", "budget": 6}, "budget=6 is too small"),
        ({"cache": "buzz", "prefill_chunk": 0}, "prefill_chunk must be >= 1, got 0"),
        ({"cache": "buzz", "score_chunk": 2.5}, "score_chunk must be an integer, got 2.5"),
        (
            {"cache": "buzz", "windw": 3},
            r"unknown model_args windw \(did you mean 'window'\?\); buzz_hf's own keys: cache",
        ),
        ({"cache": "streaming", "window": -5.0}, "streaming: window must be >= 1, got -5$"),
        ({"cache": "buzz", "stride": 1}, "stride=1 never thins earlier samples.*use stride >= 3"),
        ({"cache": "buzz", "budget": 128, "stride": 2}, "stride=2 never thins earlier samples.*use stride >= 3"),
        ({"cache": "buzz", "positions": "absolute"}, "positions must be one of shifted, original; got 'absolute'"),
    ],
)
def test_bad_model_args_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BuzzHFLM(pretrained="/nonexistent/model/dir", **kwargs)  # never reaches the weights


def test_positions_reach_the_cache_and_the_results():
    shifted, original = buzz(cache="streaming", budget=24), buzz(cache="streaming", budget=24, positions="original")
    ll = requests("loglikelihood", (STORY * 2, " She was happy."))
    scores = {lm.positions: lm.loglikelihood(ll)[0][0] for lm in (shifted, original)}
    assert scores["shifted"] != pytest.approx(scores["original"], abs=1e-6)
    assert shifted.get_model_info()["buzz_cache"]["positions"] == "shifted"
    assert original.get_model_info()["buzz_cache"]["positions"] == "original"
    assert buzz(cache="full").get_model_info()["buzz_cache"]["positions"] is None


def test_length_dependent_rope_fails_from_its_config(tmp_path):
    LlamaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=16,
        num_attention_heads=2,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        BuzzHFLM(pretrained=str(tmp_path), cache="buzz", budget=64)


def test_a_missing_model_directory_is_named():
    with pytest.raises(ValueError, match="pretrained='/nonexistent/model/dir': no such directory"):
        BuzzHFLM(pretrained="/nonexistent/model/dir", cache="full")


def test_unsupported_architecture_fails_from_its_config(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)  # a config, no weights at all
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        BuzzHFLM(pretrained=str(tmp_path), cache="buzz", budget=64)


def test_full_runs_on_any_model_hf_runs(tmp_path):
    """An architecture the evicting cache cannot serve still gets its full-cache baseline."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=256, n_layer=1, n_embd=16, n_head=2)).save_pretrained(
        tmp_path
    )
    ours = BuzzHFLM(pretrained=str(tmp_path), tokenizer=MODEL, cache="full", device="cpu", batch_size=2)
    stock = HFLM(pretrained=str(tmp_path), tokenizer=MODEL, device="cpu", batch_size=2)
    ll = requests("loglikelihood", ("Tom had a dog.", " The dog ran."), (STORY, " She was happy."))
    gen = requests("generate_until", ("Tom had", {"max_gen_toks": 8}))
    assert ours.loglikelihood(ll) == stock.loglikelihood(ll)
    assert ours.generate_until(gen) == stock.generate_until(gen)


def test_batch_size_auto_works_for_every_request_type_and_is_not_counted():
    lm = BuzzHFLM(
        pretrained=MODEL,
        device="cpu",
        batch_size="auto",
        max_batch_size=4,
        cache="streaming",
        budget=32,
        prefill_chunk=128,
    )
    cases = [
        ("generate_until", (STORY, {"max_gen_toks": 6}), ("Tom had", {"max_gen_toks": 6})),
        ("loglikelihood_rolling", (STORY * 8,)),
        ("loglikelihood", (STORY, " She was happy."), ("Tom had a dog.", " The dog ran.")),
    ]
    for kind, *args in cases:
        lm.configure_cache("streaming", 32, prefill_chunk=128)
        getattr(lm, kind)(requests(kind, *args))
        assert lm.get_model_info()["buzz_cache"]["sequences"] == len(args), kind  # the probe's rows are not


def test_response_cache_not_named_after_the_setting_is_refused(tmp_path):
    lm = buzz(cache="buzz", budget=32)
    hook = CacheHook(None)
    hook.dbdict = SqliteDict(str(tmp_path / "responses_rank0.db"), autocommit=True)
    with pytest.raises(ValueError, match="keyed by the requests only.*run without --use_cache"):
        lm.set_cache_hook(hook)
    hook.dbdict = SqliteDict(str(tmp_path / f"responses_rank0.{lm.response_cache_tag()}.db"), autocommit=True)
    lm.set_cache_hook(hook)
    with pytest.raises(ValueError, match="response cache .* holds the answers of cache=buzz"):
        lm.configure_cache("h2o", 32)
    assert buzz(cache="buzz", budget=64).response_cache_tag() != lm.response_cache_tag()


# -- the installed console script ------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_buzz_hf_and_records_cache_stats(tmp_path):
    results = lm_eval_cli(tmp_path, "buzz_hf", "cache=buzz,budget=64,score_chunk=16", "buzz_wikitext_smoke")
    stats = results["config"]["buzz_cache"]
    assert stats["policy"] == "buzz" and stats["budget"] == 64 and stats["window"] == 16
    assert stats["compression_ratio"] > 2 and stats["kept_tokens_peak"] <= 64 - 1 + 16
    assert stats["tokens_per_second"] > 0
    assert results["results"]["buzz_wikitext_smoke"]["word_perplexity,none"] > 1


@pytest.mark.slow
def test_cli_full_cache_matches_stock_hf(tmp_path):
    ours = lm_eval_cli(tmp_path, "buzz_hf", "cache=full", "buzz_wikitext_smoke")
    stock = lm_eval_cli(tmp_path, "hf", "", "buzz_wikitext_smoke")
    assert ours["results"] == stock["results"]


def test_explicit_max_length_keeps_truncation_with_chunked_prefill():
    gen = requests("generate_until", (STORY * 12, {"until": ["\n\n"], "max_gen_toks": 16}))
    lm = buzz(cache="buzz", budget=48, prefill_chunk=16, max_length=200)
    lm.generate_until(gen)
    stats = lm.get_model_info()["buzz_cache"]
    assert stats["tokens_processed"] <= 200 and stats["kept_tokens_peak"] <= 48 - 1 + 16


@pytest.mark.slow
def test_cli_use_cache_never_hands_one_setting_the_answers_of_another(tmp_path):
    """Also: the shipped model's runs land in a folder named after it, with no deprecation warning."""
    task, db = "buzz_wikitext_smoke", str(tmp_path / "responses")
    full_path, _ = run_lm_eval(tmp_path, "buzz_hf", "cache=full", task, extra=["--use_cache", db], pretrained=None)
    buzz_path, buzz_log = run_lm_eval(
        tmp_path, "buzz_hf", "cache=buzz,budget=32,score_chunk=256", task, extra=["--use_cache", db], pretrained=None
    )
    full, ours = (json.loads(path.read_text()) for path in (full_path, buzz_path))
    word = "word_perplexity,none"
    assert ours["results"][task][word] != full["results"][task][word]
    assert ours["config"]["buzz_cache"]["sequences"] == 1  # answered by the model, not by the file
    databases = sorted(path.name for path in tmp_path.glob("responses_rank0.buzz_hf-*.db"))
    assert len(databases) == 2 and [name.split("-")[1] for name in databases] == ["buzz", "full"]
    assert full_path.parent.name == buzz_path.parent.name == "stories260K"
    assert "deprecated" not in buzz_log.lower()


@pytest.mark.parametrize(
    "source, model_args, name",
    [
        ("buzz_hf", {"cache": "buzz"}, "stories260K"),
        ("buzz_hf", "cache=full", "stories260K"),
        ("buzz_hf", {"pretrained": "org/model"}, "org/model"),
        ("hf", {"cache": "buzz"}, None),
    ],
)
def test_runs_on_the_shipped_model_are_named_after_it(source, model_args, name):
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    tracker = GeneralConfigTracker()
    tracker.log_experiment_args(
        model_source=source,
        model_args=model_args,
        system_instruction=None,
        chat_template=None,
        fewshot_as_multiturn=False,
    )
    if name is None:  # not ours: lm-eval's random id stays
        assert tracker.model_name != "stories260K"
    else:
        assert tracker.model_name == name


def test_lm_eval_metadata_warning_shows_once(caplog):
    import lm_eval.api.task as task_module

    from buzz_lm_eval.harness.startup import OnceFilter

    [once] = [f for f in task_module.eval_logger.filters if isinstance(f, OnceFilter)]  # the startup hook's
    once.seen = False  # as at the start of a run
    for task in ("buzz_cnndm_smoke", "buzz_xsum_smoke"):
        task_module.eval_logger.warning(f"{task}: Custom kwargs can be passed to `--metadata` in console ...")
    task_module.eval_logger.warning("another warning")
    assert caplog.text.count("Custom kwargs") == 1 and "another warning" in caplog.text


def test_buzz_lm_eval_checks_model_args_before_lm_eval_starts(capsys):
    from buzz_lm_eval import cli

    assert cli.main(["run", "--model", "buzz_hf", "--model_args", "cache=buzz,budgt=64", "--tasks", "buzz_smoke"]) == 2
    assert "did you mean 'budget'?" in capsys.readouterr().err
    assert cli.main(["--model", "buzz_hf", "--model_args", "cache=streaming", "window=-5", "--tasks", "x"]) == 2
    assert "streaming: window must be >= 1, got -5" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_buzz_lm_eval_help_lists_its_subcommands(capsys, argv):
    from buzz_lm_eval import cli

    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for command in ("demo", "sweep", "leaderboard", "longbench-export", "run", "ls", "validate"):
        assert f"\n  {command} " in text
