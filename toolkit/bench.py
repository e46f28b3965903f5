"""Multilingual ARC-Challenge, MMLU and HellaSwag through lm-eval, base vs adapted, tied to the gaps.

Two sources of tasks, one code path after loading:

- hub (``eval.bench_data`` empty): lm-eval's own Okapi tasks ``arc_{lang}``, ``m_mmlu_{lang}`` and
  ``hellaswag_{lang}``, and the English originals ``arc_challenge``, ``mmlu`` (a group of 57 subjects)
  and ``hellaswag``, each with its own splits and prompts (the English ``mmlu`` prompt names the subject,
  the Okapi one does not). Offline this fails at once with `HubUnreachable`.
- Okapi-format JSON (``--bench-data DIR``): one template per benchmark (`TEMPLATES`) is filled per
  language and written as a task YAML to an include folder that lm-eval's `TaskManager` reads
  (``dataset_path: json``). Prompts, choices and targets are those of lm-eval's Okapi tasks; ARC and
  HellaSwag documents go through lm-eval's own Okapi ``process_docs``.

  ========== ============================== ================ ===================================
  benchmark  evaluated split (file)         few-shot split   prompt
  ========== ============================== ================ ===================================
  arc        ``arc_challenge/{l}_test``     ``_validation``  ``Question: {q}\\nAnswer:`` -> option texts
  mmlu       ``mmlu/{l}_val``               ``_dev`` first_n  question, ``A. .. D.``, ``Answer:`` -> letters
  hellaswag  ``hellaswag/{l}_val``          ``_train``, else  ``{activity}: {ctx_a} {Ctx_b}`` -> endings
                                            ``_val``
  ========== ============================== ================ ===================================

  A language without its evaluated file is reported as ``missing``; a missing few-shot file falls
  back to the evaluated split (lm-eval never shows an item as its own example).

Item selection (``eval.limit`` = N > 0): every item of a task gets the rank
``sha256(f"{seed}:{item_id}")`` and the N lowest ranks are evaluated. This is a seeded sample that does
not depend on file order, and since an item keeps its id in every language, the languages share as
many items as the files allow. Every model of a run is scored on exactly these items, so base and
adapted are paired item by item. Item ids are ``id``, else ``ind``, else the row number.

Defaults (`toolkit.config.EvalConfig`): 0 shots, every item (``eval.limit`` 0), lm-eval batch size 8,
seed ``run.seed`` (0) for the item sample, the few-shot sampler and torch.

Statistics: accuracy and length-normalised accuracy (lm-eval's ``acc`` and ``acc_norm``; for MMLU,
whose choices are single letters, they coincide), standard error = sample standard deviation / sqrt(n)
(lm-eval's ``mean_stderr``); adapted - base with an exact two-sided McNemar test on per-item
correctness (a sign test on the discordant items). Correlations across languages (English excluded)
between the mean over layers of ``gap_pct`` from ``RUN/reports/gaps.csv`` and accuracy: Pearson and
Spearman (average ranks for ties) with a seeded permutation p-value.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import yaml

from toolkit.errors import HubUnreachable, UserError
from toolkit.languages import LANGUAGES, REFERENCE

PAIRED_METRICS = ("acc", "acc_norm")
CHANCE = 0.25  # four options (a few ARC items have three or five)
PERMUTATIONS = 10_000


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Benchmark:
    key: str  # our name: arc, mmlu, hellaswag
    title: str
    folder: str  # sub-folder of --bench-data
    test_split: str  # the split that is scored
    fewshot_splits: tuple[str, ...]  # first file present supplies few-shot examples, else the test split
    hub_task: str  # lm-eval task for a non-English language, with {lang} = Okapi code
    hub_english: str  # lm-eval task (or group) for English


BENCHMARKS: dict[str, Benchmark] = {
    "arc": Benchmark("arc", "ARC-Challenge", "arc_challenge", "test", ("validation",), "arc_{lang}", "arc_challenge"),
    "mmlu": Benchmark("mmlu", "MMLU", "mmlu", "val", ("dev",), "m_mmlu_{lang}", "mmlu"),
    "hellaswag": Benchmark("hellaswag", "HellaSwag", "hellaswag", "val", ("train",), "hellaswag_{lang}", "hellaswag"),
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
    "arc": {"process_docs": Function("toolkit.bench.process_arc"), "doc_to_text": "query",
            "doc_to_target": "gold", "doc_to_choice": "choices", "metadata": {"version": 2.0}},
    "mmlu": {"doc_to_text": "{{instruction.strip()}}\nA. {{option_a}}\nB. {{option_b}}\nC. {{option_c}}\n"
                            "D. {{option_d}}\nAnswer:",
             "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
             "fewshot_config": {"sampler": "first_n"}, "metadata": {"version": 0.0}},
    "hellaswag": {"process_docs": Function("toolkit.bench.process_hellaswag"), "doc_to_text": "query",
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
class Unit:
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


def write_task_yamls(units: Iterable[Unit], folder: str | Path) -> Path:
    """Write one YAML per present unit into `folder` (an include path for lm-eval); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("lingogap_*.yaml"):
        old.unlink()
    for unit in units:
        if unit.ok:
            text = yaml.dump(task_config(unit.bench, unit.lang, unit.files), Dumper=_TaskDumper,
                             allow_unicode=True, sort_keys=False)
            (folder / f"{unit.task}.yaml").write_text(text)
    return folder


