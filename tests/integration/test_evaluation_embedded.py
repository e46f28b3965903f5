"""The embedded Gemma 3 270M on ARC-Challenge and MMLU items in English and Hindi (shared Okapi files)."""

from __future__ import annotations

import csv

import pytest

from toolkit.config import Config

pytestmark = pytest.mark.integration


def test_embedded_model_arc_and_mmlu_in_english_and_hindi(tmp_path, okapi):
    from jobs import evaluate

    cfg = Config.build({"run": {"preset": "embedded", "run": str(tmp_path), "langs": "hi"},
                        "eval": {"tasks": "arc,mmlu", "limit": 3, "bench_data": str(okapi)}})
    result = evaluate.run(cfg)
    rows = {(r["task"], r["language"]): r for r in result["results"]}
    assert set(rows) == {("arc", "en"), ("arc", "hi"), ("mmlu", "en"), ("mmlu", "hi")}
    with open(tmp_path / "eval" / "items.csv", newline="") as fh:
        items = list(csv.DictReader(fh))
    for (task, lang), r in rows.items():
        assert r["status"] == "ok" and r["n"] == 3
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        correct = [int(i["acc"]) for i in items if (i["task"], i["language"]) == (task, lang)]
        assert len(correct) == 3 and r["acc"] == pytest.approx(sum(correct) / 3)
    assert all(r["acc"] == r["acc_norm"] for (task, _), r in rows.items() if task == "mmlu")  # letter choices


def test_shared_context_scorer_equals_hflm_on_the_embedded_model(tmp_path, okapi, embedded_lm):
    """The lingogap scorer against lm-eval's HFLM, item by item, on 2 ARC and 2 MMLU items in en and hi."""
    import numpy as np

    from toolkit.evaluation import scoring, tasks

    lm = embedded_lm
    bench_tasks = tasks.load(tasks.plan(["arc", "mmlu"], ["en", "hi"], str(okapi)), str(okapi), tmp_path, limit=2)
    ours = scoring.lm_wrapper(lm.model, lm.tokenizer, 8, "lingogap")
    theirs = scoring.lm_wrapper(lm.model, lm.tokenizer, 8, "hflm")
    for bt in bench_tasks:
        a, b = scoring.evaluate(ours, bt), scoring.evaluate(theirs, bt)
        assert set(a.items) == set(b.items) and a.n == 2
        diff = max(np.abs(np.subtract(a.items[k]["lls"], b.items[k]["lls"])).max() for k in a.items)
        assert diff < 1e-4, (bt.task, diff)
