"""HDF5 activation files: the streaming, resumable writer and the reader analysis uses.

Layout (version 1) is documented in docs/hdf5.md; this module is its only writer. It imports
h5py and numpy only, never torch, so `analysis` can use it on a laptop without a model.

Writing is crash-safe by construction: each batch becomes one part file in a staging folder
(`{name}.parts/`), staged and renamed (`toolkit.files`), so a part either exists whole or not at
all. `finalize()` streams the parts into a staging file, marks it complete and renames it over the
final path. A job killed at any moment resumes after its last part.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from toolkit.errors import UserError
from toolkit.files import atomic_write, staged, stale_staging
from toolkit.locks import WriterLock
from toolkit.rundir import RunDir

LAYOUT_VERSION = 2
FORMAT = "lingogap-activations"
SAE_STATS = ("mass", "l0", "max")  # what the SAE codes say
CONTROLS = ("resid_norm", "recon_err")  # SAE-free control and the SAE's per-token error (layout 2)
FIDELITY_SUMS = ("sq_err", "sq_dev")  # per-sentence sums behind a language's FVE (layout 2)
STATS = SAE_STATS + CONTROLS  # the statistics a gap can be computed on
STORED = STATS + FIDELITY_SUMS
FLOAT16_MAX = float(np.finfo(np.float16).max)
# HDF5's own file locking fails on many cluster filesystems (Lustre or NFS without flock: "unable to lock
# file"). It is not needed: one writer per file is toolkit.locks' job, it writes a private staging file, and
# a file is read only once renamed into place, never changed after.
HDF5_LOCKING = False
CONSOLIDATION_SLACK = 64 << 10  # HDF5 metadata beyond the parts' own bytes (+5 % for chunk padding)
# HDF5's object header and chunk index per dataset: measured 2.3 KB beyond the 5 % (26 layers, 264 datasets).
DATASET_OVERHEAD = 4 << 10
FALLOC_FL_KEEP_SIZE = 1  # linux/falloc.h
# Parts are consolidated this many bytes at a time: one HDF5 write per dataset and group of parts (a small corpus
# is one group), and the memory it takes stays bounded whatever the corpus.
CONSOLIDATION_BUFFER = 8 << 20


class StoreError(UserError):
    """An activation file that cannot be used as it is."""


@dataclass
class LayerBatch:
    """One layer's SAE codes for the kept tokens of a batch (CSR) and per-sentence stats."""

    indptr: np.ndarray  # (T+1,) int64, row pointer per token
    indices: np.ndarray  # (nnz,) int32 feature ids
    values: np.ndarray  # (nnz,) float32, cast to the file's code dtype on write
    mass: np.ndarray  # (S,) mean over tokens of the summed feature activations
    l0: np.ndarray  # (S,) mean over tokens of the active-feature count
    max: np.ndarray  # (S,) largest activation in the sentence
    resid: np.ndarray | None = None  # (T, d_model) float32, only with save_resid
    # Controls from the same forward pass, per sentence; None only in files written without them (v1).
    resid_norm: np.ndarray | None = None  # (S,) mean over tokens of the residual's L2 norm
    recon_err: np.ndarray | None = None  # (S,) mean over tokens of |x - x_hat|^2 / |x - x_mean|^2
    sq_err: np.ndarray | None = None  # (S,) sum over tokens of |x - x_hat|^2
    sq_dev: np.ndarray | None = None  # (S,) sum over tokens of |x - x_mean|^2


@dataclass
class Batch:
    sentence_ids: list[str]
    lengths: np.ndarray  # (S,) kept tokens per sentence (BOS and padding removed)
    token_ids: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32, position in the tokenised sentence (BOS is 0)
    layers: dict[int, LayerBatch] = field(default_factory=dict)


