"""toolkit.evaluation.lm: the registered shared-context model reads the numbers of lm-eval's HFLM (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from tests.unit.evaluation.okapi_fixtures import load
from toolkit.errors import UserError
from toolkit.evaluation import scoring


@pytest.fixture(scope="module")
def tiny():
    from toolkit import models
    from toolkit.config import ModelConfig

    return models.load(ModelConfig(name="tiny"))


@pytest.fixture(scope="module")
def scorers(tiny):
    return {name: scoring.lm_wrapper(tiny.model, tiny.tokenizer, 3, name) for name in scoring.SCORERS}


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_registered_with_lm_eval_by_name():
    """Once imported, lm-eval finds it by name and builds it from a model directory and its arg string."""
    from lm_eval.api.registry import get_model

    from toolkit import models
    from toolkit.evaluation.lm import SharedContextLM

    assert get_model("lingogap") is SharedContextLM
    lm = SharedContextLM.create_from_arg_string(f"pretrained={models.tiny_dir()},max_length=64",
                                                {"batch_size": 4, "device": "cpu"})
    assert (lm.batch_size, str(lm.device), lm.max_length) == (4, "cpu", 64)


def test_every_benchmark_scores_as_hflm_on_the_same_items(tmp_path, fixture_data, scorers):
    for bt in load(tmp_path, fixture_data, ["arc", "mmlu", "hellaswag"], ["en", "hi"], limit=6):
        ours, theirs = scoring.evaluate(scorers["lingogap"], bt), scoring.evaluate(scorers["hflm"], bt)
        assert set(ours.items) == set(theirs.items) and ours.n == 6
        for key, item in ours.items.items():
            assert np.allclose(item["lls"], theirs.items[key]["lls"], atol=1e-4, rtol=0), (bt.task, key)
            assert item["acc"] == theirs.items[key]["acc"] and item["acc_norm"] == theirs.items[key]["acc_norm"]


def test_odd_requests_score_as_hflm(scorers):
    """Empty context, trailing spaces, a context shared by continuations of 1 to 9 tokens (more than one
    batch of tails), and a request longer than the model's window, which is cut from the left."""
    ours, theirs = scorers["lingogap"], scorers["hflm"]
    long = " ".join(f"word{k}" for k in range(400))
    args = [("", "hello there"), ("Question: why? Answer: ", "because"), ("Question: why?", " a"),
            *[("Question: why?", " " + " ".join(["b"] * k)) for k in range(1, 9)], (long, " end of it")]
    ours._max_length = theirs._max_length = 64  # make the long request overflow the window
    try:
        a = ours.loglikelihood(_requests("loglikelihood", args))
        b = theirs.loglikelihood(_requests("loglikelihood", args))
    finally:
        ours._max_length = theirs._max_length = None
    assert np.allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)
    assert [g for _, g in a] == [g for _, g in b]


def test_rolling_loglikelihood_as_hflm_across_windows(scorers, monkeypatch):
    """Several windows per text, texts sharing the BOS context, and tails split into several calls (each on
    its own copy of the cache) by a small budget of scored positions."""
    from toolkit.evaluation import lm

    monkeypatch.setattr(lm, "MAX_SCORED", 16)
    texts = ["A short sentence.", "यह एक वाक्य है।", " ".join(f"token{k}" for k in range(120)), "Another one."]
    ours, theirs = scorers["lingogap"], scorers["hflm"]
    ours._max_length = theirs._max_length = 48  # the long text needs several windows
    try:
        a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
        b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    finally:
        ours._max_length = theirs._max_length = None
    # Both sides sum each window in float32: a total of thousands of nats (the 120-token text, random weights)
    # is resolved only to float32 precision, so the bound is 1e-4 or float32 eps times the total (6e-4 here).
    assert np.allclose(a, b, atol=1e-4, rtol=float(np.finfo(np.float32).eps))


def test_generation_is_refused_with_the_switch_named(scorers):
    with pytest.raises(UserError, match="--eval-scorer hflm"):
        scorers["lingogap"].generate_until(_requests("generate_until", [("Q", {})]))
    with pytest.raises(UserError, match="unknown scorer"):
        scoring.lm_wrapper(None, None, 1, "vllm")
