"""Bootstrap intervals and the Wilcoxon signed-rank test of analysis.stats, against scipy as reference."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats as scipy_stats

from analysis import stats
from analysis.stats import bootstrap_ci, cluster_bootstrap_means, percentile_ci, resample_counts, wilcoxon


def _case(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = int(name.split("-")[-1])
    x = rng.normal(size=n)
    y = x + rng.normal(0.3, 1.0, size=n)
    if name.startswith("ties"):
        x, y = np.round(x * 2), np.round(y * 2)
    if name.startswith("zeros"):
        y[: n // 4] = x[: n // 4]
    if name.startswith("tiezero"):
        x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
    return x, y


# exact (no ties, n <= 50), exhaustive sign flips (ties or zeros, n <= 13), normal approximation otherwise
CASES = [
    "exact-5", "exact-12", "exact-30", "exact-50",
    "asymptotic-51", "asymptotic-400",
    "ties-8", "ties-13", "ties-14", "ties-40", "ties-300",
    "zeros-6", "zeros-13", "zeros-20", "zeros-200",
    "tiezero-10", "tiezero-60",
]


@pytest.mark.parametrize("name", CASES)
def test_wilcoxon_matches_scipy(name):
    x, y = _case(name)
    expected = scipy_stats.wilcoxon(x, y).pvalue
    assert wilcoxon(x, y) == pytest.approx(expected, rel=1e-10, abs=1e-300)


def test_wilcoxon_matches_scipy_on_many_random_samples():
    rng = np.random.default_rng(7)
    for _ in range(200):  # n <= 13 with ties is covered above: scipy's permutation test there is slow
        n = int(rng.integers(14, 70))
        x = rng.integers(0, 6, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
        y = x + rng.normal(0.2, 1.0, size=n) if rng.random() < 0.5 else rng.integers(0, 6, n).astype(float)
        expected = scipy_stats.wilcoxon(x, y).pvalue
        got = wilcoxon(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-10)


def test_wilcoxon_one_sample_and_edge_cases():
    d = np.array([1.5, -0.5, 2.0, 3.0, -1.0, 4.0, 0.25])
    assert wilcoxon(d) == pytest.approx(scipy_stats.wilcoxon(d).pvalue, rel=1e-12)
    assert wilcoxon(np.zeros(5), np.zeros(5)) == 1.0  # nothing differs: scipy's exhaustive test gives 1
    assert math.isnan(wilcoxon(np.array([]), np.array([])))
    assert math.isnan(wilcoxon(np.array([1.0, np.nan]), np.array([0.0, 0.0])))


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    # 400 independent samples of n=40 from N(3, 2): the percentile bootstrap of the mean should cover 3
    # about 94-95 % of the time (binomial sd ~1.1 %); a broken interval (too narrow/wide, wrong tail) falls out.
    rng = np.random.default_rng(2024)
    trials, n, sigma = 400, 40, 2.0
    covered, widths = 0, []
    for trial in range(trials):
        sample = rng.normal(3.0, sigma, size=n)
        mean, low, high = bootstrap_ci(sample, n_boot=400, seed=trial)
        assert low < mean < high
        covered += low <= 3.0 <= high
        widths.append(high - low)
    assert 0.91 <= covered / trials <= 0.98
    expected_width = 2 * 1.96 * sigma / math.sqrt(n)
    assert np.mean(widths) == pytest.approx(expected_width, rel=0.1)


def test_bootstrap_is_reproducible_and_seeded():
    sample = np.random.default_rng(0).gamma(2.0, size=30)
    assert bootstrap_ci(sample, seed=5) == bootstrap_ci(sample, seed=5)
    assert bootstrap_ci(sample, seed=5) != bootstrap_ci(sample, seed=6)


def test_resample_counts_draw_every_unit_count_once_per_replicate():
    chunks = list(resample_counts(n_units=7, n_boot=10, seed=1))
    counts = np.concatenate(chunks)
    assert counts.shape == (10, 7)
    assert (counts.sum(axis=1) == 7).all()
    assert np.array_equal(counts, np.concatenate(list(resample_counts(7, 10, 1))))


def test_cluster_bootstrap_resamples_shared_units_together():
    values = np.arange(12, dtype=float).reshape(6, 2)
    units = np.arange(6)
    reps = cluster_bootstrap_means(
        {"a": (units, values), "b": (units, 2 * values), "c": (units[:3], values[:3])}, 6, 200, seed=3
    )
    # the same draw for every group: b is exactly twice a in every replicate
    np.testing.assert_allclose(reps["b"], 2 * reps["a"])
    # a group holding only some units gets NaN in a replicate that drew none of them, else a mean of its rows
    c = reps["c"]
    finite = ~np.isnan(c[:, 0])
    assert finite.mean() > 0.9
    assert ((c[finite] >= values[:3].min(axis=0)) & (c[finite] <= values[:3].max(axis=0))).all()
    low, high = percentile_ci(c)
    assert (low <= high).all()


def test_correlation_on_known_numbers():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert stats.pearson(x, y) == pytest.approx(6 / math.sqrt(52), abs=1e-12)
    assert stats.spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)  # tied 7s share rank 3.5
    c = stats.correlation(x, [-v for v in y], seed=0, permutations=2000)
    assert c["n"] == 5 and c["pearson"] == pytest.approx(-6 / math.sqrt(52))
    assert 0 < c["pearson_p"] <= 1 and 0 < c["spearman_p"] <= 1
    perfect = stats.correlation([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12], permutations=5000)
    assert perfect["pearson"] == pytest.approx(1) and perfect["spearman"] == pytest.approx(1)
    assert perfect["pearson_p"] == pytest.approx(2 / 720, abs=0.004)  # two of 6! orders are as extreme
    assert stats.pearson([1, 2], [3, 4]) is None and stats.pearson([1, 1, 1], [1, 2, 3]) is None


def test_average_ranks_share_ties_and_count_them():
    ranks, sizes = stats.average_ranks(np.array([5.0, 6.0, 7.0, 8.0, 7.0]))
    assert ranks.tolist() == [1, 2, 3.5, 5, 3.5] and sorted(sizes.tolist()) == [1, 1, 1, 2]


def test_exact_mcnemar_on_known_counts():
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar_exact(1, 1) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
