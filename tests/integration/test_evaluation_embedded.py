"""The embedded Gemma 3 270M on 5 ARC-Challenge and 5 MMLU items in English and Hindi (shared Okapi files)."""

from __future__ import annotations

import csv

import pytest

from toolkit.config import Config

pytestmark = pytest.mark.integration


def test_embedded_model_arc_and_mmlu_in_english_and_hindi(tmp_path, okapi):
    from jobs import evaluate

    cfg = Config.build({"run": {"preset": "embedded", "run": str(tmp_path), "langs": "hi"},
                        "eval": {"tasks": "arc,mmlu", "limit": 5, "bench_data": str(okapi)}})
    result = evaluate.run(cfg)
    rows = {(r["task"], r["language"]): r for r in result["results"]}
    assert set(rows) == {("arc", "en"), ("arc", "hi"), ("mmlu", "en"), ("mmlu", "hi")}
    with open(tmp_path / "eval" / "items.csv", newline="") as fh:
        items = list(csv.DictReader(fh))
    for (task, lang), r in rows.items():
        assert r["status"] == "ok" and r["n"] == 5
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        correct = [int(i["acc"]) for i in items if (i["task"], i["language"]) == (task, lang)]
        assert len(correct) == 5 and r["acc"] == pytest.approx(sum(correct) / 5)
    assert all(r["acc"] == r["acc_norm"] for (task, _), r in rows.items() if task == "mmlu")  # letter choices
