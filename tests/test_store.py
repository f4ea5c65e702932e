"""The HDF5 label-map store: writing, reading, resuming and open-time validation."""
from __future__ import annotations

import multiprocessing
import os
import pickle

import h5py
import numpy as np
import pytest

from dali_relabel.paths import PathTable
from dali_relabel.store import (FORMAT_NAME, FORMAT_VERSION, PARTIAL_SUFFIX, LabelStore, StoreError,
                                StoreWriter, paths_digest, root_hash, row_bytes, summarize, write_store)
from helpers import random_maps

N, K, H, W, C = 10, 3, 4, 5, 7


def _paths(n=N, prefix="cls"):
    return [f"{prefix}_{i % 3}/img_{i:03d}.JPEG" for i in range(n)]


@pytest.fixture
def data():
    logits, ids = random_maps(N, K, H, W, C, seed=1)
    rng = np.random.default_rng(2)
    return dict(
        paths=_paths(),
        logits=logits,
        class_ids=ids,
        labels=rng.integers(0, C, size=N).astype(np.int32),
        image_sizes=rng.integers(20, 500, size=(N, 2)).astype(np.int32),
        class_names=[f"n{i:08d}" for i in range(C)],
    )


def _write(path, d, **kw):
    args = dict(num_classes=C, class_names=d["class_names"], layout="HW", labels=d["labels"],
                image_sizes=d["image_sizes"], teacher="teach", teacher_input_size=475, source="test")
    args.update(kw)
    return write_store(path, d["paths"], d["logits"], d["class_ids"], **args)


@pytest.fixture
def store_path(tmp_path, data):
    return _write(tmp_path / "maps.h5", data)


def _writer(path, d, paths=None, **kw):
    args = dict(num_classes=C, k=K, grid_h=H, grid_w=W, layout="HW", class_names=d["class_names"],
                teacher="teach", teacher_input_size=475, source="test")
    args.update(kw)
    return StoreWriter(path, d["paths"] if paths is None else paths, **args)


def _write_rows(writer, d, start, stop):
    writer.write(start, d["logits"][start:stop], d["class_ids"][start:stop], d["labels"][start:stop],
                 d["image_sizes"][start:stop])


# --------------------------------------------------------------------------------------- round trip
def test_round_trip_every_row_and_metadata(store_path, data):
    with LabelStore(store_path) as store:
        assert len(store) == N
        assert store.paths.tolist() == data["paths"]
        assert store.class_names == data["class_names"]
        np.testing.assert_array_equal(store.labels, data["labels"])
        np.testing.assert_array_equal(store.image_sizes, data["image_sizes"])
        h = store.header
        assert (h.num_rows, h.num_classes, h.k, h.grid_h, h.grid_w) == (N, C, K, H, W)
        assert h.map_shape == (K, H, W)
        assert (h.layout, h.teacher, h.teacher_input_size, h.source) == ("HW", "teach", 475, "test")
        assert store.layout == "HW" and store.num_classes == C
        rows = row_bytes(data["logits"], data["class_ids"].astype(np.uint8), data["labels"], data["image_sizes"])
        import hashlib
        chunk = np.frombuffer(hashlib.sha256(rows.tobytes()).digest(), np.uint8)[None]
        assert h.content_sha256 == root_hash(chunk, paths_digest(PathTable.from_strings(data["paths"])),
                                             data["class_names"])
        assert h.values_checked and h.format_version == FORMAT_VERSION
        for r in range(N):
            m = store[r]
            assert m.logits.dtype == np.float16
            np.testing.assert_array_equal(m.logits, data["logits"][r])
            np.testing.assert_array_equal(m.class_ids, data["class_ids"][r])
            assert store.row_of(data["paths"][r]) == r
        with pytest.raises(KeyError):
            store.row_of("nope/missing.JPEG")
        with pytest.raises(IndexError):
            store.read(N)
        with pytest.raises(IndexError):
            store.read([0, N])
    with h5py.File(store_path, "r") as f:
        assert f.attrs["format"] == FORMAT_NAME
        assert int(f.attrs["format_version"]) == FORMAT_VERSION
        assert bool(f.attrs["complete"]) is True
        assert f["labels"].dtype == np.int32 and f["image_sizes"].dtype == np.int32
        assert f["logits"].dtype == np.float16
    assert not os.path.exists(str(store_path) + PARTIAL_SUFFIX)


def test_defaults_for_labels_sizes_and_names(tmp_path, data):
    path = write_store(tmp_path / "s.h5", data["paths"], data["logits"], data["class_ids"], num_classes=C)
    store = LabelStore(path)
    np.testing.assert_array_equal(store.labels, np.full(N, -1))
    np.testing.assert_array_equal(store.image_sizes, np.zeros((N, 2)))
    assert store.class_names == [f"class_{i}" for i in range(C)]
    assert store.layout == "HW"


def test_paths_are_normalised_to_slashes(tmp_path, data):
    paths = [p.replace("/", os.sep) for p in data["paths"]]
    path = write_store(tmp_path / "s.h5", paths, data["logits"], data["class_ids"], num_classes=C)
    assert LabelStore(path).paths.tolist() == data["paths"]


@pytest.mark.parametrize("num_classes,dtype", [(7, np.uint8), (256, np.uint8), (257, np.uint16),
                                               (1000, np.uint16)])
