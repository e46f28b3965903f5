"""Scoring: lm-eval's HFLM over an in-memory model, per-item correctness, base vs adapted, gaps vs accuracy."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.gaps import read_gaps_csv
from analysis.stats import correlation, mcnemar_exact
from toolkit.errors import UserError
from toolkit.evaluation.tasks import PAIRED_METRICS, BenchTask, item_key
from toolkit.languages import LANGUAGES, REFERENCE


@dataclass
class Scores:
    """Per-item correctness of one model on one benchmark task."""

    items: dict[str, dict]  # key -> {"acc": 0/1, "acc_norm": 0/1, "pred": argmax, "gold": target, "lls": per choice}

    @property
    def n(self) -> int:
        return len(self.items)

    def values(self, metric: str) -> np.ndarray:
        return np.array([v[metric] for v in self.items.values()], dtype=float)


SCORERS = ("lingogap", "hflm")


def lm_wrapper(model, tokenizer, batch_size: int, scorer: str = "lingogap"):
    """The lm-eval model that scores: ours (`toolkit.evaluation.lm`, each context computed once) or
    lm-eval's own HFLM for comparison; both read the in-memory model and print no progress bars."""
    if scorer == "lingogap":
        from toolkit.evaluation.lm import SharedContextLM

        return SharedContextLM(model, tokenizer, batch_size=batch_size)
    if scorer != "hflm":
        raise UserError(f"eval.scorer: unknown scorer {scorer!r}; choose from {', '.join(SCORERS)}")
    return _quiet_hflm(model, tokenizer, batch_size)


def _quiet_hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM with its per-call progress bars off (we show our own); public methods only."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns that a model object ignores loading arguments: we know
    try:
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        log.setLevel(level)


def evaluate(lm, bt: BenchTask, seed: int = 0) -> Scores:
    """Score one benchmark task's selected items with lm-eval; per-item results come from its logged samples."""
    import torch
    from lm_eval import evaluator

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for task in bt.loaded["tasks"].values():
        task.set_fewshot_seed(seed)  # the same few-shot examples for every model
    out = evaluator.evaluate(lm=lm, task_dict=bt.loaded, samples=bt.samples, log_samples=True,
                             bootstrap_iters=0)
    several = len(bt.loaded["tasks"]) > 1
    items: dict[str, dict] = {}
    for name, rows in out["samples"].items():
        task = bt.loaded["tasks"][name]
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


def mean_gaps(path: str | Path, statistic: str | None = None) -> dict[str, float]:
    """Mean over layers of gap_pct per language from a tidy gaps.csv (`analysis.gaps.read_gaps_csv`),
    the reference excluded."""
    per_layer = read_gaps_csv(path, statistic, REFERENCE)
    return {lang: float(np.mean(list(gaps.values()))) for lang, gaps in per_layer.items() if gaps}


def correlations(gaps: dict[str, float], values: dict[str, float], seed: int = 0) -> dict:
    """Correlation between mean gap and a per-language value over the languages that have both."""
    langs = [lang for lang in LANGUAGES if lang in gaps and lang in values and lang != REFERENCE
             and values[lang] is not None and math.isfinite(values[lang])]
    return {"languages": langs, **correlation([gaps[c] for c in langs], [values[c] for c in langs], seed)}


def summarise(scores: dict[str, dict[tuple[str, str], Scores]],
              bench_tasks: list[BenchTask]) -> tuple[list[dict], list[dict]]:
    """Results rows (model x task x language) and paired comparisons of every adapted model with base."""
    results, comparisons = [], []
    for model, per_task in scores.items():
        for bt in bench_tasks:
            row: dict[str, Any] = {"model": model, "task": bt.bench, "language": bt.lang,
                                   "lm_eval_task": bt.task, "status": "ok" if bt.ok else "missing",
                                   "note": bt.missing}
            s = per_task.get((bt.bench, bt.lang))
            if s is not None:
                row["n"] = s.n
                for m in PAIRED_METRICS:
                    row[m], row[f"{m}_stderr"] = accuracy(s.values(m))
            results.append(row)
    base = scores.get("base")
    for model, per_task in scores.items():
        if model == "base" or base is None:
            continue
        for key, s in per_task.items():
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
