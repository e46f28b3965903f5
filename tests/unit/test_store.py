"""toolkit.store: the public HDF5 format of docs/hdf5.md (names, shapes, dtypes, attributes), a round trip
through ActivationWriter and ActivationFile, resuming from committed parts, and its edges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import h5_datasets
from tests.unit.analysis_fixtures import write_activations
from toolkit.store import (
    FORMAT,
    LAYOUT_VERSION,
    STORED,
    ActivationFile,
    ActivationWriter,
    Batch,
    LayerBatch,
    StoreError,
    fingerprint,
)

LAYERS = [0, 3]
D_MODEL = 4
IDENTITY = {
    "language": "hi",
    "shard": 0,
    "n_shards": 1,
    "model_id": "test/model",
    "layers": LAYERS,
    "sae_ids": ["a", "b"],
    "d_sae": [8, 8],
    "code_dtype": "float16",
}


def make_batch(ids: list[str], lengths: list[int], seed: int, resid: bool = True, controls: bool = False) -> Batch:
    """A batch with random CSR codes (1-3 features per token), statistics, residuals and (with `controls`) the
    controls and fidelity sums."""
    rng = np.random.default_rng(seed)
    n_tok = sum(lengths)
    batch = Batch(
        ids,
        np.array(lengths),
        rng.integers(5, 100, n_tok).astype(np.int32),
        np.concatenate([np.arange(1, n + 1) for n in lengths]).astype(np.int32),
    )
    for layer in LAYERS:
        per_token = rng.integers(1, 4, n_tok)
        indptr = np.r_[0, np.cumsum(per_token)]
        batch.layers[layer] = LayerBatch(
            indptr=indptr,
            indices=rng.integers(0, 8, indptr[-1]).astype(np.int32),
            values=rng.uniform(0.5, 4, indptr[-1]).astype(np.float32),
            mass=rng.uniform(0, 1, len(ids)),
            l0=rng.uniform(0, 1, len(ids)),
            max=rng.uniform(0, 1, len(ids)),
            resid=rng.normal(size=(n_tok, D_MODEL)).astype(np.float32) if resid else None,
        )
        if controls:
            for stat in STORED[3:]:
                setattr(batch.layers[layer], stat, rng.uniform(0, 1, len(ids)))
    return batch


BATCHES = [make_batch(["s0", "s1"], [3, 2], 0), make_batch(["s2", "s3", "s4"], [1, 4, 2], 1)]


def write(path, batches=BATCHES, identity=IDENTITY, **kwargs):
    writer = ActivationWriter(path, identity, LAYERS, "float16", **kwargs)
    for b in batches:
        writer.write_batch(b)
    writer.finalize({"seconds": 1.5, "lingogap_version": "test"}, {i: {"fve": 0.5, "l0": 2.0} for i in LAYERS})
    return writer


def test_names_shapes_dtypes_and_attributes_follow_the_documented_layout(tmp_path):
    path = tmp_path / "hi.h5"
    write(path)
    S, T = 5, 12
    nnz = {i: sum(int(b.layers[i].indptr[-1]) for b in BATCHES) for i in LAYERS}
    expected = {
        "sentences/id": ((S,), None),
        "sentences/token_offsets": ((S + 1,), np.int64),
        "tokens/id": ((T,), np.int32),
        "tokens/position": ((T,), np.int32),
    }
    for i in LAYERS:
        g = f"layers/{i}"
        expected |= {
            f"{g}/codes/indptr": ((T + 1,), np.int64),
            f"{g}/codes/indices": ((nnz[i],), np.int32),
            f"{g}/codes/values": ((nnz[i],), np.float16),
            f"{g}/resid": ((T, D_MODEL), np.float32),
        }
        expected |= {f"{g}/stats/{s}": ((S,), np.float32) for s in ("mass", "l0", "max")}
    with h5py.File(path, "r") as h5:
        found = []
        h5.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(found) == sorted(expected)
        for name, (shape, dtype) in expected.items():
            ds = h5[name]
            assert ds.shape == shape, name
            if dtype is None:
                assert h5py.check_string_dtype(ds.dtype).encoding == "utf-8" and not ds.fletcher32
            else:
                assert ds.dtype == dtype and ds.fletcher32 and ds.chunks, name
            assert ds.compression is None
        a = h5.attrs
        assert a["format"] == FORMAT and a["layout_version"] == LAYOUT_VERSION and a["complete"]
        assert json.loads(a["identity"]) == IDENTITY and a["fingerprint"] == fingerprint(IDENTITY)
        assert a["n_sentences"] == S and a["n_tokens"] == T and a["seconds"] == 1.5
        assert a["language"] == "hi" and list(a["layers"]) == LAYERS and list(a["sae_ids"]) == ["a", "b"]
        assert all(h5[f"layers/{i}"].attrs["fve"] == 0.5 for i in LAYERS)
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "hi.h5.parts").exists()  # nothing staged is left


def test_round_trip_reads_back_what_was_written(tmp_path):
    path = tmp_path / "hi.h5"
    write(path)
    with ActivationFile(path) as f:
        assert f.language == "hi" and f.layers == LAYERS and f.n_sentences == 5
        assert f.sentence_ids == ["s0", "s1", "s2", "s3", "s4"]
        assert f.token_offsets.tolist() == [0, 3, 5, 6, 10, 12]
        assert f.token_ids.tolist() == np.concatenate([b.token_ids for b in BATCHES]).tolist()
        for i in LAYERS:
            indptr, indices, values = f.codes(i)
            assert indices.tolist() == np.concatenate([b.layers[i].indices for b in BATCHES]).tolist()
            np.testing.assert_array_equal(
                values, np.concatenate([b.layers[i].values for b in BATCHES]).astype(np.float16)
            )
            assert indptr[-1] == len(indices) and (np.diff(indptr) >= 1).all()
            for stat in ("mass", "l0", "max"):
                np.testing.assert_array_equal(
                    f.stats(i, stat), np.concatenate([getattr(b.layers[i], stat) for b in BATCHES]).astype(np.float32)
                )
            assert f.has_resid(i)
            np.testing.assert_array_equal(f.resid(i), np.concatenate([b.layers[i].resid for b in BATCHES]))


def test_a_resumed_writer_appends_after_its_committed_parts(tmp_path):
    first = ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS)
    first.write_batch(BATCHES[0])
    del first  # a killed job: its parts stay, the final file does not exist
    resumed = ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS)
    assert not resumed.complete and resumed.n_parts == 1 and resumed.done_sentence_ids() == {"s0", "s1"}
    resumed.write_batch(BATCHES[1])
    resumed.finalize({"seconds": 1.5, "lingogap_version": "test"}, {i: {"fve": 0.5, "l0": 2.0} for i in LAYERS})
    write(tmp_path / "ref" / "hi.h5")
    want, got = h5_datasets(tmp_path / "ref" / "hi.h5"), h5_datasets(tmp_path / "hi.h5")
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    again = ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS)
    assert again.complete and again.done_sentence_ids() == {f"s{k}" for k in range(5)}


def test_another_identity_is_refused_in_parts_and_in_files_unless_overwritten(tmp_path):
    other = {**IDENTITY, "model_id": "test/other"}
    ActivationWriter(tmp_path / "a.h5", IDENTITY, LAYERS).write_batch(BATCHES[0])
    with pytest.raises(StoreError, match="partial extraction with a different configuration.*model_id"):
        ActivationWriter(tmp_path / "a.h5", other, LAYERS)
    write(tmp_path / "b.h5")
    with pytest.raises(StoreError, match="different configuration.*--overwrite"):
        ActivationWriter(tmp_path / "b.h5", other, LAYERS)
    fresh = ActivationWriter(tmp_path / "b.h5", other, LAYERS, overwrite=True)
    assert not fresh.complete and fresh.n_parts == 0


def test_codes_that_overflow_float16_are_refused(tmp_path):
    batch = make_batch(["s0"], [2], 0)
    batch.layers[3].values[0] = 1e6
    with pytest.raises(StoreError, match="overflows float16"):
        ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS).write_batch(batch)


def test_a_layer_without_any_active_feature_is_stored_and_read(tmp_path):
    ids = ["s0", "s1", "s2"]
    features = {0: [[[3], [5]] for _ in ids], 1: [[[], []] for _ in ids]}
    path = write_activations(tmp_path / "hi.h5", "hi", ids, np.zeros((3, 2)), features=features)
    with ActivationFile(path) as f:
        indptr, indices, values = f.codes(1)
        assert len(indices) == len(values) == 0 and (indptr == 0).all() and len(indptr) == 7
        assert f.codes(0)[1].tolist() == [3, 5] * 3
        assert f.code_bytes(0) == 6 * (4 + 4) and f.code_bytes(1) == 0  # float32 values, int32 indices


def test_truncated_file_is_reported(tmp_path):
    source = write(tmp_path / "hi.h5").path
    broken = tmp_path / "broken.h5"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        ActivationFile(broken)


def test_a_finished_file_is_verified_once_and_damage_names_the_fix(tmp_path):
    path = tmp_path / "hi.h5"
    write(path)
    sidecar = tmp_path / "hi.h5.verified"
    assert json.loads(sidecar.read_text())["size"] == path.stat().st_size  # recorded at finalize, nothing reread
    with h5py.File(path, "r") as h5:
        offset = h5["layers/0/codes/indices"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * 16)
    with pytest.raises(StoreError, match=r"hi.h5 is corrupt: reading layers/0/codes/indices.*delete it and rerun"):
        ActivationWriter(path, IDENTITY, LAYERS)
    assert not (tmp_path / "hi.h5.lock").exists()  # a refused writer gives its lock back


def test_a_rerun_on_a_finished_file_leaves_no_part_folder_and_clears_dead_writers_litter(tmp_path):
    path = tmp_path / "hi.h5"
    write(path)
    (tmp_path / ".hi.h5.999999999.tmp").write_bytes(b"a dead writer's staging file")
    (tmp_path / "hi.h5.parts").mkdir()  # killed between the final rename and the cleanup
    with ActivationWriter(path, IDENTITY, LAYERS) as writer:
        assert writer.complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hi.h5", "hi.h5.verified"]


def test_an_identity_recorded_with_the_absolute_run_folder_matches_its_portable_form(tmp_path):
    from toolkit.store import portable, same_identity

    new = {**IDENTITY, "sae_source": "local:ab12cd"}
    old = {**IDENTITY, "sae_source": "local:/old/place/run/saes/ab12cd"}
    assert portable(old) == new and portable(new) == new
    assert same_identity({**old, "fingerprint": fingerprint(old)}, new)
    assert not same_identity({**old, "sae_source": "local:/x/saes/other"}, new)
    write(tmp_path / "hi.h5", identity=old)
    with ActivationWriter(tmp_path / "hi.h5", new, LAYERS) as writer:
        assert writer.complete


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_during_consolidation_leaves_the_parts_to_resume(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        big = [make_batch([f"s{k}"], [2000], k) for k in range(2)]  # ~2 x 100 KB of parts, then the same again
        writer = ActivationWriter(disk / "hi.h5", IDENTITY, LAYERS)
        for b in big:
            writer.write_batch(b)
        (disk / "filler").write_bytes(b"\0" * (disk_free(disk) - 100_000))
        with pytest.raises(OSError) as info:
            writer.finalize({"seconds": 1.0})
        from toolkit.submit import environment_error

        assert "the disk is full" in environment_error(info.value, None)
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "hi.h5.parts"]  # no staging file, no final
        (disk / "filler").unlink()
        writer = ActivationWriter(disk / "hi.h5", IDENTITY, LAYERS)
        assert writer.n_parts == 2
        writer.finalize({"seconds": 1.0})
        with ActivationFile(disk / "hi.h5") as f:
            assert f.sentence_ids == ["s0", "s1"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def disk_free(path) -> int:
    import shutil

    return shutil.disk_usage(path).free


NO_RESERVATION = """
import os, shutil, sys
import numpy as np
from pathlib import Path
from tests.unit.test_store import IDENTITY, LAYERS, make_batch
from toolkit import store

