"""`align --sweep` on the live Slurm test cluster: a 4-point grid is one 4-task array, each point trains in its own
folder against one shared base measurement, and `analysis.align_sweep` reads the points back.

Start the cluster with `slurm/testcluster/start.sh`; without it every test here is skipped.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from analysis import align_sweep
from toolkit.rundir import RunDir
from toolkit.submit import main

# slow: 17-21 s alone, 33-36 s beside the rest of the suite (four job starts on the 2-CPU test cluster); .ci/run runs it
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SLURM = ["--executor", "slurm", "--cluster", "testcluster"]
TINY = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "16", "--max-length", "32", "--layers", "0-25:12",
        "--align-layers", "0-25:12", "--sae", "random", "--steps", "2", "--checkpoint-every", "2",
        "--objective", "mass"]  # fmt: skip
# `mass`, not the default `massfit`: random SAEs reconstruct nothing for massfit's fit terms to keep
GRID = "lambda_align: [0.0, 1.0]\nlr: [0.001, 0.002]\n"
POINTS = [f"hi@lambda_align={lam},lr={lr}" for lam in ("0", "1") for lr in ("0.001", "0.002")]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture(scope="module")
def swept(slurm_cluster, tmp_path_factory):
    """One 4-point sweep submitted as an array and waited for (a fresh run folder: its own submitit folder)."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "grid.yaml").write_text(GRID)
    run = root / "run"
    code = main(["align", *TINY, "--run", str(run), "--sweep", str(root / "grid.yaml"), *SLURM, "--wait"])
    return run, code


def test_a_four_point_grid_is_one_array_whose_points_train_in_their_own_folders(swept):
    run, code = swept
    records = json.loads((run / "jobs.json").read_text())["jobs"]
    assert code == 0, [r["stderr"] for r in records]
    assert [(r["language"], r["array_task"]) for r in records] == [(p, i) for i, p in enumerate(POINTS)]
    (array,) = {r["job_id"].split("_")[0] for r in records}
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State", "-j", array], capture_output=True,
                         text=True, timeout=30, check=True)  # fmt: skip
    states = dict(line.split("|") for line in out.stdout.split())
    assert sorted(states) == sorted(r["job_id"] for r in records) and set(states.values()) == {"COMPLETED"}
    assert list(RunDir(run).adapters()) == POINTS
    before = set()
    for name in POINTS:
        folder = run / "align" / name
        values = json.loads((folder / "point.json").read_text())["values"]
        assert name == f"hi@lambda_align={values['lambda_align']:g},lr={values['lr']:g}"
        report = json.loads((folder / "before_after.json").read_text())
        assert report["unit"] == name and report["targets"] == ["hi"]
        before.add(report["before_dir"])
    assert len(before) == 1 and len(list((run / "align").glob("base-*/"))) == 1  # one base measurement, shared


def test_the_sweep_analysis_reads_every_point(swept):
    run, code = swept
    assert code == 0
    report = json.loads((run / "align" / POINTS[0] / "before_after.json").read_text())
    if "summary" not in report:
        pytest.skip("before_after.json has no summary block yet: align's gain report (issue 20, item 3) writes it")
    assert align_sweep.main([str(run)]) == 0
    with open(run / "reports" / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["point"] for r in rows] == POINTS
    assert [(float(r["lambda_align"]), float(r["lr"])) for r in rows] == [(0, 1e-3), (0, 2e-3), (1, 1e-3), (1, 2e-3)]
    assert Path(run / "reports" / "pareto.png").read_bytes().startswith(b"\x89PNG")
