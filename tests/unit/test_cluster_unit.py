"""toolkit.cluster without a cluster: profiles, sbatch text, the Apptainer command line, the definition
file, the version check, planning, and the in-process executors (local, debug) with status and cancel.

Slurm and Apptainer are replaced where needed by FAKE executables written into a temporary folder
(`fake_bin`): a fake `sbatch` that keeps the scripts it is given, a fake `srun` that submitit only
looks for, and a fake `apptainer` that prints a made-up version report (Apptainer cannot be installed
on these machines). They are named and commented as fakes.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from tests.conftest import ROOT
from toolkit import cluster
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.submit import main

TINY = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "2", "--layers", "0-1", "--sae", "random"]
HERE = cluster.local_versions()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "250")  # Rich tables unfolded, so they can be searched
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(cluster.PROFILE_ENV, raising=False)


def cfg_of(tmp_path: Path, **run) -> Config:
    return Config.build({"run": {"preset": "tiny", "langs": "en,hi", "run": str(tmp_path / "run"), **run}})


# ---------------------------------------------------------------------------------------- profiles ---

def test_shipped_profiles_load():
    assert {"testcluster", "example-gpu"} <= set(cluster.available_profiles())
    tc = cluster.load_profile("testcluster")
    assert (tc.partition, tc.cpus_per_task, tc.gpus_per_task) == ("debug", 1, 0)
    assert tc.mem_gb <= 4 and tc.time_min <= 60 and tc.signal_delay_s < tc.time_min * 60
    gpu = cluster.load_profile("example-gpu")
    assert gpu.gpus_per_task >= 1 and gpu.container.image.endswith(".sif") and gpu.container.nv
    assert gpu.setup and gpu.account and gpu.qos and gpu.array_parallelism >= 1
    report = gpu.for_stage("report")
    assert report.gpus_per_task == 0 and report.partition != gpu.partition and report.setup == gpu.setup


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        cluster.load_profile("nosuchcluster")
    assert "nosuchcluster" in str(err.value) and "testcluster" in str(err.value) and "example-gpu" in str(err.value)


def test_unknown_profile_from_the_cli_is_a_user_error(tmp_path, capsys):
    assert main(["extract", *TINY, "--run", str(tmp_path), "--executor", "slurm", "--cluster", "nope"]) == 2
    assert "unknown cluster profile 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("data, field", [
    ({"partiton": "gpu"}, "partiton"),
    ({"cpus_per_task": "many"}, "'cpus_per_task'"),
    ({"gpus_per_task": True}, "'gpus_per_task'"),
    ({"time_min": 0}, "'time_min'"),
    ({"mem_gb": -1}, "'mem_gb'"),
    ({"setup": "module load cuda"}, "'setup'"),
    ({"sbatch": ["--exclusive"]}, "'sbatch'"),
    ({"time_min": 10, "signal_delay_s": 900}, "'signal_delay_s'"),
    ({"container": {"image": "lingogap.img"}}, "container.image"),
    ({"container": {"bindz": ["/scratch"]}}, "container.bindz"),
    ({"container": {"nv": "yes"}}, "container.nv"),
    ({"stages": {"extrakt": {"time_min": 5}}}, "stages.extrakt"),
    ({"stages": {"extract": {"container": "x.sif"}}}, "stages.extract.container"),
    ({"stages": {"report": {"cpus_per_task": 0}}}, "'cpus_per_task'"),
])
def test_bad_profile_fields_are_named(tmp_path, data, field):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        cluster.load_profile(str(path))
    assert field in str(err.value) and str(path) in str(err.value)


def test_profiles_are_found_through_the_environment(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("partition: long\ntime_min: 600\n")
    monkeypatch.setenv(cluster.PROFILE_ENV, str(tmp_path))
    assert cluster.load_profile("mine").partition == "long"
    assert "mine" in cluster.available_profiles()


def test_sbatch_text_has_array_dependency_and_requeue(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    prof = cluster.load_profile("testcluster")
    extract = cluster.slurm_parameters(prof, "extract", ["export A=1"], dependency="afterok:41")
    text = _make_sbatch_string(command="python job", folder=tmp_path, map_count=3, **extract)
    for line in ("#SBATCH --partition=debug", "#SBATCH --array=0-2%3", "#SBATCH --dependency=afterok:41",
                 "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue", "#SBATCH --cpus-per-task=1",
                 f"#SBATCH --time={prof.time_min}", f"#SBATCH --signal=USR2@{prof.signal_delay_s}",
                 "#SBATCH --job-name=lingogap-extract", "export A=1"):
        assert line in text, line
    assert f"#SBATCH --mem={int(prof.mem_gb)}GB" in text
    report = _make_sbatch_string(command="python job", folder=tmp_path,
                                 **cluster.slurm_parameters(prof, "report", []))
    assert "--requeue" not in report and "--dependency" not in report and "--array" not in report
    gpu = cluster.slurm_parameters(cluster.load_profile("example-gpu"), "extract", [])
    assert gpu["gpus_per_task"] == 1 and gpu["account"] and gpu["qos"] and gpu["additional_parameters"]["mail-type"]
    assert "gpus_per_task" not in cluster.slurm_parameters(cluster.load_profile("example-gpu"), "report", [])


# ---------------------------------------------------------------------------------------- apptainer ---

def test_apptainer_command_line_binds_run_cache_hf_home_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    cfg = cluster.absolute(cfg_of(tmp_path, corpus=f"text:{corpus}"))
    container = cluster.Container(binds=["/scratch"], options=["--cleanenv"])
    words = shlex.split(cluster.apptainer_python(container, "/images/lingogap.sif",
                                                 cluster.bind_paths(cfg, container)))
    assert words[:3] == ["apptainer", "exec", "--nv"] and "--cleanenv" in words
    assert words[-2:] == ["/images/lingogap.sif", "python"]
    binds = words[words.index("--bind") + 1].split(",")
    assert binds == [str(tmp_path / "run"), str(tmp_path / "cache"), str(tmp_path / "hf"), str(corpus), "/scratch"]
    plain = cluster.apptainer_python(cluster.Container(nv=False), "/i.sif", [])
    assert plain == "apptainer exec /i.sif python"


def test_job_environment_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    cfg = cfg_of(tmp_path)
    inside = cluster.setup_lines(cfg, containerised=True)
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in inside
    assert f"export LINGOGAP_CACHE={tmp_path / 'cache'}" in inside and f"export HF_HOME={tmp_path / 'hf'}" in inside
    assert not any("PYTHONPATH" in line for line in inside)  # the image has its own toolkit
    outside = cluster.setup_lines(cfg, containerised=False)
    assert any(line.startswith(f"export PYTHONPATH={ROOT}") for line in outside)  # this checkout is not installed


def test_definition_file_is_valid():
    text = cluster.DEF_FILE.read_text()
    assert cluster.check_definition(text) == []
    header, sections = cluster.definition_sections(text)
    assert header["Bootstrap"] == "docker" and ("cuda" in header["From"] or "pytorch" in header["From"])
    assert f"torch=={_version('torch').split('+')[0]}" in sections["%post"]
    for line in sections["%post"].split("<<'EOF'")[1].split("EOF")[0].strip().splitlines():
        assert "==" in line, f"unpinned dependency in %post: {line}"
    assert 'python -m toolkit.submit "$@"' in sections["%runscript"]


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace("%test", "%tset"), "section %test is missing"),
    (lambda t: t.replace("%labels", "%label"), "section %labels is missing"),
    (lambda t: t.replace("Bootstrap: docker", "Bootstrap: library"), "Bootstrap: docker"),
    (lambda t: t.replace("From: nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04", "From: nvidia/cuda:latest"),
     "pinned image tag"),
    (lambda t: t.replace('python -m toolkit.submit "$@"', "python -m toolkit.submit"), "%runscript"),
    (lambda t: t.replace(f"submitit=={HERE['submitit']}", "submitit"), f"pin submitit=={HERE['submitit']}"),
    (lambda t: t.replace(f"CLOUDPICKLE_VERSION {HERE['cloudpickle']}", "CLOUDPICKLE_VERSION 2.0.0"),
     "CLOUDPICKLE_VERSION"),
])
def test_definition_file_problems_are_found(change, problem):
    problems = cluster.check_definition(change(cluster.DEF_FILE.read_text()))
    assert any(problem in p for p in problems), problems


def test_definition_must_match_the_submitting_side():
    other = {**HERE, "python": "3.12", "submitit": "9.9.9"}
    problems = cluster.check_definition(cluster.DEF_FILE.read_text(), other)
    assert any("Python 3.12" in p for p in problems) and any("submitit==9.9.9" in p for p in problems)


def test_version_mismatches():
    assert cluster.version_mismatches(HERE, dict(HERE)) == []
    wrong = cluster.version_mismatches(HERE, {**HERE, "cloudpickle": "2.2.1"})
    assert wrong == [f"cloudpickle: {HERE['cloudpickle']} on the submitting side, 2.2.1 in the image"]


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder of FAKE executables put first on PATH (see the module docstring)."""
    folder = tmp_path / "fake_bin"
    folder.mkdir()
    scripts = {
        # FAKE sbatch: keeps each script it is given and answers with a job id, like Slurm's sbatch
        "sbatch": '#!/bin/bash\nn=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 40) + 1 ))\n'
                  'if [ "$n" = "${FAKE_SBATCH_REFUSE:-}" ]; then\n'
                  '  echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1\nfi\n'
                  'echo $n > "$FAKE_SLURM/count"\ncp "$1" "$FAKE_SLURM/job_$n.sh"\necho "Submitted batch job $n"\n',
        "srun": "#!/bin/bash\n# FAKE srun: submitit only checks that it exists\nexit 1\n",
        # FAKE apptainer: prints the made-up version report in $FAKE_APPTAINER_REPORT for `exec IMAGE python -c`
        "apptainer": '#!/bin/bash\n[ "$1" = exec ] || exit 2\necho "$FAKE_APPTAINER_REPORT"\n',
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    state = tmp_path / "fake_slurm"
    state.mkdir()
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", json.dumps(HERE))
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    return state


def test_image_with_other_versions_is_refused(fake_bin, tmp_path, monkeypatch):
    image = tmp_path / "lingogap.sif"
    image.write_bytes(b"not really an image")
    console = Console(file=open(os.devnull, "w"))
    cluster.check_container(cluster.Container(), str(image), console)  # the fake reports equal versions
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", json.dumps({**HERE, "python": "3.10", "cloudpickle": "2.2.1"}))
    with pytest.raises(UserError) as err:
        cluster.check_container(cluster.Container(), str(image), console)
    text = str(err.value)
    assert f"python: {HERE['python']} on the submitting side, 3.10 in the image" in text
    assert "cloudpickle" in text and "submitit:" not in text and "Apptainer.def" in text
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", "")  # an image whose python prints nothing
    with pytest.raises(UserError, match="cannot run its python"):
        cluster.check_container(cluster.Container(), str(image), console)
    with pytest.raises(UserError, match="no such image"):
        cluster.check_container(cluster.Container(), str(tmp_path / "missing.sif"), console)


def test_without_apptainer_the_check_is_left_to_the_job(tmp_path, capsys):
    image = tmp_path / "lingogap.sif"
    image.write_bytes(b"x")
    console = Console(stderr=True)
    cluster.check_container(cluster.Container(apptainer=str(tmp_path / "no-apptainer")), str(image), console)
    assert "cannot be checked before submitting" in capsys.readouterr().err


def test_a_job_refuses_a_runtime_with_other_versions(tmp_path):
    job = cluster.StageJob(cfg_of(tmp_path), "report", versions={**HERE, "cloudpickle": "0.1"})
    with pytest.raises(RuntimeError, match="cloudpickle: 0.1 on the submitting side"):
        job()


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
    assert isinstance(submitted.function, cluster.ResumableStageJob) and submitted.function.units == [("hi", 0, 1)]
    assert submitted.function.cfg.run.run == str(run) and submitted.function.versions == HERE
    assert cluster.result_of(records[0]) is None  # nothing ran


def test_submitting_without_sbatch_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    assert main(["report", "--run", str(tmp_path), "--executor", "slurm", "--cluster", "testcluster"]) == 2
    assert "no `sbatch` on PATH" in capsys.readouterr().err


def test_missing_corpus_is_refused_before_submitting(fake_bin, tmp_path, capsys):
    assert main(["extract", *TINY, "--corpus", f"text:{tmp_path / 'gone'}", "--run", str(tmp_path / "run"),
                 "--executor", "slurm", "--cluster", "testcluster"]) == 2
    assert "is not a folder" in capsys.readouterr().err and not (fake_bin / "count").exists()


# --------------------------------------------------------------------------------------------- plan ---

def test_stage_lists(tmp_path):
    slurm = {"executor": "slurm", "cluster": "testcluster"}
    assert cluster.stage_list(Config.build({"run": slurm}), "pipeline") == ["extract", "report"]  # --sae auto
    assert cluster.stage_list(cfg_of(tmp_path, **slurm), "pipeline") == ["train-saes", "extract", "report"]
    assert cluster.stage_list(cfg_of(tmp_path), "pipeline") == ["extract", "report"]  # local: one process trains
    trained = Config.build({"run": {"preset": "tiny", "stages": "extract,report,align", "executor": "debug"},
                            "sae": {"source": "train"}})
    assert cluster.stage_list(trained, "pipeline") == ["train-saes", "extract", "report", "align"]
    assert cluster.stage_list(trained, "align") == ["train-saes", "align"]
    assert cluster.stage_list(trained, "report") == ["report"]
    with pytest.raises(UserError, match="run.stages"):
        Config.build({"run": {"stages": "extract,reprot"}})


def test_tasks_per_language_shard_and_target(tmp_path):
    cfg = Config.build({"run": {"preset": "tiny", "langs": "en,hi,ml"}, "extract": {"shards": 2},
                        "sae": {"source": "random"}})
    langs = cfg.lang_codes
    (extract,) = cluster.plan(cfg, "extract")
    assert [t.label for t in extract.tasks] == [f"{lang} {k}/2" for lang in langs for k in (1, 2)]
    assert extract.tasks[3].units == [(langs[1], 1, 2)]
    (align,) = cluster.plan(cfg, "align")
    targets = [lang for lang in langs if lang != "en"]
    assert [(t.label, t.langs) for t in align.tasks] == [(t, [t]) for t in targets]
    cfg.align.joint = True
    assert [(t.label, t.langs) for t in cluster.plan(cfg, "align")[0].tasks] == [("joint", targets)]
    cfg.align.targets = "mr"
    with pytest.raises(UserError, match="align.targets"):
        cluster.plan(cfg, "align")


def test_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    cfg = cluster.absolute(Config.build({"run": {"run": "runs/x", "corpus": "text:c"}}))
    assert cfg.run.run == str(tmp_path / "runs" / "x") and cfg.run.corpus == f"text:{tmp_path / 'c'}"


def test_error_lines_and_array_ids():
    trace = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
             'toolkit.errors.UserError: run.corpus: /data/c is not a folder\n'
             'submitit ERROR (2026-01-01 00:00:00,000) - Submitted job triggered an exception\n')
    assert cluster.last_error_line(trace) == "toolkit.errors.UserError: run.corpus: /data/c is not a folder"
    cancel = "x\nslurmstepd-vm: error: *** STEP 12.0 ON vm CANCELLED AT 2026-01-01T00:00:00 ***\n"
    assert cluster.last_error_line(cancel).startswith("slurmstepd-vm: error: *** STEP 12.0")
    assert cluster._array_ids("12_[0-2%4]") == ["12_0", "12_1", "12_2"]
    assert cluster._array_ids("12_3") == ["12_3"] and cluster._array_ids("12") == ["12"]