def test_class_id_dtype(tmp_path, num_classes, dtype):
    logits, ids = random_maps(4, 5, 3, 3, num_classes, seed=num_classes)
    ids[0, :, 0, 0] = [num_classes - 1, 0, 1, 2, 3]  # the largest id must survive the narrow type
    path = write_store(tmp_path / "s.h5", _paths(4), logits, ids, num_classes=num_classes)
    store = LabelStore(path)
    assert store._array("class_ids").dtype == dtype
    with h5py.File(path, "r") as f:
        assert f["class_ids"].dtype == dtype
    np.testing.assert_array_equal(store.read(np.arange(4)).class_ids, ids)


def test_writer_in_chunks_equals_write_store(tmp_path, data, store_path):
    path = tmp_path / "chunks.h5"
    writer = _writer(path, data)
    for start, stop in ((0, 3), (3, 4), (4, 10)):
        assert writer.rows_written == start
        _write_rows(writer, data, start, stop)
    assert writer.finish() == os.fspath(path)
    a, b = LabelStore(path), LabelStore(store_path)
    assert a.header == b.header
    np.testing.assert_array_equal(a.read(np.arange(N)).logits, b.read(np.arange(N)).logits)
    np.testing.assert_array_equal(a.read(np.arange(N)).class_ids, b.read(np.arange(N)).class_ids)


def test_writer_context_manager_publishes_only_when_full(tmp_path, data):
    full = tmp_path / "full.h5"
    with _writer(full, data) as w:
        _write_rows(w, data, 0, N)
    assert os.path.exists(full) and not os.path.exists(str(full) + PARTIAL_SUFFIX)
    half = tmp_path / "half.h5"
    with _writer(half, data) as w:
        _write_rows(w, data, 0, 5)
    assert not os.path.exists(half) and os.path.exists(str(half) + PARTIAL_SUFFIX)


def test_finish_refuses_missing_rows(tmp_path, data):
    w = _writer(tmp_path / "s.h5", data)
    _write_rows(w, data, 0, 4)
    with pytest.raises(ValueError, match="only 4 of 10 rows"):
        w.finish()
    w.close()


# ------------------------------------------------------------------------------------------ reading
def test_read_unsorted_and_repeated_rows(store_path, data):
    store = LabelStore(store_path)
    rows = [7, 2, 2, 9, 0, 7, 3]
    got = store.read(rows)
    assert got.logits.shape == (len(rows), K, H, W)
    for i, r in enumerate(rows):
        one = store.read(r)
        np.testing.assert_array_equal(got.logits[i], one.logits)
        np.testing.assert_array_equal(got.class_ids[i], one.class_ids)
        np.testing.assert_array_equal(got.logits[i], data["logits"][r])
        np.testing.assert_array_equal(got.class_ids[i], data["class_ids"][r])


def test_memory_mapped_fast_path(store_path):
    store = LabelStore(store_path)
    store.read(0)
    for name in ("logits", "class_ids", "labels", "image_sizes", "path_bytes", "path_offsets"):
        assert isinstance(store._array(name), np.memmap), name
    assert isinstance(store.paths.data, np.memmap) and isinstance(store.labels, np.ndarray)
    assert summarize(store)["memory_mapped"] is True


def _chunked_gzip_copy(src, dst):
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        for key, value in fin.attrs.items():
            fout.attrs[key] = value
        for name, ds in fin.items():
            chunks = (1,) + ds.shape[1:] if ds.ndim > 1 else (max(1, min(4, ds.shape[0])),)
            fout.create_dataset(name, data=ds[()], dtype=ds.dtype, chunks=chunks,
                                compression="gzip", compression_opts=4)


def test_chunked_gzip_copy_reads_identically(tmp_path, store_path, data):
    copy = tmp_path / "gzip.h5"
    _chunked_gzip_copy(store_path, copy)
    with h5py.File(copy, "r") as f:
        assert f["logits"].compression == "gzip" and f["logits"].chunks is not None
    fast, slow = LabelStore(store_path), LabelStore(copy)
    slow.read(0)
    assert not isinstance(slow._array("logits"), np.ndarray)  # falls back to h5py datasets
    assert summarize(slow)["memory_mapped"] is False
    assert slow.header == fast.header
    assert slow.paths.tolist() == fast.paths.tolist() and slow.class_names == fast.class_names
    np.testing.assert_array_equal(slow.labels, fast.labels)
    np.testing.assert_array_equal(slow.image_sizes, fast.image_sizes)
    for rows in (np.arange(N), [7, 2, 2, 9, 0, 7, 3], [5]):
        a, b = fast.read(rows), slow.read(rows)
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
    for r in range(N):
        np.testing.assert_array_equal(slow.read(r).logits, data["logits"][r])
    slow.verify_checksum()
    slow.check_values()


def test_pickle_round_trip(store_path, data):
    store = LabelStore(store_path)
    store.read(3)  # an open handle must not travel through pickle
    clone = pickle.loads(pickle.dumps(store))
    assert clone.paths.tolist() == store.paths.tolist() and clone.header == store.header
    got = clone.read(np.arange(N))
    np.testing.assert_array_equal(got.logits, data["logits"])
    np.testing.assert_array_equal(got.class_ids, data["class_ids"])
    # the original still works too
    np.testing.assert_array_equal(store.read(4).logits, data["logits"][4])


_FORK_STORE = None