def fingerprint(identity: dict) -> str:
    """Hash of everything that must match for two writes to belong in one file."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ActivationWriter:
    """Streams batches for one language (one shard) into one HDF5 file; one writer per file.

    `identity` holds the attributes that define the file's content (model, SAEs, layers, corpus,
    language...): a staging folder or a finished file made with a different identity is refused
    unless `overwrite` is set. `extra_attrs` are stored but do not define the content.
    """

    def __init__(
        self,
        path: str | Path,
        identity: dict,
        layers: list[int],
        code_dtype: str = "float16",
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.layers = sorted(layers)
        self.code_dtype = np.dtype(code_dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reserve = 0  # bytes the consolidated file is expected to need (set by finalize)
        self.lock = WriterLock(self.path, str(self.path))
        self.lock.acquire()  # held until finalize() or close(): one writer per file and its parts
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool) -> None:
        if overwrite:
            self.path.unlink(missing_ok=True)
            verified_path(self.path).unlink(missing_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
        self._remove_litter()
        self._check_existing()
        self._n_parts = 0
        if self.complete:
            verify(self.path)
            return
        self._n_parts = len(self._part_files())

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give up the file (its committed parts stay for a resume)."""
        self.lock.release()

    def _remove_litter(self) -> None:
        """Staging files of writers that died, and the parts of a file that was finished before they were
        removed (a kill between the final rename and the cleanup)."""
        for tmp in stale_staging(self.path.parent):
            if tmp.name.startswith(f".{self.path.name}."):
                tmp.unlink(missing_ok=True)
        if self.parts.is_dir():
            for tmp in stale_staging(self.parts):
                tmp.unlink(missing_ok=True)
            if self.path.exists():
                shutil.rmtree(self.parts, ignore_errors=True)

    def _check_existing(self) -> None:
        hint = "pass --overwrite to start afresh, or use another --run directory"
        old = recorded_identity(self.path)
        if old is not None and not same_identity(old, self.identity):
            where = f"{self.path} was written" if self.path.exists() else f"{self.parts} holds a partial extraction"
            raise StoreError(
                f"{where} with a different configuration ({identity_diff(portable(old), self.identity)}); {hint}"
            )

    @property
    def complete(self) -> bool:
        return self.path.exists()

    @property
    def n_parts(self) -> int:
        """Batches committed so far (each batch is one part)."""
        return self._n_parts

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz"))

    def done_sentence_ids(self) -> set[str]:
        """Ids already committed, in parts or in the finished file."""
        if self.complete:
            with ActivationFile(self.path) as f:
                return set(f.sentence_ids)
        done: set[str] = set()
        for part in self._part_files():
            with np.load(part) as z:
                done.update(z["sentence_ids"].tolist())
        return done

    def write_batch(self, batch: Batch) -> None:
        """Commit one batch as one part file (layout: `_part_arrays`)."""
        arrays = _part_arrays(batch, self.layers, self.code_dtype)
        # The folder and its identity stamp come with the first part: a file made from memory alone has neither.
        stamp = self.parts / "fingerprint.json"
        if not stamp.exists():
            self.parts.mkdir(exist_ok=True)
            atomic_write(stamp, json.dumps({"fingerprint": self.fingerprint, **self.identity}, indent=1))
        final = self.parts / f"part-{self._n_parts:06d}.npz"
        with staged(final) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        self._n_parts += 1

    def finalize(self, attrs: dict, layer_attrs: dict[int, dict] | None = None, last: Batch | None = None) -> Path:
        """Consolidate the parts, then `last`, into the final file (atomically), remove them and give up the lock.

        `last` is the unit's last batch, handed over from memory: writing it as a part only to read it back cost a
        small corpus a write, an fsync and an unlink per file. A kill meanwhile loses that batch, as one during its
        computation would."""
        try:
            if not self.complete:
                parts: list[PartSource] = [*self._part_files()]
                if last is not None:
                    parts.append(_as_part(_part_arrays(last, self.layers, self.code_dtype), self.layers))
                self._reserve = self._check_space(parts)
                with staged(self.path) as tmp:  # per-process staging name: only a whole file is renamed
                    self._consolidate(tmp, parts, attrs, layer_attrs)
                mark_verified(self.path)  # just written and fsynced: nothing to read back
                _layout_written(self.path)  # nor a layout to check when this process opens it next
                shutil.rmtree(self.parts, ignore_errors=True)
        finally:
            self.close()
        return self.path

    def _check_space(self, parts: list[PartSource]) -> int:
        """The bytes the consolidated file needs, about as many as its (uncompressed) parts plus HDF5's metadata;
        refused now if they are not free. HDF5 meets a full disk in its cache flushes and object destructors
        (chained errors, once a segfault), so it is not let near one: `_write_file` reserves these bytes."""
        n_datasets = 4 + len(self.layers) * (3 + len(STORED) + 1)
        need = int(sum(_source_bytes(p) for p in parts) * 1.05) + CONSOLIDATION_SLACK + n_datasets * DATASET_OVERHEAD
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise OSError(
                errno.ENOSPC, f"consolidating needs about {need:,} bytes and {free:,} are free", str(self.path)
            )
        return need

    def _consolidate(
        self, tmp: Path, parts: list[PartSource], attrs: dict, layer_attrs: dict[int, dict] | None
    ) -> None:
        try:
            self._write_file(tmp, parts, attrs, layer_attrs)
        except (RuntimeError, OSError) as exc:  # HDF5 words a full disk in its message only
            if "errno = 28" in str(exc) or "No space left on device" in str(exc):
                raise OSError(errno.ENOSPC, "no space left on device", str(self.path)) from None
            raise

    def _write_file(self, tmp: Path, parts: list[PartSource], attrs: dict, layer_attrs: dict[int, dict] | None) -> None:
        h5 = h5py.File(tmp, "w", locking=HDF5_LOCKING)
        with _destructor_errors() as failed:
            try:
                _reserve(h5, self._reserve)
                self._fill(h5, parts, attrs, layer_attrs, failed)
                if failed:  # raised before the flush: a flush that fails leaves HDF5 unable to close the file
                    raise failed[0]
                h5.close()
                if failed:
                    raise failed[0]
            except BaseException:
                _abandon(h5, tmp)
                raise
        _release(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())

    def _fill(
        self,
        h5: h5py.File,
        parts: list[PartSource],
        attrs: dict,
        layer_attrs: dict[int, dict] | None,
        failed: list[BaseException],
    ) -> None:
        _write_consolidated(h5, parts, self.layers, self.code_dtype, failed)
        for key, value in {**attrs, **self.identity}.items():
            h5.attrs[key] = _attr(value)
        h5.attrs["format"] = FORMAT
        h5.attrs["layout_version"] = LAYOUT_VERSION
        h5.attrs["fingerprint"] = self.fingerprint
        h5.attrs["identity"] = json.dumps(self.identity, sort_keys=True)
        for layer, extra in (layer_attrs or {}).items():
            for key, value in extra.items():
                h5[f"layers/{layer}"].attrs[key] = _attr(value)
        h5.attrs["complete"] = True