# ------------------------------------------------------------------------------------ local, debug ---

def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def test_local_and_debug_executors_record_their_jobs(tmp_path, capsys):
    local, debug = tmp_path / "local", tmp_path / "debug"
    assert main(["extract", *TINY, "--run", str(local)]) == 0  # local is the default
    assert main(["extract", *TINY, "--run", str(debug), "--executor", "debug"]) == 0
    (rec,) = json.loads((local / "jobs.json").read_text())["jobs"]
    assert (rec["executor"], rec["language"], rec["state"], rec["pid"]) == ("local", "en,hi", "COMPLETED", os.getpid())
    per_task = json.loads((debug / "jobs.json").read_text())["jobs"]
    assert [(r["language"], r["state"]) for r in per_task] == [("en", "COMPLETED"), ("hi", "COMPLETED")]
    for lang in ("en", "hi"):  # the pickled per-language jobs write what the in-process run writes
        a, b = _datasets(local / "activations" / f"{lang}.h5"), _datasets(debug / "activations" / f"{lang}.h5")
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
    assert main(["extract", *TINY, "--corpus", f"text:{corpus}", "--run", str(run)]) == 2
    (rec,) = json.loads((run / "jobs.json").read_text())["jobs"]
    assert rec["state"] == "FAILED" and "corpus has no Hindi file" in rec["error"]
    capsys.readouterr()
    assert main(["status", "--run", str(run)]) == 0
    assert "corpus has no Hindi file" in capsys.readouterr().err
    assert main(["status", "--run", str(run), "--wait"]) == 1


