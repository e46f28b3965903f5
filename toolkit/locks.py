"""One writer per output: an exclusive lock file beside what it guards, safe on a shared filesystem.

HDF5's own locking is off or broken on many cluster filesystems (Lustre, GPFS, NFS), so a lock here is a
plain file `{target}.lock`, created with O_CREAT|O_EXCL (atomic on local disks and on NFSv3 and later),
holding JSON {host, pid, started, command, ...}. A second writer finds it and fails with a message that
names the holder. A lock is stale, and taken over, when its holder is gone:
- same host: that pid no longer runs (or runs a newer process: its start time differs);
- any host: it names this Slurm job (and array task) at an earlier restart count: a requeue meets its own lock.
A holder on another host cannot be asked; the message says which file to delete once that job is gone.
A lock file is parsed defensively: one whose holder cannot be read as a host and a process id is refused with
the file to delete, never guessed stale. Breaking a stale lock is itself exclusive (a flock on the lock's
folder, which the kernel releases when its holder dies): of several processes breaking the same lock, one
removes it and every other finds the new holder.
Locks are re-entrant within one process: a job may lock its units up front and the writer again.
torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import UserError
from toolkit.files import pid_alive

LOCK_SUFFIX = ".lock"
UNWRITTEN_GRACE_S = 60.0  # an empty lock file younger than this is a writer between create and write
BREAK_WAIT_S = 10.0  # breaking a stale lock takes milliseconds; a breaker holding on this long is stuck

_held: dict[Path, int] = {}  # this process's locks and their nesting depth


class LockHeld(UserError):
    """Another process writes this output (or its lock file cannot be read)."""


def lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(target.name + LOCK_SUFFIX)


class WriterLock:
    """`with WriterLock(target, what):` holds `{target}.lock` or raises LockHeld naming the holder."""

    def __init__(self, target: str | Path, what: str | None = None):
        self.path = lock_path(target).absolute()
        self.what = what or str(target)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path in _held:
            _held[self.path] += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed and creating is tried again
            if self._create():
                _held[self.path] = 1
                return
            holder = read_holder(self.path)
            if holder is None or not stale(holder, self.path):
                raise LockHeld(self._held_message(holder))
            _break(self.path, holder)
        raise LockHeld(self._held_message(read_holder(self.path)))

    def release(self) -> None:
        depth = _held.get(self.path, 0)
        if depth > 1:
            _held[self.path] = depth - 1
            return
        _held.pop(self.path, None)
        holder = read_holder(self.path)
        if holder and _is_me(holder):  # never remove a lock another process took over
            self.path.unlink(missing_ok=True)

    def check_free(self) -> None:
        """Raise LockHeld now if a live writer holds the lock (a submit-time check; taking it is `acquire`)."""
        if self.path in _held or not self.path.exists():
            return
        holder = read_holder(self.path)
        if holder is None or (holder and not stale(holder, self.path) and not _is_me(holder)):
            raise LockHeld(self._held_message(holder))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(me(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _held_message(self, holder: dict | None) -> str:
        if holder is None:
            who = "a process that is still writing its lock"
        else:
            job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            who = (f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started_at', '?')}: "
                   f"{holder.get('command', '?')}")
        return (f"{self.what} is being written by another process ({who}). Wait for it to finish (rerunning then "
                f"resumes or finds it done); if that process is gone for good, delete {self.path}")


def me() -> dict:
    """This process as a lock holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "started": time.time(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500], "slurm_job": _slurm_job(),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file; {} for an old empty or unreadable one, None while it is new."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if isinstance(holder, dict):
        return holder
    return {} if age > UNWRITTEN_GRACE_S else None


def stale(holder: dict, path: Path) -> bool:
    """Whether the holder is known to be gone (see the module's docstring); a holder that cannot be read as a
    host and a process id is a LockHeld naming the lock file, since nothing can be said about it."""
    if not holder:  # no lock left, or one whose writer died before recording itself
        return True
    _check_holder(holder, path)
    if holder.get("slurm_job") and holder["slurm_job"] == _slurm_job() and _restarts(holder) < _restarts(me()):
        return True  # a requeued job meets its own earlier run's lock
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder["pid"]
    if not pid_alive(pid):
        return True
    return holder.get("pid_start") is not None and holder["pid_start"] != _start_time(pid)


# The fields stale() interprets, and what each must be (a lock of another version may carry more).
_FIELDS = {"host": (str,), "pid": (int,), "pid_start": (int, type(None)), "slurm_job": (str, type(None)),
           "slurm_restart": (int, type(None))}


def _check_holder(holder: dict, path: Path) -> None:
    for key, kinds in _FIELDS.items():
        value = holder.get(key)
        bad = (key in ("host", "pid") and key not in holder) or not isinstance(value, kinds) or isinstance(value, bool)
        if not bad and key == "pid" and not 0 < value < 1 << 22:  # Linux pid_max is at most 2**22
            bad = True
        if bad:
            raise LockHeld(f"{path} is damaged ({key} {value!r} is not a {'process id' if key == 'pid' else key}); "
                           f"nothing can tell whether its writer still runs. Once no lingogap job writes that "
                           f"output, delete {path} and rerun")


def _break(path: Path, holder: dict) -> None:
    """Remove a stale lock, under the lock on the lock: only if it still holds the stale `holder`, so a lock
    another breaker has meanwhile replaced by its own is never removed."""
    with _breaking(path):
        # A lock that is gone is not broken: read_holder's {} for a missing file would otherwise match an
        # unwritten stale lock's {}, and the unlink could remove a lock a writer created in the meantime.
        if path.exists() and read_holder(path) == holder:
            path.unlink(missing_ok=True)


@contextmanager
def _breaking(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the lock's folder while breaking a lock in it: breakers take turns, the kernel
    releases the flock when its holder dies, and no guard file is left behind. (A guard file removed while held
    let two breakers in once the file system reused its inode number for the next guard.)"""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        deadline = time.monotonic() + BREAK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockHeld(f"another process has been breaking a stale lock in {path.parent} for "
                                   f"{BREAK_WAIT_S:.0f} s; if none runs, delete {path}") from None
                time.sleep(0.01)
            except OSError as exc:  # a filesystem without flock: break as before, unguarded
                if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                    raise
                break
        yield
    finally:
        os.close(fd)  # releases the flock


def _restarts(holder: dict) -> int:
    return holder.get("slurm_restart") or 0


def _is_me(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
