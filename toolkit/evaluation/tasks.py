"""Benchmark tasks for lm-eval: one YAML template per benchmark filled per language, and the seeded item sample.

See the package doc (`toolkit.evaluation`) for the sources of tasks, the splits and the item selection.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from toolkit.errors import HubUnreachable, UserError
from toolkit.evaluation import benchdata
from toolkit.languages import LANGUAGES, REFERENCE

PAIRED_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Benchmark:
    key: str  # our name: arc, mmlu, hellaswag
    title: str
    folder: str  # sub-folder of --bench-data
    test_split: str  # the split that is scored
    fewshot_splits: tuple[str, ...]  # first file present supplies few-shot examples, else the test split
    hub_task: str  # lm-eval task for a non-English language, with {lang} = Okapi code
    hub_english: str  # lm-eval task (or group) for English
    primary: str  # the metric to read first (see toolkit.evaluation.metrics)


# ARC and HellaSwag choices are texts of different lengths, compared per character (as acc_norm is, the
# metric they are usually reported with); MMLU's are the letters A-D, where normalising changes nothing.
BENCHMARKS: dict[str, Benchmark] = {
    "arc": Benchmark("arc", "ARC-Challenge", "arc_challenge", "test", ("validation",), "arc_{lang}", "arc_challenge",
                     "p_gold_norm"),
    "mmlu": Benchmark("mmlu", "MMLU", "mmlu", "val", ("dev",), "m_mmlu_{lang}", "mmlu", "p_gold"),
    "hellaswag": Benchmark("hellaswag", "HellaSwag", "hellaswag", "val", ("train",), "hellaswag_{lang}", "hellaswag",
                           "p_gold_norm"),
}


class Function(str):
    """A dotted function name that the YAML writer emits as lm-eval's ``!function`` tag."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))

_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in PAIRED_METRICS]
_COMMON: dict[str, Any] = {"dataset_path": "json", "output_type": "multiple_choice", "metric_list": _METRICS}

# Per-benchmark fields, as in lm-eval's tasks/okapi/{arc,mmlu,hellaswag}_multilingual; `task_config` adds
# the task name, data files and splits. HellaSwag scores `gold` (= int(label), set by lm-eval's Okapi
# process_docs) rather than `label.lstrip()`, so integer labels work too.
TEMPLATES: dict[str, dict[str, Any]] = {
    "arc": {"process_docs": Function("toolkit.evaluation.tasks.process_arc"), "doc_to_text": "query",
            "doc_to_target": "gold", "doc_to_choice": "choices", "metadata": {"version": 2.0}},
    "mmlu": {"doc_to_text": "{{instruction.strip()}}\nA. {{option_a}}\nB. {{option_b}}\nC. {{option_c}}\n"
                            "D. {{option_d}}\nAnswer:",
             "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
             "fewshot_config": {"sampler": "first_n"}, "metadata": {"version": 0.0}},
    "hellaswag": {"process_docs": Function("toolkit.evaluation.tasks.process_hellaswag"), "doc_to_text": "query",
                  "doc_to_target": "gold", "doc_to_choice": "choices", "metadata": {"version": 1.0}},
}


def process_arc(dataset):
    """lm-eval's Okapi ARC preprocessing; it reads `option_e`, which 4-option files may lack."""
    from lm_eval.tasks.okapi.arc_multilingual import utils

    if "option_e" not in dataset.column_names:
        dataset = dataset.add_column("option_e", [None] * len(dataset))
    return utils.process_docs(dataset)


def process_hellaswag(dataset):
    from lm_eval.tasks.okapi.hellaswag_multilingual import utils

    return utils.process_docs(dataset)


