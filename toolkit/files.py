"""Files that appear whole or not at all: the one atomic-write helper and build-once-under-lock.

Everything the toolkit commits to disk (HDF5 files, manifests, SAEs, adapters, checkpoints, job logs,
results, reports, CSVs, figures) goes through `staged` or one of the writers built on it (`atomic_write`,
`write_json`, `write_csv`, `save_figure`), so a reader, a second job or a resumed run never sees half a
file, whatever killed the writer. torch-free: `analysis` may use it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_SUFFIX = ".tmp"


def staging_path(final: str | Path) -> Path:
    """The hidden sibling a writer fills before committing: `dir/.name.<pid>.tmp` (one per process)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}{STAGING_SUFFIX}")


@contextmanager
def staged(final: str | Path, replace_dir: bool = False) -> Iterator[Path]:
    """Yield a staging path (file or folder) to fill; on success it is renamed to `final` in one step.

    On an exception the staging path is removed and `final` is untouched. A folder that already
    exists at `final` is replaced only with `replace_dir=True` (a rename cannot replace a non-empty one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(final)
    remove(tmp)
    try:
        yield tmp
        if replace_dir and final.is_dir():
            remove(final)
        os.replace(tmp, final)
    except BaseException:
        remove(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` so that readers see the old content or the new, never a part."""
    with staged(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        _fsync(tmp)
    return Path(path)


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: JSON has no NaN or infinity, so non-finite floats become null; numpy
    scalars and 0-d arrays or tensors become numbers, tuples lists, keys strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path: str | Path, data: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Atomically write `data` as UTF-8 JSON, non-finite numbers as null (see `jsonable`)."""
    text = json.dumps(jsonable(data), indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    return atomic_write(path, text + "\n")


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    """Atomically write a CSV file: a header row, then `rows`."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """Atomically save a matplotlib figure (its format from `path`'s suffix)."""
    path = Path(path)
    with staged(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    return path


def read_json(path: str | Path, fix: str) -> Any:
    """A run file's JSON; a damaged one is a UserError naming the file and `fix`, the way to repair it."""
    from toolkit.errors import UserError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); {fix}") from None


def check_safetensors(path: str | Path, fix: str) -> None:
    """Open a safetensors file's header and check that it covers the file (cheap): a truncated or garbled
    weights file is a UserError naming it and `fix`, here rather than deep in a job."""
    _safetensors(path, fix, lambda fh: fh.keys())


def read_safetensors(path: str | Path, fix: str, framework: str = "pt") -> dict:
    """Every tensor of a safetensors file (torch tensors, or numpy arrays with framework "np"); a damaged file is
    a UserError naming it and `fix`, whatever safetensors raised."""
    return _safetensors(path, fix, lambda fh: {name: fh.get_tensor(name) for name in fh.keys()}, framework)


def _safetensors(path: str | Path, fix: str, read: Callable[[Any], Any], framework: str = "np") -> Any:
    from safetensors import SafetensorError, safe_open

    from toolkit.errors import UserError

    try:
        with safe_open(str(path), framework) as fh:
            return read(fh)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path} is damaged ({detail}); {fix}") from None


def check_writable(folder: str | Path) -> None:
    """Refuse a folder this process cannot write into (or create), before anything is written there.
    A nameless temporary file probes it: permissions, a read-only mount and a full inode table all show."""
    import errno
    import tempfile

    from toolkit.errors import UserError

    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = {errno.EROFS: "a read-only filesystem", errno.EACCES: "no permission to write there",
                  errno.ENOSPC: "the disk is full"}.get(exc.errno, exc.strerror)
        where = folder if existing == folder else f"{existing} (to create {folder})"
        raise UserError(f"cannot write to {where}: {reason}; choose another --run folder or fix its "
                        "permissions") from None


def build_once(target: str | Path, build: Callable[[Path], None], done: str = "DONE") -> Path:
    """Build the folder `target` once across processes and jobs: the first caller holds a lock and fills a
    staging folder through `build(staging)`, which must create `staging/done`; later callers reuse it."""
    from filelock import FileLock

    target = Path(target)
    if (target / done).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / done).exists():  # another process finished it while we waited
            return target
        with staged(target, replace_dir=True) as tmp:
            tmp.mkdir()
            build(tmp)
            if not (tmp / done).exists():
                raise RuntimeError(f"building {target} did not write its {done} marker")
    return target


def stale_staging(folder: str | Path) -> list[Path]:
    """Staging leftovers of writers that no longer run on this host (`.name.<pid>.tmp` with a dead pid)."""
    out = []
    for p in Path(folder).glob(f".*{STAGING_SUFFIX}"):
        pid = p.name[: -len(STAGING_SUFFIX)].rpartition(".")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            out.append(p)
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def remove(path: Path) -> None:
    """Delete a file or a folder tree (a staging leftover); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
