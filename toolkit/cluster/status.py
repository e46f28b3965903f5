"""The `status` and `cancel` commands and `--wait`: they read RUN/jobs.json and ask Slurm or this host."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.cluster.joblog import JobLog
from toolkit.cluster.states import FAILED_STATES, OK_STATES, alive, error_text, last_error_line, states, terminal
from toolkit.errors import UserError
from toolkit.rundir import RunDir, is_point

STATE_STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "yellow"}


def _recorded(run_dir: Path) -> list[dict]:
    records = JobLog(run_dir).latest()
    if not records:
        raise UserError(f"no jobs recorded for {run_dir} (no {RunDir(run_dir).jobs_file}); submit a stage first, "
                        "with the same --run")
    return records


def status_table(records: list[dict], now: dict[str, tuple[str, str]], run_dir: Path) -> Table:
    """stage, language, job id, state, elapsed, log (relative to the run directory), last error line."""
    table = Table(title=f"jobs of {run_dir}")
    for col in ("stage", "language", "job id", "state", "elapsed", "log", "last error"):
        table.add_column(col, overflow="fold")
    for rec in records:
        state, elapsed = now.get(rec["job_id"], ("UNKNOWN", ""))
        style = STATE_STYLE.get(state, "red" if state in FAILED_STATES else "")
        log = rec.get("stderr") or ("(this terminal)" if rec["executor"] != "slurm" else "")
        err = last_error_line(error_text(rec, state)) if terminal(state) and state not in OK_STATES else ""
        table.add_row(rec["stage"], rec["language"], rec["job_id"], f"[{style}]{state}[/]" if style else state,
                      elapsed, _short(log, run_dir), err)
    return table


def _short(path: str, run_dir: Path) -> str:
    for root in (Path(run_dir).resolve(), Path.cwd()):
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return path


def show_status(run_dir: Path, console: Console) -> tuple[list[dict], dict]:
    records = _recorded(run_dir)
    now = states(records)
    console.print(status_table(records, now, run_dir))
    console.print(adapters_line(run_dir), highlight=False, soft_wrap=True)
    return records, now


def adapters_line(run_dir: Path) -> str:
    """The run's trained adapters (`RunDir.adapters`), sweep points counted apart from the others."""
    found = RunDir(run_dir).adapters()
    plain = [name for name in found if not is_point(name)]
    points = len(found) - len(plain)
    text = f"adapters: {', '.join(plain) if plain else 'none'}"
    return text + (f"; sweep points: {points} (python -m analysis.align_sweep {run_dir})" if points else "")


def wait(run_dir: Path, records: list[dict], console: Console, poll_s: float = 1.0, max_poll_s: float = 10.0) -> int:
    """Wait until every job is finished; print each state change, then the errors; 0 if all completed.

    Polls every `poll_s`, then every tenth of the time waited so far, at most `max_poll_s`: the end is seen at most
    ~10 % late (a 1.2x backoff had overshot a 27 s array by 6 s) while long waits query Slurm rarely."""
    seen: dict[str, str] = {}
    started = time.monotonic()
    try:
        while True:
            records = [r for r in JobLog(run_dir).latest() if r["job_id"] in {x["job_id"] for x in records}]
            now = states(records)
            for rec in records:
                state = now[rec["job_id"]][0]
                if seen.get(rec["job_id"]) != state:
                    seen[rec["job_id"]] = state
                    console.print(f"{rec['stage']:>10} {rec['language']:<8} {rec['job_id']:<12} {state}",
                                  highlight=False)
            if all(terminal(now[r["job_id"]][0]) for r in records):
                break
            time.sleep(min(max(poll_s, 0.1 * (time.monotonic() - started)), max_poll_s))
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped waiting[/]; the jobs go on: `status --run {run_dir}` or `cancel --run "
                      f"{run_dir}`")
        return 130
    console.print(status_table(records, now, run_dir))
    failed = [r for r in records if now[r["job_id"]][0] not in OK_STATES]
    for rec in failed:
        state = now[rec["job_id"]][0]
        text = error_text(rec, state)
        tail = "\n".join(text.strip().splitlines()[-15:])
        console.print(f"[bold red]{rec['stage']} {rec['language']} (job {rec['job_id']}) {state}[/]"
                      + (f", log {rec['stderr']}" if rec.get("stderr") else ""), highlight=False)
        if tail:
            console.print(tail, markup=False, highlight=False)
    return 1 if failed else 0


CANCEL_GRACE_S = 5.0  # a local stage gets this long to stop on SIGINT before SIGTERM


def cancel(run_dir: Path, console: Console) -> int:
    """scancel every recorded job still queued or running; SIGINT to a running local stage on this host
    (SIGTERM if it is still there after CANCEL_GRACE_S)."""
    records = _recorded(run_dir)
    now = states(records)
    active = [r for r in records if not terminal(now[r["job_id"]][0])]
    slurm_ids = [r["job_id"] for r in active if r["executor"] == "slurm"]
    if slurm_ids:
        out = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise UserError(f"scancel failed: {out.stderr.strip()}")
    local = [r["pid"] for r in active
             if r["executor"] != "slurm" and r.get("host") == socket.gethostname() and alive(r.get("pid", 0))]
    for pid in local:
        os.kill(pid, signal.SIGINT)
    # A stage started from a non-interactive shell's background (`nohup ... &`) ignores SIGINT: terminate it.
    deadline = time.time() + CANCEL_GRACE_S
    while local and time.time() < deadline:
        time.sleep(0.1)
        local = [pid for pid in local if alive(pid)]
    for pid in local:
        os.kill(pid, signal.SIGTERM)
    if active:
        console.print(f"cancelled {len(active)} job(s): {', '.join(r['job_id'] for r in active)}", highlight=False)
    else:
        console.print("nothing to cancel: every recorded job has finished")
    return 0
