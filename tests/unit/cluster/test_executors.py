"""The executors behind one interface: local and debug in this process, slurm through the FAKE `sbatch`
of `fake_bin` (see conftest.py): the scripts, the chain, RUN/jobs.json, and the dry run."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tests.helpers import h5_datasets
from tests.unit.cluster.common import HERE, TINY, cfg_of
from toolkit.cluster import executor_names, get_executor, plan
from toolkit.cluster.base import Executor
from toolkit.cluster.debug import DebugExecutor
from toolkit.cluster.job import ResumableStageJob
from toolkit.cluster.local import LocalExecutor
from toolkit.cluster.slurm import SlurmExecutor
from toolkit.cluster.states import result_of
from toolkit.errors import UserError
from toolkit.submit import build_parser, main


def test_local_and_debug_executors_record_their_jobs(tmp_path, capsys):
    local, debug = tmp_path / "local", tmp_path / "debug"
    assert main(["extract", *TINY, "--run", str(local)]) == 0  # local is the default
    assert main(["extract", *TINY, "--run", str(debug), "--executor", "debug"]) == 0
    (rec,) = json.loads((local / "jobs.json").read_text())["jobs"]
    assert (rec["executor"], rec["language"], rec["state"], rec["pid"]) == ("local", "en,hi", "COMPLETED", os.getpid())
    per_task = json.loads((debug / "jobs.json").read_text())["jobs"]
    assert [(r["language"], r["state"]) for r in per_task] == [("en", "COMPLETED"), ("hi", "COMPLETED")]
    for lang in ("en", "hi"):  # the pickled per-language jobs write what the in-process run writes
        a, b = h5_datasets(local / "activations" / f"{lang}.h5"), h5_datasets(debug / "activations" / f"{lang}.h5")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["status", "--run", str(local)]) == 0
    out = capsys.readouterr().err
    assert "COMPLETED" in out and rec["job_id"] in out and "(this terminal)" in out
    assert main(["status", "--run", str(local), "--wait"]) == 0


def test_a_local_failure_is_recorded_and_reported(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_text("a\n")  # no hi.txt
    run = tmp_path / "run"
    run.mkdir()  # a run folder this command did not create keeps the record (a new one is removed again)
    assert main(["extract", *TINY, "--corpus", f"text:{corpus}", "--run", str(run)]) == 2
    (rec,) = json.loads((run / "jobs.json").read_text())["jobs"]
    assert rec["state"] == "FAILED" and "corpus has no Hindi file" in rec["error"]
    capsys.readouterr()
    assert main(["status", "--run", str(run)]) == 0
    assert "corpus has no Hindi file" in capsys.readouterr().err
    assert main(["status", "--run", str(run), "--wait"]) == 1


def test_pipeline_submission_with_a_container(fake_bin, tmp_path, monkeypatch, capsys):
    """Through submitit to the FAKE sbatch: the scripts, the chain and RUN/jobs.json."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("en", "hi"):
        (corpus / f"{lang}.txt").write_text("a\nb\n")
    image = tmp_path / "lingogap.sif"
    image.write_bytes(b"x")
    run = tmp_path / "run"
    assert main(["pipeline", "--preset", "tiny", "--langs", "en,hi", "--corpus", f"text:{corpus}", "--sae", "train",
                 "--run", str(run), "--executor", "slurm", "--cluster", "testcluster", "--container", str(image),
                 "--stages", "extract,report,align,evaluate"]) == 0
    records = json.loads((run / "jobs.json").read_text())["jobs"]
    assert [(r["stage"], r["language"]) for r in records] == [
        ("train-saes", "all"), ("extract", "en"), ("extract", "hi"), ("report", "all"), ("align", "hi"),
        ("evaluate", "all")]
    ids = [r["job_id"] for r in records]
    assert ids == ["41", "42_0", "42_1", "43", "44", "45"]
    assert [r["depends_on"] for r in records] == [None, "41", "41", "42", "43", "44"]
    assert [r["array_task"] for r in records] == [None, 0, 1, None, None, None]
    for rec in records:
        assert rec["folder"].startswith(str(run / "logs")) and rec["container"] == str(image)
        assert rec["stderr"].endswith(f"{rec['job_id']}_0_log.err")
    scripts = {n: (fake_bin / f"job_{n}.sh").read_text() for n in range(41, 46)}
    expected_python = shlex.join(["apptainer", "exec", "--nv", "--bind",
                                  f"{run},{tmp_path / 'cache'},{tmp_path / 'hf'},{corpus}", str(image), "python"])
    for n, text in scripts.items():
        assert f"{expected_python} -u -m submitit.core._submit" in text, text
        assert "export HDF5_USE_FILE_LOCKING=FALSE" in text and "--kill-on-invalid-dep=yes" in text
        assert ("#SBATCH --dependency=afterok:" in text) == (n > 41)
        assert ("#SBATCH --requeue" in text) == (n in (42, 44))  # extraction and alignment are checkpointable
    assert "#SBATCH --array=0-1%2" in scripts[42]
    from submitit.core.utils import DelayedSubmission

    # the pickled job of an array task is the very callable that task runs
    submitted = DelayedSubmission.load(Path(records[2]["folder"]) / "42_1_submitted.pkl")
    assert isinstance(submitted.function, ResumableStageJob) and submitted.function.task.units == (("hi", 0, 1),)
    assert submitted.function.cfg.run.run == str(run) and submitted.function.versions == HERE
    assert result_of(records[0]) is None  # nothing ran