def plan_units(benches: list[str], langs: list[str], bench_data: str = "") -> list[Unit]:
    """Every benchmark x language, with its task name (offline) or its hub task name."""
    units = []
    for bench in benches:
        for lang in langs:
            if bench_data:
                files = okapi_files(bench_data, bench, lang)
                if files:
                    units.append(Unit(bench, lang, task_name(bench, lang), files))
                else:
                    where = Path(bench_data) / BENCHMARKS[bench].folder
                    units.append(Unit(bench, lang, missing=f"no {LANGUAGES[lang].okapi}_"
                                      f"{BENCHMARKS[bench].test_split}.json in {where}"))
            else:
                b = BENCHMARKS[bench]
                name = b.hub_english if lang == REFERENCE else b.hub_task.format(lang=LANGUAGES[lang].okapi)
                units.append(Unit(bench, lang, name))
    return units


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


def task_manager(units: list[Unit], bench_data: str, include_dir: str | Path | None):
    """lm-eval's TaskManager over our generated YAMLs (offline) or over its own tasks (hub)."""
    from lm_eval.tasks import TaskManager

    if bench_data:
        if include_dir is None:
            raise ValueError("offline tasks need an include folder for their YAML files")
        return TaskManager(include_path=str(write_task_yamls(units, include_dir)), include_defaults=False)
    check_hub()
    tm = TaskManager()
    known = set(tm.all_tasks) | set(tm.all_groups)
    for unit in units:
        if unit.task not in known:
            unit.missing, unit.task = f"lm-eval has no task {unit.task}", None
    return tm


def load_units(units: list[Unit], bench_data: str = "", include_dir: str | Path | None = None, shots: int = 0,
               limit: int = 0, seed: int = 0) -> list[Unit]:
    """Build each present unit's lm-eval tasks, set the shots and choose its items (see the module doc)."""
    import datasets

    tm = task_manager(units, bench_data, include_dir)
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one "Generating split" and "Map" bar per file and split otherwise
    try:
        for unit in units:
            if unit.ok:
                _load_unit(tm, unit, bench_data, shots, limit, seed)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return units


