"""The project's statistics, in numpy alone (no scipy): bootstrap intervals, Wilcoxon, McNemar, correlations.

Ranks: `average_ranks` is the one ranking (ties share their average rank) behind Wilcoxon and Spearman.

Bootstrap: percentile intervals from a *cluster* bootstrap whose units are sentence ids. One
replicate draws the ids with replacement once and reuses that draw for every language and every
layer, so a language and English are resampled together (paired) on their parallel sentences, and
statistics that combine layers (band means, minima) or languages (group means) get intervals that
respect those dependencies. A language that lacks some ids simply has no rows for them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

CI_LEVEL = 0.95
_MAX_CELLS = 1 << 22  # bootstrap draws held at once (32 MiB of counts), whatever the corpus size

# scipy.stats.wilcoxon's method="auto" (scipy 1.17), which wilcoxon() below reproduces:
EXACT_MAX_N = 50  # exact null distribution up to this many pairs, when there are no ties or zeros
ENUMERATE_MAX_N = 13  # with ties or zeros: all 2**n sign flips enumerated (scipy's exhaustive permutation test)
PERMUTATIONS = 10_000  # shuffles behind a correlation's p-value


def resample_counts(n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield (k, n_units) float arrays: how often each unit is drawn in each of k replicates, n_boot in all.

    Counts rather than index lists, so a replicate's weighted sum is a single matmul; chunks keep
    memory bounded whatever the number of units.
    """
    if n_units < 1 or n_boot < 1:
        raise ValueError("resample_counts needs at least one unit and one replicate")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _MAX_CELLS // n_units))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(k, n_units)) + (np.arange(k) * n_units)[:, None]
        yield np.bincount(draws.ravel(), minlength=k * n_units).reshape(k, n_units).astype(np.float64)


def cluster_bootstrap_means(
    groups: Mapping[str, tuple[np.ndarray, np.ndarray]], n_units: int, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of column means for groups of rows that share resampling units.

    `groups[name] = (unit, values)`: the unit index (0..n_units-1) of each row, and a (rows, k)
    value matrix. A replicate's mean for a group weights each row by how often its unit was drawn;
    it is NaN in the (rare) replicate that draws none of the group's units. Returns name -> (n_boot, k).
    """
    out: dict[str, list[np.ndarray]] = {name: [] for name in groups}
    for counts in resample_counts(n_units, n_boot, seed):
        for name, (unit, values) in groups.items():
            weights = counts[:, unit]
            total = weights.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name].append((weights @ values) / total)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def percentile_ci(replicates: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN replicates (NaN where every replicate is NaN)."""
    tail = 100 * (1 - level) / 2
    with quiet_nan():  # all-NaN columns give NaN
        low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return low, high


@contextlib.contextmanager
def quiet_nan() -> Iterator[None]:
    """Silence numpy's all-NaN RuntimeWarnings where a NaN result is the intended answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def nanmean(values, axis: int | None = None):
    """np.nanmean without the all-NaN warning: NaN where no value is finite."""
    with quiet_nan():
        return np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile bootstrap interval (each value is its own unit)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    reps = cluster_bootstrap_means({"x": (np.arange(len(v)), v)}, len(v), n_boot, seed)["x"]
    low, high = percentile_ci(reps, level)
    return float(v.mean()), float(low[0]), float(high[0])


def wilcoxon(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of the differences x - y (or of x).

    Equals `scipy.stats.wilcoxon(x, y).pvalue` with scipy's defaults (zero_method="wilcox",
    correction=False, method="auto"; scipy 1.17): zero differences are dropped before ranking, tied
    |differences| get their average rank, and with n pairs (zeros included)
      - n <= 50 without ties or zeros: the exact null distribution of the positive-rank sum;
      - n <= 13 otherwise: all 2**n sign flips enumerated (an exact permutation test);
      - otherwise: the normal approximation, variance corrected for ties, no continuity correction.
    NaN when there are no pairs or any difference is NaN, and when the normal approximation has no
    non-zero difference to work with.
    """
    d = np.asarray(x, dtype=np.float64) - (0.0 if y is None else np.asarray(y, dtype=np.float64))
    d = d.ravel()
    n = d.size
    if n == 0 or np.isnan(d).any():
        return math.nan
    nonzero = d[d != 0]
    ranks, tie_sizes = average_ranks(np.abs(nonzero))
    r_plus = float(ranks[nonzero > 0].sum())
    if n <= EXACT_MAX_N and nonzero.size == n and not (tie_sizes > 1).any():
        return _exact_p(r_plus, n)
    if n <= ENUMERATE_MAX_N:
        return _sign_flip_p(ranks, r_plus)
    m = nonzero.size
    variance = (m * (m + 1) * (2 * m + 1) - np.sum(tie_sizes**3 - tie_sizes) / 2) / 24
    if variance <= 0:
        return math.nan
    z = (r_plus - m * (m + 1) / 4) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))


