"""`align --sweep grid.yaml`: grid expansion, tags, bad grids, point folders, the array it becomes, and a real
two-point sweep on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import stages, sweep
from toolkit.config import AlignConfig, Config
from toolkit.errors import UserError
from toolkit.rundir import RunDir
from toolkit.submit import main

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--preset", "tiny", "--langs", "en,hi", "--sae", "random"]


def _cfg(run: Path | str = "runs/unused", **align) -> Config:
    return Config.build({"run": {"run": str(run), "langs": "en,hi,ml"}, "align": align}, preset="tiny")


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_the_grid_is_the_cross_product_with_typed_values_and_readable_tags():
    grid = {"seed": [0, 1], "lambda_align": [0.5, "1"], "lora_targets": [["q_proj", "v_proj"]], "lr": ["1e-3"]}
    points = sweep.expand(grid, _cfg())
    assert [p.tag for p in points] == [
        "lambda_align=0.5,lora_targets=q_proj+v_proj,lr=0.001,seed=0",
        "lambda_align=1,lora_targets=q_proj+v_proj,lr=0.001,seed=0",
        "lambda_align=0.5,lora_targets=q_proj+v_proj,lr=0.001,seed=1",
        "lambda_align=1,lora_targets=q_proj+v_proj,lr=0.001,seed=1",
    ]  # the file's first key varies slowest; tags list keys alphabetically, so reordering the file keeps folders
    assert points[1].as_dict() == {"seed": 0, "lambda_align": 1.0, "lora_targets": "q_proj,v_proj", "lr": 0.001}
    cfg = sweep.apply(_cfg(sweep="grid.yaml"), points[1])
    assert (cfg.align.lambda_align, cfg.align.lr, cfg.align.lora_targets, cfg.run.seed) == (
        1.0,
        0.001,
        "q_proj,v_proj",
        0,
    )
    assert cfg.align.sweep == "" and isinstance(cfg.align.lambda_align, float)
    reordered = sweep.expand(dict(reversed(list(grid.items()))), _cfg())
    assert {p.tag for p in reordered} == {p.tag for p in points}


def test_tags_spell_every_kind_of_value_safely():
    assert sweep.tag_of({"lr": 2e-4, "lambda_keep": 0.0, "steps": 40}) == "lambda_keep=0,lr=0.0002,steps=40"
    assert sweep.tag_of({"lr": 1e-5}) == "lr=1e-05"
    assert (
        sweep.tag_of({"align_layers": "0-17:2", "lora_layers": "0-5, 12"}) == "align_layers=0-17+2,lora_layers=0-5++12"
    )
    long = sweep.tag_of({"lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" * 3})
    assert (
        len(long) == sweep.TAG_MAX
        and long[-9] == "~"
        and long == sweep.tag_of({"lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" * 3})
    )


def test_an_objective_grid_follows_the_config():
    """`objective` is an align option once the gain report's objectives exist; until then it is an unknown key."""
    grid = {"objective": ["mass", "none"], "lambda_align": [0.5]}
    if "objective" in {f.name for f in dataclasses.fields(AlignConfig)}:
        assert [p.tag for p in sweep.expand(grid, _cfg())] == [
            "lambda_align=0.5,objective=none",  # the none arm first, so a local sweep measures it first
            "lambda_align=0.5,objective=mass",
        ]
    else:
        with pytest.raises(UserError, match="unknown grid key 'objective'"):
            sweep.expand(grid, _cfg())


