"""`--executor slurm` on the live single-node test cluster: arrays, preemption and requeue, failures,
cancel, and a dependent pipeline. Each test uses its own run directory, so its own submitit folder
(job ids restart after a purge of the cluster).

Start the cluster with `slurm/testcluster/start.sh`; without it every test here is skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from toolkit.cluster.states import states
from toolkit.submit import main

pytestmark = pytest.mark.cluster

SLURM = ["--executor", "slurm", "--cluster", "testcluster"]
TINY = ["--preset", "tiny", "--langs", "en,hi,ml", "--max-sentences", "8", "--layers", "0-3", "--sae", "random"]
# Long enough (~4 s of extraction per language, 40+ batches) to be interrupted while it runs.
LONG = ["--preset", "tiny", "--layers", "0-12", "--sae", "random", "--batch-tokens", "256"]
SLACK_S = 2
VOLATILE_ATTRS = {"seconds", "tokens_per_second"}  # timings: the only attributes that differ between runs


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # Rich tables unfolded, so error lines can be searched


@pytest.fixture
def reference(slurm_cluster, tmp_path_factory):
    """Local (in-process) runs to compare the cluster's files with (each test compares with its own)."""
    made: dict[str, Path] = {}

    def get(name: str, args: list[str]) -> Path:
        if name not in made:
            run = tmp_path_factory.mktemp(f"local-{name}")
            assert main(["extract", *args, "--run", str(run)]) == 0
            made[name] = run
        return made[name]

    return get


def job_records(run: Path) -> list[dict]:
    return json.loads((run / "jobs.json").read_text())["jobs"]


