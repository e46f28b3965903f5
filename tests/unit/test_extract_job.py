"""jobs.extract: run(cfg, task) over every unit or the task's, the summary table, refusing another
configuration, and resuming after SIGKILL with a file equal to an uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jobs import extract
from tests.conftest import ROOT
from tests.helpers import h5_datasets
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.stages import Task
from toolkit.store import ActivationFile


def tiny_cfg(run, **run_opts) -> Config:
    values = {"run": {"run": str(run), "langs": "en,hi", "max_sentences": 8, **run_opts}}
    return Config.build(values, preset="tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("tiny_job"), layers="0-2")
    return cfg, extract.run(cfg)


def test_every_unit_of_the_config_and_the_summary_table(tiny_run, capsys, monkeypatch):
    cfg, summaries = tiny_run
    monkeypatch.setenv("COLUMNS", "160")  # the job's own console prints the table to stderr
    assert sorted(s.lang for s in summaries) == ["en", "hi"] and not any(s.skipped for s in summaries)
    again = extract.run(cfg)
    assert all(s.skipped for s in again)
    table = capsys.readouterr().err
    assert "Extraction" in table and "done: finished by an earlier run" in table and "mean L0" in table


def test_a_task_narrows_the_units(tiny_run):
    cfg, _ = tiny_run
    (summary,) = extract.run(cfg, Task("hi", units=(("hi", 0, 1),)))
    assert summary.lang == "hi" and summary.skipped


def test_different_config_is_refused_then_overwritten(tiny_run):
    cfg, _ = tiny_run
    other = tiny_cfg(cfg.run_dir, layers="0-3")
    en = Task("en", units=(("en", 0, 1),))
    with pytest.raises(UserError, match="different configuration.*--overwrite"):
        extract.run(other, en)
    other.extract.overwrite = True
    (summary,) = extract.run(other, en)
    with ActivationFile(summary.path) as f:
        assert f.layers == [0, 1, 2, 3]


# The job body through the stage registry in a child process, as an executor runs it.
JOB = ("import sys; from toolkit import stages, submit; "
       "cfg = submit.config_from_args(submit.build_parser().parse_args(sys.argv[1:])); "
       "stages.run(cfg, 'extract')")


def _job_args(run, *extra) -> list[str]:
    return ["extract", "--preset", "tiny", "--langs", "en", "--corpus", "embedded", "--batch-tokens", "128",
            "--layers", "0-5", "--sae", "random", "--run", str(run), *extra]


def _job_extract(run, *extra):
    args = [sys.executable, "-c", JOB, *_job_args(run, *extra)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job_in_process(run) -> None:
    """The same job body with the same arguments, in this process (no interpreter to start)."""
    from toolkit import stages, submit

    stages.run(submit.config_from_args(submit.build_parser().parse_args(_job_args(run))), "extract")




def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    _job_in_process(reference)  # the uninterrupted run; only the killed one needs a process of its own

    killed = tmp_path / "killed"
    proc = _job_extract(killed)
    parts = killed / "activations" / "en.h5.parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "activations" / "en.h5").exists(), "the run finished before it could be killed"
    n_before = len(list(parts.glob("part-*.npz")))
    assert n_before >= 3

    _job_in_process(killed)  # resumes after the committed parts
    assert not parts.exists()
    want, got = h5_datasets(reference / "activations" / "en.h5"), h5_datasets(killed / "activations" / "en.h5")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)