def _read_inherited(row):
    m = _FORK_STORE.read(row)
    return os.getpid(), m.logits.copy(), m.class_ids.copy()


def _read_passed(args):
    store, row = args
    m = store.read(row)
    return os.getpid(), m.logits.copy(), m.class_ids.copy()


@pytest.mark.slow
def test_fork_pool_reads_match_parent(store_path):
    global _FORK_STORE
    store = LabelStore(store_path)
    parent = store.read(np.arange(N))  # handle opened in the parent before forking
    _FORK_STORE = store
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            inherited = pool.map(_read_inherited, range(N))
            passed = pool.map(_read_passed, [(store, r) for r in range(N)])
    finally:
        _FORK_STORE = None
    for results in (inherited, passed):
        assert all(pid != os.getpid() for pid, _, _ in results)
        for r, (_, lg, ci) in enumerate(results):
            np.testing.assert_array_equal(lg, parent.logits[r])
            np.testing.assert_array_equal(ci, parent.class_ids[r])
    # the parent's handle still works after the children used theirs
    np.testing.assert_array_equal(store.read(np.arange(N)).logits, parent.logits)


# --------------------------------------------------------------------------- interrupted / resuming
def test_interrupted_write_leaves_only_partial(tmp_path, data):
    out = tmp_path / "s.h5"
    w = _writer(out, data)
    _write_rows(w, data, 0, 5)
    w.close()
    partial = str(out) + PARTIAL_SUFFIX
    assert not os.path.exists(out)
    assert os.path.exists(partial)
    with pytest.raises(StoreError) as info:
        LabelStore(out)
    assert partial in str(info.value) and "interrupted" in str(info.value)
    # the partial file itself is refused as incomplete
    with pytest.raises(StoreError, match="incomplete"):
        LabelStore(partial)


def test_resume_equals_uninterrupted(tmp_path, data, store_path):
    out = tmp_path / "s.h5"
    w = _writer(out, data)
    _write_rows(w, data, 0, 3)
    _write_rows(w, data, 3, 6)
    w.close()
    w2 = _writer(out, data)
    assert w2.rows_written == 6
    with pytest.raises(ValueError, match="in order"):
        _write_rows(w2, data, 0, 3)
    _write_rows(w2, data, 6, N)
    w2.finish()
    assert not os.path.exists(str(out) + PARTIAL_SUFFIX)
    resumed, clean = LabelStore(out), LabelStore(store_path)
    assert resumed.header.content_sha256 == clean.header.content_sha256
    assert resumed.header == clean.header
    resumed.verify_checksum()
    a, b = resumed.read(np.arange(N)), clean.read(np.arange(N))
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(resumed.labels, clean.labels)
    np.testing.assert_array_equal(resumed.image_sizes, clean.image_sizes)
    assert resumed.paths.tolist() == clean.paths.tolist()


def test_different_plan_does_not_resume(tmp_path, data):
    out = tmp_path / "s.h5"
    w = _writer(out, data)
    _write_rows(w, data, 0, 5)
    w.close()
    other = _writer(out, data, paths=_paths(prefix="other"))
    assert other.rows_written == 0
    other.close()
    # a different header (class count) is a different plan too
    w = _writer(out, data)
    _write_rows(w, data, 0, 5)
    w.close()
    other = _writer(out, data, num_classes=C + 1, class_names=data["class_names"] + ["extra"])
    assert other.rows_written == 0
    other.close()
    # resume=False starts over even for the same plan
    w = _writer(out, data)
    _write_rows(w, data, 0, 5)
    w.close()
    fresh = _writer(out, data, resume=False)
    assert fresh.rows_written == 0
    fresh.close()


def test_damaged_partial_is_kept_unless_restarted(tmp_path, data):
    """A partial file that cannot be opened is never truncated by a resume: the error names it and the
    ways out; only resume=False (--restart) starts again."""
    out = tmp_path / "s.h5"
    partial = str(out) + PARTIAL_SUFFIX
    garbage = b"garbage, not hdf5" * 10
    with open(partial, "wb") as fh:
        fh.write(garbage)
    with pytest.raises(StoreError, match=r"cannot be opened to resume.*kept: remove it, or start again "
                                         r"with --restart") as info:
        _writer(out, data)
    assert partial in str(info.value)
    with open(partial, "rb") as fh:
        assert fh.read() == garbage
    assert not os.path.exists(str(out) + ".lock"), "the lock is released after a refusal"
    w = _writer(out, data, resume=False)
    assert w.rows_written == 0
    _write_rows(w, data, 0, N)
    w.finish()
    LabelStore(out).verify_checksum()


