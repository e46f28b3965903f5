"""jobs.evaluate end to end on the tiny model: results.json/csv, items.csv, the figure, base vs adapted on the
same items, and the report of a missing language."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis import stats
from tests.unit.evaluation.okapi_fixtures import write_gaps_csv
from toolkit.config import Config
from toolkit.errors import UserError


def _cfg(tmp_path, data, **extra) -> Config:
    return Config.build({"run": {"preset": "tiny", "run": str(tmp_path / "run"), "langs": "hi"},
                         "eval": {"tasks": "arc", "limit": 10, "bench_data": str(data), "batch_size": 4,
                                  "bpb_sentences": 40, **extra}})


def _align_heldout() -> list[str]:
    from toolkit import corpus
    from toolkit.align.data import split_ids

    return split_ids(corpus.load("embedded", ["en", "hi"]).ids, 0.2, 0.1, 0).heldout


def _items(run: Path) -> dict:
    with open(run / "eval" / "items.csv", newline="") as fh:
        out: dict = {}
        for r in csv.DictReader(fh):
            out.setdefault((r["model"], r["task"], r["language"]), {})[r["item"]] = r
    return out


def test_tiny_model_ten_arc_items_in_two_languages(tmp_path, fixture_data):
    from jobs import evaluate

    write_gaps_csv(tmp_path / "run" / "reports" / "gaps.csv")
    result = evaluate.run(_cfg(tmp_path, fixture_data))
    run = tmp_path / "run"
    assert set(result["gaps"]["bands"]) == {"early", "middle", "deep", "all"}
    corr = {(c["band"], c["task"], c["y"]): c for c in result["correlations"]}
    assert corr["early", "arc", "p_gold"]["languages"] == ["hi"] and ("deep", "heldout", "bpb") in corr
    assert (run / "eval" / "figures" / "gap_vs_performance.png").stat().st_size > 1000
    rows = {(r["model"], r["language"]): r for r in result["results"]}
    assert set(rows) == {("base", "en"), ("base", "hi")} and [m["label"] for m in result["models"]] == ["base"]
    items = _items(run)
    for lang in ("en", "hi"):
        r = rows["base", lang]
        assert r["status"] == "ok" and r["n"] == 10
        assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        acc = np.array([float(i["acc"]) for i in items["base", "arc", lang].values()])
        assert r["acc"] == pytest.approx(acc.mean())
        assert r["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(10))
        assert all(int(i["acc"]) == (i["pred"] == i["gold"]) for i in items["base", "arc", lang].values())
    on_disk = json.loads((run / "eval" / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(result["results"]))
    assert (run / "eval" / "figures" / "accuracy.png").stat().st_size > 1000
    assert "evaluate" in json.loads((run / "manifest.json").read_text())["stages"]
    with open(run / "eval" / "results.csv", newline="") as fh:
        assert sorted(r["task"] for r in csv.DictReader(fh)) == ["arc", "arc", "bpb", "bpb"]
    for lang in ("en", "hi"):  # continuous metrics from the same log-likelihoods
        r, rows_ = rows["base", lang], items["base", "arc", lang].values()
        p_gold = np.array([float(i["p_gold"]) for i in rows_])
        assert r["p_gold"] == pytest.approx(p_gold.mean(), abs=1e-5) and r["primary"] == "p_gold_norm"
        assert r["p_gold_stderr"] == pytest.approx(np.std(p_gold, ddof=1) / math.sqrt(10), abs=1e-5)
        assert all((float(i["margin"]) > 0) == (i["acc"] == "1") for i in rows_)
    bpb = {b["language"]: b for b in result["bpb"]}
    held = _align_heldout()
    assert set(bpb) == {"en", "hi"} and all(b["n"] == len(held) and 0 < b["bpb"] < 30 for b in bpb.values())
    with open(run / "eval" / "bpb.csv", newline="") as fh:  # the sentences no adapter trains on
        assert {r["sentence"] for r in csv.DictReader(fh)} == set(held)
    assert result["config"]["scorer"] == "lingogap" and result["config"]["primary"] == {"arc": "p_gold_norm"}


def _make_adapter(path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit import models
    from toolkit.config import ModelConfig

    lm = models.load(ModelConfig(name="tiny"))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(lm.model, config).save_pretrained(str(path))


def test_adapter_against_base_on_the_same_items(tmp_path, fixture_data, capsys, monkeypatch):
    from jobs import evaluate

    _make_adapter(tmp_path / "run" / "align" / "hi" / "adapter")
    monkeypatch.setenv("COLUMNS", "160")  # the job's own console prints the tables to stderr
    result = evaluate.run(_cfg(tmp_path, fixture_data, tasks="arc,hellaswag"))
    assert [m["label"] for m in result["models"]] == ["base", "adapted:hi"]
    items = _items(tmp_path / "run")
    by = {(r["model"], r["task"], r["language"]): r for r in result["results"]}
    preds_differ = False
    for c in result["comparisons"]:
        base, adapted = items["base", c["task"], c["language"]], items["adapted:hi", c["task"], c["language"]]
        assert set(base) == set(adapted) and c["n_paired"] == len(base) == 10
        assert c["delta_acc"] == pytest.approx(by["adapted:hi", c["task"], c["language"]]["acc"]
                                               - by["base", c["task"], c["language"]]["acc"])
        assert c["base_only"] == sum(base[k]["acc"] == "1" and adapted[k]["acc"] == "0" for k in base)
        assert c["adapted_only"] == sum(base[k]["acc"] == "0" and adapted[k]["acc"] == "1" for k in base)
        assert c["p_mcnemar"] == stats.mcnemar_exact(c["base_only"], c["adapted_only"])
        preds_differ |= any(base[k]["pred"] != adapted[k]["pred"] for k in base)
    assert len(result["comparisons"]) == 4 and preds_differ, "the adapter should change some predictions"
    text = capsys.readouterr().err
    assert "base vs adapted:hi" in text and "Δ acc" in text
    with open(tmp_path / "run" / "eval" / "results.csv", newline="") as fh:
        adapted_rows = [r for r in csv.DictReader(fh) if r["model"] == "adapted:hi"]
    assert len(adapted_rows) == 4 + 2 and all(r["p_mcnemar"] for r in adapted_rows if r["task"] != "bpb")
    for c in result["comparisons"]:  # the continuous metrics, paired on the same items
        base, adapted = items["base", c["task"], c["language"]], items["adapted:hi", c["task"], c["language"]]
        delta = np.mean([float(adapted[k]["p_gold_norm"]) - float(base[k]["p_gold_norm"]) for k in base])
        assert c["delta_p_gold_norm"] == pytest.approx(delta, abs=1e-5)
        assert c["delta_p_gold_norm_ci_low"] <= c["delta_p_gold_norm"] <= c["delta_p_gold_norm_ci_high"]
    (pair,) = [c for c in result["bpb_comparisons"] if c["language"] == "hi"]
    assert pair["n_paired"] == len(_align_heldout()) and pair["delta_bpb"] != 0 and 0 < pair["p_bpb"] <= 1


def test_joint_and_sweep_point_adapters_are_evaluated_like_the_others(tmp_path, fixture_data):
    """The run's adapters by one rule (RunDir.adapters): a --joint adapter always, sweep points on request."""
    from jobs import evaluate

    for name in ("hi", "joint", "hi@lr=0.001"):
        _make_adapter(tmp_path / "run" / "align" / name / "adapter")
    cfg = _cfg(tmp_path, fixture_data, limit=4, bpb_sentences=0)
    assert [label for label, _ in evaluate.discover_adapters(cfg)] == ["adapted:hi", "adapted:joint"]
    cfg.eval.sweep_points = True
    result = evaluate.run(cfg)
    labels = ["base", "adapted:hi", "adapted:hi@lr=0.001", "adapted:joint"]
    assert [m["label"] for m in result["models"]] == labels
    joint = next(m for m in result["models"] if m["label"] == "adapted:joint")
    assert Path(joint["adapter"]) == tmp_path / "run" / "align" / "joint" / "adapter"
    scored = {(r["model"], r["language"]) for r in result["results"] if r["status"] == "ok"}
    assert scored == {(label, lang) for label in labels for lang in ("en", "hi")}
    assert {(c["model"], c["language"]) for c in result["comparisons"]} == {
        (label, lang) for label in labels[1:] for lang in ("en", "hi")
    }