def test_cancel_interrupts_a_running_local_stage_and_status_sees_lost_ones(tmp_path, capsys):
    run = tmp_path / "run"
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        log = cluster.JobLog(run)
        log.add([{"stage": "extract", "language": "en,hi", "job_id": f"local-{stage.pid}-0", "executor": "local",
                  "host": socket.gethostname(), "pid": stage.pid, "started": time.time(), "state": "RUNNING"}])
        now = cluster.states(log.latest())
        assert now[f"local-{stage.pid}-0"][0] == "RUNNING"
        assert main(["cancel", "--run", str(run)]) == 0
        assert stage.wait(timeout=10) != 0  # SIGINT: KeyboardInterrupt in that process
        assert f"local-{stage.pid}-0" in capsys.readouterr().err
        assert cluster.states(log.latest())[f"local-{stage.pid}-0"][0] == "LOST"  # it never recorded its end
        assert main(["cancel", "--run", str(run)]) == 0
        assert "nothing to cancel" in capsys.readouterr().err
    finally:
        stage.kill()
        stage.wait()


def test_cancel_terminates_a_local_stage_that_ignores_sigint(tmp_path, capsys):
    # what a stage started with `nohup ... &` from a script looks like: background jobs ignore SIGINT
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        time.sleep(0.5)  # let it start with SIGINT ignored
        cluster.JobLog(tmp_path).add([{"stage": "extract", "language": "en", "job_id": f"local-{stage.pid}-0",
                                       "executor": "local", "host": socket.gethostname(), "pid": stage.pid,
                                       "started": time.time(), "state": "RUNNING"}])
        assert main(["cancel", "--run", str(tmp_path)]) == 0
        assert stage.wait(timeout=cluster.CANCEL_GRACE_S + 5) == -signal.SIGTERM
    finally:
        stage.kill()
        stage.wait()


