"""toolkit.evaluation.scoring: mean gaps from gaps.csv, gap correlations, base vs adapted pairing."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from analysis import stats
from toolkit.errors import UserError
from toolkit.evaluation import scoring


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
    means = scoring.mean_gaps(path, "mass")
    assert means == {"hi": -20.0, "ml": -20.0, "es": -3.0, "ru": -8.0}
    assert scoring.mean_gaps(path, None) == means  # read_gaps_csv's default statistic: mass
    with pytest.raises(UserError, match="statistic"):
        scoring.mean_gaps(path, "max")
    results = [{"model": "base", "task": "arc", "language": c, "status": "ok", "acc": a}
               for c, a in {"en": 0.5, "hi": 0.2, "ml": 0.3, "es": 0.4, "ru": 0.35, "zh": 0.45}.items()]
    (corr,) = scoring.gap_correlations(results, [], means)
    assert corr["languages"] == ["ru", "es", "ml", "hi"] and corr["n"] == 4
    assert corr["pearson"] == pytest.approx(stats.pearson([-8, -3, -20, -20], [0.35, 0.4, 0.3, 0.2]))


def test_exact_mcnemar_and_pairing():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar_exact(1, 1) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    base = scoring.Scores({k: {"acc": a, "acc_norm": a} for k, a in zip("abcdef", [1, 1, 0, 0, 0, 1], strict=True)})
    adapted = scoring.Scores({k: {"acc": a, "acc_norm": a} for k, a in zip("abcdeg", [1, 0, 1, 1, 0, 0], strict=True)})
    p = scoring.paired(base, adapted)
    assert (p.n, p.base_only, p.adapted_only) == (5, 1, 2)  # f and g are not paired
    assert p.delta == pytest.approx(3 / 5 - 2 / 5) and p.p == stats.mcnemar_exact(1, 2)
    mean, se = scoring.accuracy(np.array([1.0, 0.0, 1.0, 1.0]))
    assert mean == 0.75 and se == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
