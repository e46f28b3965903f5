"""toolkit/files.py: the one home of atomic writes, JSON, CSV and figures."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from toolkit import files


def test_json_has_no_nan_and_plain_numbers(tmp_path):
    path = files.write_json(tmp_path / "r.json", {"a": math.nan, "b": [np.float32(1.5), np.int64(2), -math.inf],
                                                  3: torch.tensor(0.25), "t": ("x", "नमस्ते")})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": None, "b": [1.5, 2, None], "3": 0.25, "t": ["x", "नमस्ते"]}
    assert "नमस्ते" in text  # readable UTF-8, not \\u escapes


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path):
    path = files.write_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_csv_is_written_whole(tmp_path):
    path = files.write_csv(tmp_path / "t.csv", ["a", "b"], ([i, None] for i in range(3)))
    with open(path, newline="") as fh:
        assert list(csv.reader(fh)) == [["a", "b"], ["0", ""], ["1", ""], ["2", ""]]


def test_figures_are_saved_under_their_final_name_only(tmp_path):
    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1])
    path = files.save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert path.read_bytes()[:4] == b"\x89PNG" and os.listdir(path.parent) == ["f.png"]
