"""Per-item metrics from the choices' log-likelihoods, per-language summaries and base-vs-adapter pairs.

Accuracy is a coarse readout: at chance it carries almost no signal about what the model believes.
The same log-likelihoods give continuous metrics per item (choices c_1..c_k, gold g, ll_i the summed
log-likelihood of choice i, len_i its length in characters, as lm-eval's acc_norm counts it):

- ``p_gold`` = softmax(ll)_g, the probability of the gold choice normalised over the choices;
- ``p_gold_norm`` = softmax(ll / len)_g, the same over per-character log-likelihoods, the continuous
  counterpart of ``acc_norm`` (choices of different lengths are compared per character);
- ``margin`` = ll_g - max_{i != g} ll_i (nats; > 0 exactly when the item is right under ``acc``), and
  ``margin_norm`` on per-character log-likelihoods (nats per character; > 0 when right under acc_norm).

Chance level of p_gold is 1/k (0.25 with four choices). Per language: mean and standard error
(sample sd / sqrt(n)). Base vs adapter on the items both scored: accuracy with the exact McNemar test,
continuous metrics with the mean paired difference, its 95 % paired bootstrap interval and bootstrap
p-value (`analysis.stats.paired_bootstrap`, items as units, `N_BOOT` replicates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.stats import mcnemar_exact, paired_bootstrap

ACCURACY = ("acc", "acc_norm")
CONTINUOUS = ("p_gold", "p_gold_norm", "margin", "margin_norm")
N_BOOT = 10_000


def item_metrics(lls: list[float], gold: int, choices: list[str]) -> dict[str, float]:
    """The continuous metrics of one item (see the module doc)."""
    ll = np.asarray(lls, dtype=np.float64)
    per_char = ll / np.array([max(1, len(c)) for c in choices], dtype=np.float64)
    return {"p_gold": _softmax_at(ll, gold), "p_gold_norm": _softmax_at(per_char, gold),
            "margin": _margin(ll, gold), "margin_norm": _margin(per_char, gold)}


def _softmax_at(x: np.ndarray, i: int) -> float:
    z = np.exp(x - x.max())
    return float(z[i] / z.sum())


def _margin(x: np.ndarray, i: int) -> float:
    others = np.delete(x, i)
    return float(x[i] - others.max()) if others.size else math.nan


def mean_se(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(n), as lm-eval's mean_stderr)."""
    values = np.asarray(values, dtype=np.float64)
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


def paired_accuracy(a: np.ndarray, b: np.ndarray) -> Paired:
    """adapted - base accuracy on paired items (0/1 arrays), with the exact McNemar test."""
    if len(a) == 0:
        return Paired(0, math.nan, math.nan, math.nan, 0, 0, math.nan)
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    base_only, adapted_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return Paired(len(a), float(a.mean()), float(b.mean()), float(b.mean() - a.mean()), base_only, adapted_only,
                  mcnemar_exact(base_only, adapted_only))


def paired_continuous(a: np.ndarray, b: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """adapted - base of a continuous metric on paired items: base and adapted means, delta, CI, p."""
    out = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    out["base"] = float(np.mean(a)) if len(a) else math.nan
    out["adapted"] = float(np.mean(b)) if len(b) else math.nan
    return out