def sacct(job_id: str, *extra: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State,Start,End", *extra, "-j", job_id],
                         capture_output=True, text=True, timeout=30, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def assert_same_h5(a: Path, b: Path) -> None:
    """Every dataset and attribute equal (timings excepted)."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        items: dict[str, dict] = {"a": {}, "b": {}}
        fa.visititems(lambda n, o: items["a"].__setitem__(n, o))
        fb.visititems(lambda n, o: items["b"].__setitem__(n, o))
        assert set(items["a"]) == set(items["b"]), f"{a} and {b} hold different objects"
        for name, obj in [("/", fa), *items["a"].items()]:
            other = fb[name]
            if isinstance(obj, h5py.Dataset):
                assert obj.dtype == other.dtype and np.array_equal(obj[()], other[()]), f"{a}: {name} differs"
            for key in set(obj.attrs) - VOLATILE_ATTRS:
                assert np.array_equal(np.asarray(obj.attrs[key]), np.asarray(other.attrs[key])), f"{name}@{key}"


def wait_until(predicate, timeout: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _text(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).is_file() else ""


def drain(job_ids: list[str]) -> None:
    """A cancelled running job keeps the only node COMPLETING ~7 s: let that pass before the next test."""
    mains = sorted({j.split("_")[0] for j in job_ids})
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(mains), "-o", "%i"], capture_output=True,
                                          text=True).stdout.strip(), 30, "the node to drain")


def test_extraction_array_completes_and_equals_a_local_run(slurm_cluster, reference, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["extract", *TINY, "--run", str(run), *SLURM, "--wait"]) == 0, capsys.readouterr().err
    records = job_records(run)
    assert sorted(r["language"] for r in records) == ["en", "hi", "ml"]
    array = {r["job_id"].split("_")[0] for r in records}
    assert len(array) == 1 and sorted(r["array_task"] for r in records) == [0, 1, 2], "not one 3-task array"
    states = {row[0]: row[1] for row in sacct(array.pop())}
    assert sorted(states) == sorted(r["job_id"] for r in records) and set(states.values()) == {"COMPLETED"}, states
    local = reference("tiny", TINY)
    for lang in ("en", "hi", "ml"):
        assert_same_h5(run / "activations" / f"{lang}.h5", local / "activations" / f"{lang}.h5")
    assert main(["status", "--run", str(run)]) == 0
    assert capsys.readouterr().err.count("COMPLETED") >= 3


@pytest.mark.slow  # ~30 s: two job starts and Slurm's ~10 s requeue delay; run by .ci/run
def test_preempted_extraction_is_requeued_and_resumes(slurm_cluster, reference, tmp_path, capsys):
    import submitit

    run = tmp_path / "run"
    args = [*LONG, "--langs", "en"]
    assert main(["extract", *args, "--run", str(run), *SLURM]) == 0
    (rec,) = job_records(run)
    parts = run / "activations" / "en.h5.parts"
    # interrupt only once batches are committed, i.e. while the extraction really runs
    wait_until(lambda: len(list(parts.glob("part-*.npz"))) >= 2, 120, "committed batches")
    submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])._interrupt()  # SIGTERM, then USR2: preemption
    local = reference("long-en", args)  # made while Slurm requeues the job (~10 s in which the node is idle)
    assert main(["status", "--run", str(run), "--wait"]) == 0, capsys.readouterr().err
    history = [row[1] for row in sacct(rec["job_id"], "--duplicates")]
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    log = Path(rec["stderr"]).read_text()
    assert "this job is preempted" in log and "CANCELLED AT" in log and "DUE TO JOB REQUEUE" in log
    assert_same_h5(run / "activations" / "en.h5", local / "activations" / "en.h5")


def test_failed_job_shows_its_error_and_its_dependents_never_run(slurm_cluster, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("en", "hi"):
        (corpus / f"{lang}.txt").write_text("one sentence\nanother sentence\n")
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--langs", "en,hi", "--corpus", f"text:{corpus}", "--layers", "0-1", "--sae", "random"]
    assert main(["pipeline", *args, "--run", str(run), *SLURM]) == 0  # checked here: the folder exists
    shutil.rmtree(corpus)  # ...and is gone when the jobs start (importing torch alone takes seconds)
    capsys.readouterr()
    assert main(["status", "--run", str(run), "--wait"]) == 1
    err = capsys.readouterr().err
    assert "is not a folder" in err and "FAILED" in err
    assert main(["status", "--run", str(run)]) == 0
    table = capsys.readouterr().err
    extract = [ln for ln in table.splitlines() if " extract " in ln]
    assert len(extract) == 2 and all("FAILED" in ln and "is not a folder" in ln for ln in extract), table
    report = [ln for ln in table.splitlines() if " report " in ln]
    assert len(report) == 1 and "CANCELLED" in report[0] and "never started: dependency" in report[0], table


def test_cancel_stops_a_running_array(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["extract", *LONG, "--langs", "en,hi,ml", "--run", str(run), *SLURM]) == 0
    records = job_records(run)
    ids = [r["job_id"] for r in records]
    wait_until(lambda: sum(s == "RUNNING" for s, _ in states(records).values()) >= 2, 60, "running tasks")
    # ...and their Python has started (submitit's own signal handling is in place)
    wait_until(lambda: sum("Starting with" in _text(r["stdout"]) for r in records) >= 2, 60, "the jobs' Python")
    try:
        assert main(["cancel", "--run", str(run)]) == 0
        out = capsys.readouterr().err
        assert all(i in out for i in ids), out
        wait_until(lambda: all(s == "CANCELLED" for s, _ in states(records).values()), 30, "CANCELLED")
        assert main(["status", "--run", str(run)]) == 0
        assert capsys.readouterr().err.count("CANCELLED") >= 3
        assert not (run / "activations" / "en.h5").exists()
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)
        drain(ids)


def test_pipeline_chains_train_saes_extract_and_report(slurm_cluster, tmp_path, capsys):
    run = tmp_path / "run"
    # the tiny preset trains its SAEs (--sae train): one train-saes job goes before the extraction array
    args = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "8", "--layers", "0-3", "--n-boot", "20"]
    assert main(["pipeline", *args, "--run", str(run), *SLURM, "--wait"]) == 0, capsys.readouterr().err
    records = job_records(run)
    assert [r["stage"] for r in records] == ["train-saes", "extract", "extract", "report"]
    train, extract_array, report = records[0]["job_id"], records[1]["job_id"].split("_")[0], records[3]
    assert [r["depends_on"] for r in records] == [None, train, train, extract_array]
    script = Path(report["folder"]) / f"{report['job_id']}_submission.sh"
    assert f"#SBATCH --dependency=afterok:{extract_array}" in script.read_text()
    (train_row,) = sacct(train)
    extract_rows = sacct(extract_array)
    (report_row,) = sacct(report["job_id"])
    rows = [train_row, *extract_rows, report_row]
    assert {row[1] for row in rows} == {"COMPLETED"}, rows
    # each stage started once the previous one ended (sacct's End may be stamped a second late)
    assert min(_t(row[2]) for row in extract_rows) >= _t(train_row[3]) - SLACK_S, rows
    assert _t(report_row[2]) >= max(_t(row[3]) for row in extract_rows) - SLACK_S, rows
    assert len(list((run / "saes").glob("*/layer_*/cfg.json"))) == 4
    assert json.loads((run / "reports" / "gaps.json").read_text()) and (run / "reports" / "gaps.csv").is_file()


@pytest.mark.slow  # ~34 s at its smallest: six dependent job starts (lm-eval's import alone ~5 s); run by .ci/run
def test_pipeline_aligns_and_evaluates_on_the_cluster(slurm_cluster, okapi, tmp_path, capsys):
    """All five stages as dependent jobs: the adapter trained on a node is the one lm-eval scores next."""
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "12", "--max-length", "32",
            "--layers", "0-25:12", "--align-layers", "0-25:12", "--n-boot", "20", "--steps", "2",
            "--checkpoint-every", "2", "--stages", "train-saes,extract,report,align,evaluate",
            "--tasks", "arc", "--limit", "2", "--bench-data", str(okapi)]
    assert main(["pipeline", *args, "--run", str(run), *SLURM, "--wait"]) == 0, capsys.readouterr().err
    records = job_records(run)
    assert [(r["stage"], r["language"]) for r in records] == [
        ("train-saes", "all"), ("extract", "en"), ("extract", "hi"), ("report", "all"), ("align", "hi"),
        ("evaluate", "all")]
    rows = [row for r in records if r["array_task"] in (None, 0) for row in sacct(r["job_id"].split("_")[0])]
    assert {row[1] for row in rows} == {"COMPLETED"}, rows
    align_row, eval_row = sacct(records[4]["job_id"])[0], sacct(records[5]["job_id"])[0]
    assert _t(eval_row[2]) >= _t(align_row[3]) - SLACK_S, (align_row, eval_row)
    adapter = run / "align" / "hi" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    models = {m["label"]: m["adapter"] for m in results["models"]}
    assert models.keys() == {"base", "adapted:hi"} and Path(models["adapted:hi"]).resolve() == adapter.resolve()
    scored = {(r["model"], r["task"], r["language"]) for r in results["results"] if r.get("acc") is not None}
    assert scored == {(m, "arc", lang) for m in models for lang in ("en", "hi")}, results["results"]