@dataclass
class BenchTask:
    """One benchmark in one language: the lm-eval task that scores it, or why it is missing."""

    bench: str
    lang: str
    task: str | None = None  # lm-eval task or group name
    files: dict[str, str] = field(default_factory=dict)  # split -> JSON file (offline tasks)
    missing: str = ""  # reason, when the language has no data for this benchmark
    loaded: dict | None = None  # TaskManager.load() output
    samples: dict[str, list[int]] = field(default_factory=dict)  # leaf task -> selected doc indices
    n_requests: int = 0  # loglikelihood requests per model (one per choice)

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def n_items(self) -> int:
        return sum(len(v) for v in self.samples.values())


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in BENCHMARKS]
    if unknown or not names:
        raise UserError(f"eval.tasks: unknown task(s) {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def okapi_files(bench_data: str | Path, bench: str, lang: str) -> dict[str, str]:
    """{"test": file, "fewshot": file} for one language; empty when the evaluated split has no file."""
    b = BENCHMARKS[bench]
    code = LANGUAGES[lang].okapi
    folder = Path(bench_data) / b.folder
    test = folder / f"{code}_{b.test_split}.json"
    if not test.is_file():
        return {}
    fewshot = next((folder / f"{code}_{s}.json" for s in b.fewshot_splits
                    if (folder / f"{code}_{s}.json").is_file()), test)
    return {"test": str(test.resolve()), "fewshot": str(fewshot.resolve())}


def task_name(bench: str, lang: str) -> str:
    return f"lingogap_{bench}_{lang}"


def task_config(bench: str, lang: str, files: dict[str, str]) -> dict[str, Any]:
    """The template of `bench` filled for one language: an lm-eval task config."""
    splits = {"test": files["test"]}
    if files["fewshot"] != files["test"]:
        splits["fewshot"] = files["fewshot"]
    return {
        "task": task_name(bench, lang),
        "tag": [f"lingogap_{bench}"],
        **_COMMON,
        "dataset_kwargs": {"data_files": splits},
        "test_split": "test",
        "fewshot_split": "fewshot" if "fewshot" in splits else "test",
        **TEMPLATES[bench],
    }


def write_task_yamls(bench_tasks: Iterable[BenchTask], folder: str | Path) -> Path:
    """Write one YAML per present benchmark task into `folder` (an include path for lm-eval); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("lingogap_*.yaml"):
        old.unlink()
    for bt in bench_tasks:
        if bt.ok:
            text = yaml.dump(task_config(bt.bench, bt.lang, bt.files), Dumper=_TaskDumper,
                             allow_unicode=True, sort_keys=False)
            (folder / f"{bt.task}.yaml").write_text(text)
    return folder


def plan(benches: list[str], langs: list[str], bench_data: str = "") -> list[BenchTask]:
    """Every benchmark x language, with its task name (offline) or its hub task name."""
    bench_tasks = []
    for bench in benches:
        for lang in langs:
            if bench_data:
                files = okapi_files(bench_data, bench, lang)
                if files:
                    for path in dict.fromkeys(files.values()):
                        benchdata.check_file(path, bench)
                    bench_tasks.append(BenchTask(bench, lang, task_name(bench, lang), files))
                else:
                    bench_tasks.append(BenchTask(bench, lang, missing=_missing(bench_data, bench, lang)))
            else:
                b = BENCHMARKS[bench]
                name = b.hub_english if lang == REFERENCE else b.hub_task.format(lang=LANGUAGES[lang].okapi)
                bench_tasks.append(BenchTask(bench, lang, name))
    return bench_tasks


def _missing(bench_data: str, bench: str, lang: str) -> str:
    """Which file a language lacks, and the languages that the folder does have."""
    b = BENCHMARKS[bench]
    where = Path(bench_data) / b.folder
    codes = {info.okapi: code for code, info in LANGUAGES.items()}
    present = sorted(codes.get(f.name.removesuffix(f"_{b.test_split}.json"), f.name.split("_")[0])
                     for f in where.glob(f"*_{b.test_split}.json"))
    have = f"it has {', '.join(present)}" if present else "it has no language (or does not exist)"
    return f"no {LANGUAGES[lang].okapi}_{b.test_split}.json in {where}; {have}"


def check_hub(timeout: float = 5.0) -> None:
    """Fail fast, before lm-eval indexes its tasks and datasets retries, when the hub cannot be reached."""
    advice = ("pass --bench-data DIR with Okapi-format JSON files (e.g. ../shared/data/okapi) to run the "
              "benchmarks offline")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise HubUnreachable(f"the Hugging Face hub is unreachable ({var} is set), so lm-eval's Okapi "
                                 f"benchmark datasets cannot be downloaded; {advice}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise HubUnreachable(f"the Hugging Face hub is unreachable ({endpoint.hostname}:{port}: {exc}), so "
                             f"lm-eval's Okapi benchmark datasets cannot be downloaded; {advice}") from None


def task_manager(bench_tasks: list[BenchTask], bench_data: str, include_dir: str | Path | None):
    """lm-eval's TaskManager over our generated YAMLs (offline) or over its own tasks (hub)."""
    from lm_eval.tasks import TaskManager

    if bench_data:
        if include_dir is None:
            raise ValueError("offline tasks need an include folder for their YAML files")
        return TaskManager(include_path=str(write_task_yamls(bench_tasks, include_dir)), include_defaults=False)
    check_hub()
    tm = TaskManager()
    known = set(tm.all_tasks) | set(tm.all_groups)
    for bt in bench_tasks:
        if bt.task not in known:
            bt.missing, bt.task = f"lm-eval has no task {bt.task}", None
    return tm


def load(bench_tasks: list[BenchTask], bench_data: str = "", include_dir: str | Path | None = None, shots: int = 0,
               limit: int = 0, seed: int = 0) -> list[BenchTask]:
    """Build each present benchmark task's lm-eval tasks, set the shots and choose its items (see the module doc)."""
    import datasets

    tm = task_manager(bench_tasks, bench_data, include_dir)
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one "Generating split" and "Map" bar per file and split otherwise
    try:
        for bt in bench_tasks:
            if bt.ok:
                _load_one(tm, bt, bench_data, shots, limit, seed)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return bench_tasks


def _load_one(tm, bt: BenchTask, bench_data: str, shots: int, limit: int, seed: int) -> None:
    """Build one benchmark task's tasks, set its shots and choose its items."""
    try:
        bt.loaded = tm.load([bt.task])
    except (ConnectionError, OSError) as exc:
        if bench_data:
            raise UserError(f"{bt.bench} {bt.lang}: cannot read {bt.files['test']}: {exc}") from None
        raise HubUnreachable(f"{bt.task}: the Hugging Face hub is unreachable ({exc}); pass --bench-data DIR "
                             "with Okapi-format JSON files (e.g. ../shared/data/okapi)") from None
    except Exception as exc:  # datasets reports malformed JSON with its own exception classes
        if not bench_data:
            raise
        raise UserError(f"{bt.bench} {bt.lang}: lm-eval could not build a task from {bt.files}: "
                        f"{type(exc).__name__}: {exc}") from None
    for task in bt.loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=shots)
    bt.samples, bt.n_requests = select_items(bt.loaded["tasks"], limit, seed)
    if not bt.n_items:
        bt.missing = f"{bt.task} has no items"


def item_key(doc: dict, index: int) -> str:
    for name in ("id", "ind"):
        if doc.get(name) not in (None, ""):
            return str(doc[name])
    return f"#{index}"


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def select_items(tasks: dict, limit: int, seed: int) -> tuple[dict[str, list[int]], int]:
    """Sorted doc indices per leaf task (lm-eval's `samples`) and the loglikelihood requests they need."""
    several = len(tasks) > 1
    keyed = []
    for name, task in tasks.items():
        for i, doc in enumerate(task.eval_docs):
            keyed.append((_rank(seed, f"{name}/{item_key(doc, i)}" if several else item_key(doc, i)), name, i, doc))
    if limit:
        keyed = sorted(keyed, key=lambda k: k[0])[:limit]
    samples: dict[str, list[int]] = {}
    requests = 0
    for _, name, i, doc in keyed:
        samples.setdefault(name, []).append(i)
        requests += len(tasks[name].doc_to_choice(doc))
    # lm-eval walks the docs in dataset order and maps the k-th one back to samples[k]: keep them sorted.
    return {name: sorted(ids) for name, ids in samples.items()}, requests