@contextmanager
def _destructor_errors() -> Iterator[list[BaseException]]:
    """HDF5 flushes metadata whenever its cache evicts, also inside the destructor of a dataset or group handle
    going away. h5py reports a failure there by printing its traceback (sys.excepthook) and then "Exception
    ignored" (sys.unraisablehook), and carries on. While a file is written such a failure is a failed write (a
    full disk), and an interrupt (Ctrl-C, SIGTERM) that lands in a destructor would be lost the same way: both
    are collected here and raised by the caller; anything else goes to the hooks as before."""
    caught: list[BaseException] = []
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def from_h5py(exc: BaseException | None, tb, where: object = None) -> bool:
        if isinstance(exc, KeyboardInterrupt):  # only destructors report exceptions to the hooks meanwhile
            return True
        frames = traceback.extract_tb(tb) if tb else []
        in_h5py = "h5py" in str(where) or any("h5py" in frame.filename for frame in frames)
        return in_h5py and isinstance(exc, (OSError, RuntimeError))

    def unraisable_hook(unraisable) -> None:
        if from_h5py(unraisable.exc_value, unraisable.exc_traceback, unraisable.object):
            caught.append(unraisable.exc_value)
        else:
            previous_unraisable(unraisable)

    def except_hook(kind, value, tb) -> None:
        if from_h5py(value, tb):
            caught.append(value)
        else:
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    try:
        yield caught
    finally:
        sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except
    # an interrupt that landed in a destructor after the caller last looked (h5.close() and after) is still raised
    interrupt = next((exc for exc in caught if isinstance(exc, KeyboardInterrupt)), None)
    if interrupt is not None:
        raise interrupt


def _reserve(h5: h5py.File, size: int) -> None:
    """Allocate the file's expected size on disk before HDF5 writes into it, so that another process filling
    the disk meanwhile cannot make HDF5's writes fail. The blocks are allocated past the end of the file
    (Linux fallocate with FALLOC_FL_KEEP_SIZE): HDF5 sees an empty file and writes into them, and
    `_release` frees what it did not use. Elsewhere, or on a filesystem without fallocate, it goes without."""
    fallocate = getattr(_libc(), "fallocate", None)
    if size <= 0 or fallocate is None:
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(h5.id.get_vfd_handle(), FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


def _release(path: Path) -> None:
    """Free the reserved blocks past the end of a written file (truncating to its own size does that)."""
    os.truncate(path, path.stat().st_size)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _abandon(h5: h5py.File, tmp: Path) -> None:
    """Close a staging file whose writing failed, leaving no HDF5 object for Python to finalise later.

    On a full disk every dataset, group and the file itself still hold metadata HDF5 wants to write; left to
    the garbage collector, each fails again in its destructor ("Exception ignored", once a segfault at exit).
    The file is discarded anyway, so it is emptied first: its blocks are freed and the pending metadata lands
    in a small sparse file. Then the file is closed, which closes its objects first (h5py's strong close)."""
    try:
        os.truncate(tmp, 0)
    except OSError:
        pass
    for _ in range(3):  # each try closes what it can; what failed to flush is retried
        try:
            h5.close()
            return
        except (OSError, RuntimeError, ValueError):
            continue


def recorded_identity(path: Path) -> dict | None:
    """The identity a finished file or its partial parts were written with; None when there is neither."""
    path = Path(path)
    if path.exists():
        with ActivationFile(path) as f:
            return {**f.identity, "fingerprint": f.attrs.get("fingerprint")}
    stamp = path.with_name(path.name + ".parts") / "fingerprint.json"
    if not stamp.exists():
        return None
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise StoreError(f"{stamp} is damaged; rerun extract with --overwrite to start that file afresh")
    return recorded


def portable(identity: dict) -> dict:
    """The identity without where the run folder lives: SAEs trained in the run are `local:KEY`, whatever
    folder (older versions recorded `local:/abs/RUN/saes/KEY`)."""
    source = str(identity.get("sae_source", ""))
    if not source.startswith("local:") or "/" not in source:
        return identity
    return {**identity, "sae_source": "local:" + source.rstrip("/").rpartition("/")[2]}


def same_identity(old: dict, new: dict) -> bool:
    """Whether a recorded identity (by its fingerprint, or recomputed once made portable) is `new`'s."""
    recorded = {k: v for k, v in old.items() if k != "fingerprint"}
    return fingerprint(new) in (old.get("fingerprint"), fingerprint(portable(recorded)))


def verified_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".verified")


