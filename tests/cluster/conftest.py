"""The cluster tier: every test here needs the live Slurm test cluster (slurm/testcluster/start.sh).

`slurm_cluster` skips (with the reason) when no controller answers or no node is usable.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _run(cmd: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def slurm_unavailable() -> str | None:
    """Why the test cluster cannot be used, or None when it can."""
    if shutil.which("sinfo") is None:
        return "Slurm client tools not installed (no 'sinfo' on PATH); run slurm/testcluster/start.sh"
    # `scontrol ping` fails at once when no controller runs; sinfo retries ~9 s.
    if shutil.which("scontrol") is not None:
        try:
            ping = _run(["scontrol", "ping"], timeout=15)
        except subprocess.TimeoutExpired:
            return "no Slurm cluster answers: 'scontrol ping' timed out; run slurm/testcluster/start.sh"
        if ping.returncode != 0 or "is UP" not in ping.stdout:
            first = (ping.stdout or ping.stderr).strip().splitlines()[:1]
            return f"no Slurm cluster answers ({first}); run slurm/testcluster/start.sh"
    try:
        proc = _run(["sinfo", "-h", "-o", "%T"], timeout=15)
    except subprocess.TimeoutExpired:
        return "no Slurm cluster answers: 'sinfo' timed out; run slurm/testcluster/start.sh"
    states = proc.stdout.split()
    if proc.returncode != 0 or not states:
        return ("no Slurm cluster answers ('sinfo' rc="
                f"{proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}); run slurm/testcluster/start.sh")
    if not any(s.rstrip("*~#!%$@^-") in {"idle", "mixed", "allocated", "completing"} for s in states):
        return f"Slurm cluster answers but has no usable node (states: {states})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
