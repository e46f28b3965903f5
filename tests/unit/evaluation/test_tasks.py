"""toolkit.evaluation.tasks: offline task generation from one template per benchmark, the seeded item
sample, hub task names and the offline-hub error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.unit.evaluation.okapi_fixtures import docs_of, load, write_fixture
from toolkit.config import Config
from toolkit.errors import HubUnreachable, UserError
from toolkit.evaluation import tasks
from toolkit.languages import LANGUAGES

ALL = list(LANGUAGES)
LM_EVAL_OKAPI = Path(__import__("lm_eval").__file__).parent / "tasks" / "okapi"


def test_all_ten_languages_from_the_shared_files(tmp_path, okapi):
    bench_tasks = load(tmp_path, okapi, ["arc", "mmlu"], ALL, limit=20)
    assert [(u.bench, u.lang) for u in bench_tasks] == [(b, c) for b in ("arc", "mmlu") for c in ALL]
    assert all(u.ok and u.n_items == 20 for u in bench_tasks), [u.missing for u in bench_tasks if not u.ok]
    assert sorted(p.name for p in (tmp_path / "tasks").glob("*.yaml")) == sorted(f"{u.task}.yaml" for u in bench_tasks)
    by = {(u.bench, u.lang): u for u in bench_tasks}
    for b in ("arc", "mmlu"):
        folder, split = ("arc_challenge", "test") if b == "arc" else ("mmlu", "val")
        ids = {c: {d["id"] for d in docs_of(by[b, c])[0]} for c in ALL}
        for c in ALL:  # the 20 lowest seeded ranks of each file; ids line up, so languages share most items
            file_ids = [r["id"] for r in json.loads((okapi / folder / f"{c}_{split}.json").read_text())]
            assert ids[c] == set(sorted(file_ids, key=lambda i: tasks._rank(0, i))[:20]), (b, c)
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
    ours = tasks.TEMPLATES
    mmlu = yaml.safe_load((LM_EVAL_OKAPI / "mmlu_multilingual" / "_default_yaml").read_text())
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "fewshot_config"):
        assert ours["mmlu"][key] == mmlu[key], key
    for name, folder, base in (("arc", "arc_multilingual", "_arc_yaml"),
                               ("hellaswag", "hellaswag_multilingual", "_hellaswag_yaml")):
        theirs = yaml.load((LM_EVAL_OKAPI / folder / base).read_text(), Loader=_AnyTag)
        assert theirs["output_type"] == "multiple_choice"
        for key in ("doc_to_text", "doc_to_choice"):
            assert ours[name][key] == theirs[key], (name, key)
        assert {m["metric"] for m in theirs["metric_list"]} == set(tasks.PAIRED_METRICS)


def test_fixture_tasks_hellaswag_three_options_and_a_missing_language(tmp_path, fixture_data):
    bench_tasks = load(tmp_path, fixture_data, ["arc", "mmlu", "hellaswag"], ["en", "zh", "hi"], shots=2)
    by = {(u.bench, u.lang): u for u in bench_tasks}
    missing = [(u.bench, u.lang) for u in bench_tasks if not u.ok]
    assert missing == [("arc", "zh"), ("mmlu", "zh"), ("hellaswag", "zh")]
    assert "zh_val.json" in by["hellaswag", "zh"].missing
    assert by["arc", "hi"].n_items == 13 and by["arc", "en"].n_items == 14  # hi lacks one item
    docs, task = docs_of(by["hellaswag", "hi"])
    doc = next(d for d in docs if d["ind"] == 1003)
    assert task.doc_to_text(doc) == "hi activity 3: hi someone does 3. Then they"
    assert task.doc_to_choice(doc) == [f"hi ending {j} " for j in range(4)]  # lm-eval strips, then drops [..]
    assert task.doc_to_target(doc) == 3
    assert tasks.item_key(doc, 0) == "1003"
    docs, task = docs_of(by["arc", "en"])
    three = next(d for d in docs if d["id"].endswith("/2"))
    assert len(task.doc_to_choice(three)) == 3 and "[title]" not in task.doc_to_text(three)
    # hellaswag has no train file: few-shot examples come from the val split itself
    config = yaml.load((tmp_path / "tasks" / "lingogap_hellaswag_hi.yaml").read_text(), Loader=_AnyTag)
    assert config["process_docs"] == "!function toolkit.evaluation.tasks.process_hellaswag"
    assert config["fewshot_split"] == "test" and set(config["dataset_kwargs"]["data_files"]) == {"test"}
    assert by["arc", "en"].n_requests == 13 * 4 + 3


def test_limit_is_a_deterministic_seeded_sample(tmp_path, fixture_data):
    def chosen(seed, limit=5):
        (bt,) = load(tmp_path, fixture_data, ["arc"], ["en"], limit=limit, seed=seed)
        return [d["id"] for d in docs_of(bt)[0]]

    a = chosen(0)
    assert len(a) == 5 and a == chosen(0) and a != chosen(1)
    ranks = sorted(range(14), key=lambda k: tasks._rank(0, f"arc_challenge/test/{k}"))[:5]
    assert sorted(a) == sorted(f"arc_challenge/test/{k}" for k in ranks)


def test_unknown_task_and_bad_file(tmp_path, fixture_data):
    with pytest.raises(UserError, match="unknown task"):
        tasks.parse_tasks("arc,winogrande")
    broken = write_fixture(tmp_path / "broken", langs=("en",), n=3, hellaswag=())
    (broken / "arc_challenge" / "en_test.json").write_text('[\n {"id": "a",\n  not json}]')
    with pytest.raises(UserError, match=r"en_test.json: line 3: malformed JSON"):
        load(tmp_path, broken, ["arc"], ["en"])


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_bad_benchmark_items_are_refused_with_file_and_id(tmp_path):
    data = write_fixture(tmp_path / "data", langs=("en", "hi"), n=4, hellaswag=("en",))
    mmlu = data / "mmlu" / "hi_dev.json"
    rows = _rows(mmlu)
    del rows[2]["option_c"]
    mmlu.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"hi_dev.json: item mmlu/dev/2: no option_c"):
        tasks.plan(["mmlu"], ["hi"], str(data))
    arc = data / "arc_challenge" / "en_test.json"
    rows = _rows(arc)
    arc.write_text(json.dumps(rows + [rows[1]]))
    with pytest.raises(UserError, match=r"en_test.json: item arc_challenge/test/1: duplicate id"):
        tasks.plan(["arc"], ["en"], str(data))
    rows[3]["answer"] = "E"
    arc.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"item arc_challenge/test/3: answer 'E' points at no option"):
        tasks.plan(["arc"], ["en"], str(data))
    hs = data / "hellaswag" / "en_val.json"
    hs.write_text("\n".join(json.dumps(r) for r in _rows(hs)[:2]) + "\n{oops\n")  # JSON lines
    with pytest.raises(UserError, match=r"en_val.json: line 3: malformed JSON"):
        tasks.plan(["hellaswag"], ["en"], str(data))


def test_a_missing_language_names_its_file_and_the_languages_present(tmp_path):
    data = write_fixture(tmp_path / "data", langs=("en", "hi"), n=3, hellaswag=())
    (bt,) = tasks.plan(["arc"], ["ml"], str(data))
    assert not bt.ok and "no ml_test.json in" in bt.missing and bt.missing.endswith("it has en, hi")


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
        tasks.check_hub(timeout=3)
    assert time.time() - start < 10


def test_hub_task_names():
    bench_tasks = tasks.plan(["arc", "mmlu", "hellaswag"], ["en", "hi"])
    assert [u.task for u in bench_tasks] == ["arc_challenge", "arc_hi", "mmlu", "m_mmlu_hi", "hellaswag",
                                             "hellaswag_hi"]


# --------------------------------------------------------------------------------------- statistics


def test_shots_offline_from_validation_for_arc_and_dev_for_mmlu(tmp_path, fixture_data):
    """--shots N: ARC's examples come from its validation file, MMLU's are the first N of its dev file, the
    same for every model, and the scorer takes the longer contexts."""
    import json as json_

    from lm_eval import evaluator

    from toolkit import models
    from toolkit.config import ModelConfig
    from toolkit.evaluation import scoring

    tiny = models.load(ModelConfig(name="tiny"))
    lm = scoring.lm_wrapper(tiny.model, tiny.tokenizer, 4)
    for bench, shot_split in (("arc", "validation"), ("mmlu", "dev")):
        (bt,) = load(tmp_path, fixture_data, [bench], ["hi"], limit=3, shots=2)
        contexts = {}
        for _ in range(2):  # twice: the examples are seeded, so base and adapted models see the same ones
            for task in bt.loaded["tasks"].values():
                task.set_fewshot_seed(0)
            out = evaluator.evaluate(lm=lm, task_dict=bt.loaded, samples=bt.samples, log_samples=True,
                                     bootstrap_iters=0)
            for row in next(iter(out["samples"].values())):
                first = row["arguments"][0]  # one (context, choice) request per choice: they share the context
                contexts.setdefault(row["doc"]["id"], set()).add(first[0] if isinstance(first, list | tuple) else
                                                                 json_.dumps(first, ensure_ascii=False))
        for seen in contexts.values():
            (text,) = seen
            assert text.count(f"{shot_split} question") == 2, (bench, text)
            assert text.count("test question") + text.count("val question") == 1
        if bench == "mmlu":  # lm-eval's first_n sampler: dev items 0 and 1
            assert all(f"{shot_split} question 0" in t and f"{shot_split} question 1" in t
                       for seen in contexts.values() for t in seen)
        assert scoring.evaluate(lm, bt).n == 3