def _load_unit(tm, unit: Unit, bench_data: str, shots: int, limit: int, seed: int) -> None:
    """Build one unit's tasks, set its shots and choose its items."""
    try:
        unit.loaded = tm.load([unit.task])
    except (ConnectionError, OSError) as exc:
        if bench_data:
            raise UserError(f"{unit.bench} {unit.lang}: cannot read {unit.files['test']}: {exc}") from None
        raise HubUnreachable(f"{unit.task}: the Hugging Face hub is unreachable ({exc}); pass --bench-data DIR "
                             "with Okapi-format JSON files (e.g. ../shared/data/okapi)") from None
    except Exception as exc:  # datasets reports malformed JSON with its own exception classes
        if not bench_data:
            raise
        raise UserError(f"{unit.bench} {unit.lang}: lm-eval could not build a task from {unit.files}: "
                        f"{type(exc).__name__}: {exc}") from None
    for task in unit.loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=shots)
    unit.samples, unit.n_requests = select_items(unit.loaded["tasks"], limit, seed)
    if not unit.n_items:
        unit.missing = f"{unit.task} has no items"


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


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class Scores:
    """Per-item correctness of one model on one unit."""

    items: dict[str, dict]  # key -> {"acc": 0/1, "acc_norm": 0/1, "pred": argmax, "gold": target, "lls": per choice}

    @property
    def n(self) -> int:
        return len(self.items)

    def values(self, metric: str) -> np.ndarray:
        return np.array([v[metric] for v in self.items.values()], dtype=float)


def lm_wrapper(model, tokenizer, batch_size: int, fast: bool = True):
    """lm-eval's HFLM over an in-memory model, with its per-call progress bar off (we show our own).

    With `fast`, each model call returns logits for the last K positions of the batch only, K being
    the smallest window that holds every row's continuation (transformers' `logits_to_keep`). lm-eval
    locates continuations relative to the end of the returned logits (its handling of prefix-tuning
    "virtual tokens"), so it reads the same numbers while the vocabulary projection and lm-eval's
    log-softmax skip most context positions: with Gemma 3 270M's 262k-token vocabulary they take about
    a third of a full forward on CPU. A call it cannot match to its requests gets the full logits."""
    import inspect

    import torch
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        _needed: dict[tuple[int, ...], int] = {}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if fast:  # each row is (context + continuation)[-(max_length + 1):][:-1], right-padded with 0
                self._needed = {}
                for _, context, continuation in requests:
                    key = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                    self._needed[key] = max(self._needed.get(key, 0), len(continuation))
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            finally:
                self._needed = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            keep = self._window(inps) if self._needed and attn_mask is None and labels is None else None
            if keep is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            with torch.no_grad():
                return self.model(inps, logits_to_keep=keep).logits

        def _window(self, inps) -> int | None:
            """Positions from the end of the padded batch back to the earliest continuation token."""
            width = inps.shape[1]
            start = width
            for row in inps.tolist():
                n = len(row)
                while n and row[n - 1] == 0:
                    n -= 1
                length = self._needed.get(tuple(row[:n]))
                if length is None:
                    return None
                start = min(start, n - length)
            return width - max(start, 0)

    # Stripping padding is exact only when token 0 is a special token that prompts never contain.
    fast = (fast and 0 in getattr(tokenizer, "all_special_ids", [])
            and "logits_to_keep" in inspect.signature(model.forward).parameters)
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns that a model object ignores loading arguments: we know
    try:
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        log.setLevel(level)


def evaluate_unit(lm, unit: Unit, seed: int = 0) -> Scores:
    """Score one unit's selected items with lm-eval; per-item results come from its logged samples."""
    import torch
    from lm_eval import evaluator

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for task in unit.loaded["tasks"].values():
        task.set_fewshot_seed(seed)  # the same few-shot examples for every model
    out = evaluator.evaluate(lm=lm, task_dict=unit.loaded, samples=unit.samples, log_samples=True,
                             bootstrap_iters=0)
    several = len(unit.loaded["tasks"]) > 1
    items: dict[str, dict] = {}
    for name, rows in out["samples"].items():
        task = unit.loaded["tasks"][name]
        for row in rows:
            gold = row["target"]
            if not isinstance(gold, int):  # MMLU's target is a letter among its choices
                gold = list(task.doc_to_choice(row["doc"])).index(gold)
            key = item_key(row["doc"], row["doc_id"])
            lls = [float(resp[0]) for resp in row["filtered_resps"]]
            items[f"{name}/{key}" if several else key] = {
                **{m: float(row[m]) for m in PAIRED_METRICS}, "pred": int(np.argmax(lls)), "gold": gold, "lls": lls}
    return Scores(items)


