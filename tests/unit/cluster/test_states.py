"""Job states and errors, and the `status` and `cancel` commands on local stages."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from toolkit.cluster.joblog import JobLog
from toolkit.cluster.states import array_ids, last_error_line, states
from toolkit.cluster.status import CANCEL_GRACE_S
from toolkit.submit import main


def test_error_lines_and_array_ids():
    trace = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
             'toolkit.errors.UserError: run.corpus: /data/c is not a folder\n'
             'submitit ERROR (2026-01-01 00:00:00,000) - Submitted job triggered an exception\n')
    assert last_error_line(trace) == "toolkit.errors.UserError: run.corpus: /data/c is not a folder"
    cancel = "x\nslurmstepd-vm: error: *** STEP 12.0 ON vm CANCELLED AT 2026-01-01T00:00:00 ***\n"
    assert last_error_line(cancel).startswith("slurmstepd-vm: error: *** STEP 12.0")
    assert array_ids("12_[0-2%4]") == ["12_0", "12_1", "12_2"]
    assert array_ids("12_3") == ["12_3"] and array_ids("12") == ["12"]


def test_cancel_interrupts_a_running_local_stage_and_status_sees_lost_ones(tmp_path, capsys):
    run = tmp_path / "run"
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        log = JobLog(run)
        log.add([{"stage": "extract", "language": "en,hi", "job_id": f"local-{stage.pid}-0", "executor": "local",
                  "host": socket.gethostname(), "pid": stage.pid, "started": time.time(), "state": "RUNNING"}])
        now = states(log.latest())
        assert now[f"local-{stage.pid}-0"][0] == "RUNNING"
        assert main(["cancel", "--run", str(run)]) == 0
        assert stage.wait(timeout=10) != 0  # SIGINT: KeyboardInterrupt in that process
        assert f"local-{stage.pid}-0" in capsys.readouterr().err
        assert states(log.latest())[f"local-{stage.pid}-0"][0] == "LOST"  # it never recorded its end
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
        JobLog(tmp_path).add([{"stage": "extract", "language": "en", "job_id": f"local-{stage.pid}-0",
                                       "executor": "local", "host": socket.gethostname(), "pid": stage.pid,
                                       "started": time.time(), "state": "RUNNING"}])
        assert main(["cancel", "--run", str(tmp_path)]) == 0
        assert stage.wait(timeout=CANCEL_GRACE_S + 5) == -signal.SIGTERM
    finally:
        stage.kill()
        stage.wait()


def test_status_of_a_run_without_jobs_is_a_user_error(tmp_path, capsys):
    assert main(["status", "--run", str(tmp_path)]) == 2
    assert "no jobs recorded" in capsys.readouterr().err