def _hold_open(path, mode):
    """A separate process holding ``path`` open with h5py (and so HDF5's lock on it)."""
    import subprocess
    import sys

    code = (f"import h5py, sys, time\nf = h5py.File({str(path)!r}, {mode!r})\nprint('open', flush=True)\n"
            "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    return holder


@pytest.mark.slow
def test_partial_held_by_another_process_is_kept_and_the_holder_named(tmp_path, data):
    """The old rerun took HDF5's lock error for a damaged file and recreated the partial file empty."""
    from dali_relabel.outputs import OutputBusyError

    out = tmp_path / "s.h5"
    partial = str(out) + PARTIAL_SUFFIX
    w = _writer(out, data)
    _write_rows(w, data, 0, 4)
    w.close()
    size = os.path.getsize(partial)
    holder = _hold_open(partial, "r+")  # like a worker process of a killed run that outlived it
    try:
        for resume in (True, False):
            with pytest.raises(OutputBusyError, match=f"held open by another process \\(pid {holder.pid} "
                                                      r".*the file is kept") as info:
                _writer(out, data, resume=resume)
            assert partial in str(info.value)
            assert os.path.getsize(partial) == size
    finally:
        holder.kill()
        holder.wait()
    w = _writer(out, data)
    assert w.rows_written == 4, "the rows written before are still there"
    _write_rows(w, data, 4, N)
    w.finish()
    reference = _write(tmp_path / "ref.h5", data)
    assert LabelStore(out).header.content_sha256 == LabelStore(reference).header.content_sha256


def test_a_second_writer_of_the_same_store_is_refused_at_once(tmp_path, data):
    from dali_relabel.outputs import OutputBusyError

    out = tmp_path / "s.h5"
    first = _writer(out, data)
    _write_rows(first, data, 0, 4)
    with pytest.raises(OutputBusyError, match=f"is being written by process {os.getpid()} on .*wait for it"):
        _writer(out, data)
    with pytest.raises(OutputBusyError):
        _writer(out, data, resume=False)  # nor may it discard the first writer's file
    _write_rows(first, data, 4, N)
    first.finish()
    LabelStore(out, verify="full")
    assert sorted(os.listdir(tmp_path)) == ["s.h5"], "the lock file is removed once published"
    second = _writer(out, data)  # the output is free again
    second.close()


def test_close_and_reopen_go_on_where_the_writer_stopped(tmp_path, data):
    out = tmp_path / "s.h5"
    w = _writer(out, data)
    _write_rows(w, data, 0, 3)
    w.close()
    assert w.rows_written == 3
    with pytest.raises(ValueError, match="closed"):
        _write_rows(w, data, 3, 5)
    w.reopen()
    _write_rows(w, data, 3, N)
    w.finish()
    reference = _write(tmp_path / "ref.h5", data)
    assert LabelStore(out).header.content_sha256 == LabelStore(reference).header.content_sha256


def test_finish_publishes_durably(tmp_path, data, monkeypatch):
    """fsync of the complete file, then the rename, then fsync of the directory."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = str(tmp_path / "s.h5")
    _write(out, data)
    assert events == [("fsync", out + PARTIAL_SUFFIX), ("replace", out + PARTIAL_SUFFIX, out),
                      ("fsync", str(tmp_path))]


def test_out_of_order_writes_raise(tmp_path, data):
    w = _writer(tmp_path / "s.h5", data)
    with pytest.raises(ValueError, match="expected row 0, got 2"):
        _write_rows(w, data, 2, 4)
    _write_rows(w, data, 0, 2)
    with pytest.raises(ValueError, match="expected row 2, got 3"):
        _write_rows(w, data, 3, 5)
    with pytest.raises(ValueError, match="expected row 2, got 1"):
        _write_rows(w, data, 1, 3)
    with pytest.raises(ValueError):  # past the end
        w.write(2, np.zeros((N, K, H, W), np.float16), np.zeros((N, K, H, W), np.int64))
    with pytest.raises(ValueError, match="do not match"):
        w.write(2, np.zeros((1, K, W, H), np.float16), np.zeros((1, K, W, H), np.int64))
    assert w.rows_written == 2
    w.close()


def test_writer_argument_checks(tmp_path, data):
    with pytest.raises(ValueError, match="layout"):
        _writer(tmp_path / "a.h5", data, layout="XY")
    with pytest.raises(ValueError, match="class names"):
        _writer(tmp_path / "b.h5", data, class_names=["a", "b"])
    with pytest.raises(ValueError, match="at least one row"):
        _writer(tmp_path / "c.h5", data, paths=[])


@pytest.mark.parametrize("problem", ["id_high", "id_negative", "nan", "inf"])
def test_writer_rejects_bad_values_before_writing(tmp_path, data, problem):
    w = _writer(tmp_path / "s.h5", data)
    logits = data["logits"][:3].astype(np.float32)
    ids = data["class_ids"][:3].copy()
    if problem == "id_high":
        ids[2, 0, 1, 1] = C
        match = f"class id {C} is outside"
    elif problem == "id_negative":
        ids[2, 0, 1, 1] = -1
        match = "class id -1 is outside"
    elif problem == "nan":
        logits[2, 1, 0, 0] = np.nan
        match = "not finite"
    else:
        logits[2, 1, 0, 0] = np.inf
        match = "not finite"
    with pytest.raises(ValueError, match=match):
        w.write(0, logits, ids)
    assert w.rows_written == 0
    # nothing of the rejected batch reached the file, not even its good first rows
    assert not np.any(w._file["logits"][0:3])
    assert not np.any(w._file["class_ids"][0:3])
    _write_rows(w, data, 0, N)
    w.finish()
    LabelStore(tmp_path / "s.h5").verify_checksum()


def test_writer_rejects_logits_that_overflow_float16(tmp_path, data):
    """A float32 logit beyond float16's range (65504) becomes inf when stored; the writer checks the
    values after the cast, so it refuses the batch by map and index and publishes no store (one its
    own reader would refuse)."""
    logits = data["logits"].astype(np.float32)
    logits[4, 0, 2, 2] = 1.0e5
    path = tmp_path / "s.h5"
    with pytest.raises(ValueError, match=r"\(map 4\): logit at index \(0, 2, 2\) is inf \(not finite\)"):
        write_store(path, data["paths"], logits, data["class_ids"], num_classes=C)
    assert not path.exists()


# ------------------------------------------------------------------------------------- validation
def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        LabelStore(tmp_path / "absent.h5")


def test_not_hdf5(tmp_path):
    path = tmp_path / "random.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(StoreError, match="cannot be opened as HDF5") as info:
        LabelStore(path)
    assert info.value.path == os.fspath(path)
    assert os.fspath(path) in str(info.value)


def _edit_attrs(path, **attrs):
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def test_wrong_format_attr(store_path):
    _edit_attrs(store_path, format="something-else")
    with pytest.raises(StoreError, match="not a dali-relabel label store"):
        LabelStore(store_path)


def test_other_hdf5_file_is_not_a_store(tmp_path):
    """An arbitrary HDF5 file (no store attributes, no store datasets) must be refused with a
    StoreError, not crash with a KeyError."""
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(StoreError, match="not a dali-relabel label store"):
        LabelStore(path)


def test_unsupported_version(store_path):
    _edit_attrs(store_path, format_version=3)
    with pytest.raises(StoreError, match="format version 3 is not supported"):
        LabelStore(store_path)


def test_incomplete_flag(store_path):
    _edit_attrs(store_path, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        LabelStore(store_path)


def test_missing_header_attribute(store_path):
    with h5py.File(store_path, "r+") as f:
        del f.attrs["grid_w"]
    with pytest.raises(StoreError, match="grid_w"):
        LabelStore(store_path)


def test_bad_layout_attribute(store_path):
    _edit_attrs(store_path, layout="XY")
    with pytest.raises(StoreError, match="neither 'HW' nor 'WH'"):
        LabelStore(store_path)


@pytest.mark.parametrize("name", ["path_bytes", "path_offsets", "labels", "image_sizes", "class_names",
                                  "chunk_sha256"])
def test_missing_small_dataset(store_path, name):
    with h5py.File(store_path, "r+") as f:
        del f[name]
    with pytest.raises(StoreError, match=f"dataset '{name}' is missing"):
        LabelStore(store_path)


@pytest.mark.parametrize("name", ["logits", "class_ids"])
def test_missing_map_dataset(store_path, name):
    with h5py.File(store_path, "r+") as f:
        del f[name]
    with pytest.raises(StoreError, match=f"dataset '{name}' is missing"):
        LabelStore(store_path)


@pytest.mark.parametrize("name,data_fn", [
    ("image_sizes", lambda: np.zeros((N, 3), np.int32)),
    ("labels", lambda: np.zeros(N + 1, np.int32)),
    ("class_names", lambda: np.array(["a", "b"], dtype=h5py.string_dtype())),
    ("logits", lambda: np.zeros((N, K, W, H), np.float16)),
    ("class_ids", lambda: np.zeros((N, K + 1, H, W), np.uint8)),
])
def test_dataset_with_wrong_shape(store_path, name, data_fn):
    with h5py.File(store_path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data_fn())
    with pytest.raises(StoreError, match=f"dataset '{name}' has shape"):
        LabelStore(store_path)


def test_wrong_dtypes(store_path):
    with h5py.File(store_path, "r+") as f:
        del f["class_ids"]
        f.create_dataset("class_ids", data=np.zeros((N, K, H, W), np.float32))
    with pytest.raises(StoreError, match="class_ids must be integers"):
        LabelStore(store_path)


def test_class_id_out_of_range_names_row(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["class_ids"][6, 1, 2, 3] = C
    with pytest.raises(StoreError, match="checksum mismatch"):
        LabelStore(store_path)  # the default open checks a block's hash: here the only block
    with pytest.raises(StoreError) as info:
        LabelStore(store_path, verify="full")
    msg = str(info.value)
    assert "row 6" in msg and data["paths"][6] in msg and f"class id {C} is outside" in msg
    store = LabelStore(store_path, verify="header")
    store.read_checked(5)  # other rows are fine
    with pytest.raises(StoreError) as info:
        store.read_checked(6)
    msg = str(info.value)
    assert "row 6" in msg and data["paths"][6] in msg and f"class id {C} is outside" in msg
    with pytest.raises(StoreError, match="row 6"):
        store.check_values()


def test_nan_logit_names_row(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["logits"][8, 0, 0, 4] = np.nan
    with pytest.raises(StoreError) as info:
        LabelStore(store_path, verify="full")
    msg = str(info.value)
    assert "row 8" in msg and data["paths"][8] in msg and "not finite" in msg
    store = LabelStore(store_path, verify="header")
    np.testing.assert_array_equal(store.read_checked(7).logits, data["logits"][7])
    with pytest.raises(StoreError) as info:
        store.read_checked(8)
    msg = str(info.value)
    assert "row 8" in msg and data["paths"][8] in msg and "not finite" in msg


def test_first_bad_row_is_named(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["class_ids"][9, 0, 0, 0] = 200
        f["class_ids"][2, 2, 3, 4] = 100
    with pytest.raises(StoreError, match=r"row 2 \("):
        LabelStore(store_path, verify="full")


def test_a_few_corrupted_bytes_are_caught_at_open(store_path):
    """20 bytes of valid-looking logits changed after writing: the default open checks a block's
    hash (here the only block) and refuses; ``verify="header"`` opens, ``verify_checksum`` refuses."""
    with h5py.File(store_path, "r+") as f:
        offset = f["logits"].id.get_offset()
    with open(store_path, "r+b") as fh:
        fh.seek(offset + 100)
        fh.write(bytes(np.full(20, 0x3C, np.uint8)))  # float16 ~1.0: finite, in range
    with pytest.raises(StoreError, match="checksum mismatch in rows 0..9"):
        LabelStore(store_path)
    store = LabelStore(store_path, verify="header")
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.verify_checksum()


def test_verify_checksum_catches_label_change(store_path):
    with h5py.File(store_path, "r+") as f:
        f["labels"][0] = (f["labels"][0] + 1) % C
    with pytest.raises(StoreError, match="checksum mismatch"):
        LabelStore(store_path)
    with pytest.raises(StoreError, match="checksum mismatch"):
        LabelStore(store_path, verify="header").verify_checksum()


def test_verify_checksum_catches_path_change(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["path_bytes"][0] = ord("X")
    with pytest.raises(StoreError, match="checksum mismatch in the image paths"):
        LabelStore(store_path)


def test_block_hashes_localise_damage(tmp_path, data, monkeypatch):
    import dali_relabel.store.writer as store_module  # the writer decides the block size

    monkeypatch.setattr(store_module, "HASH_CHUNK_ROWS", 4)  # 10 rows: blocks 0-3, 4-7, 8-9
    path = _write(tmp_path / "blocks.h5", data)
    with h5py.File(path, "r") as f:
        assert f["chunk_sha256"].shape == (3, 32) and int(f.attrs["hash_chunk_rows"]) == 4
    monkeypatch.setattr(store_module, "HASH_CHUNK_ROWS", 8192)  # the reader uses the recorded size
    LabelStore(path, verify="full")
    with h5py.File(path, "r+") as f:
        f["image_sizes"][5] = [1, 1]
    store = LabelStore(path, verify="header")
    store.verify_checksum(chunks=[0])
    store.verify_checksum(chunks=[2])
    with pytest.raises(StoreError, match="rows 4..7"):
        store.verify_checksum(chunks=[1])
    with pytest.raises(StoreError, match="rows 4..7"):
        store.verify_checksum()


def test_resumed_write_inside_a_block_hashes_identically(tmp_path, data, monkeypatch):
    import dali_relabel.store.writer as store_module  # the writer decides the block size

    monkeypatch.setattr(store_module, "HASH_CHUNK_ROWS", 4)
    clean = _write(tmp_path / "clean.h5", data)
    out = tmp_path / "resumed.h5"
    w = _writer(out, data)
    _write_rows(w, data, 0, 6)  # stops inside block 4-7
    w.close()
    w = _writer(out, data)
    assert w.rows_written == 6
    _write_rows(w, data, 6, N)
    w.finish()
    assert LabelStore(out, verify="full").header.content_sha256 == LabelStore(clean).header.content_sha256


def test_open_does_not_scan_values_of_a_checked_store(store_path, monkeypatch):
    def fail(self):
        raise AssertionError("the default open must not scan every value of a version-2 store")

    monkeypatch.setattr(LabelStore, "check_values", fail)
    LabelStore(store_path)
    with pytest.raises(AssertionError):
        LabelStore(store_path, verify="full")


def test_writer_refuses_repeated_class_in_a_cell(tmp_path, data):
    ids = data["class_ids"].copy()
    ids[3, 1, 2, 2] = ids[3, 0, 2, 2]
    with pytest.raises(ValueError, match=r"map 3\): cell \(2, 2\) holds class ids .* a class may appear once"):
        write_store(tmp_path / "dup.h5", data["paths"], data["logits"], ids, num_classes=C)
    assert not os.path.exists(tmp_path / "dup.h5")


def test_repeated_class_in_a_cell_is_caught_when_verified(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["class_ids"][4, 2, 1, 0] = f["class_ids"][4, 0, 1, 0]
    with pytest.raises(StoreError, match=r"row 4 .*a class may appear once per cell"):
        LabelStore(store_path, verify="full")


def test_writer_refuses_labels_out_of_range(tmp_path, data):
    labels = data["labels"].copy()
    labels[2] = C
    with pytest.raises(ValueError, match=f"label {C} is outside"):
        write_store(tmp_path / "l.h5", data["paths"], data["logits"], data["class_ids"], num_classes=C,
                    labels=labels)


def test_label_out_of_range_is_refused_at_open(store_path, data):
    with h5py.File(store_path, "r+") as f:
        f["labels"][7] = 99
    with pytest.raises(StoreError, match=rf"row 7 \({data['paths'][7]}\) has label 99, outside"):
        LabelStore(store_path)


@pytest.mark.parametrize("bad", ["../outside.JPEG", "/etc/passwd", "cls_0/../../x.JPEG", "a/..", "a\0b"])
def test_writer_refuses_paths_that_leave_the_root(tmp_path, data, bad):
    paths = list(data["paths"])
    paths[1] = bad.replace("\\0", "\0")
    with pytest.raises(ValueError, match="row 1"):
        write_store(tmp_path / "p.h5", paths, data["logits"], data["class_ids"], num_classes=C)


def test_dotted_names_are_not_parent_references(tmp_path, data):
    paths = list(data["paths"])
    paths[0], paths[1] = "cls_0/..hidden.JPEG", "cls_0/a..b/c...JPEG"
    path = write_store(tmp_path / "ok.h5", paths, data["logits"], data["class_ids"], num_classes=C)
    assert LabelStore(path).paths.tolist()[:2] == paths[:2]


def test_tampered_path_leaving_the_root_is_refused_at_open(store_path):
    with h5py.File(store_path, "r+") as f:
        start = int(f["path_offsets"][3])
        f["path_bytes"][start:start + 3] = np.frombuffer(b"../", np.uint8)
    with pytest.raises(StoreError, match="row 3 has the path '../"):
        LabelStore(store_path)


def _write_version1(path, d):
    """A store in the version-1 layout (paths as HDF5 strings), as dali-relabel 0.1 wrote it."""
    from dali_relabel.store import content_hash_v1

    ids = d["class_ids"].astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs.update(format=FORMAT_NAME, format_version=1, complete=True, num_rows=N, num_classes=C,
                       k=K, grid_h=H, grid_w=W, layout="WH", teacher="t", teacher_input_size=0, source="old",
                       content_sha256=content_hash_v1(d["logits"], ids, d["labels"], d["image_sizes"],
                                                      d["paths"]))
        f.create_dataset("logits", data=d["logits"])
        f.create_dataset("class_ids", data=ids)
        f.create_dataset("labels", data=d["labels"])
        f.create_dataset("image_sizes", data=d["image_sizes"])
        f.create_dataset("paths", data=np.array(d["paths"], dtype=h5py.string_dtype("utf-8")))
        f.create_dataset("class_names", data=np.array(d["class_names"], dtype=h5py.string_dtype("utf-8")))
    return path


def test_version1_store_is_still_read(tmp_path, data):
    path = _write_version1(tmp_path / "v1.h5", data)
    store = LabelStore(path, verify="full")
    assert store.header.format_version == 1 and not store.header.values_checked
    assert store.paths.tolist() == data["paths"] and store.layout == "WH"
    np.testing.assert_array_equal(store.read(np.arange(N)).logits, data["logits"])
    np.testing.assert_array_equal(store.labels, data["labels"])
    store.close()
    with h5py.File(path, "r+") as f:
        f["class_ids"][2, 0, 0, 0] = 250
    with pytest.raises(StoreError, match="row 2"):
        LabelStore(path)  # nothing recorded: the default open scans a version-1 store's values


# -------------------------------------------------------------------------------------- summarize
def test_summarize(store_path, data):
    s = summarize(LabelStore(store_path))
    assert s["rows"] == N and s["sampled_rows"] == N
    assert s["num_classes"] == C and s["k"] == K and s["grid"] == [H, W] and s["layout"] == "HW"
    assert s["format_version"] == FORMAT_VERSION
    assert s["file_bytes"] == os.path.getsize(store_path)
    assert s["bytes_per_image"] == pytest.approx(s["file_bytes"] / N)
    assert s["bytes_per_image"] > K * H * W * 3  # at least the float16 logits and uint8 ids
    assert s["class_ids_dtype"] == "uint8"
    lg = data["logits"].astype(np.float32)
    assert s["logit_min"] == pytest.approx(lg.min())
    assert s["logit_max"] == pytest.approx(lg.max())
    assert s["logit_mean"] == pytest.approx(lg.mean(), abs=1e-4)
    assert s["top1_logit_mean"] == pytest.approx(lg[:, 0].mean(), abs=1e-4)
    assert s["hard_label_known"] == 1.0
    assert s["distinct_classes_in_sample"] == len(np.unique(data["class_ids"]))
    assert 0.0 <= s["majority_top1_equals_hard_label"] <= 1.0


def test_summarize_label_agreement(tmp_path):
    n = 6
    logits, ids = random_maps(n, 2, 3, 3, 5, seed=3)
    labels = np.array([0, 1, 2, 3, 4, -1], np.int32)
    ids[:, 0] = labels.clip(0)[:, None, None]  # top-1 is the hard label everywhere
    ids[:, 1] = (ids[:, 0] + 1) % 5
    path = write_store(tmp_path / "a.h5", _paths(n), logits, ids, num_classes=5, labels=labels)
    s = summarize(LabelStore(path))
    assert s["majority_top1_equals_hard_label"] == 1.0
    assert s["hard_label_known"] == pytest.approx(5 / 6)
    path = write_store(tmp_path / "b.h5", _paths(n), logits, ids, num_classes=5,
                       labels=np.array([1, 2, 3, 4, 0, 1], np.int32))
    assert summarize(LabelStore(path))["majority_top1_equals_hard_label"] == 0.0
    s = summarize(LabelStore(path), sample_rows=3)
    assert s["sampled_rows"] == 3 and s["rows"] == n


# ------------------------------------------------------------------ untrusted files (issue 23)
@pytest.mark.parametrize("name, dtype, expected", [
    ("labels", np.int64, "int32"), ("labels", np.float32, "int32"), ("image_sizes", np.int64, "int32"),
    ("image_sizes", np.float32, "int32"), ("class_ids", np.int64, "uint8"),
])
def test_wrong_dtypes_are_named_with_the_expected_one(store_path, name, dtype, expected):
    with h5py.File(store_path, "r+") as f:
        values = f[name][()]
        del f[name]
        f.create_dataset(name, data=values.astype(dtype))
    with pytest.raises(StoreError, match=f"dataset '{name}' has dtype {np.dtype(dtype)}, expected {expected}"):
        LabelStore(store_path, verify="header")


def test_an_external_link_is_refused_by_name(store_path, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(store_path, "r") as f, h5py.File(other, "w") as g:
        g.create_dataset("labels", data=f["labels"][()])
    with h5py.File(store_path, "r+") as f:
        del f["labels"]
        f["labels"] = h5py.ExternalLink(str(other), "/labels")
    with pytest.raises(StoreError, match=f"dataset 'labels' is a link to {other}:/labels"):
        LabelStore(store_path)


def test_a_soft_link_is_refused_by_name(store_path):
    with h5py.File(store_path, "r+") as f:
        f.move("labels", "elsewhere")
        f["labels"] = h5py.SoftLink("/elsewhere")
    with pytest.raises(StoreError, match="dataset 'labels' is a link to /elsewhere"):
        LabelStore(store_path)


def test_external_storage_is_refused_without_reading_it(store_path, tmp_path):
    """External storage makes HDF5 read another file; pointing at a FIFO, opening hung (issue 23)."""
    fifo = tmp_path / "outside"
    os.mkfifo(fifo)
    with h5py.File(store_path, "r+") as f:
        del f["labels"]
        f.create_dataset("labels", shape=(N,), dtype=np.int32, external=[(str(fifo), 0, N * 4)])
    with pytest.raises(StoreError, match="dataset 'labels' keeps its data in 1 external file"):
        LabelStore(store_path)


def test_a_virtual_dataset_is_refused(store_path, tmp_path):
    other = tmp_path / "source.h5"
    with h5py.File(store_path, "r") as f, h5py.File(other, "w") as g:
        g.create_dataset("labels", data=f["labels"][()])
    layout = h5py.VirtualLayout(shape=(N,), dtype=np.int32)
    layout[:] = h5py.VirtualSource(str(other), "labels", shape=(N,))
    with h5py.File(store_path, "r+") as f:
        del f["labels"]
        f.create_virtual_dataset("labels", layout)
    with pytest.raises(StoreError, match="dataset 'labels' is a virtual dataset"):
        LabelStore(store_path)


def _declaring_rows(src, dst, rows):
    """A copy of the store's header and names, its datasets declared for ``rows`` rows but never
    written (HDF5 allocates nothing for them: the file stays a few KB)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        g.attrs.update(dict(f.attrs))
        g.attrs["num_rows"] = rows
        g.create_dataset("class_names", data=f["class_names"][()])
        for name, ds in f.items():
            if name == "class_names":
                continue
            shape = (rows + (name == "path_offsets"),) + ds.shape[1:]
            if name == "chunk_sha256":
                shape = (-(-rows // 1024), 32)
            if name == "path_bytes":
                shape = ds.shape
            g.create_dataset(name, shape=shape, dtype=ds.dtype)


def test_huge_declared_sizes_are_refused_before_allocating(store_path, tmp_path):
    import resource

    huge = tmp_path / "huge.h5"
    _declaring_rows(store_path, huge, 2 ** 31)
    assert os.path.getsize(huge) < 100_000
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StoreError, match="dataset 'logits' declares 2147483648 rows .* holds no data"):
        LabelStore(huge)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - used < 200_000, "nothing big was allocated"


def test_a_store_rewritten_in_place_under_a_reader_is_refused(tmp_path, data, store_path):
    other = dict(data, logits=data["logits"][::-1].copy(), class_ids=data["class_ids"][::-1].copy())
    replacement = _write(tmp_path / "other.h5", other)
    store = LabelStore(store_path)
    store.read([0, 1])
    with open(replacement, "rb") as f:
        new_bytes = f.read()
    with open(store_path, "r+b") as f:  # same file (inode), new content: the maps would switch silently
        f.write(new_bytes)
    with pytest.raises(StoreError, match="changed while it was read"):
        store.read([0, 1])
    with pytest.raises(StoreError, match="changed while it was read"):
        store.read(3)


def test_a_store_replaced_under_a_reader_is_refused(tmp_path, data, store_path):
    replacement = _write(tmp_path / "other.h5", data)
    store = LabelStore(store_path)
    store.read([0, 1])
    os.replace(replacement, store_path)
    with pytest.raises(StoreError, match="was replaced by another file while it was read"):
        store.read([0, 1])


_TRUNCATED_UNDER_A_READER = """
import os, sys
from dali_relabel.store import LabelStore, StoreError
store = LabelStore(sys.argv[1])
store.read([0, 1, 2])
with open(sys.argv[1], "r+b") as f:
    f.truncate(4096)
try:
    store.read([7, 8, 9])
except StoreError as error:
    print("StoreError:", error)
"""


@pytest.mark.slow
def test_a_store_truncated_under_a_reader_is_an_error_not_sigbus(tmp_path, data):
    """The maps are memory-mapped: touching a page past a truncated file's end kills the process
    with SIGBUS. Every batch read first checks the file (issue 23)."""
    import subprocess
    import sys

    logits, ids = random_maps(4000, K, H, W, C, seed=3)  # pages of the maps well beyond 4 KB
    path = write_store(tmp_path / "big.h5", _paths(4000), logits, ids, C)
    result = subprocess.run([sys.executable, "-c", _TRUNCATED_UNDER_A_READER, path], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert "StoreError:" in result.stdout and "was truncated to 4096 bytes while it was read" in result.stdout