# ---------------------------------------------------------------------------------------- statistics


def accuracy(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(n), as lm-eval's mean_stderr)."""
    if len(values) == 0:
        return None, None
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), se


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial sign test at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass
class Paired:
    n: int
    base: float
    adapted: float
    delta: float
    base_only: int  # right before, wrong after
    adapted_only: int  # wrong before, right after
    p: float


def paired(base: Scores, adapted: Scores, metric: str = "acc") -> Paired:
    """adapted - base on the items both scored, with the exact McNemar test."""
    keys = sorted(set(base.items) & set(adapted.items))
    if not keys:
        return Paired(0, math.nan, math.nan, math.nan, 0, 0, math.nan)
    a = np.array([base.items[k][metric] for k in keys]) > 0.5
    b = np.array([adapted.items[k][metric] for k in keys]) > 0.5
    base_only, adapted_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return Paired(len(keys), float(a.mean()), float(b.mean()), float(b.mean() - a.mean()), base_only,
                  adapted_only, mcnemar_exact(base_only, adapted_only))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(x: Iterable[float], y: Iterable[float]) -> float | None:
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else None


def spearman(x: Iterable[float], y: Iterable[float]) -> float | None:
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else None


def correlation(x: list[float], y: list[float], seed: int = 0, permutations: int = PERMUTATIONS) -> dict:
    """Pearson and Spearman with n and two-sided permutation p-values (seeded, `permutations` shuffles)."""
    r, rho = pearson(x, y), spearman(x, y)
    out = {"n": len(x), "pearson": r, "spearman": rho, "pearson_p": None, "spearman_p": None}
    if r is None or rho is None:
        return out
    rng = np.random.default_rng(seed)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rx, ry = _ranks(xa), _ranks(ya)
    shuffles = np.array([rng.permutation(len(xa)) for _ in range(permutations)])

    def p_value(a: np.ndarray, b: np.ndarray, observed: float) -> float:
        a, b = a - a.mean(), b - b.mean()
        perm = b[shuffles]  # (permutations, n)
        stats = perm @ a / math.sqrt(float(a @ a) * float(b @ b))
        return float((1 + np.sum(np.abs(stats) >= abs(observed) - 1e-12)) / (1 + permutations))

    out["pearson_p"] = p_value(xa, ya, r)
    out["spearman_p"] = p_value(rx, ry, rho)
    return out


