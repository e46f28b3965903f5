"""Scoring: the lm-eval model over an in-memory model, per-item scores, per-language rows, base vs adapted."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.errors import UserError
from toolkit.evaluation import metrics
from toolkit.evaluation.tasks import BENCHMARKS, BenchTask, item_key


@dataclass
class Scores:
    """Per-item scores of one model on one benchmark task."""

    # key -> {"acc", "acc_norm": 0/1, "p_gold", "p_gold_norm", "margin", "margin_norm", "pred": argmax,
    #         "gold": target, "lls": per choice}
    items: dict[str, dict]

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
            gold, choices = row["target"], list(task.doc_to_choice(row["doc"]))
            if not isinstance(gold, int):  # MMLU's target is a letter among its choices
                gold = choices.index(gold)
            key = item_key(row["doc"], row["doc_id"])
            lls = [float(resp[0]) for resp in row["filtered_resps"]]
            items[f"{name}/{key}" if several else key] = {
                **{m: float(row[m]) for m in metrics.ACCURACY}, **metrics.item_metrics(lls, gold, choices),
                "pred": int(np.argmax(lls)), "gold": gold, "lls": lls}
    return Scores(items)


# ---------------------------------------------------------------------------------------- summaries

SUMMARISED = metrics.ACCURACY + metrics.CONTINUOUS


def result_row(model: str, bt: BenchTask, s: Scores | None) -> dict[str, Any]:
    """One model on one benchmark task: n, and mean and standard error of every metric."""
    row: dict[str, Any] = {"model": model, "task": bt.bench, "language": bt.lang, "lm_eval_task": bt.task,
                           "status": "ok" if bt.ok else "missing", "note": bt.missing,
                           "primary": BENCHMARKS[bt.bench].primary}
    if s is not None:
        row["n"] = s.n
        for m in SUMMARISED:
            row[m], row[f"{m}_stderr"] = metrics.mean_se(s.values(m))
    return row


def compare(model: str, key: tuple[str, str], base: Scores, adapted: Scores, seed: int = 0) -> dict | None:
    """adapted - base on the items both scored: McNemar for accuracy, paired bootstrap for the rest."""
    keys = sorted(set(base.items) & set(adapted.items))
    if not keys:
        return None

    def pair(m: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([base.items[k][m] for k in keys], dtype=float),
                np.array([adapted.items[k][m] for k in keys], dtype=float))

    acc, norm = metrics.paired_accuracy(*pair("acc")), metrics.paired_accuracy(*pair("acc_norm"))
    out = {"model": model, "task": key[0], "language": key[1], "n_paired": acc.n, "primary": BENCHMARKS[key[0]].primary,
           "base_acc": acc.base, "acc": acc.adapted, "delta_acc": acc.delta,
           "base_acc_norm": norm.base, "acc_norm": norm.adapted, "delta_acc_norm": norm.delta,
           "base_only": acc.base_only, "adapted_only": acc.adapted_only, "p_mcnemar": acc.p,
           "p_mcnemar_acc_norm": norm.p, "retention_pct": 100 * acc.adapted / acc.base if acc.base else None}
    for m in metrics.CONTINUOUS:
        c = metrics.paired_continuous(*pair(m), seed=seed)
        out |= {f"base_{m}": c["base"], m: c["adapted"], f"delta_{m}": c["delta"], f"delta_{m}_ci_low": c["ci_low"],
                f"delta_{m}_ci_high": c["ci_high"], f"p_{m}": c["p"]}
    return out


def summarise(scores: dict[str, dict[tuple[str, str], Scores]], bench_tasks: list[BenchTask],
              seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Results rows (model x task x language) and paired comparisons of every adapted model with base."""
    results = [result_row(model, bt, per_task.get((bt.bench, bt.lang)))
               for model, per_task in scores.items() for bt in bench_tasks]
    base = scores.get("base")
    comparisons = []
    for model, per_task in scores.items():
        if model == "base" or base is None:
            continue
        for key, s in per_task.items():
            c = compare(model, key, base[key], s, seed) if key in base else None
            if c is not None:
                comparisons.append(c)
    return results, comparisons
