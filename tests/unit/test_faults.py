"""Faults as a user or a cluster meets them, run as real commands on the tiny preset: two writers on one run
folder, a copied run, damaged run files, a full disk, a read-only folder, SIGTERM.

Each refused command exits 2 with one `error:` line naming the problem (and the fix), no traceback, and
leaves what was already in the run folder untouched. One small run is made once and copied per case.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.unit.test_bad_input import snapshot

ARGS = ["--preset", "tiny", "--langs", "en,hi", "--max-sentences", "8", "--layers", "0-1"]
ENV = {**os.environ, "COLUMNS": "200"}  # the summary table unabridged
IS_ROOT = os.geteuid() == 0 and shutil.which("mount") is not None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit.submit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolkit.submit", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def one_clear_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    text = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert text.count("error:") == 1, out.stderr
    for fragment in fragments:
        assert fragment in text, out.stderr


def datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    for lang in ("en", "hi"):
        left, right = datasets(a / "activations" / f"{lang}.h5"), datasets(b / "activations" / f"{lang}.h5")
        assert left.keys() == right.keys()
        for name in left:
            np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def done_rows(stderr: str) -> int:
    """Rows of the summary table for files an earlier run finished (their time cell says "done")."""
    return sum(line.split()[4:5] == ["done"] for line in stderr.splitlines())


def litter(run: Path) -> list[str]:
    """What a finished run must not hold: part folders, staging files, lock files."""
    found = [*run.rglob("*.parts"), *run.rglob(".*.tmp"), *run.rglob("*.h5.lock")]
    return sorted(str(p.relative_to(run)) for p in found)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "template"
    out = cli("extract", *ARGS, "--run", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def copy_run(template: Path, dest: Path, only_saes: bool = False) -> Path:
    if only_saes:
        shutil.copytree(template / "saes", dest / "saes")
    else:
        shutil.copytree(template, dest)
    return dest


@pytest.mark.slow  # ten races of two processes: ~130 s on 2 cores, run by .ci/run
def test_two_concurrent_writers_one_writes_each_file_and_the_output_equals_a_single_run(template, tmp_path):
    trials = 10
    for trial in range(trials):
        run = copy_run(template, tmp_path / f"trial{trial}", only_saes=True)
        first = start("extract", *ARGS, "--run", str(run))
        done_first = first.communicate(timeout=300) if trial == trials - 1 else None  # a late requeue
        time.sleep(0.3 * (trial % 5))  # from a photo finish to the second arriving mid-run
        second = start("extract", *ARGS, "--run", str(run))
        outputs = [done_first or first.communicate(timeout=300), second.communicate(timeout=300)]
        results = [(p.returncode, *out) for p, out in zip((first, second), outputs)]
        writes = 0
        for rc, _stdout, stderr in results:
            assert "Traceback" not in stderr, stderr[-3000:]
            assert rc in (0, 2), stderr[-3000:]
            if rc == 2:
                assert "is being written by another process (pid" in " ".join(stderr.split()), stderr
            else:
                writes += 2 - done_rows(stderr)
        assert writes == 2, f"trial {trial}: {[r[0] for r in results]}"  # each file written exactly once
        assert_same_files(template, run)
        assert litter(run) == []


def test_a_copied_run_resumes_and_reports(template, tmp_path):
    run = copy_run(template, tmp_path / "elsewhere" / "moved")
    out = cli("extract", *ARGS, "--run", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert done_rows(out.stderr) == 2, out.stderr
    assert litter(run) == []  # no empty part folders after a re-run
    report = cli("report", "--run", str(run))
    assert report.returncode == 0, report.stderr[-3000:]


def test_a_run_recorded_with_an_absolute_sae_path_still_resumes(template, tmp_path):
    """Files of older versions recorded `local:/abs/RUN/saes/KEY`; they count as the same SAEs anywhere."""
    run = copy_run(template, tmp_path / "old")
    for lang in ("en", "hi"):
        path = run / "activations" / f"{lang}.h5"
        with h5py.File(path, "r+") as h5:
            ident = json.loads(h5.attrs["identity"])
            ident["sae_source"] = f"local:/somewhere/else/saes/{ident['sae_source'].partition(':')[2]}"
            h5.attrs["identity"] = json.dumps(ident, sort_keys=True)
            from toolkit.store import fingerprint

            h5.attrs["fingerprint"] = fingerprint(ident)
    out = cli("extract", *ARGS, "--run", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert done_rows(out.stderr) == 2, out.stderr


def test_stale_locks_and_staging_files_of_dead_writers_are_cleared(template, tmp_path):
    run = copy_run(template, tmp_path / "stale")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    acts = run / "activations"
    (acts / "en.h5.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": pid, "command": "killed"}))
    (acts / f".hi.h5.{pid}.tmp").write_bytes(b"half a file")
    (acts / "hi.h5.parts").mkdir()
    (acts / "hi.h5.parts" / "part-000000.npz").write_bytes(b"left by a kill after the final rename")
    out = cli("extract", *ARGS, "--run", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert litter(run) == []


def test_a_live_lock_names_its_holder(template, tmp_path):
    run = copy_run(template, tmp_path / "held")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = run / "activations" / "en.h5.lock"
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "command": "lingogap extract"}))
        before = outputs(run)
        one_clear_error(cli("extract", *ARGS, "--run", str(run)), f"pid {holder.pid}", "lingogap extract",
                        f"delete {lock}")
        assert outputs(run) == before
    finally:
        holder.kill()
        holder.wait()


def damage_json(path: Path) -> None:
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


def first_sae_layer(run: Path) -> Path:
    return next(run.glob("saes/*/layer_0"))


@pytest.mark.parametrize("damage, args, fragments", [
    (lambda run: damage_json(run / "manifest.json"), ["extract", *ARGS], ["manifest.json is damaged", "move it aside"]),
    (lambda run: damage_json(run / "jobs.json"), ["extract", *ARGS], ["jobs.json is damaged", "delete it"]),
    (lambda run: damage_json(run / "jobs.json"), ["status"], ["jobs.json is damaged"]),
    (lambda run: damage_json(first_sae_layer(run) / "lingogap.json"), ["extract", *ARGS],
     ["lingogap.json is damaged", "rerun train-saes"]),
    (lambda run: damage_json(first_sae_layer(run) / "cfg.json"), ["extract", *ARGS], ["cfg.json is damaged"]),
    (lambda run: (lambda p: p.write_bytes(p.read_bytes()[:40]))(next(first_sae_layer(run).glob("*.safetensors"))),
     ["extract", *ARGS], [".safetensors is damaged", "rerun train-saes"]),
    (lambda run: flip_chunk(run / "activations" / "hi.h5"), ["extract", *ARGS],
     ["hi.h5 is corrupt", "delete it and rerun extract"]),
    (lambda run: None, ["extract", *ARGS, "--code-dtype", "float32"], ["different configuration", "code_dtype"]),
    (lambda run: None, ["extract", *ARGS, "--max-sentences", "6"], ["different configuration", "corpus_hash"]),
    (lambda run: None, ["extract", *ARGS, "--sae-width", "64"], ["different configuration", "sae_source"]),
    (lambda run: None, ["extract", *ARGS, "--shards", "9"], ["extract.shards: 9 shards for 8 sentences"]),
], ids=["manifest", "jobs-json", "jobs-json-status", "sae-meta", "sae-cfg", "sae-weights", "h5-chunk",
        "mismatch-dtype", "mismatch-corpus", "mismatch-sae-recipe", "too-many-shards"])
def test_damaged_run_files_and_refused_runs_change_nothing(template, tmp_path, damage, args, fragments):
    run = copy_run(template, tmp_path / "run")
    damage(run)
    before = outputs(run)
    one_clear_error(cli(*args, "--run", str(run)), *fragments)
    assert outputs(run) == before  # the manifest records what ran; no SAE trained for a refused run


def outputs(run: Path) -> dict[str, bytes]:
    """The run folder but its job log (a refused job is recorded there as FAILED)."""
    return {k: v for k, v in snapshot(run).items() if not k.startswith("jobs.json")}


def flip_chunk(path: Path) -> None:
    """Garble bytes inside a checksummed dataset's chunk (HDF5 metadata stays readable)."""
    with h5py.File(path, "r") as h5:
        offset = h5["layers/0/codes/values"].id.get_chunk_info(0).byte_offset
    (path.parent / (path.name + ".verified")).unlink()
    with open(path, "r+b") as fh:
        fh.seek(offset + 16)
        fh.write(b"\xff" * 64)


