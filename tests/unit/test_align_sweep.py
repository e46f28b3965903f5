"""`python -m analysis.align_sweep RUN` on synthetic sweep points: sweep.csv, pareto.png, the default and the front."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from analysis import align_sweep
from toolkit.config import AlignConfig

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = AlignConfig()


def synthetic_before_after(run: Path, name: str, **summary) -> Path:
    """A point folder with a peft adapter's config and a before_after.json whose summary block is `summary` over
    the align defaults (the only part the analysis reads)."""
    folder = run / "align" / name
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    block = {
        "objective": getattr(DEFAULT, "objective", "match"), "lambda_align": DEFAULT.lambda_align,
        "lambda_keep": DEFAULT.lambda_keep, "lr": DEFAULT.lr, "lora_targets": DEFAULT.lora_targets,
        "lora_r": DEFAULT.lora_r, "align_layers": DEFAULT.align_layers, "seed": 0, "closure_pct": None,
        "norm_adjusted_gain_pct": None, "gain_pct": None,
        "english_kl": None, "english_retention_pct": 100.0, "fve_drop": 0.01, "target_bpb": 3.2, "minutes": 0.2,
        "guards_ok": True,
    }  # fmt: skip
    block.update(summary)
    (folder / "before_after.json").write_text(json.dumps({"unit": name, "summary": block}))
    return folder


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    synthetic_before_after(run, "hi@lambda_align=0.5", lambda_align=0.5, closure_pct=40.0, norm_adjusted_gain_pct=9.0,
                           gain_pct=12.0, english_kl=0.010)  # fmt: skip
    synthetic_before_after(run, "hi@lambda_align=1", closure_pct=70.0, norm_adjusted_gain_pct=15.0, gain_pct=20.0,
                           english_kl=0.050, guards_ok=False)  # fmt: skip
    return run


def _rows(run: Path) -> dict[str, dict]:
    with open(run / "reports" / "sweep.csv", newline="") as fh:
        return {r["point"]: r for r in csv.DictReader(fh)}


def test_two_points_give_the_csv_the_figure_and_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    run = _run(tmp_path)
    assert align_sweep.main([str(run)]) == 0
    rows = _rows(run)
    assert list(rows) == ["hi@lambda_align=0.5", "hi@lambda_align=1"]
    low, default = rows["hi@lambda_align=0.5"], rows["hi@lambda_align=1"]
    assert (low["unit"], low["tag"], low["lambda_align"], low["closure_pct"]) == (
        "hi",
        "lambda_align=0.5",
        "0.5",
        "40.0",
    )
    assert (low["default"], default["default"]) == ("False", "True")  # the align defaults are the default point
    # the default overshoots the other on closure but fails a guard: only the guarded point is on the front
    assert (low["pareto"], default["pareto"], default["guards_ok"]) == ("True", "False", "False")
    assert low["norm_adjusted_gain_pct"] == "9.0" and low["gain_pct"] == "12.0"
    png = (run / "reports" / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    out = capsys.readouterr().out
    cells = {line.split("│")[2].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert set(cells) == {"lambda_align=0.5 ◆", "lambda_align=1 ★✗"}  # front; default that fails a guard
    assert "+40.0" in cells["lambda_align=0.5 ◆"] and "0.0500" in cells["lambda_align=1 ★✗"]
    assert f"wrote {run / 'reports' / 'sweep.csv'}" in out


def test_the_front_keeps_only_points_no_guarded_point_dominates(tmp_path):
    run = _run(tmp_path)
    synthetic_before_after(run, "hi@lambda_align=0.25", lambda_align=0.25, closure_pct=30.0, english_kl=0.02)
    synthetic_before_after(run, "hi@lambda_align=2", lambda_align=2.0, closure_pct=60.0, english_kl=0.03)
    synthetic_before_after(run, "hi@lambda_align=3", lambda_align=3.0, closure_pct=None, english_kl=0.001)
    synthetic_before_after(run, "ml@lambda_align=2", lambda_align=2.0, closure_pct=85.0, english_kl=0.005)
    rows = align_sweep.load(run)
    assert {r.name: r.pareto for r in rows} == {
        "ml@lambda_align=2": True,  # each target has its own front: ml dominates no hi point
        "hi@lambda_align=0.25": False,  # less closure and more KL than lambda_align=0.5
        "hi@lambda_align=0.5": True,
        "hi@lambda_align=1": False,  # fails a guard
        "hi@lambda_align=2": True,  # more closure at more KL: a trade-off, not dominated
        "hi@lambda_align=3": False,  # no closure measured
    }
    align_sweep.write(rows, run, x="norm_adjusted_gain_pct")  # only points with that number can be on its front
    assert {n for n, r in _rows(run).items() if r["pareto"] == "True"} == {"hi@lambda_align=0.5"}


def test_the_front_is_on_norm_adjusted_closure_when_the_summaries_give_it(tmp_path):
    run = _run(tmp_path)  # closure: 0.5 has 40 at KL 0.01; the one below has 35 at KL 0.008 (both on the front)
    synthetic_before_after(run, "hi@lambda_align=0.25", lambda_align=0.25, closure_pct=35.0, english_kl=0.008,
                           norm_adjusted_closure_pct=5.0)  # fmt: skip
    folder = run / "align" / "hi@lambda_align=0.5" / "before_after.json"
    report = json.loads(folder.read_text())
    report["summary"]["norm_adjusted_closure_pct"] = 4.0  # less than 0.25's once scale is taken out: dominated
    folder.write_text(json.dumps(report))
    rows = align_sweep.load(run)
    assert align_sweep.default_x(rows) == "norm_adjusted_closure_pct"
    assert {r.name: r.pareto for r in rows} == {"hi@lambda_align=0.25": True, "hi@lambda_align=0.5": False,
                                                "hi@lambda_align=1": False}  # fmt: skip
    align_sweep.write(rows, run, x="closure_pct")
    assert {n for n, r in _rows(run).items() if r["pareto"] == "True"} == {
        "hi@lambda_align=0.25",
        "hi@lambda_align=0.5",
    }
    assert _rows(run)["hi@lambda_align=0.25"]["norm_adjusted_closure_pct"] == "5.0"


def test_unfinished_points_and_plain_adapters_are_not_sweep_rows(tmp_path):
    run = _run(tmp_path)
    (run / "align" / "hi@lambda_align=4" / "adapter").mkdir(parents=True)  # trained, not measured yet
    (run / "align" / "hi@lambda_align=4" / "adapter" / "adapter_config.json").write_text("{}")
    synthetic_before_after(run, "hi", closure_pct=50.0, english_kl=0.01)  # an ordinary adapter
    assert [r.name for r in align_sweep.load(run)] == ["hi@lambda_align=0.5", "hi@lambda_align=1"]


def test_a_run_without_points_or_summaries_is_one_error(tmp_path, capsys):
    assert align_sweep.main([str(tmp_path / "nowhere")]) == 2
    assert f"error: {tmp_path / 'nowhere'}: no such run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert align_sweep.main([str(run)]) == 2
    assert "no sweep point has an adapter" in " ".join(capsys.readouterr().err.split())
    folder = synthetic_before_after(run, "hi@lr=0.001", lr=0.001)
    (folder / "before_after.json").write_text(json.dumps({"unit": "hi@lr=0.001", "languages": {}}))
    assert align_sweep.main([str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{folder / 'before_after.json'} has no summary block" in err and "Traceback" not in err
    (folder / "before_after.json").write_text(json.dumps({"summary": {"objective": "mass"}}))
    assert align_sweep.main([str(run)]) == 2
    assert "summary has no 'lambda_align'" in capsys.readouterr().err


def test_the_sweep_analysis_never_imports_torch(tmp_path):
    run = _run(tmp_path)
    code = (
        "import sys; from analysis import align_sweep; assert align_sweep.main([sys.argv[1]]) == 0; "
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'scipy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