disk, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "no-fallocate":
    store._reserve = lambda h5, size: None  # a filesystem where the space cannot be reserved
writer = store.ActivationWriter(disk / "hi.h5", IDENTITY, LAYERS, "float16")
for k in range(8):
    writer.write_batch(make_batch([f"s{k}-{i}" for i in range(40)], [200] * 40, k))
need = writer._check_space(writer._part_files())
with open(disk / "filler", "wb") as fh:  # the check passed; now another process takes all but 1/3 of it
    fh.write(b"\\0" * (shutil.disk_usage(disk).free - need // 3))
try:
    writer.finalize({})
    print("finished")
except OSError as exc:
    print("refused", exc.errno, sorted(p.name for p in disk.iterdir()))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("mode", ["reserved", "no-fallocate"])
def test_a_disk_filled_after_the_space_check_is_one_enospc_without_h5py_noise(tmp_path, mode):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        out = subprocess.run(
            [sys.executable, "-c", NO_RESERVATION, str(disk), mode],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[2],
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]  # no segfault at exit
        assert out.stderr == "", out.stderr[-3000:]  # no "Exception ignored", no HDF5 traceback
        assert out.stdout.startswith("refused 28"), out.stdout
        assert "hi.h5.parts" in out.stdout and ".tmp" not in out.stdout and "'hi.h5'" not in out.stdout
        (disk / "filler").unlink()
        write(disk / "hi.h5", batches=[])  # the committed parts, consolidated now there is room
        with ActivationFile(disk / "hi.h5") as f:
            assert f.n_sentences == 320
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_file_this_process_wrote_opens_without_a_second_layout_check_and_a_later_change_is_checked(
    tmp_path, monkeypatch
):
    path = write(tmp_path / "hi.h5").path
    checked = []
    original = ActivationFile._layer_names  # read by the whole layout check only
    monkeypatch.setattr(ActivationFile, "_layer_names", lambda self: checked.append(self.path) or original(self))
    with ActivationFile(path) as f:
        assert f.n_sentences == 5
    assert checked == []
    with h5py.File(path, "r+") as h5:  # another writer's damage: a dataset's shape no longer fits
        del h5["tokens/position"]
        h5["tokens/position"] = np.zeros(3, dtype=np.int32)
    with pytest.raises(StoreError, match=r"tokens/position has shape \(3,\)"):  # the whole check again
        ActivationFile(path)


def per_layer_part(batch: Batch) -> dict[str, np.ndarray]:
    """A part's members as earlier versions wrote them, one per layer and array (`{layer}/indptr`, `{layer}/mass`)."""
    arrays = {
        "sentence_ids": np.asarray(batch.sentence_ids, dtype=np.str_),
        "lengths": np.asarray(batch.lengths, dtype=np.int64),
        "token_ids": batch.token_ids.astype(np.int32),
        "positions": batch.positions.astype(np.int32),
        "nnz": np.array([len(batch.layers[i].indices) for i in LAYERS], dtype=np.int64),
    }
    for layer in LAYERS:
        lb = batch.layers[layer]
        arrays |= {
            f"{layer}/indptr": lb.indptr.astype(np.int64),
            f"{layer}/indices": lb.indices.astype(np.int32),
            f"{layer}/values": lb.values.astype(np.float16),
        }
        arrays |= {
            f"{layer}/{stat}": np.asarray(getattr(lb, stat), dtype=np.float32)
            for stat in STORED
            if getattr(lb, stat) is not None
        }
        if lb.resid is not None:
            arrays[f"{layer}/resid"] = lb.resid.astype(np.float32)
    return arrays


def described(path: Path) -> dict:
    """Every dataset's dtype, shape, chunks, checksum and values, and every attribute but the timing (`seconds`)."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = (obj.dtype.str, obj.shape, obj.chunks, obj.fletcher32, obj[()].tolist())
        out[f"{name}@"] = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
        out["@"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items() if k != "seconds"}
    return out


CONTROL_BATCHES = [
    make_batch(["s0", "s1"], [3, 2], 0, controls=True),
    make_batch(["s2"], [4], 1, controls=True),
    make_batch(["s3", "s4", "s5"], [1, 4, 2], 2, controls=True),
]


@pytest.mark.parametrize("earlier", [[0, 1, 2], [0]], ids=["all-parts-earlier", "resumed-across-versions"])
def test_parts_in_the_earlier_per_layer_layout_consolidate_into_the_same_file(tmp_path, earlier):
    """A run resumed by a newer version finds its parts folder as an earlier version left it."""
    write(tmp_path / "ref" / "hi.h5", batches=CONTROL_BATCHES)
    path = tmp_path / "hi.h5"
    parts = tmp_path / "hi.h5.parts"  # as the earlier version left it: its stamp, then its parts
    parts.mkdir()
    (parts / "fingerprint.json").write_text(json.dumps({"fingerprint": fingerprint(IDENTITY), **IDENTITY}))
    for k in earlier:
        np.savez(parts / f"part-{k:06d}.npz", **per_layer_part(CONTROL_BATCHES[k]))
    resumed = ActivationWriter(path, IDENTITY, LAYERS)
    assert resumed.n_parts == len(earlier)
    assert resumed.done_sentence_ids() == {s for k in earlier for s in CONTROL_BATCHES[k].sentence_ids}
    for batch in CONTROL_BATCHES[len(earlier) :]:
        resumed.write_batch(batch)
    resumed.finalize({"seconds": 1.5, "lingogap_version": "test"}, {i: {"fve": 0.5, "l0": 2.0} for i in LAYERS})
    assert described(path) == described(tmp_path / "ref" / "hi.h5")
    with ActivationFile(path) as f:
        assert all(f.has_stat(i, stat) for i in LAYERS for stat in STORED)


def test_a_part_holds_one_member_per_array_whatever_the_layers_but_residuals(tmp_path):
    writer = ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS)
    writer.write_batch(CONTROL_BATCHES[0])
    with np.load(writer.parts / "part-000000.npz") as z:
        # residuals (--save-resid) stay one member per layer: stacking them would copy a batch's worth
        assert sorted(z.files) == sorted(
            [
                "sentence_ids",
                "lengths",
                "token_ids",
                "positions",
                "nnz",
                "indptr",
                "indices",
                "values",
                "stat_names",
                "stats",
                "0/resid",
                "3/resid",
            ]
        )
        assert z["stat_names"].tolist() == list(STORED) and z["stats"].shape == (len(STORED), len(LAYERS), 2)
        assert z["indptr"].shape == (len(LAYERS), 6) and z["3/resid"].shape == (5, D_MODEL)
    writer.close()


def test_parts_consolidated_one_at_a_time_or_all_together_make_the_same_file(tmp_path, monkeypatch):
    from toolkit import store

    write(tmp_path / "together" / "hi.h5", batches=CONTROL_BATCHES)
    monkeypatch.setattr(store, "CONSOLIDATION_BUFFER", 1)  # every part a group of its own
    write(tmp_path / "apart" / "hi.h5", batches=CONTROL_BATCHES)
    assert described(tmp_path / "apart" / "hi.h5") == described(tmp_path / "together" / "hi.h5")


def test_the_last_batch_handed_over_from_memory_makes_the_same_file_as_a_part(tmp_path):
    write(tmp_path / "parts" / "hi.h5", batches=CONTROL_BATCHES)
    writer = ActivationWriter(tmp_path / "hi.h5", IDENTITY, LAYERS)
    for batch in CONTROL_BATCHES[:-1]:
        writer.write_batch(batch)
    writer.finalize(
        {"seconds": 1.5, "lingogap_version": "test"},
        {i: {"fve": 0.5, "l0": 2.0} for i in LAYERS},
        last=CONTROL_BATCHES[-1],
    )
    assert described(tmp_path / "hi.h5") == described(tmp_path / "parts" / "hi.h5")
    alone = ActivationWriter(tmp_path / "alone" / "hi.h5", IDENTITY, LAYERS)  # one batch: no part is ever written
    alone.finalize({}, last=CONTROL_BATCHES[0])
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["hi.h5", "hi.h5.verified"]
    with ActivationFile(tmp_path / "alone" / "hi.h5") as f:
        assert f.sentence_ids == CONTROL_BATCHES[0].sentence_ids