def average_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of `a` with ties averaged, and the size of each group of tied values."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    sizes = np.diff(np.r_[starts, a.size])
    ranks = np.empty(a.size)
    ranks[order] = np.repeat(starts + (sizes + 1) / 2, sizes)
    return ranks, sizes.astype(np.float64)


def _exact_p(r_plus: float, n: int) -> float:
    # counts[k] = number of subsets of {1..n} summing to k; integer-exact up to n = 50 (< 2**53)
    counts = np.zeros(n * (n + 1) // 2 + 1, dtype=np.int64)
    counts[0] = 1
    for i in range(1, n + 1):
        counts[i:] = counts[i:] + counts[:-i]
    k = int(r_plus)
    tail = min(int(counts[: k + 1].sum()), int(counts[k:].sum()))
    return min(1.0, 2 * tail / 2.0**n)


def _sign_flip_p(ranks: np.ndarray, r_plus: float) -> float:
    m = ranks.size
    signs = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
    null = signs @ ranks
    tol = abs(r_plus) * 100 * np.finfo(np.float64).eps  # scipy's tolerance for equal statistics
    tail = min(np.mean(null <= r_plus + tol), np.mean(null >= r_plus - tol))
    return float(min(1.0, 2 * tail))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial sign test at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def pearson(x: Iterable[float], y: Iterable[float]) -> float | None:
    """Pearson's r; None under 3 pairs or for a constant series."""
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else None


def spearman(x: Iterable[float], y: Iterable[float]) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks."""
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    return pearson(average_ranks(x)[0], average_ranks(y)[0]) if len(x) >= 3 else None


def correlation(x: list[float], y: list[float], seed: int = 0, permutations: int = PERMUTATIONS) -> dict:
    """Pearson and Spearman with n and two-sided permutation p-values (seeded, `permutations` shuffles)."""
    r, rho = pearson(x, y), spearman(x, y)
    out = {"n": len(x), "pearson": r, "spearman": rho, "pearson_p": None, "spearman_p": None}
    if r is None or rho is None:
        return out
    rng = np.random.default_rng(seed)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    shuffles = np.array([rng.permutation(len(xa)) for _ in range(permutations)])
    out["pearson_p"] = _permutation_p(xa, ya, r, shuffles)
    out["spearman_p"] = _permutation_p(average_ranks(xa)[0], average_ranks(ya)[0], rho, shuffles)
    return out


def _permutation_p(a: np.ndarray, b: np.ndarray, observed: float, shuffles: np.ndarray) -> float:
    """Share of shuffles of `b` (the observed order counted once) whose |r| reaches |observed|."""
    a, b = a - a.mean(), b - b.mean()
    stats = b[shuffles] @ a / math.sqrt(float(a @ a) * float(b @ b))
    return float((1 + np.sum(np.abs(stats) >= abs(observed) - 1e-12)) / (1 + len(shuffles)))


def paired_bootstrap(base: Iterable[float], other: Iterable[float], n_boot: int = 10_000, seed: int = 0,
                     level: float = CI_LEVEL) -> dict:
    """Mean paired difference other - base on the same items, its percentile bootstrap interval and a
    two-sided bootstrap p-value.

    Items are the resampling units, drawn with replacement and kept as pairs. The p-value is that of the
    centred bootstrap (the replicates shifted to a zero mean stand for the null of no difference): the
    share of replicates whose distance from the observed mean reaches |observed|, the observed sample
    counted once. NaN values without pairs give n = 0 and NaN results.
    """
    a, b = np.asarray(list(base), dtype=np.float64), np.asarray(list(other), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired_bootstrap needs two series of the same length")
    d = (b - a)[~(np.isnan(a) | np.isnan(b))]
    if d.size == 0:
        return {"n": 0, "delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": math.nan}
    reps = np.concatenate([counts @ d / d.size for counts in resample_counts(d.size, n_boot, seed)])
    low, high = percentile_ci(reps[:, None], level)
    observed = float(d.mean())
    extreme = np.sum(np.abs(reps - observed) >= abs(observed) - 1e-12)
    return {"n": int(d.size), "delta": observed, "ci_low": float(low[0]), "ci_high": float(high[0]),
            "p": float((1 + extreme) / (1 + n_boot))}