def _signature(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def mark_verified(path: Path) -> None:
    # Staged but not fsynced: it only saves a read-back, so losing it in a crash costs one more read of the file,
    # while an fsync here waited on the filesystem's journal at the end of every file.
    with staged(verified_path(path)) as tmp:
        tmp.write_text(json.dumps(_signature(path)))


def verify(path: Path) -> None:
    """Read back every dataset of a finished file once (checksums and chunks); record that in
    `{file}.verified` (size and mtime) so a resumed run does not read it again. Damage is a StoreError."""
    path = Path(path)
    try:
        if json.loads(verified_path(path).read_text()) == _signature(path):
            return
    except (OSError, ValueError):
        pass
    with ActivationFile(path) as f:
        f.read_all()
    mark_verified(path)


def _part_arrays(batch: Batch, layers: list[int], code_dtype: np.dtype) -> dict[str, np.ndarray]:
    """A batch as the members of its part file: every member costs a read when the parts are consolidated, so
    each layer's arrays are concatenated (codes) or stacked (the rest) in layer order, ten members in all.

    sentence_ids, lengths (S,); token_ids, positions (T,); nnz (L,) codes per layer; indptr (L, T+1); indices,
    values (sum of nnz,); stat_names (K,) and stats (K, L, S) float32. With save_resid also `{layer}/resid`
    (T, d_model) per layer: stacking them would copy a batch's residuals, whose read dwarfs a member's cost.
    """
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    token_ids = np.asarray(batch.token_ids, dtype=np.int32)
    if int(lengths.sum()) != len(token_ids):
        raise ValueError("batch lengths do not add up to the number of tokens")
    per_layer = [batch.layers[i] for i in layers]
    for layer, lb in zip(layers, per_layer):
        if code_dtype == np.float16 and lb.values.size and float(np.abs(lb.values).max()) > FLOAT16_MAX:
            raise StoreError(
                f"layer {layer}: an SAE activation of {float(np.abs(lb.values).max()):.4g} overflows "
                "float16; rerun with --code-dtype float32"
            )
    stats = [stat for stat in STORED if all(getattr(lb, stat) is not None for lb in per_layer)]
    arrays = {
        "sentence_ids": np.asarray(batch.sentence_ids, dtype=np.str_),
        "lengths": lengths,
        "token_ids": token_ids,
        "positions": np.asarray(batch.positions, dtype=np.int32),
        "nnz": np.array([len(lb.indices) for lb in per_layer], dtype=np.int64),
        "indptr": np.stack([np.asarray(lb.indptr, dtype=np.int64) for lb in per_layer]),
        "indices": np.concatenate([np.asarray(lb.indices, dtype=np.int32) for lb in per_layer]),
        "values": np.concatenate([_cast_codes(lb.values, code_dtype) for lb in per_layer]),
        "stat_names": np.asarray(stats, dtype=np.str_),
        "stats": np.array([[getattr(lb, stat) for lb in per_layer] for stat in stats], dtype=np.float32).reshape(
            len(stats), len(layers), len(lengths)
        ),
    }
    if all(lb.resid is not None for lb in per_layer):
        arrays |= {f"{layer}/resid": np.asarray(lb.resid, dtype=np.float32) for layer, lb in zip(layers, per_layer)}
    return arrays


@dataclass
class _PartSize:
    """What consolidation needs of a part before it creates the datasets: its small members only."""

    lengths: np.ndarray
    nnz: np.ndarray
    stats: list[str]
    resid_width: int | None


@dataclass
class _Part:
    """A part's arrays in the layout `_part_arrays` writes, each member read once."""

    sentence_ids: np.ndarray
    lengths: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    nnz: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    stats: dict[str, np.ndarray]  # name -> (L, S)
    resid: list[np.ndarray] | None  # per layer, (T, d_model)

    @property
    def nbytes(self) -> int:
        arrays = [
            self.sentence_ids,
            self.lengths,
            self.token_ids,
            self.positions,
            self.nnz,
            self.indptr,
            self.indices,
            self.values,
            *self.stats.values(),
            *(self.resid or []),
        ]
        return sum(a.nbytes for a in arrays)

    def size(self) -> _PartSize:
        return _PartSize(self.lengths, self.nnz, list(self.stats), self.resid[0].shape[-1] if self.resid else None)

    def codes(self, k: int, name: str) -> np.ndarray:
        """The `name` ("indices" or "values") of the k-th layer's codes."""
        start = int(self.nnz[:k].sum())
        return getattr(self, name)[start : start + int(self.nnz[k])]


PartSource = Path | _Part  # a committed part file, or the last batch handed to `finalize` from memory


def _is_per_layer(z: np.lib.npyio.NpzFile) -> bool:
    """A part in the earlier layout, one member per layer and array (`{layer}/indptr`, `{layer}/mass`...): a run
    resumed by this version may find such parts in its folder, so they are read as well."""
    return "indptr" not in z.files


def _member_shape(z: np.lib.npyio.NpzFile, name: str) -> tuple[int, ...]:
    """A member's shape from its .npy header, without reading its data."""
    with z.zip.open(f"{name}.npy") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(fh)[0]


def _part_size(source: PartSource, layers: list[int]) -> _PartSize:
    if isinstance(source, _Part):
        return source.size()
    with np.load(source) as z:
        if _is_per_layer(z):
            stats = [s for s in STORED if f"{layers[0]}/{s}" in z.files]
        else:
            stats = z["stat_names"].tolist()
        resid = f"{layers[0]}/resid"
        width = _member_shape(z, resid)[-1] if resid in z.files else None
        return _PartSize(z["lengths"], z["nnz"], stats, width)


def _read_part(source: PartSource, layers: list[int]) -> _Part:
    if isinstance(source, _Part):
        return source
    with np.load(source) as z:
        arrays = {name: z[name] for name in z.files}
        if _is_per_layer(z):
            arrays = _from_per_layer(arrays, layers)
    return _as_part(arrays, layers)


def _as_part(arrays: dict[str, np.ndarray], layers: list[int]) -> _Part:
    """A part from its members (`_part_arrays`)."""
    arrays = dict(arrays)
    names = arrays.pop("stat_names").tolist()
    resid = [arrays.pop(f"{layer}/resid") for layer in layers] if f"{layers[0]}/resid" in arrays else None
    return _Part(stats=dict(zip(names, arrays.pop("stats"))), resid=resid, **arrays)


def _source_bytes(source: PartSource) -> int:
    return source.nbytes if isinstance(source, _Part) else source.stat().st_size


def _from_per_layer(arrays: dict[str, np.ndarray], layers: list[int]) -> dict[str, np.ndarray]:
    """A part of the earlier layout (`_is_per_layer`) in the layout of `_part_arrays`."""

    def stacked(name: str) -> list[np.ndarray]:
        return [arrays[f"{layer}/{name}"] for layer in layers]

    stats = [stat for stat in STORED if f"{layers[0]}/{stat}" in arrays]
    out = {name: arrays[name] for name in ("sentence_ids", "lengths", "token_ids", "positions", "nnz")}
    out |= {
        "indptr": np.stack(stacked("indptr")),
        "indices": np.concatenate(stacked("indices")),
        "values": np.concatenate(stacked("values")),
        "stat_names": np.asarray(stats, dtype=np.str_),
        "stats": np.array([stacked(stat) for stat in stats], dtype=np.float32).reshape(
            len(stats), len(layers), len(out["lengths"])
        ),
    }
    if f"{layers[0]}/resid" in arrays:  # the same members in both layouts
        out |= {f"{layer}/resid": arrays[f"{layer}/resid"] for layer in layers}
    return out


def _groups(parts: list[PartSource], budget: int) -> Iterator[list[PartSource]]:
    """Consecutive parts of at most `budget` bytes together (a larger part is a group of its own)."""
    group: list[PartSource] = []
    size = 0
    for part in parts:
        n = _source_bytes(part)
        if group and size + n > budget:
            yield group
            group, size = [], 0
        group.append(part)
        size += n
    if group:
        yield group


def _write_consolidated(
    h5: h5py.File, parts: list[PartSource], layers: list[int], code_dtype: np.dtype, failed: list[BaseException]
) -> None:
    """Stream the parts into `h5`, `CONSOLIDATION_BUFFER` bytes of parts at a time, one write per dataset and
    group (each write and each dataset cost HDF5 a fixed time that dominated a small corpus); stops at the next
    group once a destructor has failed (`_destructor_errors`)."""
    # Sizes first (small members), so every dataset is created at its final shape with fitting chunks.
    sizes = [_part_size(part, layers) for part in parts]
    n_sent = sum(len(size.lengths) for size in sizes)
    n_tok = sum(int(size.lengths.sum()) for size in sizes)
    nnz = sum((size.nnz for size in sizes), np.zeros(len(layers), dtype=np.int64))
    stored = [stat for stat in STORED if all(stat in size.stats for size in sizes)]
    resid_width = next((size.resid_width for size in sizes if size.resid_width), None)
    groups = list(_groups(parts, CONSOLIDATION_BUFFER))
    # One group (a small corpus): each dataset is created with its data, half of HDF5's cost of creating it
    # and then writing it.
    whole = (
        _rows(
            [_read_part(part, layers) for part in groups[0]],
            layers,
            stored,
            resid_width is not None,
            (0, 0, np.zeros(len(layers), dtype=np.int64)),
        )
        if len(groups) == 1
        else {}
    )

    def make(group: h5py.Group, name: str, key: str, dtype, n: int, width: int | None = None) -> h5py.Dataset:
        shape = (n,) if width is None else (n, width)
        data = whole[key][1] if key in whole else None
        if n == 0:  # a layer whose SAE fired on nothing: HDF5 cannot chunk an empty dataset
            return group.create_dataset(name, shape=shape, dtype=dtype)
        rows = max(1, min(n, 65536 // (width or 1)))  # ~64k values per chunk, never more rows than exist
        chunks = (rows,) if width is None else (rows, width)
        checksum = h5py.check_string_dtype(np.dtype(dtype)) is None  # HDF5 cannot checksum variable-length data
        return group.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=chunks, fletcher32=checksum)

    # Datasets are made in their group's handle: a path through groups costs h5py a lookup per dataset.
    sentences, tokens = h5.create_group("sentences"), h5.create_group("tokens")
    out = {
        "ids": make(sentences, "id", "ids", h5py.string_dtype(), n_sent),
        "offsets": make(sentences, "token_offsets", "offsets", np.int64, n_sent + 1),
        "token_ids": make(tokens, "id", "token_ids", np.int32, n_tok),
        "positions": make(tokens, "position", "positions", np.int32, n_tok),
    }
    for k, layer in enumerate(layers):
        group = h5.create_group(f"layers/{layer}")
        codes = group.create_group("codes")
        for name, dtype, n in (
            ("indptr", np.int64, n_tok + 1),
            ("indices", np.int32, int(nnz[k])),
            ("values", code_dtype, int(nnz[k])),
        ):
            out[f"{layer}/{name}"] = make(codes, name, f"{layer}/{name}", dtype, n)
        stats = group.create_group("stats") if stored else None
        for stat in stored:
            out[f"{layer}/{stat}"] = make(stats, stat, f"{layer}/{stat}", np.float32, n_sent)
        if resid_width:
            out[f"{layer}/resid"] = make(group, "resid", f"{layer}/resid", np.float32, n_tok, resid_width)
    if not parts:  # each group writes its first offset and row pointer: with none, they are written here
        out["offsets"][0] = 0
        for layer in layers:
            out[f"{layer}/indptr"][0] = 0
    at = (0, 0, np.zeros(len(layers), dtype=np.int64))  # sentences, tokens and codes per layer written so far
    for group in groups if not whole else []:
        if failed:
            raise failed[0]
        rows = _rows([_read_part(part, layers) for part in group], layers, stored, resid_width is not None, at)
        for key, (start, values) in rows.items():
            out[key][start : start + len(values)] = values
        at = (
            at[0] + len(rows["ids"][1]),
            at[1] + len(rows["token_ids"][1]),
            np.array([rows[f"{layer}/indices"][0] + len(rows[f"{layer}/indices"][1]) for layer in layers]),
        )
    h5.attrs["n_sentences"] = n_sent
    h5.attrs["n_tokens"] = n_tok


def _rows(
    loaded: list[_Part], layers: list[int], stored: list[str], resid: bool, at: tuple[int, int, np.ndarray]
) -> dict[str, tuple[int, np.ndarray]]:
    """A group of parts as each dataset's next rows, {key: (first row, rows)}, after `at` (the sentences, tokens
    and codes per layer before the group)."""
    s, t, z = at
    lengths = _joined([p.lengths for p in loaded])
    out = {
        "ids": (s, _joined([p.sentence_ids for p in loaded]).astype(object)),
        "offsets": (s, t + np.r_[0, np.cumsum(lengths)]),
        "token_ids": (t, _joined([p.token_ids for p in loaded])),
        "positions": (t, _joined([p.positions for p in loaded])),
    }
    for k, layer in enumerate(layers):
        # each part's row pointers continue from the codes of the parts before it
        before = z[k] + np.r_[0, np.cumsum([p.nnz[k] for p in loaded])]
        pointers = [before[:1], *(start + p.indptr[k, 1:] for start, p in zip(before, loaded))]
        out[f"{layer}/indptr"] = (t, _joined(pointers))
        for name in ("indices", "values"):
            out[f"{layer}/{name}"] = (int(before[0]), _joined([p.codes(k, name) for p in loaded]))
        for stat in stored:
            out[f"{layer}/{stat}"] = (s, _joined([p.stats[stat][k] for p in loaded]))
        if resid:
            out[f"{layer}/resid"] = (t, _joined([p.resid[k] for p in loaded]))
    return out


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays end to end; a single one as it is (a part larger than the buffer is a group of its own: no copy)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _cast_codes(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast code values, keeping active features non-zero: a value below float16's smallest
    subnormal (6e-8) would otherwise turn into a stored zero that still counts as active."""
    out = np.asarray(values).astype(dtype)
    lost = (out == 0) & (np.asarray(values) != 0)
    out[lost] = np.sign(values[lost]) * np.finfo(dtype).smallest_subnormal
    return out


def _attr(value):
    """HDF5-friendly attribute: numeric and string lists as arrays, mappings as JSON, None as ''."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
        return json.dumps(value, sort_keys=True)
    return value


def identity_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if k != "fingerprint" and old.get(k) != new.get(k))
    if not keys:
        return "unknown difference"
    return "; ".join(f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys[:3])


REBUILD = "delete it and rerun extract to rebuild it (or rerun extract with --overwrite to rebuild every file)"
H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError)  # what h5py raises on damaged metadata
_checked: set[tuple[str, int, int]] = set()  # files whose layout this process has checked (path, size, mtime)


def _layout_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _layout_written(path: Path) -> None:
    """A file this process's writer has just consolidated has the layout by construction: checking it again
    (~40 ms at 18 layers) cost a small extraction 9 % of its throughput. Any later change (size, mtime) is
    checked as before."""
    _checked.add(_layout_key(path))


class ActivationFile:
    """Read-only view of one finished activation file. Use as a context manager or call close().

    Opening checks the layout (docs/hdf5.md) before anything is trusted: the root attributes, then every
    dataset's presence, shape and dtype against the sentence, token and code counts. A damaged file (a flipped
    bit in an object header, a shape or a datatype) is a StoreError naming the file, the dataset and the fix,
    whatever h5py raised, instead of a traceback or silently wrong values. Checksums of the data themselves are
    read by `read_all` (`verify`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._h5 = None
        try:
            self._h5 = h5py.File(self.path, "r", locking=HDF5_LOCKING)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such activation file") from None
        except H5_ERRORS as exc:
            raise StoreError(f"{self.path} is truncated or corrupt ({_first_line(exc)}); {REBUILD}") from None
        try:
            self._check_attrs()
            self._check_layout()
        except BaseException:
            self.close()
            raise

    def _check_attrs(self) -> None:
        try:
            attrs = dict(self._h5.attrs)
        except H5_ERRORS as exc:
            raise StoreError(f"{self.path}: its attributes cannot be read ({_first_line(exc)}); {REBUILD}") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{self.path} is not a lingogap activation file; move it away, or delete it and "
                "rerun extract to rebuild it"
            )
        version = _int_attr(attrs, "layout_version")
        if version is None:
            raise StoreError(f"{self.path}: its layout_version {attrs.get('layout_version')!r} is damaged; {REBUILD}")
        if version > LAYOUT_VERSION:
            raise StoreError(
                f"{self.path} has layout version {version}, newer than this lingogap reads ({LAYOUT_VERSION}); "
                "upgrade lingogap"
            )
        if not bool(attrs.get("complete", False)):
            raise StoreError(f"{self.path} is incomplete; delete it and rerun extract to rebuild it")
        for name in ("n_sentences", "n_tokens"):
            if _int_attr(attrs, name) is None or _int_attr(attrs, name) < 0:
                raise StoreError(f"{self.path}: its {name} attribute {attrs.get(name)!r} is damaged; {REBUILD}")

    def _check_layout(self) -> None:
        """Every dataset of the layout present, with its shape and dtype (once per file and process)."""
        key = _layout_key(self.path)
        if key in _checked:
            return
        n_sent, n_tok = int(self._h5.attrs["n_sentences"]), int(self._h5.attrs["n_tokens"])
        code_dtype = str(self._h5.attrs.get("code_dtype", "") or "")
        self._expect("sentences/id", (n_sent,), "string")
        self._expect("sentences/token_offsets", (n_sent + 1,), np.int64)
        self._expect("tokens/id", (n_tok,), np.int32)
        self._expect("tokens/position", (n_tok,), np.int32)
        layers = self._layer_names()
        for layer in layers:
            g = f"layers/{layer}"
            self._expect(f"{g}/codes/indptr", (n_tok + 1,), np.int64)
            nnz = self._expect(f"{g}/codes/indices", None, np.int32).shape
            values = self._expect(f"{g}/codes/values", nnz, (np.float16, np.float32))
            if code_dtype and values.dtype != np.dtype(code_dtype):
                self._damaged(f"{g}/codes/values", f"has dtype {values.dtype}, the file says {code_dtype}")
            for stat in STORED:
                if stat in SAE_STATS or self._exists(f"{g}/stats/{stat}"):  # the controls are absent in layout 1
                    self._expect(f"{g}/stats/{stat}", (n_sent,), np.float32)
            if self._exists(f"{g}/resid"):
                resid = self._expect(f"{g}/resid", None, np.float32)
                if resid.ndim != 2 or resid.shape[0] != n_tok:
                    self._damaged(f"{g}/resid", f"has shape {resid.shape}, not ({n_tok}, d_model)")
        recorded = self._h5.attrs.get("layers")
        if recorded is not None and sorted(np.atleast_1d(recorded).tolist()) != layers:
            self._damaged("layers", f"holds layers {layers}, the file says {np.atleast_1d(recorded).tolist()}")
        _checked.add(key)

    def _layer_names(self) -> list[int]:
        try:
            names = list(self._h5["layers"].keys())
        except H5_ERRORS as exc:
            self._damaged("layers", f"cannot be read ({_first_line(exc)})")
        if not all(name.isdigit() for name in names):
            self._damaged("layers", f"holds a group that is not a layer index ({', '.join(sorted(names))[:200]})")
        return sorted(int(name) for name in names)

    def _exists(self, name: str) -> bool:
        try:
            return name in self._h5
        except H5_ERRORS:
            return True  # present but unreadable: _expect says so

    def _expect(self, name: str, shape: tuple | None, dtype) -> h5py.Dataset:
        """The dataset `name`, refused unless it has `shape` (None: any) and one of `dtype` ("string": UTF-8)."""
        try:
            ds = self._h5[name]
            if not isinstance(ds, h5py.Dataset):
                self._damaged(name, "is not a dataset")
            found_shape, found_dtype = ds.shape, ds.dtype
        except H5_ERRORS as exc:
            missing = isinstance(exc, KeyError) and "doesn't exist" in str(exc)
            self._damaged(name, "is missing" if missing else f"cannot be opened ({_first_line(exc)})")
        if dtype == "string":
            fits = h5py.check_string_dtype(found_dtype) is not None
        else:
            fits = any(found_dtype == np.dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,)))
        if not fits:
            self._damaged(name, f"has dtype {found_dtype.str}, the layout says {_dtype_name(dtype)}")
        if shape is not None and found_shape != tuple(shape):
            self._damaged(name, f"has shape {found_shape}, the layout says {tuple(shape)}")
        return ds

    def _damaged(self, name: str, problem: str):
        raise StoreError(f"{self.path} is damaged: dataset {name} {problem}; {REBUILD}")

    def __enter__(self) -> ActivationFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None

    def read_all(self, block: int = 1 << 20) -> None:
        """Read every dataset, `block` rows at a time: a checksum or a chunk that fails is a StoreError."""
        names: list[str] = []
        try:
            self._h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        except H5_ERRORS as exc:
            raise StoreError(
                f"{self.path} is corrupt: its groups cannot be listed ({_first_line(exc)}); {REBUILD}"
            ) from None
        for name in names:
            n = self._h5[name].shape[0] if self._h5[name].shape else 0
            for start in range(0, max(n, 1), block):
                self._read(name, slice(start, start + block) if n else ())

    def _read(self, name: str, sel=slice(None)) -> np.ndarray:
        try:
            return self._h5[name][sel]
        except KeyError as exc:
            if "doesn't exist" in str(exc):
                raise StoreError(f"{self.path} has no dataset {name!r}") from None
            raise StoreError(f"{self.path} is corrupt: opening {name} failed ({_first_line(exc)}); {REBUILD}") from None
        except H5_ERRORS as exc:  # fletcher32 checksum, a truncated chunk, damaged metadata
            raise StoreError(f"{self.path} is corrupt: reading {name} failed ({_first_line(exc)}); {REBUILD}") from None

    @property
    def attrs(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self._h5.attrs.items()}

    @property
    def identity(self) -> dict:
        return json.loads(self._h5.attrs.get("identity", "{}"))

    @property
    def language(self) -> str:
        return str(self._h5.attrs["language"])

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self._h5["layers"].keys())

    @property
    def sentence_ids(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self._read("sentences/id")]

    @property
    def token_offsets(self) -> np.ndarray:
        return self._read("sentences/token_offsets")

    @property
    def token_ids(self) -> np.ndarray:
        return self._read("tokens/id")

    @property
    def n_sentences(self) -> int:
        return int(self._h5.attrs["n_sentences"])

    def stats(self, layer: int, stat: str = "mass") -> np.ndarray:
        """(S,) per-sentence statistic in file order; a control a v1 file lacks is a clear error."""
        if stat not in STORED:
            raise StoreError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
        if not self.has_stat(layer, stat):
            raise StoreError(
                f"{self.path} holds no {stat!r} (layout version {self._h5.attrs.get('layout_version')}, "
                "written before the controls existed); rerun extract with --overwrite to measure it"
            )
        return self._read(f"layers/{layer}/stats/{stat}").astype(np.float64)

    def has_stat(self, layer: int, stat: str) -> bool:
        return f"layers/{layer}/stats/{stat}" in self._h5

    @property
    def positions(self) -> np.ndarray:
        return self._read("tokens/position")

    def codes(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR arrays (indptr, indices, values as float32) of all kept tokens at `layer`."""
        g = f"layers/{layer}/codes"
        return self._read(f"{g}/indptr"), self._read(f"{g}/indices"), self._read(f"{g}/values").astype(np.float32)

    def code_bytes(self, layer: int) -> int:
        """Bytes of the nonzero codes themselves at `layer` (values and feature indices, as stored)."""
        g = self._h5[f"layers/{layer}/codes"]
        return sum(g[name].size * g[name].dtype.itemsize for name in ("values", "indices"))

    def has_resid(self, layer: int) -> bool:
        return f"layers/{layer}/resid" in self._h5

    def resid(self, layer: int, sel=slice(None)) -> np.ndarray:
        return self._read(f"layers/{layer}/resid", sel)

    def pooled_resid(self, layer: int, block: int = 4096) -> np.ndarray:
        """(S, d_model) mean residual per sentence, reading about `block` tokens at a time."""
        if not self.has_resid(layer):
            raise StoreError(f"{self.path} has no residuals for layer {layer}; extract with --save-resid")
        offsets = self.token_offsets
        pooled = []
        start = 0
        while start < len(offsets) - 1:
            stop = int(np.searchsorted(offsets, offsets[start] + block, side="right")) - 1
            stop = max(stop, start + 1)
            rows = self.resid(layer, slice(offsets[start], offsets[stop]))
            sums = np.add.reduceat(rows, offsets[start:stop] - offsets[start], axis=0)
            pooled.append(sums / np.diff(offsets[start : stop + 1])[:, None])
            start = stop
        return np.concatenate(pooled) if pooled else np.zeros((0, 0), dtype=np.float32)


def _int_attr(attrs: dict, name: str) -> int | None:
    value = attrs.get(name)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def _dtype_name(dtype) -> str:
    if dtype == "string":
        return "a UTF-8 string"
    return " or ".join(np.dtype(d).str for d in (dtype if isinstance(dtype, tuple) else (dtype,)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def activation_files(run_dir: str | Path) -> dict[str, list[Path]]:
    """Finished activation files of a run, by language (shards of one language together)."""
    folder = RunDir(run_dir).activations
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.h5")):
        found.setdefault(path.name.split(".")[0], []).append(path)
    return found


def shard_name(lang: str, shard: int, n_shards: int) -> str:
    return f"{lang}.h5" if n_shards == 1 else f"{lang}.shard{shard:03d}-of-{n_shards:03d}.h5"
