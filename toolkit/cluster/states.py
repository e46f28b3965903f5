"""Job states: squeue and sacct for Slurm jobs, the record itself for in-process ones, and their errors."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from toolkit.files import pid_alive

OK_STATES = ("COMPLETED",)
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "LOST")
LOST_AFTER_S = 120  # a job neither sacct nor squeue knows this long after submission is lost


def array_ids(job_id: str) -> list[str]:
    from submitit.slurm.slurm import read_job_id

    out = []
    for parts in read_job_id(job_id):
        if len(parts) == 3:
            out += [f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[2]) + 1)]
        else:
            out.append("_".join(parts))
    return out


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, elapsed)}: squeue for live jobs (sacct lags seconds behind), then sacct for the rest
    (the latest record of a requeued job)."""
    if not job_ids:
        return {}
    mains = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    found: dict[str, tuple[str, str]] = {}
    for cmd in (["squeue", "-h", "-o", "%i|%T|%M", "-j", mains],
                ["sacct", "-X", "-P", "-n", "-o", "JobID,State,Elapsed", "-j", mains]):
        if all(j in found for j in job_ids):
            break
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3 or "." in parts[0]:
                continue
            state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
            for jid in array_ids(parts[0]):
                found.setdefault(jid, (state, parts[2]))
    return found


def result_of(rec: dict) -> tuple[str, Any] | None:
    """submitit's result pickle: ("success", value) or ("error", traceback text); None while absent."""
    path = Path(rec.get("result", ""))
    if not rec.get("result") or not path.is_file():
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(path)
    except Exception as exc:  # an unreadable pickle says something too
        return ("error", f"cannot read {path}: {exc}")


def states(records: list[dict]) -> dict[str, tuple[str, str]]:
    """{job id: (state, elapsed)} for slurm and in-process records alike."""
    slurm = slurm_states([r["job_id"] for r in records if r["executor"] == "slurm"])
    out = {}
    for rec in records:
        if rec["executor"] != "slurm":
            out[rec["job_id"]] = _local_state(rec)
            continue
        state, elapsed = slurm.get(rec["job_id"], ("", ""))
        if not state:  # accounting forgot it (or there is none): the result pickle still tells
            res = result_of(rec)
            state = {"success": "COMPLETED", "error": "FAILED"}.get(res[0], "UNKNOWN") if res else "UNKNOWN"
            if state == "UNKNOWN" and time.time() - rec.get("submitted_at", time.time()) > LOST_AFTER_S:
                state = "LOST"  # neither sacct nor squeue knows it, and it left no result
        out[rec["job_id"]] = (state, elapsed)
    return out


def _local_state(rec: dict) -> tuple[str, str]:
    state = rec.get("state", "UNKNOWN")
    end = rec.get("ended") or time.time()
    if state == "RUNNING" and rec.get("host") == socket.gethostname() and not alive(rec.get("pid", 0)):
        state, end = "LOST", rec.get("started", end)
    return state, clock(end - rec.get("started", end))


def alive(pid: int) -> bool:
    """Whether a recorded local stage's process still runs here (no pid recorded: no)."""
    return pid > 0 and pid_alive(pid)


def clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def terminal(state: str) -> bool:
    return state in OK_STATES or state in FAILED_STATES


ERROR_LINE = re.compile(r"(\b\w*(Error|Exception|Interrupt)\b:?\s)|(\berror:\s)|(Job not requeued)")


def error_text(rec: dict, state: str) -> str:
    """The job's error: traceback from the result pickle, else the end of its stderr log."""
    if rec["executor"] != "slurm":
        return rec.get("error", "") if state not in OK_STATES else ""
    res = result_of(rec)
    if res and res[0] == "error":
        return str(res[1])
    log = Path(rec.get("stderr", ""))
    if rec.get("stderr") and log.is_file():
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    if state == "CANCELLED" and rec.get("depends_on"):
        return f"never started: dependency {rec['depends_on']} did not complete"
    if state == "LOST":
        return "sacct and squeue no longer know this job and it left no result (is accounting enabled?)"
    return ""


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if ERROR_LINE.search(ln) and not ln.startswith("submitit ")]
    return (hits or lines or [""])[-1]