def test_explicit_adapter_and_missing_language_in_the_report(tmp_path, fixture_data, capsys, monkeypatch):
    from jobs import evaluate

    cfg = _cfg(tmp_path, fixture_data, tasks="hellaswag")
    cfg.run.langs = "zh"
    cfg.model.adapter = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="adapter_config.json"):
        evaluate.run(cfg)
    cfg.model.adapter = ""
    cfg.run.max_sentences = 1  # one sentence cannot be split for alignment: bits per byte is skipped, not the stage
    monkeypatch.setenv("COLUMNS", "160")
    capsys.readouterr()
    result = evaluate.run(cfg)
    assert result["bpb"] == []
    status = {r["language"]: r["status"] for r in result["results"]}
    assert status == {"en": "ok", "zh": "missing"}
    err = capsys.readouterr().err
    assert "missing" in err and "bits per byte skipped" in err
    assert evaluate.adapter_label(tmp_path / "align" / "ml" / "adapter") == "adapted:ml"
    assert evaluate.adapter_label(tmp_path / "my-lora") == "adapted:my-lora"


def test_an_adapter_for_another_model_is_refused_before_scoring(tmp_path, fixture_data):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs import evaluate
    from toolkit import models
    from toolkit.config import ModelConfig

    tiny = models.load(ModelConfig(name="tiny"))
    config = copy.deepcopy(tiny.model.config)
    config.hidden_size, config.num_hidden_layers = 32, 2  # another model's shapes
    other = AutoModelForCausalLM.from_config(config)
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "other"))
    cfg = _cfg(tmp_path, fixture_data)
    cfg.model.adapter = str(tmp_path / "other")
    with pytest.raises(UserError, match="does not fit this model"):
        evaluate.run(cfg)
    with pytest.raises(UserError, match="does not fit this model"):
        models.apply_adapter(tiny.model, tmp_path / "other")


def test_adapters_merge_in_float32_only_and_stay_unmerged_in_bfloat16(tmp_path):
    import torch

    from toolkit import models
    from toolkit.config import ModelConfig

    _make_adapter(tmp_path / "adapter")
    tiny = models.load(ModelConfig(name="tiny"))
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    merged = models.apply_adapter(copy.deepcopy(tiny.model), tmp_path / "adapter")
    assert not any("lora_" in name for name, _ in merged.named_modules())
    base16 = copy.deepcopy(tiny.model).to(torch.bfloat16)
    unmerged = models.apply_adapter(copy.deepcopy(base16), tmp_path / "adapter")
    assert type(unmerged) is type(tiny.model)  # the transformers model: same attribute paths and hooks
    assert any("lora_A" in name for name, _ in unmerged.named_modules())
    assert all(p.dtype == torch.bfloat16 for n, p in unmerged.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        want = merged(ids).logits - tiny.model(ids).logits  # the adapter's effect, float32
        got = unmerged(ids).logits.float() - base16(ids).logits.float()
    assert torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1] > 0.9