def test_report_on_a_missing_folder_creates_nothing(tmp_path):
    run = tmp_path / "nothing" / "here"
    one_clear_error(cli("report", "--run", str(run)), "no run folder", "run extract")
    assert not (tmp_path / "nothing").exists()


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_refused_before_extracting_with_the_space_needed(tmp_path):
    with tmpfs(tmp_path / "small", "200k") as disk:
        one_clear_error(cli("extract", *ARGS, "--run", str(disk / "run")), "needs about", "is free there",
                        "rerun the same command")
        assert not list((disk / "run").rglob("*.h5"))


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_a_disk_that_fills_while_writing_is_one_message(template, tmp_path):
    with tmpfs(tmp_path / "full", "4m") as disk:
        run = copy_run(template, disk / "run")
        shutil.rmtree(run / "saes")
        fill(disk / "filler")
        out = cli("report", "--run", str(run))
        one_clear_error(out, "the disk is full", "rerun the same command")


def fill(path: Path) -> None:
    """Take what is left on the disk, so the next write does not fit."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.skipif(not IS_ROOT, reason="mounting a read-only filesystem needs root")
def test_a_read_only_run_folder_is_one_message_and_stays_as_it_was(template, tmp_path):
    with tmpfs(tmp_path / "ro", "64m") as disk:
        run = copy_run(template, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = snapshot(run)
        one_clear_error(cli("extract", *ARGS, "--run", str(run)), "read-only filesystem")
        one_clear_error(cli("report", "--run", str(run)), "read-only filesystem")
        assert snapshot(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_run_folder_is_one_message_and_stays_as_it_was(template, tmp_path):
    run = copy_run(template, tmp_path / "locked")
    before = snapshot(run)
    for folder in (run, run / "activations"):
        folder.chmod(0o555)
    try:
        one_clear_error(cli("extract", *ARGS, "--run", str(run)), "no permission to write there")
        assert snapshot(run) == before
    finally:
        for folder in (run, run / "activations"):
            folder.chmod(0o755)


def test_sigterm_records_cancelled_and_leaves_a_resumable_run(template, tmp_path):
    run = copy_run(template, tmp_path / "term", only_saes=True)
    proc = start("extract", *ARGS[:-4], "--max-sentences", "200", "--layers", "0-1", "--run", str(run))
    deadline = time.time() + 120
    while not (run / "jobs.json").is_file() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-3000:]
    job = json.loads((run / "jobs.json").read_text())["jobs"][-1]
    if proc.returncode == 0:
        pytest.skip("the extraction finished before SIGTERM arrived")
    assert proc.returncode == 143, stderr[-3000:]
    assert job["state"] == "CANCELLED" and "SIGTERM" in job["error"]
    assert not list(run.rglob("*.h5.lock"))  # the writers' locks went with them
