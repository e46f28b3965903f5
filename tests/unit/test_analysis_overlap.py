"""Feature overlap (Jaccard) and residual similarity (cosine) on hand-built codes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.gaps import GapOptions, analyse
from analysis.overlap import active_keys, feature_overlap, jaccard, mean_cosine, pair_keys
from tests.unit.analysis_fixtures import write_activations

# per sentence id: per layer, per token, the codes (feature, or (feature, value)); two tokens per sentence
EN = {
    "a": [[[1, 2], [3]], [[1], [1]]],
    "b": [[[4], [4, 5]], [[], []]],
    "c": [[[(6, 0.0)], [7]], [[2], []]],  # feature 6 has value 0: not active
    "x": [[[100], [101]], [[100], []]],  # no Hindi counterpart: ignored
}
HI = {
    "y": [[[4], [200]], [[4], []]],  # no English counterpart: ignored
    "c": [[[7], [7]], [[3], []]],
    "a": [[[1], [2, 9]], [[1], []]],
    "b": [[[(5, -1.0)], [8]], [[], []]],  # feature 5 is negative: not active
}


def _write(path, lang, codes, resid=None):
    ids = list(codes)
    features = {layer: [codes[i][layer] for i in ids] for layer in (0, 1)}
    stats = np.ones((len(ids), 2))
    return write_activations(path, lang, ids, stats, features=features, resid=resid)


def test_jaccard_of_sets():
    assert jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5
    assert jaccard(np.array([1]), np.array([], dtype=np.int64)) == 0.0
    assert math.isnan(jaccard(np.array([], dtype=np.int64), np.array([], dtype=np.int64)))


def test_feature_overlap_from_codes():
    # language a: row 0 {1, 2}, row 1 {5}, row 2 {7} (no counterpart); b: row 0 {2}, row 1 {6} (9 inactive)
    a = active_keys(np.array([0, 0, 0, 1, 2]), np.array([2, 1, 2, 5, 7]), np.ones(5))
    b = active_keys(np.array([1, 0, 1]), np.array([6, 2, 9]), np.array([1.0, 1.0, 0.0]))
    assert a.tolist() == [1, 2, (1 << 32) | 5, (2 << 32) | 7]
    pairs_a, pairs_b = pair_keys(a, np.array([0, 1, -1])), pair_keys(b, np.array([0, 1]))
    # a third pair where neither side has an active feature is left out of the per-pair mean
    corpus, per_pair = feature_overlap(pairs_a, pairs_b, n_pairs=3)
    assert corpus == pytest.approx(1 / 4)  # {1, 2, 5} vs {2, 6}
    assert per_pair == pytest.approx((1 / 2 + 0) / 2)
    # pairs numbered against the row order still give sorted keys
    assert pair_keys(a, np.array([1, 0, -1])).tolist() == [5, (1 << 32) | 1, (1 << 32) | 2]


def test_overlap_end_to_end_on_hand_built_codes(tmp_path):
    _write(tmp_path / "en.h5", "en", EN)
    _write(tmp_path / "hi.h5", "hi", HI)
    report = analyse(tmp_path, GapOptions(n_boot=10, allow_id_mismatch=True))  # x and y have no counterpart on purpose
    layer0, layer1 = (r for r in report.overlap if r.language == "hi")
    # layer 0: F_en = {1,2,3,4,5,7}, F_hi = {1,2,9,8,7}; pairs a: 2/4, b: 0/3, c: 1/1
    assert (layer0.layer, layer0.n_parallel) == (0, 3)
    assert layer0.jaccard == pytest.approx(3 / 8)
    assert layer0.sentence_jaccard == pytest.approx((0.5 + 0 + 1) / 3)
    # layer 1: {1, 2} vs {1, 3}; pair b has no active feature on either side and is left out
    assert layer1.jaccard == pytest.approx(1 / 3)
    assert layer1.sentence_jaccard == pytest.approx((1 + 0) / 2)
    assert report.similarity == []  # no residuals saved


def test_cosine_similarity_of_pooled_residuals(tmp_path):
    en = {"a": [1, 0], "b": [0, 1], "c": [1, 1], "x": [5, 5]}
    hi = {"y": [3, 3], "c": [-1, -1], "a": [2, 0], "b": [1, 0]}
    # layer 0 as above (cosines 1, 0, -1); layer 1: Hindi = 3 x English (cosine 1)
    en_resid = np.array([[en[i], en[i]] for i in EN], dtype=float)
    hi_resid = np.array([[hi[i], [3 * v for v in en.get(i, [1, 1])]] for i in HI], dtype=float)
    _write(tmp_path / "en.h5", "en", EN, resid=en_resid)
    _write(tmp_path / "hi.h5", "hi", HI, resid=hi_resid)
    report = analyse(tmp_path, GapOptions(n_boot=10, allow_id_mismatch=True))  # x and y have no counterpart on purpose
    assert [(r.layer, r.n_parallel) for r in report.similarity] == [(0, 3), (1, 3)]
    assert report.similarity[0].cosine == pytest.approx(0.0, abs=1e-12)
    assert report.similarity[1].cosine == pytest.approx(1.0)


def test_mean_cosine_leaves_out_zero_vectors():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    assert mean_cosine(a, b) == pytest.approx(0.0)
    assert math.isnan(mean_cosine(np.zeros((2, 2)), np.ones((2, 2))))
