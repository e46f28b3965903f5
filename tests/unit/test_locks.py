"""toolkit.locks: one writer per output, a holder named, stale locks of gone writers taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from toolkit.locks import LockHeld, WriterLock, lock_path


def holder_file(target, **holder) -> None:
    lock_path(target).write_text(json.dumps({"host": socket.gethostname(), "command": "lingogap extract", **holder}))


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, other_process):
    target = tmp_path / "en.h5"
    holder_file(target, pid=other_process.pid, started_at="2026-01-01T00:00:00")
    with pytest.raises(LockHeld, match=rf"en.h5 is being written by another process \(pid {other_process.pid} on "
                                       rf"{socket.gethostname()}.*lingogap extract\).*delete .*en.h5.lock"):
        WriterLock(target).acquire()


def test_the_lock_records_this_process_and_goes_with_it(tmp_path):
    target = tmp_path / "en.h5"
    with WriterLock(target):
        holder = json.loads(lock_path(target).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["command"]
        with WriterLock(target):  # re-entrant: a job locks its units, the writer again
            pass
        assert lock_path(target).exists()
    assert not lock_path(target).exists()


@pytest.mark.parametrize("holder", [
    {"pid": "dead"},  # its process is gone on this host
    {"pid": "self-other-start", "pid_start": 1},  # the pid now belongs to a newer process
    {"host": "node-a", "pid": 1, "slurm_job": "77_3", "slurm_restart": 0},  # this job, requeued elsewhere
], ids=["dead-pid", "reused-pid", "slurm-requeue"])
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, holder):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    pid = {"dead": dead_pid(), "self-other-start": os.getppid()}.get(holder["pid"], holder["pid"])
    target = tmp_path / "en.h5"
    holder_file(target, **{**holder, "pid": pid})
    with WriterLock(target):
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()


def test_a_holder_on_another_host_is_never_guessed_gone(tmp_path):
    target = tmp_path / "en.h5"
    holder_file(target, host="node-b", pid=dead_pid(), slurm_job="12")
    with pytest.raises(LockHeld, match="on node-b, Slurm job 12"):
        WriterLock(target).acquire()


def test_a_lock_being_written_is_held_and_an_old_empty_one_is_stale(tmp_path):
    target = tmp_path / "en.h5"
    lock_path(target).write_text("")
    with pytest.raises(LockHeld, match="still writing its lock"):
        WriterLock(target).acquire()
    old = time.time() - 3600
    os.utime(lock_path(target), (old, old))
    with WriterLock(target):
        pass


def test_check_free_refuses_a_live_holder_and_passes_a_stale_one(tmp_path, other_process):
    target = tmp_path / "en.h5"
    WriterLock(target).check_free()  # no lock
    holder_file(target, pid=dead_pid())
    WriterLock(target).check_free()
    holder_file(target, pid=other_process.pid)
    with pytest.raises(LockHeld, match=f"pid {other_process.pid}"):
        WriterLock(target).check_free()


CONTENDER = """
import os, sys, time
from toolkit.locks import LockHeld, WriterLock
target, go, log = sys.argv[1:4]
open(log + f".ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    with WriterLock(target):
        with open(log, "a") as fh:
            fh.write(f"in {time.monotonic()} {os.getpid()}\\n")
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(f"out {time.monotonic()} {os.getpid()}\\n")
except LockHeld:
    pass
"""


def most_holders_at_once(log) -> int:
    events = sorted((float(t), kind) for kind, t, _ in (line.split() for line in log.read_text().splitlines()))
    held = most = 0
    for _, kind in events:
        held += 1 if kind == "in" else -1
        most = max(most, held)
    return most


def test_three_processes_breaking_one_stale_lock_let_exactly_one_through(tmp_path):
    """Real processes, released together on a lock whose writer died: breaking it is itself atomic."""
    for trial in range(25):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        target, go, log = folder / "en.h5", folder / "go", folder / "log"
        holder_file(target, pid=dead_pid())
        log.write_text("")
        procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(target), str(go), str(log)])
                 for _ in range(3)]
        while len(list(folder.glob("log.ready.*"))) < 3:
            time.sleep(0.01)
        go.touch()
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
        assert most_holders_at_once(log) == 1, f"trial {trial}: {log.read_text()}"
        assert not lock_path(target).exists()


@pytest.mark.parametrize("pid", ["abc", None, 1.5, 10**30, -3, [1]], ids=["text", "null", "float", "huge", "negative",
                                                                          "list"])
def test_a_lock_with_a_garbage_pid_is_an_error_naming_the_lock(tmp_path, pid):
    target = tmp_path / "en.h5"
    holder_file(target, pid=pid)
    before = lock_path(target).read_bytes()
    for check in (WriterLock(target).acquire, WriterLock(target).check_free):
        with pytest.raises(LockHeld, match=rf"{lock_path(target)} is damaged \(pid .*\).*delete {lock_path(target)}"):
            check()
    assert lock_path(target).read_bytes() == before