def mean_gaps(path: str | Path, statistic: str | None = None) -> dict[str, float]:
    """Mean over layers of gap_pct per language from a tidy gaps.csv, the reference excluded.

    With several statistics in the file, `statistic` picks one (default: the only one there)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"language", "gap_pct"} - set(rows[0] if rows else {})
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(sorted(missing))}; expected a gaps.csv from `report`")
    stats = {r.get("statistic", "") for r in rows}
    if len(stats) > 1:
        if statistic not in stats:
            raise UserError(f"{path} holds statistics {', '.join(sorted(stats))}; choose one with --stat")
        rows = [r for r in rows if r.get("statistic") == statistic]
    per_lang: dict[str, list[float]] = {}
    for r in rows:
        try:
            value = float(r["gap_pct"])
        except ValueError:
            continue
        if r["language"] != REFERENCE and math.isfinite(value):
            per_lang.setdefault(r["language"], []).append(value)
    return {lang: float(np.mean(v)) for lang, v in per_lang.items() if v}


def correlations(gaps: dict[str, float], values: dict[str, float], seed: int = 0) -> dict:
    """Correlation between mean gap and a per-language value over the languages that have both."""
    langs = [lang for lang in LANGUAGES if lang in gaps and lang in values and lang != REFERENCE
             and values[lang] is not None and math.isfinite(values[lang])]
    return {"languages": langs, **correlation([gaps[c] for c in langs], [values[c] for c in langs], seed)}


# ------------------------------------------------------------------------------------------- outputs


def figure(results: list[dict], path: str | Path, metric: str = "acc") -> Path:
    """Accuracy per language, one panel per benchmark, a bar per model with standard-error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in results if r["status"] == "ok"]
    benches = [b for b in BENCHMARKS if any(r["task"] == b for r in ok)]
    models = list(dict.fromkeys(r["model"] for r in ok))
    fig = Figure(figsize=(max(6.0, 0.9 * len(LANGUAGES) * max(1, len(models)) / 1.6), 3.2 * max(1, len(benches))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(benches)), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(models))
    for ax, bench in zip(axes, benches, strict=False):
        langs = [c for c in LANGUAGES if any(r["task"] == bench and r["language"] == c for r in ok)]
        for k, model in enumerate(models):
            rows = {r["language"]: r for r in ok if r["task"] == bench and r["model"] == model}
            xs = [i + (k - (len(models) - 1) / 2) * width for i, c in enumerate(langs) if c in rows]
            ys = [rows[c][metric] for c in langs if c in rows]
            es = [rows[c][f"{metric}_stderr"] or 0.0 for c in langs if c in rows]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=model)
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.set_title(BENCHMARKS[bench].title)
        ax.legend(fontsize="small", ncols=min(4, len(models) + 1), loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return Path(path)


CSV_COLUMNS = ["model", "task", "language", "status", "lm_eval_task", "n", "acc", "acc_stderr", "acc_norm",
               "acc_norm_stderr", "base_acc", "delta_acc", "delta_acc_norm", "base_only", "adapted_only",
               "p_mcnemar", "retention_pct", "note"]


def write_csv(results: list[dict], comparisons: list[dict], path: str | Path) -> Path:
    """One row per model x task x language; adapted rows carry their paired comparison with the base."""
    pairs = {(c["model"], c["task"], c["language"]): c for c in comparisons}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            c = pairs.get((r["model"], r["task"], r["language"]), {})
            writer.writerow({**r, **{k: c.get(k) for k in CSV_COLUMNS[10:17]}})
    return Path(path)


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def tables(result: dict) -> list:
    """Rich tables: task x language with base, adapted, delta and p; then the gap correlations."""
    from rich.table import Table

    rows = result["results"]
    labels = [m["label"] for m in result["models"]]
    adapted = [m for m in labels if m != "base"]
    by = {(r["model"], r["task"], r["language"]): r for r in rows}
    pairs = {(c["model"], c["task"], c["language"]): c for c in result["comparisons"]}
    keys = list(dict.fromkeys((r["task"], r["language"]) for r in rows))
    cfg = result["config"]
    items = f"{cfg['limit']} items per task and language (seeded sample)" if cfg["limit"] else "all items"
    caption = (f"{cfg['shots']}-shot · {items} · acc ± standard error · p: exact McNemar on paired items · "
               f"chance {CHANCE:.2f}")
    out = []
    for model in adapted or labels:
        t = Table(title=f"benchmark accuracy: {'base vs ' + model if adapted and 'base' in labels else model}",
                  caption=caption, title_justify="left")
        for col in ("task", "lang", "n"):
            t.add_column(col, justify="right" if col == "n" else "left")
        shown = ["base", model] if adapted and "base" in labels else [model]
        for label in shown:
            t.add_column(f"{label} acc", justify="right")
            t.add_column(f"{label} acc_norm", justify="right")
        if len(shown) == 2:
            for col in ("Δ acc", "p"):
                t.add_column(col, justify="right")
        for task, lang in keys:
            first = by.get((shown[0], task, lang))
            if first is None or first["status"] != "ok":
                t.add_row(task, lang, "", "[dim]missing[/]", *([""] * (2 * len(shown) - 1 + 2 * (len(shown) == 2))))
                continue
            cells = [task, lang, str(first["n"])]
            for label in shown:
                r = by.get((label, task, lang), {})
                cells += [f"{fmt(r.get('acc'))} ± {fmt(r.get('acc_stderr'))}",
                          f"{fmt(r.get('acc_norm'))} ± {fmt(r.get('acc_norm_stderr'))}"]
            if len(shown) == 2:
                c = pairs.get((model, task, lang), {})
                d = c.get("delta_acc")
                style = "green" if d and d > 0 and c.get("p_mcnemar", 1) < 0.05 else (
                    "red" if d and d < 0 and c.get("p_mcnemar", 1) < 0.05 else "")
                cells += [f"[{style}]{d:+.3f}[/]" if style else (f"{d:+.3f}" if d is not None else "–"),
                          fmt(c.get("p_mcnemar"))]
            t.add_row(*cells)
        out.append(t)
    if result.get("correlations"):
        t = Table(title="mean activation gap (gaps.csv) vs accuracy across languages, English excluded",
                  title_justify="left")
        for col in ("model", "task", "y", "n", "Pearson r", "p", "Spearman ρ", "p"):
            t.add_column(col, justify="left" if col in ("model", "task", "y") else "right")
        for c in result["correlations"]:
            t.add_row(c["model"], c["task"], c["y"], str(c["n"]), fmt(c["pearson"]), fmt(c["pearson_p"]),
                      fmt(c["spearman"]), fmt(c["spearman_p"]))
        out.append(t)
    return out


def summarise(scores: dict[str, dict[tuple[str, str], Scores]], units: list[Unit]) -> tuple[list[dict], list[dict]]:
    """Results rows (model x task x language) and paired comparisons of every adapted model with base."""
    results, comparisons = [], []
    for model, per_unit in scores.items():
        for unit in units:
            row: dict[str, Any] = {"model": model, "task": unit.bench, "language": unit.lang,
                                   "lm_eval_task": unit.task, "status": "ok" if unit.ok else "missing",
                                   "note": unit.missing}
            s = per_unit.get((unit.bench, unit.lang))
            if s is not None:
                row["n"] = s.n
                for m in PAIRED_METRICS:
                    row[m], row[f"{m}_stderr"] = accuracy(s.values(m))
            results.append(row)
    base = scores.get("base")
    for model, per_unit in scores.items():
        if model == "base" or base is None:
            continue
        for key, s in per_unit.items():
            if key not in base:
                continue
            acc, norm = paired(base[key], s, "acc"), paired(base[key], s, "acc_norm")
            if not acc.n:
                continue
            comparisons.append({
                "model": model, "task": key[0], "language": key[1], "n_paired": acc.n,
                "base_acc": acc.base, "acc": acc.adapted, "delta_acc": acc.delta,
                "base_acc_norm": norm.base, "acc_norm": norm.adapted, "delta_acc_norm": norm.delta,
                "base_only": acc.base_only, "adapted_only": acc.adapted_only, "p_mcnemar": acc.p,
                "p_mcnemar_acc_norm": norm.p,
                "retention_pct": 100 * acc.adapted / acc.base if acc.base else None,
            })
    return results, comparisons


def gap_correlations(results: list[dict], comparisons: list[dict], gaps: dict[str, float], seed: int = 0) -> list[dict]:
    """Per model and task: mean gap vs accuracy; per adapted model and task: mean gap vs delta."""
    out = []
    series: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in results:
        if r["status"] == "ok" and r.get("acc") is not None:
            series.setdefault((r["model"], r["task"], "acc"), {})[r["language"]] = r["acc"]
    for c in comparisons:
        series.setdefault((c["model"], c["task"], "delta_acc"), {})[c["language"]] = c["delta_acc"]
    for (model, task, y), values in series.items():
        out.append({"model": model, "task": task, "x": "mean_gap_pct", "y": y, **correlations(gaps, values, seed)})
    return out

