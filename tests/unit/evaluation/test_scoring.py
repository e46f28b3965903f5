"""toolkit.evaluation.metrics, correlate and scoring.compare: continuous per-item metrics, band gaps from
gaps.csv, gap correlations, base vs adapted pairing (McNemar and paired bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis import stats
from tests.unit.evaluation.okapi_fixtures import write_gaps_csv
from toolkit.errors import UserError
from toolkit.evaluation import correlate, metrics, scoring


def test_band_gaps_and_gap_correlations(tmp_path):
    path = write_gaps_csv(tmp_path / "gaps.csv")
    gaps = correlate.band_gaps(path, "mass")
    assert set(gaps) == {"early", "middle", "deep", "all"}
    assert gaps["early"] == {"hi": -30.0, "ml": -25.0, "es": -2.0, "ru": -8.0}
    assert gaps["deep"]["hi"] == pytest.approx(-3.0) and gaps["deep"]["ru"] == pytest.approx(-0.8)  # nan dropped
    assert correlate.band_gaps(path, None) == gaps  # read_gaps_csv's default statistic: mass
    with pytest.raises(UserError, match="statistic"):
        correlate.band_gaps(path, "max")
    p_gold = {"en": 0.5, "hi": 0.2, "ml": 0.3, "es": 0.4, "ru": 0.35, "zh": 0.45}
    results = [{"model": "base", "task": "arc", "language": c, "status": "ok", "p_gold": v, "acc": v}
               for c, v in p_gold.items()]
    bpb = [{"model": "base", "language": c, "bpb": 3 - v} for c, v in p_gold.items()]
    rows = correlate.gap_correlations(results, [], gaps, bpb)
    by = {(r["band"], r["task"], r["y"]): r for r in rows}
    assert len(rows) == 4 * 3  # (p_gold, acc, bpb) x 4 bands
    early = by["early", "arc", "p_gold"]
    assert early["languages"] == ["ru", "es", "ml", "hi"] and early["n"] == 4
    assert early["pearson"] == pytest.approx(stats.pearson([-8, -2, -25, -30], [0.35, 0.4, 0.3, 0.2]))
    assert by["early", "heldout", "bpb"]["pearson"] == pytest.approx(-early["pearson"])
    fig = correlate.figure(rows, gaps, results, bpb, tmp_path / "scatter.png")
    assert fig.stat().st_size > 1000


def test_continuous_item_metrics():
    m = metrics.item_metrics([-1.0, -2.0, -3.0], 0, ["a", "bb", "ccc"])
    z = np.exp([-1.0, -2.0, -3.0])
    assert m["p_gold"] == pytest.approx(z[0] / z.sum()) and m["margin"] == pytest.approx(1.0)
    assert m["p_gold_norm"] == pytest.approx(1 / 3) and m["margin_norm"] == pytest.approx(0.0)  # all -1 per char
    wrong = metrics.item_metrics([-5.0, -1.0], 0, ["A", "B"])
    assert wrong["margin"] == pytest.approx(-4.0) and wrong["p_gold"] < 0.5


def test_paired_bootstrap_interval_and_p():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.1, 200)
    shifted = stats.paired_bootstrap(base, base + 0.05 + rng.normal(0, 0.02, 200), n_boot=2000)
    assert shifted["n"] == 200 and shifted["ci_low"] < shifted["delta"] < shifted["ci_high"]
    assert 0.04 < shifted["ci_low"] and shifted["ci_high"] < 0.06 and shifted["p"] < 0.001
    same = stats.paired_bootstrap(base, base + rng.normal(0, 0.02, 200), n_boot=2000)
    assert same["ci_low"] < 0 < same["ci_high"] and same["p"] > 0.05
    assert math.isnan(stats.paired_bootstrap([], [])["delta"])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 2], [1])


def _scores(acc: dict[str, int], p: dict[str, float]) -> scoring.Scores:
    return scoring.Scores({k: {"acc": a, "acc_norm": a, "p_gold": p[k], "p_gold_norm": p[k], "margin": p[k],
                               "margin_norm": p[k]} for k, a in acc.items()})


def test_exact_mcnemar_and_pairing():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar_exact(1, 1) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    base = _scores(dict(zip("abcdef", [1, 1, 0, 0, 0, 1], strict=True)), dict(zip("abcdef", [.6, .5, .2, .3, .1, .7],
                                                                                   strict=True)))
    adapted = _scores(dict(zip("abcdeg", [1, 0, 1, 1, 0, 0], strict=True)), dict(zip("abcdeg", [.7, .4, .5, .6, .2, .1],
                                                                                      strict=True)))
    c = scoring.compare("adapted:hi", ("arc", "hi"), base, adapted)
    assert (c["n_paired"], c["base_only"], c["adapted_only"]) == (5, 1, 2)  # f and g are not paired
    assert c["delta_acc"] == pytest.approx(3 / 5 - 2 / 5) and c["p_mcnemar"] == stats.mcnemar_exact(1, 2)
    assert c["delta_p_gold"] == pytest.approx(np.mean([.1, -.1, .3, .3, .1]))
    assert c["base_p_gold"] == pytest.approx(np.mean([.6, .5, .2, .3, .1])) and c["primary"] == "p_gold_norm"
    assert c["delta_p_gold_ci_low"] < c["delta_p_gold"] < c["delta_p_gold_ci_high"] and 0 < c["p_p_gold"] <= 1
    mean, se = metrics.mean_se(np.array([1.0, 0.0, 1.0, 1.0]))
    assert mean == 0.75 and se == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
