"""Feature overlap (Jaccard) and representation similarity (cosine) of parallel sentences.

Sets of active features are sorted int64 keys `sentence << 32 | feature`, so a layer's per-sentence
and whole-corpus sets come out of a few vectorised numpy operations. Set operations sort or
binary-search explicitly: np.unique's hash path (numpy >= 2.3) degrades badly on such keys, whose
low bits repeat.
"""

from __future__ import annotations

import math

import numpy as np

_FEATURE_MASK = (1 << 32) - 1


def active_keys(rows: np.ndarray, features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted unique keys `row << 32 | feature` of the active codes (value > 0) of a layer."""
    keep = values > 0
    keys = np.sort((rows[keep].astype(np.int64) << 32) | features[keep].astype(np.int64))
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys


def pair_keys(keys: np.ndarray, pair_of_row: np.ndarray) -> np.ndarray:
    """Re-key by pair number (`pair_of_row[row]`, -1 for a sentence without counterpart, dropped).

    Pair numbers that increase with the row keep the keys sorted, with no second sort."""
    pair = pair_of_row[keys >> 32]
    keep = pair >= 0
    out = (pair[keep] << 32) | (keys[keep] & _FEATURE_MASK)
    return out if np.all(out[1:] > out[:-1]) else np.sort(out)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sets given as sorted unique arrays; NaN when both are empty."""
    shared = _shared(a, b).size
    union = a.size + b.size - shared
    return shared / union if union else math.nan


def feature_overlap(keys_a: np.ndarray, keys_b: np.ndarray, n_pairs: int) -> tuple[float, float]:
    """Jaccard of the features active anywhere in the pairs, and the mean Jaccard per sentence pair.

    keys_a, keys_b: pair keys (pair_keys) of the two languages. A pair in which neither sentence
    has an active feature has no defined Jaccard and is left out of the mean.
    """
    corpus = jaccard(_features(keys_a), _features(keys_b))
    size_a = np.bincount(keys_a >> 32, minlength=n_pairs)
    size_b = np.bincount(keys_b >> 32, minlength=n_pairs)
    shared = np.bincount(_shared(keys_a, keys_b) >> 32, minlength=n_pairs)
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


def _features(keys: np.ndarray) -> np.ndarray:
    """Sorted unique feature ids in a set of keys (a counting pass, no sort)."""
    return np.flatnonzero(np.bincount(keys & _FEATURE_MASK)) if keys.size else keys


def _shared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elements of sorted unique `a` that are also in sorted unique `b`."""
    if not a.size or not b.size:
        return a[:0]
    i = np.minimum(np.searchsorted(b, a), b.size - 1)
    return a[b[i] == a]
