"""Layer weights from the gap, and where the gap is read from (analysis.gaps computes it)."""

import math

import numpy as np
import pytest

from tests.unit.analysis_fixtures import write_activations
from toolkit import align
from toolkit.rundir import RunDir


def test_weights_follow_the_gap_with_mean_one():
    w = align.weights_from_gaps({0: -30.0, 1: -10.0, 2: 5.0, 3: math.nan}, [0, 1, 2, 3])
    assert w[0] == pytest.approx(3 * w[1]) and w[2] == 0 and w[3] == 0
    assert np.mean(list(w.values())) == pytest.approx(1.0)
    assert align.weights_from_gaps({0: 4.0, 1: 2.0}, [0, 1]) == {0: 1.0, 1: 1.0}  # never weaker: uniform
    assert align.weights_from_gaps({0: -4.0, 1: -2.0}, [0, 1], "uniform") == {0: 1.0, 1: 1.0}
    assert align.weights_from_gaps(None, [5]) == {5: 1.0}


def test_layer_gaps_come_from_training_and_validation_ids_only(tmp_path):
    ids = ["a", "b", "c", "d"]
    en = np.array([[2.0, 4.0]] * 4)
    hi = np.array([[1.0, 4.0], [1.0, 4.0], [1.0, 2.0], [100.0, 100.0]])
    write_activations(tmp_path / "activations" / "en.h5", "en", ids, en, layers=[0, 1])
    write_activations(tmp_path / "activations" / "hi.h5", "hi", ids, hi, layers=[0, 1])
    split = align.Split(["a", "b"], ["c"], ["d"])
    inputs = align.AlignInputs(None, None, None, max_length=48, batch_tokens=1024)  # the files answer: no model
    gaps, source = align.layer_gaps(inputs, RunDir(tmp_path), "hi", [0, 1], split)
    assert source.startswith("activations")
    assert gaps[0] == pytest.approx(-50.0) and gaps[1] == pytest.approx(100 * (10 / 3 - 4) / 4)
    # a report's gaps.csv (over all ids, the held-out "d" included) is not read
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gaps.csv").write_text(
        "language,layer,statistic,gap_pct\n" + "".join(f"hi,{layer},mass,-7\n" for layer in (0, 1)))
    assert align.layer_gaps(inputs, RunDir(tmp_path), "hi", [0, 1], split) == (gaps, source)
