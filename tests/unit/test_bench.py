"""toolkit.bench and jobs.evaluate: offline task generation, lm-eval end to end on the tiny model,
base vs adapted pairing, statistics, and the offline-hub error."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolkit import bench
from toolkit.config import Config
from toolkit.errors import HubUnreachable, UserError
from toolkit.languages import LANGUAGES

ALL = list(LANGUAGES)
LM_EVAL_OKAPI = Path(__import__("lm_eval").__file__).parent / "tasks" / "okapi"


def _mc(lang: str, ident: str, k: int, options: int = 4) -> dict:
    row = {"id": ident, "instruction": f"[{lang}] question {k} [title] about things?", "answer": "ABCDE"[k % options]}
    for letter in "abcd"[:options]:
        row[f"option_{letter}"] = f"{lang} option {letter} of {k}"
    if options == 3:
        row["option_d"] = ""
    return row


def _hellaswag(lang: str, k: int) -> dict:
    return {"ind": 1000 + k, "activity_label": f"{lang} activity {k}", "ctx_a": f"{lang} someone does {k}.",
            "ctx_b": "then they", "ctx": f"{lang} someone does {k}. then they", "split": "val",
            "split_type": "indomain", "label": str(k % 4), "endings": [f"{lang} ending {j} [step]" for j in range(4)],
            "source_id": f"activitynet~{k}"}


def write_fixture(root: Path, langs=("en", "hi"), n: int = 14, hellaswag=("en", "hi")) -> Path:
    """Okapi-format files: ARC (hi lacks one item, has a 3-option item), MMLU, HellaSwag; zh has nothing."""
    for folder, splits in (("arc_challenge", ("test", "validation")), ("mmlu", ("val", "dev"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for lang in langs:
            for split in splits:
                rows = [_mc(lang, f"{folder}/{split}/{k}", k, 3 if k == 2 else 4) for k in range(n)
                        if not (lang == "hi" and k == 5)]
                (root / folder / f"{lang}_{split}.json").write_text(json.dumps(rows, ensure_ascii=False))
    (root / "hellaswag").mkdir(exist_ok=True)
    for lang in hellaswag:
        rows = [_hellaswag(lang, k) for k in range(n)]
        (root / "hellaswag" / f"{lang}_val.json").write_text(json.dumps(rows, ensure_ascii=False))
    return root


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("okapi"))


def load(tmp_path, data, benches, langs, limit=0, shots=0, seed=0):
    units = bench.plan_units(benches, langs, str(data))
    return bench.load_units(units, str(data), tmp_path / "tasks", shots=shots, limit=limit, seed=seed)


def docs_of(unit: bench.Unit) -> list[dict]:
    (name, task), = unit.loaded["tasks"].items()
    return [task.eval_docs[i] for i in unit.samples[name]], task


# ------------------------------------------------------------------------------------ task generation


def test_all_ten_languages_from_the_shared_files(tmp_path, okapi):
    units = load(tmp_path, okapi, ["arc", "mmlu"], ALL, limit=20)
    assert [(u.bench, u.lang) for u in units] == [(b, c) for b in ("arc", "mmlu") for c in ALL]
    assert all(u.ok and u.n_items == 20 for u in units), [u.missing for u in units if not u.ok]
    assert sorted(p.name for p in (tmp_path / "tasks").glob("*.yaml")) == sorted(f"{u.task}.yaml" for u in units)
    by = {(u.bench, u.lang): u for u in units}
    for b in ("arc", "mmlu"):
        folder, split = ("arc_challenge", "test") if b == "arc" else ("mmlu", "val")
        ids = {c: {d["id"] for d in docs_of(by[b, c])[0]} for c in ALL}
        for c in ALL:  # the 20 lowest seeded ranks of each file; ids line up, so languages share most items
            file_ids = [r["id"] for r in json.loads((okapi / folder / f"{c}_{split}.json").read_text())]
            assert ids[c] == set(sorted(file_ids, key=lambda i: bench._rank(0, i))[:20]), (b, c)
            assert len(ids[c] & ids["en"]) >= 12, (b, c)
    docs, task = docs_of(by["arc", "hi"])
    raw = {r["id"]: r for r in json.loads((okapi / "arc_challenge" / "hi_test.json").read_text())}
    doc = docs[0]
    assert task.doc_to_text(doc) == "Question: " + raw[doc["id"]]["instruction"].strip() + "\nAnswer:"
    assert task.doc_to_choice(doc)[0] == raw[doc["id"]]["option_a"].strip()
    assert task.doc_to_target(doc) == "ABCDE".index(raw[doc["id"]]["answer"])
    docs, task = docs_of(by["mmlu", "ml"])
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]
    assert task.doc_to_text(docs[0]).endswith("\nD. " + docs[0]["option_d"] + "\nAnswer:")
    config = yaml.safe_load((tmp_path / "tasks" / "lingogap_mmlu_ml.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"].endswith("mmlu/ml_val.json")
    assert config["dataset_kwargs"]["data_files"]["fewshot"].endswith("mmlu/ml_dev.json")


class _AnyTag(yaml.SafeLoader):
    pass


_AnyTag.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {node.value}")


def test_templates_match_lm_evals_okapi_tasks():
    ours = bench.TEMPLATES
    mmlu = yaml.safe_load((LM_EVAL_OKAPI / "mmlu_multilingual" / "_default_yaml").read_text())
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "fewshot_config"):
        assert ours["mmlu"][key] == mmlu[key], key
    for name, folder, base in (("arc", "arc_multilingual", "_arc_yaml"),
                               ("hellaswag", "hellaswag_multilingual", "_hellaswag_yaml")):
        theirs = yaml.load((LM_EVAL_OKAPI / folder / base).read_text(), Loader=_AnyTag)
        assert theirs["output_type"] == "multiple_choice"
        for key in ("doc_to_text", "doc_to_choice"):
            assert ours[name][key] == theirs[key], (name, key)
        assert {m["metric"] for m in theirs["metric_list"]} == set(bench.PAIRED_METRICS)


def test_fixture_tasks_hellaswag_three_options_and_a_missing_language(tmp_path, fixture_data):
    units = load(tmp_path, fixture_data, ["arc", "mmlu", "hellaswag"], ["en", "zh", "hi"], shots=2)
    by = {(u.bench, u.lang): u for u in units}
    missing = [(u.bench, u.lang) for u in units if not u.ok]
    assert missing == [("arc", "zh"), ("mmlu", "zh"), ("hellaswag", "zh")]
    assert "zh_val.json" in by["hellaswag", "zh"].missing
    assert by["arc", "hi"].n_items == 13 and by["arc", "en"].n_items == 14  # hi lacks one item
    docs, task = docs_of(by["hellaswag", "hi"])
    doc = next(d for d in docs if d["ind"] == 1003)
    assert task.doc_to_text(doc) == "hi activity 3: hi someone does 3. Then they"
    assert task.doc_to_choice(doc) == [f"hi ending {j} " for j in range(4)]  # lm-eval strips, then drops [..]
    assert task.doc_to_target(doc) == 3
    assert bench.item_key(doc, 0) == "1003"
    docs, task = docs_of(by["arc", "en"])
    three = next(d for d in docs if d["id"].endswith("/2"))
    assert len(task.doc_to_choice(three)) == 3 and "[title]" not in task.doc_to_text(three)
    # hellaswag has no train file: few-shot examples come from the val split itself
    config = yaml.load((tmp_path / "tasks" / "lingogap_hellaswag_hi.yaml").read_text(), Loader=_AnyTag)
    assert config["process_docs"] == "!function toolkit.bench.process_hellaswag"
    assert config["fewshot_split"] == "test" and set(config["dataset_kwargs"]["data_files"]) == {"test"}
    assert by["arc", "en"].n_requests == 13 * 4 + 3


def test_limit_is_a_deterministic_seeded_sample(tmp_path, fixture_data):
    def chosen(seed, limit=5):
        (unit,) = load(tmp_path, fixture_data, ["arc"], ["en"], limit=limit, seed=seed)
        return [d["id"] for d in docs_of(unit)[0]]

    a = chosen(0)
    assert len(a) == 5 and a == chosen(0) and a != chosen(1)
    ranks = sorted(range(14), key=lambda k: bench._rank(0, f"arc_challenge/test/{k}"))[:5]
    assert sorted(a) == sorted(f"arc_challenge/test/{k}" for k in ranks)


def test_unknown_task_and_bad_file(tmp_path, fixture_data):
    with pytest.raises(UserError, match="unknown task"):
        bench.parse_tasks("arc,winogrande")
    broken = write_fixture(tmp_path / "broken", langs=("en",), n=3, hellaswag=())
    (broken / "arc_challenge" / "en_test.json").write_text("{not json")
    with pytest.raises(UserError, match="arc en"):
        load(tmp_path, broken, ["arc"], ["en"])


# ------------------------------------------------------------------------------------- hub / offline


def test_offline_hub_fails_fast_with_one_clear_error(tmp_path, monkeypatch):
    from jobs import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = Config.build({"run": {"preset": "tiny", "run": str(tmp_path / "run"), "langs": "hi"},
                        "eval": {"tasks": "arc,mmlu"}})
    start = time.time()
    with pytest.raises(HubUnreachable) as err:
        evaluate.run(cfg)
    assert time.time() - start < 5
    message = str(err.value)
    assert "hub is unreachable" in message and "--bench-data DIR" in message and "okapi" in message


def test_unreachable_endpoint_without_offline_flags(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    start = time.time()
    with pytest.raises(HubUnreachable, match="hub.invalid"):
        bench.check_hub(timeout=3)
    assert time.time() - start < 10


def test_hub_task_names():
    units = bench.plan_units(["arc", "mmlu", "hellaswag"], ["en", "hi"])
    assert [u.task for u in units] == ["arc_challenge", "arc_hi", "mmlu", "m_mmlu_hi", "hellaswag", "hellaswag_hi"]


# --------------------------------------------------------------------------------------- statistics


def test_correlation_on_known_numbers():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert bench.pearson(x, y) == pytest.approx(6 / math.sqrt(52), abs=1e-12)
    assert bench.spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)  # tied 7s share rank 3.5
    c = bench.correlation(x, [-v for v in y], seed=0, permutations=2000)
    assert c["n"] == 5 and c["pearson"] == pytest.approx(-6 / math.sqrt(52))
    assert 0 < c["pearson_p"] <= 1 and 0 < c["spearman_p"] <= 1
    perfect = bench.correlation([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12], permutations=5000)
    assert perfect["pearson"] == pytest.approx(1) and perfect["spearman"] == pytest.approx(1)
    assert perfect["pearson_p"] == pytest.approx(2 / 720, abs=0.004)  # two of 6! orders are as extreme
    assert bench.pearson([1, 2], [3, 4]) is None and bench.pearson([1, 1, 1], [1, 2, 3]) is None


def test_mean_gaps_and_gap_correlations(tmp_path):
    path = tmp_path / "gaps.csv"
    cols = ["language", "layer", "statistic", "value", "ci_low", "ci_high", "gap_pct", "gap_parallel_pct",
            "p_value", "n"]
    gaps = {"en": [0, 0], "hi": [-30, -10], "ml": [-25, -15], "es": [-2, -4], "ru": [-8, "nan"]}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for stat, scale in (("mass", 1), ("l0", 10)):
            for lang, values in gaps.items():
                for layer, v in enumerate(values):
                    w.writerow([lang, layer, stat, 1, 0, 2, v if v == "nan" else v * scale, 0, 0.5, 100])
    means = bench.mean_gaps(path, "mass")
    assert means == {"hi": -20.0, "ml": -20.0, "es": -3.0, "ru": -8.0}
    with pytest.raises(UserError, match="statistics"):
        bench.mean_gaps(path, None)
    results = [{"model": "base", "task": "arc", "language": c, "status": "ok", "acc": a}
               for c, a in {"en": 0.5, "hi": 0.2, "ml": 0.3, "es": 0.4, "ru": 0.35, "zh": 0.45}.items()]
    (corr,) = bench.gap_correlations(results, [], means)
    assert corr["languages"] == ["ru", "es", "ml", "hi"] and corr["n"] == 4
    assert corr["pearson"] == pytest.approx(bench.pearson([-8, -3, -20, -20], [0.35, 0.4, 0.3, 0.2]))


def test_exact_mcnemar_and_pairing():
    assert bench.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert bench.mcnemar_exact(2, 8) == pytest.approx(2 * 56 / 1024)
    assert bench.mcnemar_exact(1, 1) == 1.0 and bench.mcnemar_exact(0, 0) == 1.0
    base = bench.Scores({k: {"acc": a, "acc_norm": a} for k, a in zip("abcdef", [1, 1, 0, 0, 0, 1], strict=True)})
    adapted = bench.Scores({k: {"acc": a, "acc_norm": a} for k, a in zip("abcdeg", [1, 0, 1, 1, 0, 0], strict=True)})
    p = bench.paired(base, adapted)
    assert (p.n, p.base_only, p.adapted_only) == (5, 1, 2)  # f and g are not paired
    assert p.delta == pytest.approx(3 / 5 - 2 / 5) and p.p == bench.mcnemar_exact(1, 2)
    mean, se = bench.accuracy(np.array([1.0, 0.0, 1.0, 1.0]))
    assert mean == 0.75 and se == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)


# ------------------------------------------------------------------------------- end to end (tiny)


def _cfg(tmp_path, data, **extra) -> Config:
    return Config.build({"run": {"preset": "tiny", "run": str(tmp_path / "run"), "langs": "hi"},
                         "eval": {"tasks": "arc", "limit": 10, "bench_data": str(data), "batch_size": 4, **extra}})


def _items(run: Path) -> dict:
    with open(run / "eval" / "items.csv", newline="") as fh:
        out: dict = {}
        for r in csv.DictReader(fh):
            out.setdefault((r["model"], r["task"], r["language"]), {})[r["item"]] = r
    return out


def test_tiny_model_ten_arc_items_in_two_languages(tmp_path, fixture_data):
    from jobs import evaluate

    result = evaluate.run(_cfg(tmp_path, fixture_data))
    run = tmp_path / "run"
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
        assert len(list(csv.DictReader(fh))) == 2


def test_logit_window_reads_the_same_numbers_as_full_logits(tmp_path, fixture_data):
    from toolkit import models
    from toolkit.config import ModelConfig

    lm = models.load(ModelConfig(name="tiny"))
    units = load(tmp_path, fixture_data, ["arc", "mmlu"], ["en"], limit=6)
    fast, plain = bench.lm_wrapper(lm.model, lm.tokenizer, 4), bench.lm_wrapper(lm.model, lm.tokenizer, 4, fast=False)
    windows = []
    window = fast._window

    def spy(inps):
        windows.append((inps.shape[1], window(inps)))
        return windows[-1][1]

    fast._window = spy
    for unit in units:
        a, b = bench.evaluate_unit(fast, unit), bench.evaluate_unit(plain, unit)
        assert set(a.items) == set(b.items)
        for key in a.items:
            assert np.allclose(a.items[key]["lls"], b.items[key]["lls"], atol=1e-4), key
            assert a.items[key]["acc"] == b.items[key]["acc"] and a.items[key]["pred"] == b.items[key]["pred"]
    assert windows and all(k is not None for _, k in windows), "every call should match its requests"
    assert any(k < width for width, k in windows), "the window should skip context positions"


def _make_adapter(path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit import models
    from toolkit.config import ModelConfig

    lm = models.load(ModelConfig(name="tiny"))
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(lm.model, config).save_pretrained(str(path))


def test_adapter_against_base_on_the_same_items(tmp_path, fixture_data):
    from rich.console import Console

    from jobs import evaluate

    _make_adapter(tmp_path / "run" / "align" / "hi" / "adapter")
    console = Console(record=True, width=160)
    result = evaluate.run(_cfg(tmp_path, fixture_data, tasks="arc,hellaswag"), console=console)
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
        assert c["p_mcnemar"] == bench.mcnemar_exact(c["base_only"], c["adapted_only"])
        preds_differ |= any(base[k]["pred"] != adapted[k]["pred"] for k in base)
    assert len(result["comparisons"]) == 4 and preds_differ, "the adapter should change some predictions"
    text = console.export_text()
    assert "base vs adapted:hi" in text and "Δ acc" in text
    with open(tmp_path / "run" / "eval" / "results.csv", newline="") as fh:
        adapted_rows = [r for r in csv.DictReader(fh) if r["model"] == "adapted:hi"]
    assert len(adapted_rows) == 4 and all(r["p_mcnemar"] for r in adapted_rows)


def test_explicit_adapter_and_missing_language_in_the_report(tmp_path, fixture_data):
    from rich.console import Console

    from jobs import evaluate

    cfg = _cfg(tmp_path, fixture_data, tasks="hellaswag")
    cfg.run.langs = "zh"
    cfg.model.adapter = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="adapter_config.json"):
        evaluate.run(cfg)
    cfg.model.adapter = ""
    console = Console(record=True, width=160)
    result = evaluate.run(cfg, console=console)
    status = {r["language"]: r["status"] for r in result["results"]}
    assert status == {"en": "ok", "zh": "missing"}
    assert "missing" in console.export_text()
    assert evaluate.adapter_label(tmp_path / "align" / "ml" / "adapter") == "adapted:ml"
    assert evaluate.adapter_label(tmp_path / "my-lora") == "adapted:my-lora"
