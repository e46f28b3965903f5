"""`--executor local` (the default): each stage runs in this process, one after another.

A stage's tasks are merged into one call (an extraction loads the model once for all its languages),
progress shows live, Ctrl-C stops it and the same command resumes. Each call is recorded in
RUN/jobs.json (job id `local-PID-N`), so `status` shows it and `cancel` interrupts it (SIGINT to this
process; same host only).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from toolkit import stages
from toolkit.cluster.base import Executor, register_executor
from toolkit.cluster.chain import Step
from toolkit.cluster.joblog import JobLog, now
from toolkit.rundir import discard_if_empty
from toolkit.stages import Task


@register_executor
class LocalExecutor(Executor):
    name = "local"

    def tasks(self, step: Step) -> list[Task]:
        return [stages.get(step.stage).merge(step.tasks)]

    def run(self, steps: list[Step]) -> int:
        """Every step in order; a failure stops the chain (and propagates, recorded as FAILED)."""
        log = JobLog(self.cfg.run_dir)
        fresh = not self.cfg.run_dir.exists()
        try:
            with terminate_as_interrupt():
                for step in steps:
                    for task in self.tasks(step):
                        self._recorded(log, step.stage, task)
        except BaseException:
            if fresh:  # a failed command leaves no run folder it created (the error is on this terminal)
                discard_if_empty(self.cfg.run_dir)
            raise
        return 0

    def call(self, stage: str, task: Task) -> None:
        stages.run(self.cfg, stage, task)

    def failed(self, exc: BaseException) -> None:
        """Called with a task's exception before it propagates."""

    def _recorded(self, log: JobLog, stage: str, task: Task) -> None:
        job_id = f"{self.name}-{os.getpid()}-{len(log.read())}"
        log.add([{"stage": stage, "language": task.label, "job_id": job_id, "array_task": None,
                  "executor": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                  "submitted": now(), "started": time.time(), "state": "RUNNING"}])
        try:
            self.call(stage, task)
        except KeyboardInterrupt as exc:
            why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C or cancel)"
            _record_end(log, job_id, state="CANCELLED", error=why)
            raise
        except BaseException as exc:
            _record_end(log, job_id, state="FAILED", error=one_line(exc))
            self.failed(exc)
            raise
        log.update(job_id, state="COMPLETED", ended=time.time())


def _record_end(log: JobLog, job_id: str, **values: str) -> None:
    """Record how a task ended; on a full disk the record may not fit, and the task's own error matters more
    (`status` then shows LOST: the recorded process is gone)."""
    try:
        log.update(job_id, ended=time.time(), **values)
    except OSError:
        pass


REDELIVER_S = 0.01  # an interrupt lost in a finalizer is sent again this much later


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `cancel`, a shutdown): unwinds like Ctrl-C, so the job is recorded CANCELLED, locks are
    released and committed parts stay for a resume."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While a local stage runs, SIGTERM raises Terminated in the main thread (elsewhere: left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _redeliver_lost(hooks[0]), _quiet_interrupts(hooks[1])
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook, sys.excepthook = hooks


def _redeliver_lost(previous):
    """An interrupt raised while Python runs a finalizer (a weakref callback, an h5py handle's destructor) cannot
    propagate: Python prints it as "Exception ignored" and goes on, and the stage would finish as if never
    interrupted. It is sent again instead, from another thread a moment later: sent from here, its handler would
    run inside this hook and be lost again."""
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum)).start()
        else:
            previous(unraisable)
    return hook


def _quiet_interrupts(previous):
    """Cython destructors (h5py) print a lost exception's traceback before reporting it as unraisable: an
    interrupt is left to `_redeliver_lost`, without the traceback."""
    def hook(kind, value, tb) -> None:
        if not isinstance(value, KeyboardInterrupt):
            previous(kind, value, tb)
    return hook


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")
