"""Feature overlap (Jaccard) and representation similarity (cosine) of parallel sentences.

Sets of active features are handled as sorted int64 keys `pair << 32 | feature`, so per-sentence
and whole-corpus sets of a layer come out of a few vectorised numpy set operations.
"""

from __future__ import annotations

import math

import numpy as np

_FEATURE_MASK = (1 << 32) - 1


def active_keys(rows: np.ndarray, features: np.ndarray, values: np.ndarray, pair_of_row: np.ndarray) -> np.ndarray:
    """Unique (pair, feature) keys of the features active (value > 0) in parallel sentences.

    `rows, features, values` are a layer's codes as triples; `pair_of_row` maps a sentence row to
    its pair number, or -1 for a sentence without a counterpart in the other language.
    """
    pair = pair_of_row[rows]
    keep = (values > 0) & (pair >= 0)
    return np.unique((pair[keep].astype(np.int64) << 32) | features[keep].astype(np.int64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sets given as unique arrays; NaN when both are empty."""
    union = np.union1d(a, b).size
    return np.intersect1d(a, b, assume_unique=True).size / union if union else math.nan


def feature_overlap(keys_a: np.ndarray, keys_b: np.ndarray, n_pairs: int) -> tuple[float, float]:
    """Jaccard of the features active anywhere in the pairs, and mean Jaccard per sentence pair.

    A pair in which neither sentence has an active feature has no defined Jaccard and is left out
    of the mean.
    """
    corpus = jaccard(np.unique(keys_a & _FEATURE_MASK), np.unique(keys_b & _FEATURE_MASK))
    size_a = np.bincount(keys_a >> 32, minlength=n_pairs)
    size_b = np.bincount(keys_b >> 32, minlength=n_pairs)
    shared = np.bincount(np.intersect1d(keys_a, keys_b, assume_unique=True) >> 32, minlength=n_pairs)
    union = size_a + size_b - shared
    per_pair = shared[union > 0] / union[union > 0]
    return corpus, float(per_pair.mean()) if per_pair.size else math.nan


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows of a and b; rows with a zero or NaN vector are left out."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = norms > 0  # False for NaN too (a sentence without tokens pools to NaN)
    if not ok.any():
        return math.nan
    return float(np.mean(np.einsum("ij,ij->i", a[ok], b[ok]) / norms[ok]))
