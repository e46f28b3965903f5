"""Report outputs (JSON, CSV, PNG, text), the Rich report at 80 columns, the CLI, and no torch import."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from analysis.gaps import GapOptions, analyse, run_report, write_report
from analysis.report import GROUP_NAME
from analysis.terminal import layer_columns, render
from tests.unit.analysis_fixtures import random_run

ROOT = Path(__file__).resolve().parents[2]
LANGS = ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
SCALE = {"zh": 0.95, "id": 0.85, "ca": 0.9, "mr": 0.75, "ml": 0.7, "hi": 0.8}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run26(tmp_path_factory) -> Path:
    return random_run(tmp_path_factory.mktemp("run26"), LANGS, n_sentences=12, n_layers=26, scale=SCALE)


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_write_report_outputs(run26, tmp_path):
    report = analyse(run26, GapOptions(n_boot=200))
    out = write_report(report, tmp_path / "reports")

    data = json.loads((out / "gaps.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["metadata"]["layers"] == list(range(26))
    assert data["metadata"]["bands"] == {"early": list(range(9)), "middle": list(range(9, 18)),
                                         "deep": list(range(18, 26))}
    assert data["metadata"]["model"]["model_id"] == "test/tiny-model"
    assert len(data["rows"]) == 10 * 26 and len(data["overlap"]) == 9 * 26
    assert data["headlines"][0]["name"] == GROUP_NAME and data["headlines"][0]["deep_mean_gap"] < -15

    with open(out / "gaps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:10] == ["language", "layer", "statistic", "value", "ci_low", "ci_high", "gap_pct",
                                  "gap_parallel_pct", "p_value", "n"]
    assert len(rows) == 260
    ml = next(r for r in rows if r["language"] == "ml" and r["layer"] == "3")
    assert float(ml["gap_pct"]) == pytest.approx(report.matrix("gap_pct", ["ml"])[0, 3])
    assert float(ml["p_value"]) < 0.01 and rows[0]["p_value"] == ""  # the reference has no test

    for name in ("gap_heatmap.png", "gap_lines.png", "overlap_heatmap.png"):
        path = out / "figures" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400

    text = (out / "report.txt").read_text()
    assert "medium/low-resource (id, ca, mr, ml, hi): up to" in text
    assert "\x1b[" not in text


@pytest.mark.parametrize("n_layers, expected_columns", [(26, 9), (18, 9), (6, 6), (3, 3)])
def test_terminal_report_fits_80_columns(tmp_path, n_layers, expected_columns):
    run = random_run(tmp_path, ["en", "hi", "ml", "it"], n_sentences=10, n_layers=n_layers, scale={"ml": 0.8})
    report = analyse(run, GapOptions(n_boot=50))
    console = Console(record=True, width=80, file=io.StringIO())
    render(report, console)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if line.startswith("layer "))
    assert len(header.split()) - 2 == expected_columns  # minus "layer" and "all"
    assert any(line.startswith("med/low") for line in lines)


def test_layer_columns_never_cross_a_band():
    bands = {"early": list(range(9)), "middle": list(range(9, 18)), "deep": list(range(18, 26))}
    columns = layer_columns(list(range(26)), bands, max_columns=9)
    assert [layers for _, layers in columns] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20], [21, 22, 23], [24, 25]
    ]
    assert [band for band, _ in columns if band] == ["early", "middle", "deep"]
    assert len(layer_columns(list(range(26)), bands, max_columns=100)) == 26


def test_run_report_writes_into_the_run(tmp_path):
    run = random_run(tmp_path, ["en", "hi", "ml"], n_sentences=8, n_layers=6)
    console = Console(record=True, width=80, file=io.StringIO())
    report = run_report(run, GapOptions(n_boot=50), console=console)
    assert (run / "reports" / "gaps.json").is_file()
    assert (run / "reports" / "figures" / "gap_heatmap.png").is_file()
    assert report.headline(GROUP_NAME) is not None
    assert "per language" in console.export_text()


def test_cli_writes_outputs(tmp_path):
    run = random_run(tmp_path / "run", ["en", "it", "mr", "hi"], n_sentences=8, n_layers=8, scale={"mr": 0.8})
    out = tmp_path / "cli-out"
    result = _python("-m", "analysis.gaps", str(run), "--out", str(out), "--n-boot", "100", "--stat", "l0",
                     "--bands", "0-1,2-5,6-7")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "medium/low-resource" in result.stdout
    data = json.loads((out / "gaps.json").read_text())
    assert data["metadata"]["statistic"] == "l0" and data["metadata"]["bands"]["early"] == [0, 1]
    assert {p.name for p in (out / "figures").iterdir()} == {"gap_heatmap.png", "gap_lines.png", "overlap_heatmap.png"}
    assert (out / "report.txt").is_file() and (out / "gaps.csv").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/run"], "error: /nonexistent/run: no such file or directory"),
        (["{run}/activations/hi.h5"], "error: no activation file for the reference language 'en'"),
        (["{run}", "--bands", "0-8,9-17"], "error: bands '0-8,9-17': give three inclusive layer ranges"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(run26, args, message):
    result = _python("-m", "analysis.gaps", *(a.format(run=run26) for a in args), "--out", str(run26 / "unused"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_analysis_never_imports_torch_or_scipy(tmp_path):
    run = random_run(tmp_path / "run", ["en", "hi", "ml"], n_sentences=8, n_layers=6)
    code = f"""
import io, sys
from rich.console import Console
import analysis
from analysis import GapOptions, analyse, render, write_report
report = analyse({str(run)!r}, GapOptions(n_boot=20))
write_report(report, {str(tmp_path / "out")!r})
render(report, Console(file=io.StringIO(), width=80))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "scipy", "transformers", "sae_lens"}})
print("HEAVY", heavy)
"""
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
