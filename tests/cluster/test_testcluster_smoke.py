"""Smoke test for the single-node Slurm test cluster (slurm/testcluster/).

Start the cluster first with ``sudo slurm/testcluster/start.sh``; without a
reachable Slurm controller every test here is skipped (``slurm_cluster`` in conftest.py).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

# Upper bounds; on the test cluster a trivial job takes ~1-2 s end to end.
RESULT_TIMEOUT_S = 30
RUNNING_TIMEOUT_S = 30
CANCEL_TIMEOUT_S = 20
SACCT_TIMEOUT_S = 15


def _run(cmd: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def executor(slurm_cluster: None, tmp_path: Path) -> Any:
    submitit = pytest.importorskip("submitit")
    # A fresh folder per test: job ids restart at 1 after a --purge, so a
    # reused folder could mix old and new job files.
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, name="lingogap-smoke")
    return ex


def _sacct_state(job_id: str) -> str:
    proc = _run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"])
    assert proc.returncode == 0, f"sacct failed (is accounting/slurmdbd up?): {proc.stderr.strip()}"
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _wait_sacct(job_id: str, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = _sacct_state(job_id)
    while not state.startswith(prefix) and time.monotonic() < deadline:
        time.sleep(0.25)
        state = _sacct_state(job_id)
    return state


def _state(job: Any) -> str:
    # submitit throttles its sacct polling (every 2 s and growing with job
    # age); force a refresh so the test measures Slurm, not the throttle.
    job.watcher.update()
    return job.state


def test_trivial_job_completes(executor: Any) -> None:
    def payload(a: int, b: int) -> tuple[int, str]:
        import os

        return a + b, os.environ.get("SLURM_JOB_ID", "")

    t0 = time.monotonic()
    job = executor.submit(payload, 2, 3)
    total, slurm_job_id = job.result()  # raises if the job failed
    elapsed = time.monotonic() - t0

    assert total == 5
    assert slurm_job_id == str(job.job_id), "payload did not run inside the submitted Slurm job"
    state = _wait_sacct(job.job_id, "COMPLETED", SACCT_TIMEOUT_S)
    assert state == "COMPLETED", f"sacct reports {state!r} for job {job.job_id}"
    assert elapsed < RESULT_TIMEOUT_S, f"trivial job took {elapsed:.1f}s"


def test_cancel_running_job_is_observed(executor: Any) -> None:
    # The case that hangs without accounting: submitit learns the CANCELLED
    # state only through sacct.
    job = executor.submit(time.sleep, 300)
    try:
        deadline = time.monotonic() + RUNNING_TIMEOUT_S
        while (state := _state(job)) != "RUNNING":
            assert time.monotonic() < deadline, f"job {job.job_id} not RUNNING after {RUNNING_TIMEOUT_S}s: {state}"
            time.sleep(0.5)

        job.cancel()
        t0 = time.monotonic()
        while not (state := _state(job)).startswith("CANCELLED"):
            assert time.monotonic() - t0 < CANCEL_TIMEOUT_S, (
                f"job {job.job_id} still {state!r} {CANCEL_TIMEOUT_S}s after cancel()"
            )
            time.sleep(0.5)
        assert job.done()
        state = _wait_sacct(job.job_id, "CANCELLED", SACCT_TIMEOUT_S)
        assert state.startswith("CANCELLED"), f"sacct reports {state!r} for job {job.job_id}"
    finally:
        if not job.done():
            _run(["scancel", str(job.job_id)])
        # A cancelled submitit job keeps the (only) node COMPLETING for a few
        # seconds (KillWait + slurmstepd retrying the dead srun); wait it out
        # so that later tests do not pay for it.
        deadline = time.monotonic() + CANCEL_TIMEOUT_S
        while time.monotonic() < deadline:
            if not _run(["squeue", "-h", "-j", str(job.job_id), "-t", "CG,R,PD", "-o", "%T"]).stdout.strip():
                break
            time.sleep(0.25)