def test_status_of_a_run_without_jobs_is_a_user_error(tmp_path, capsys):
    assert main(["status", "--run", str(tmp_path)]) == 2
    assert "no jobs recorded" in capsys.readouterr().err


def test_dry_run_lists_the_jobs_and_their_resources(tmp_path, capsys):
    assert main(["pipeline", *TINY, "--run", str(tmp_path), "--executor", "slurm", "--cluster", "example-gpu",
                 "--stages", "extract,report,align", "--container", str(tmp_path / "l.sif"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "jobs (slurm, profile example-gpu)" in out and "0 GPU, 16GB, 60 min" in out  # report: no GPU
    assert f"apptainer exec --nv --bind {tmp_path}," in out and not (tmp_path / "jobs.json").exists()


def test_a_chain_refused_half_way_keeps_the_submitted_jobs_on_record(fake_bin, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_REFUSE", "42")  # the FAKE sbatch refuses the second submission
    run = tmp_path / "run"
    assert main(["pipeline", *TINY, "--run", str(run), "--executor", "slurm", "--cluster", "testcluster"]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the report job: sbatch: error: Batch job submission failed: Invalid account" in err
    assert "cancel" in err
    records = json.loads((run / "jobs.json").read_text())["jobs"]
    assert [(r["stage"], r["job_id"]) for r in records] == [("extract", "41_0"), ("extract", "41_1")]
