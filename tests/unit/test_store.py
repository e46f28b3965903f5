"""Activation files at their edges: a layer whose SAE fired on nothing is still a valid file."""

import numpy as np

from tests.unit.analysis_fixtures import write_activations
from toolkit.store import ActivationFile


def test_a_layer_without_any_active_feature_is_stored_and_read(tmp_path):
    ids = ["s0", "s1", "s2"]
    features = {0: [[[3], [5]] for _ in ids], 1: [[[], []] for _ in ids]}
    path = write_activations(tmp_path / "hi.h5", "hi", ids, np.zeros((3, 2)), features=features)
    with ActivationFile(path) as f:
        indptr, indices, values = f.codes(1)
        assert len(indices) == len(values) == 0 and (indptr == 0).all() and len(indptr) == 7
        assert f.codes(0)[1].tolist() == [3, 5] * 3
        assert f.code_bytes(0) == 6 * (4 + 4) and f.code_bytes(1) == 0  # float32 values, int32 indices