def test_submitting_without_sbatch_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert main(["report", "--run", str(tmp_path), "--executor", "slurm", "--cluster", "testcluster"]) == 2
    assert "no `sbatch` on PATH" in capsys.readouterr().err


def test_a_chain_refused_half_way_keeps_the_submitted_jobs_on_record(fake_bin, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_REFUSE", "42")  # the FAKE sbatch refuses the second submission
    run = tmp_path / "run"
    assert main(["pipeline", *TINY, "--run", str(run), "--executor", "slurm", "--cluster", "testcluster"]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the report job: sbatch: error: Batch job submission failed: Invalid account" in err
    assert "cancel" in err
    records = json.loads((run / "jobs.json").read_text())["jobs"]
    assert [(r["stage"], r["job_id"]) for r in records] == [("extract", "41_0"), ("extract", "41_1")]


def test_dry_run_lists_the_jobs_and_their_resources(tmp_path, capsys):
    assert main(["pipeline", *TINY, "--run", str(tmp_path), "--executor", "slurm", "--cluster", "example-gpu",
                 "--stages", "extract,report,align", "--container", str(tmp_path / "l.sif"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "jobs (slurm, profile example-gpu)" in out and "0 GPU, 16GB, 60 min" in out  # report: no GPU
    assert f"apptainer exec --nv --bind {tmp_path}," in out and not (tmp_path / "jobs.json").exists()


def test_executors_are_chosen_by_name(tmp_path):
    console = Console(file=open(os.devnull, "w"))
    assert type(get_executor(cfg_of(tmp_path), console)) is LocalExecutor
    assert type(get_executor(cfg_of(tmp_path, executor="debug"), console)) is DebugExecutor
    slurm = get_executor(cfg_of(tmp_path, executor="slurm", cluster="testcluster"), console)
    assert type(slurm) is SlurmExecutor and slurm.profile.name == "testcluster"
    cfg = cfg_of(tmp_path)
    cfg.run.executor = "cloud"
    with pytest.raises(UserError, match="unknown executor 'cloud'; known: .*local.*debug.*slurm"):
        get_executor(cfg, console)


def test_local_merges_a_stage_into_one_call_and_debug_keeps_the_tasks(tmp_path, capsys):
    assert main(["extract", *TINY, "--run", str(tmp_path), "--dry-run"]) == 0
    assert "jobs (local)" in capsys.readouterr().out.split("resolved config")[-1]
    cfg = cfg_of(tmp_path, executor="debug")
    step = plan(cfg, "extract")[-1]  # (after train-saes: the tiny preset trains its SAEs)
    console = Console(file=open(os.devnull, "w"))
    assert [t.label for t in get_executor(cfg, console).tasks(step)] == ["en", "hi"]
    cfg.run.executor = "local"
    assert [t.label for t in get_executor(cfg, console).tasks(step)] == ["en,hi"]
    assert isinstance(get_executor(cfg, console), Executor)


def test_executor_names_come_from_the_registry(tmp_path, capsys):
    assert executor_names() == ("local", "debug", "slurm")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--executor", "cloud"])
    assert "choose from 'local', 'debug', 'slurm'" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("executor: cloud\n")  # YAML and the Python API do not pass argparse's choices
    assert main(["extract", *TINY, "--config", str(config), "--run", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "unknown executor 'cloud'" in capsys.readouterr().err and not (tmp_path / "run").exists()