@pytest.mark.parametrize(
    "text, message",
    [
        ("lambda: [1.0]\n", "unknown grid key 'lambda'; a grid maps these options to lists:"),
        ("lr: 0.001\n", "lr must be a list of values (got 0.001); write lr: [0.001]"),
        ("", "empty grid; map align option names to lists of values"),
        ("{}\n", "empty grid"),
        ("- lr\n", "a grid must be a mapping (got a list); map align option names to lists of values"),
        ("lr: []\n", "lr is an empty list"),
        ("targets: [hi, ml]\n", "'targets' cannot vary in a sweep; set align.targets outside the grid"),
        ("lora_r: [4, four]\n", "lora_r: align.lora_r must be an integer (got 'four', a str)"),
        ("lr: [0.001, -1]\n", "sweep point lr=-1: align.lr must be a finite number greater than 0"),
        ("lr: [0.001, 1.0e-3]\n", "two points have the tag 'lr=0.001'"),
        ("engine: [torch, gpu]\n", "engine: align.engine must be one of auto, torch, deepspeed (got 'gpu')"),
    ],
)
def test_a_bad_grid_is_one_error_naming_the_key(tmp_path, capsys, text, message):
    grid = _grid(tmp_path, text)
    run = tmp_path / "run"
    assert main(["align", *BASE, "--run", str(run), "--sweep", str(grid), "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {grid}: {message}" in err and "Traceback" not in err
    assert not run.exists()  # refused before anything was written


def test_a_missing_grid_file_exits_2_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "toolkit.submit", "align", *BASE, "--run", str(tmp_path / "run"), "--sweep",
         str(tmp_path / "nowhere.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"align.sweep: no such file {tmp_path / 'nowhere.yaml'}" in " ".join(out.stderr.split())


def test_a_folder_holding_another_points_checkpoint_is_refused_by_name(tmp_path, capsys):
    grid = _grid(tmp_path, "lambda_align: [0.5, 1.0]\n")
    run = tmp_path / "run"
    (point,) = sweep.expand({"lambda_align": [0.5]}, _cfg(run))
    taken = RunDir(run).point_record("hi@lambda_align=0.5")
    taken.parent.mkdir(parents=True)
    taken.write_text(json.dumps({"tag": point.tag, "values": {"lambda_align": 0.25}}))
    assert main(["align", *BASE, "--run", str(run), "--sweep", str(grid), "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"{taken.parent} holds another sweep point's adapter ({{'lambda_align': 0.25}}; it differs in lambda_align)"
        in err
    )
    taken.unlink()  # no record, but checkpoints of something else
    (taken.parent / "checkpoints" / "step-000002").mkdir(parents=True)
    assert main(["align", *BASE, "--run", str(run), "--sweep", str(grid), "--dry-run"]) == 2
    assert f"{taken.parent} holds checkpoints of another run, not of this sweep point" in " ".join(
        capsys.readouterr().err.split()
    )
    sweep.check_folder(run, "hi@lambda_align=1", sweep.expand({"lambda_align": [1.0]}, _cfg(run))[0])  # others pass


def test_one_array_task_per_target_and_point_merged_into_one_local_call(tmp_path):
    grid = _grid(tmp_path, "lambda_align: [0.5, 1.0]\nseed: [3]\n")
    cfg = _cfg(tmp_path / "run", sweep=str(grid), targets="hi,ml")
    align = stages.get("align")
    tasks = align.split(cfg)
    assert [t.label for t in tasks] == [
        f"{lang}@lambda_align={lam},seed=3" for lang in ("hi", "ml") for lam in ("0.5", "1")
    ]
    assert [t.langs for t in tasks] == [("hi",)] * 2 + [("ml",)] * 2 and all(len(t.points) == 1 for t in tasks)
    merged = align.merge(tasks)
    assert merged.label == "hi,ml x 2 sweep points" and merged.langs is None
    assert [p.tag for p in merged.points] == ["lambda_align=0.5,seed=3", "lambda_align=1,seed=3"]
    cfg.align.joint = True
    assert [t.label for t in align.split(cfg)] == ["joint@lambda_align=0.5,seed=3", "joint@lambda_align=1,seed=3"]
    cfg.align.sweep = ""
    assert [t.label for t in align.split(cfg)] == ["joint"]


def test_a_two_point_sweep_trains_each_point_in_its_folder_and_resumes(tmp_path, capsys, monkeypatch):
    """Real tiny runs: each point its own adapter and record, one shared base measurement, a rerun only measures."""
    monkeypatch.setenv("COLUMNS", "250")
    grid = _grid(tmp_path, "lambda_align: [0.0, 1.0]\n")
    run = tmp_path / "run"
    args = ["align", *BASE, "--run", str(run), "--sweep", str(grid), "--max-sentences", "24", "--max-length", "48",
            "--layers", "0-25:5", "--align-layers", "0-25:5", "--steps", "2", "--checkpoint-every", "2"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    names = ["hi@lambda_align=0", "hi@lambda_align=1"]
    assert list(RunDir(run).adapters()) == names and RunDir(run).adapters(points=False) == {}
    for name, lam in zip(names, (0.0, 1.0), strict=True):
        folder = run / "align" / name
        assert json.loads((folder / "point.json").read_text()) == {"tag": name[3:], "values": {"lambda_align": lam}}
        report = json.loads((folder / "before_after.json").read_text())
        assert report["unit"] == name and report["targets"] == ["hi"]
    bases = [json.loads((run / "align" / n / "before_after.json").read_text())["before_dir"] for n in names]
    assert bases[0] == bases[1] and len(list((run / "align").glob("base-*/"))) == 1  # measured once, shared
    first = {n: (run / "align" / n / "adapter" / "adapter_model.safetensors").read_bytes() for n in names}
    assert first[names[0]] != first[names[1]], "lambda_align should change what is learnt"
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert all(f"{n}: adapter already trained" in err for n in names), err
    assert {n: (run / "align" / n / "adapter" / "adapter_model.safetensors").read_bytes() for n in names} == first


def test_a_points_none_arm_is_the_none_point_with_its_other_values(tmp_path):
    run = RunDir(tmp_path)
    records = {
        "hi@lambda_align=1,objective=mass,seed=0": {"lambda_align": 1.0, "objective": "mass", "seed": 0},
        "hi@lambda_align=1,objective=mass,seed=1": {"lambda_align": 1.0, "objective": "mass", "seed": 1},
        "hi@lambda_align=0.5,objective=none,seed=0": {"lambda_align": 0.5, "objective": "none", "seed": 0},
        "ml@lambda_align=1,objective=none,seed=1": {"lambda_align": 1.0, "objective": "none", "seed": 1},
    }
    for name, values in records.items():
        run.point_record(name).parent.mkdir(parents=True)
        run.point_record(name).write_text(json.dumps({"tag": name[3:], "values": values}))
    none = run.align("hi@lambda_align=0.5,objective=none,seed=0") / "before_after.json"
    assert sweep.none_arm(tmp_path, "hi@lambda_align=1,objective=mass,seed=0") == none  # lambda_align aside
    assert sweep.none_arm(tmp_path, "hi@lambda_align=1,objective=mass,seed=1") is None  # seed 1 has none for hi
    assert sweep.none_arm(tmp_path, "hi@lambda_align=0.5,objective=none,seed=0") is None  # the arm itself
    assert sweep.none_arm(tmp_path, "hi") is None  # not a sweep point
