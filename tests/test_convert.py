"""Converting the ReLabel authors' release (one .pt per image) into a store."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.tools.convert import (RELEASE_TEACHER, RELEASE_TEACHER_SIZE, ConversionError,
                                  convert_release, load_release_map, map_relpath)
from dali_relabel.store import PARTIAL_SUFFIX, LabelStore, StoreError, StoreWriter
from helpers import make_jpeg_tree, random_maps, wait_until_gone, write_release_tree

NUM_CLASSES, PER_CLASS, K, MAP_H, MAP_W = 3, 4, 2, 3, 4
N = NUM_CLASSES * PER_CLASS
SIZES = [(10 + i, 14 + 2 * i) for i in range(N)]  # (H, W), a different size per image


@pytest.fixture
def release(tmp_path):
    images = tmp_path / "images"
    maps = tmp_path / "maps"
    relpaths = make_jpeg_tree(images, NUM_CLASSES, PER_CLASS, sizes=SIZES, seed=3)
    logits, ids = random_maps(N, K, MAP_H, MAP_W, NUM_CLASSES, seed=4)
    write_release_tree(maps, relpaths, logits, ids)
    return dict(images=images, maps=maps, relpaths=relpaths, logits=logits, ids=ids, tmp=tmp_path)


def _convert(r, out_name="store.h5", **kw):
    args = dict(num_classes=NUM_CLASSES, workers=2, progress=False, chunk_rows=4)
    args.update(kw)
    out = r["tmp"] / out_name
    return convert_release(r["maps"], r["images"], out, **args), out


def _map_file(r, rel):
    return os.path.join(r["maps"], map_relpath(rel))


def _check_rows_against_files(store, r):
    for row, rel in enumerate(store.paths.tolist()):
        tensor = torch.load(_map_file(r, rel), weights_only=True)
        got = store.read(row)
        np.testing.assert_array_equal(got.logits.astype(np.float32), tensor[0].numpy())
        np.testing.assert_array_equal(got.class_ids.astype(np.int64), tensor[1].numpy().astype(np.int64))


def test_helpers_write_the_release_format(release):
    path = _map_file(release, release["relpaths"][5])
    assert path.endswith(os.path.join("class_01", "img_001.pt"))
    tensor = torch.load(path, weights_only=True)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (2, K, MAP_H, MAP_W)
    np.testing.assert_array_equal(tensor[0].numpy(), release["logits"][5].astype(np.float32))
    np.testing.assert_array_equal(tensor[1].numpy(), release["ids"][5].astype(np.float32))
    with Image.open(os.path.join(release["images"], release["relpaths"][5])) as im:
        assert im.format == "JPEG" and im.size == (SIZES[5][1], SIZES[5][0])
    for cell in release["ids"].transpose(0, 2, 3, 1).reshape(-1, K):
        assert len(set(cell.tolist())) == K


@pytest.mark.slow
def test_convert_pairs_rows_with_maps(release):
    report, out = _convert(release)
    assert report.rows == N and report.resumed_from_row == 0 and report.out == os.fspath(out)
    assert report.images_without_map == [] and report.maps_without_image == []
    assert report.unreadable_image_headers == []
    assert not os.path.exists(str(out) + PARTIAL_SUFFIX)
    store = LabelStore(out)
    store.verify_checksum()
    h = store.header
    assert h.layout == "WH" and h.source == "relabel-release"
    assert h.teacher == RELEASE_TEACHER and h.teacher_input_size == RELEASE_TEACHER_SIZE
    assert (h.num_rows, h.num_classes, h.k, h.grid_h, h.grid_w) == (N, NUM_CLASSES, K, MAP_H, MAP_W)
    assert store.paths.tolist() == release["relpaths"]
    assert store.class_names == [f"class_{c:02d}" for c in range(NUM_CLASSES)]
    np.testing.assert_array_equal(store.labels, np.repeat(np.arange(NUM_CLASSES), PER_CLASS))
    np.testing.assert_array_equal(store.image_sizes, np.array(SIZES))
    _check_rows_against_files(store, release)
    # and against the arrays the files were made from, row by row
    for row in range(N):
        np.testing.assert_array_equal(store.read(row).logits, release["logits"][row])
        np.testing.assert_array_equal(store.read(row).class_ids, release["ids"][row])


@pytest.mark.slow
def test_convert_with_one_worker_and_one_chunk_is_identical(release):
    _, a = _convert(release, "a.h5")
    _, b = _convert(release, "b.h5", workers=1, chunk_rows=1000)
    assert LabelStore(a).header.content_sha256 == LabelStore(b).header.content_sha256


def test_missing_map_is_an_error(release):
    missing = release["relpaths"][7]
    os.remove(_map_file(release, missing))
    with pytest.raises(ConversionError, match="images have no map") as info:
        _convert(release)
    assert missing in str(info.value)
    assert not os.path.exists(release["tmp"] / "store.h5")


def test_extra_map_is_an_error(release):
    extra = release["maps"] / "class_01" / "img_999.pt"
    torch.save(torch.zeros(2, K, MAP_H, MAP_W), extra)
    with pytest.raises(ConversionError, match="maps have no image") as info:
        _convert(release)
    assert "class_01/img_999.pt" in str(info.value)


@pytest.mark.slow
def test_allow_missing_skips_and_reports(release):
    missing = release["relpaths"][7]
    os.remove(_map_file(release, missing))
    torch.save(torch.zeros(2, K, MAP_H, MAP_W), release["maps"] / "class_02" / "orphan.pt")
    report, out = _convert(release, allow_missing=True)
    assert report.images_without_map == [missing]
    assert report.maps_without_image == ["class_02/orphan.pt"]
    assert report.rows == N - 1
    assert "1 images without a map" in report.summary()
    assert "1 maps without an image" in report.summary()
    store = LabelStore(out)
    assert store.paths.tolist() == [p for p in release["relpaths"] if p != missing]
    np.testing.assert_array_equal(store.labels, [int(p[6:8]) for p in store.paths.tolist()])
    keep = [i for i, p in enumerate(release["relpaths"]) if p != missing]
    np.testing.assert_array_equal(store.image_sizes, np.array(SIZES)[keep])
    _check_rows_against_files(store, release)


def test_no_map_at_all(release, tmp_path):
    empty = tmp_path / "empty_maps"
    empty.mkdir()
    with pytest.raises(ConversionError, match="has a map"):
        convert_release(empty, release["images"], tmp_path / "x.h5", num_classes=NUM_CLASSES,
                        allow_missing=True, workers=1, progress=False)


# ---------------------------------------------------------------------------------- bad map files
def _bad_id(r, rel):
    t = torch.load(_map_file(r, rel), weights_only=True)
    t[1, 0, 1, 2] = NUM_CLASSES
    torch.save(t, _map_file(r, rel))
    return "outside"


def _negative_id(r, rel):
    t = torch.load(_map_file(r, rel), weights_only=True)
    t[1, 1, 0, 0] = -1
    torch.save(t, _map_file(r, rel))
    return "class id -1"


def _fractional_id(r, rel):
    t = torch.load(_map_file(r, rel), weights_only=True)
    t[1, 0, 0, 0] = 1.5
    torch.save(t, _map_file(r, rel))
    return "whole numbers"


def _nan_logit(r, rel):
    t = torch.load(_map_file(r, rel), weights_only=True)
    t[0, 1, 2, 3] = float("nan")
    torch.save(t, _map_file(r, rel))
    return "non-finite"


def _three_planes(r, rel):
    torch.save(torch.zeros(3, K, MAP_H, MAP_W), _map_file(r, rel))
    return r"\[2, k, H, W\]"


def _three_dims(r, rel):
    torch.save(torch.zeros(2, MAP_H, MAP_W), _map_file(r, rel))
    return r"\[2, k, H, W\]"


def _not_a_pickle(r, rel):
    with open(_map_file(r, rel), "wb") as fh:
        fh.write(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return "cannot be loaded"


def _dict_pickle(r, rel):
    torch.save({"maps": torch.zeros(2, K, MAP_H, MAP_W)}, _map_file(r, rel))
    return "found dict"


BAD_MAPS = [_bad_id, _negative_id, _fractional_id, _nan_logit, _three_planes, _three_dims,
            _not_a_pickle, _dict_pickle]


@pytest.mark.slow
@pytest.mark.parametrize("row", [0, 6], ids=["first-row", "worker-row"])
@pytest.mark.parametrize("damage", BAD_MAPS, ids=lambda f: f.__name__.strip("_"))
def test_bad_map_file_names_the_file(release, damage, row):
    rel = release["relpaths"][row]
    match = damage(release, rel)
    with pytest.raises(ConversionError, match=match) as info:
        _convert(release)
    assert _map_file(release, rel) in str(info.value)
    assert not os.path.exists(release["tmp"] / "store.h5")


@pytest.mark.slow
def test_map_of_another_shape_names_the_file(release):
    rel = release["relpaths"][9]
    torch.save(torch.zeros(2, K, MAP_W, MAP_H), _map_file(release, rel))
    with pytest.raises(ConversionError, match="differs from the first map") as info:
        _convert(release)
    assert _map_file(release, rel) in str(info.value)


def test_load_release_map_types(release):
    logits, ids = load_release_map(_map_file(release, release["relpaths"][2]), NUM_CLASSES)
    assert logits.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, release["ids"][2])


@pytest.mark.slow
def test_unreadable_image_header_is_reported(release):
    rel = release["relpaths"][4]
    with open(os.path.join(release["images"], rel), "wb") as fh:
        fh.write(b"this is not a jpeg")
    report, out = _convert(release)
    assert report.unreadable_image_headers == [os.path.join(str(release["images"]), rel)]
    store = LabelStore(out)
    np.testing.assert_array_equal(store.image_sizes[4], [0, 0])
    np.testing.assert_array_equal(store.image_sizes[5], SIZES[5])


# ----------------------------------------------------------------------------- interrupt / resume
def _crash_on_second_write(monkeypatch):
    original = StoreWriter.write
    calls = []

    def failing_write(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write", failing_write)
    return calls


@pytest.mark.slow
def test_interrupted_conversion_resumes(release, monkeypatch):
    _, clean = _convert(release, "clean.h5")
    calls = _crash_on_second_write(monkeypatch)
    out = release["tmp"] / "store.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _convert(release)
    assert calls == [0, 4]
    assert not os.path.exists(out)
    assert os.path.exists(str(out) + PARTIAL_SUFFIX)
    with pytest.raises(StoreError, match="partial"):
        LabelStore(out)
    monkeypatch.undo()
    report, _ = _convert(release)
    assert report.resumed_from_row == 4
    assert report.rows == N
    assert "resumed an interrupted conversion at row 4" in report.summary()
    assert not os.path.exists(str(out) + PARTIAL_SUFFIX)
    resumed, reference = LabelStore(out), LabelStore(clean)
    resumed.verify_checksum()
    assert resumed.header.content_sha256 == reference.header.content_sha256
    assert resumed.header == reference.header
    _check_rows_against_files(resumed, release)
    np.testing.assert_array_equal(resumed.image_sizes, reference.image_sizes)


@pytest.mark.slow
def test_restart_discards_partial(release, monkeypatch):
    _, clean = _convert(release, "clean.h5")
    _crash_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError):
        _convert(release)
    monkeypatch.undo()
    calls = []
    original = StoreWriter.write

    def recording_write(self, start, *args, **kwargs):
        calls.append(start)
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write", recording_write)
    report, out = _convert(release, restart=True)
    assert report.resumed_from_row == 0
    assert calls == [0, 4, 8]
    assert LabelStore(out).header.content_sha256 == LabelStore(clean).header.content_sha256


@pytest.mark.slow
def test_changed_image_set_does_not_resume(release, monkeypatch):
    _crash_on_second_write(monkeypatch)
    with pytest.raises(RuntimeError):
        _convert(release)
    monkeypatch.undo()
    # one image and its map gone: the plan differs, so the partial file must not be reused
    rel = release["relpaths"][-1]
    os.remove(os.path.join(release["images"], rel))
    os.remove(_map_file(release, rel))
    report, out = _convert(release)
    assert report.resumed_from_row == 0 and report.rows == N - 1
    assert LabelStore(out).paths.tolist() == release["relpaths"][:-1]


# ---------------------------------------------------------------------------------------- classes
def test_folder_count_must_match_num_classes(release):
    with pytest.raises(ConversionError, match="3 class folders but num_classes is 4"):
        _convert(release, num_classes=4)


@pytest.mark.slow
def test_class_names_give_labels(release):
    names = ["class_zz", "class_00", "class_01", "class_02"]
    report, out = _convert(release, num_classes=4, class_names=names)
    store = LabelStore(out)
    assert store.class_names == names and store.num_classes == 4
    np.testing.assert_array_equal(store.labels, np.repeat([1, 2, 3], PER_CLASS))


@pytest.mark.slow
def test_logit_beyond_float16_range_is_not_published_as_inf(release):
    """The store keeps float16 logits: a release logit of 1e5 (finite in float32) turns into inf.
    The conversion must either refuse that map, naming it, or publish a store that opens."""
    rel = release["relpaths"][6]
    t = torch.load(_map_file(release, rel), weights_only=True)
    t[0, 0, 1, 1] = 1.0e5
    torch.save(t, _map_file(release, rel))
    try:
        _, out = _convert(release)
    except ConversionError as error:
        assert _map_file(release, rel) in str(error)
        return
    LabelStore(out, verify="full")


@pytest.mark.slow
def test_partial_from_another_maps_directory_is_not_resumed(release, monkeypatch):
    """An interrupted conversion of other maps for the same images starts again instead of mixing."""
    import shutil

    other = release["tmp"] / "other_maps"
    shutil.copytree(release["maps"], other)
    calls = {"n": 0}
    original = StoreWriter.write

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write", failing)
    with pytest.raises(RuntimeError):
        _convert(release)
    monkeypatch.setattr(StoreWriter, "write", original)
    assert _convert(release)[0].resumed_from_row == 4, "the same maps resume"
    with pytest.raises(RuntimeError):
        monkeypatch.setattr(StoreWriter, "write", failing)
        calls["n"] = 0
        _convert(release, out_name="second.h5")
    monkeypatch.setattr(StoreWriter, "write", original)
    report, _ = _convert(dict(release, maps=other), out_name="second.h5")
    assert report.resumed_from_row == 0, "maps from another directory must not resume the partial file"


# ---------------------------------------------------------------------- faults: kills, two writers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A conversion that stops after its first write until the file GO exists (or forever), reporting
# its pid and its loader processes' pids.
_PAUSED_CONVERT = """
import json, multiprocessing, os, sys, time
from dali_relabel.tools.convert import convert_release
from dali_relabel.store import StoreWriter

maps, images, out, go = sys.argv[1:5]
write = StoreWriter.write

def paused_write(self, start, *args, **kwargs):
    write(self, start, *args, **kwargs)
    if start == 0:
        workers = [p.pid for p in multiprocessing.active_children()]
        print(json.dumps({"pid": os.getpid(), "workers": workers}), flush=True)
        while not os.path.exists(go):
            time.sleep(0.05)

StoreWriter.write = paused_write
report = convert_release(maps, images, out, num_classes=%d, workers=2, progress=False, chunk_rows=4)
print("done", report.rows, flush=True)
""" % NUM_CLASSES


def _start_paused_convert(r, out):
    import json
    import subprocess
    import sys

    go = str(r["tmp"] / "go")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_CONVERT, str(r["maps"]), str(r["images"]),
                                str(out), go], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError(f"the conversion did not start: {process.stderr.read()[-3000:]}")
    info = json.loads(line)
    assert info["pid"] == process.pid and len(info["workers"]) == 2
    return process, info["workers"], go


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killing_the_converter_kills_its_loaders_and_the_rerun_resumes(release, signal_name):
    """Killed alone, the main process used to leave its loaders alive (holding the partial file and
    its HDF5 lock); the rerun then emptied the partial file and died with a BlockingIOError."""
    import signal

    from dali_relabel.outputs import processes_holding

    out = release["tmp"] / "store.h5"
    partial = str(out) + PARTIAL_SUFFIX
    process, workers, _ = _start_paused_convert(release, out)
    try:
        holders = [pid for pid, _ in processes_holding(partial)]
        assert holders == [process.pid], "a loader process holds the partial file open"
        os.kill(process.pid, getattr(signal, signal_name))
        process.wait(timeout=10)
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    assert wait_until_gone(workers) == [], "a loader process outlived the converter"
    report, _ = _convert(release)
    assert report.resumed_from_row == 4, "the rows written before the kill were lost"
    store = LabelStore(out, verify="full")
    _check_rows_against_files(store, release)


@pytest.mark.slow
def test_a_second_conversion_of_the_same_output_is_refused(release):
    """Two runs writing one --out: the second used to empty the first's partial file, and the first
    then published a corrupt store."""
    import time

    from dali_relabel.outputs import OutputBusyError

    out = release["tmp"] / "store.h5"
    process, _, go = _start_paused_convert(release, out)
    try:
        started = time.monotonic()
        # The message names the writer and the command line it runs (here python -c with out's path).
        who = rf"is being written by process {process.pid} on \S+ \(started [^:]+:.*{re.escape(str(out))}"
        with pytest.raises(OutputBusyError, match=who):
            _convert(release)
        with pytest.raises(OutputBusyError):
            _convert(release, restart=True)
        assert time.monotonic() - started < 10, "the second run must be refused at once"
        open(go, "w").close()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "done 12" in stdout
    store = LabelStore(out, verify="full")
    _check_rows_against_files(store, release)
    assert sorted(os.listdir(release["tmp"])) == ["go", "images", "maps", "store.h5"]


def test_cli_names_the_other_writer(release, capsys):
    from dali_relabel.tools.cli import main
    from dali_relabel.outputs import OutputLock

    out = release["tmp"] / "store.h5"
    with OutputLock(out):
        code = main(["convert", "--maps", str(release["maps"]), "--images", str(release["images"]), "--out",
                     str(out), "--num-classes", str(NUM_CLASSES), "--workers", "1", "--quiet"])
    assert code == 2
    assert f"is being written by process {os.getpid()}" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(str(out) + PARTIAL_SUFFIX)


@pytest.mark.slow
def test_conversion_publishes_durably(release, monkeypatch):
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _, out = _convert(release)
    assert events == [str(out) + PARTIAL_SUFFIX, str(release["tmp"])]


@pytest.mark.slow
def test_forked_workers_leave_the_callers_garbage_alone(release, monkeypatch, unguarded_fork):
    """A DALI pipeline left in a reference cycle by the caller must not be torn down inside a forked
    worker (that crashed the worker: BrokenProcessPool when convert ran after pipeline tests)."""
    pytest.importorskip("nvidia.dali")
    import gc

    from nvidia.dali import fn, pipeline_def

    from dali_relabel.tools import convert

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return fn.random.uniform(shape=[1])

    gc.disable()  # keep the garbage until the workers fork
    try:
        cycle = {"pipeline": graph()}
        cycle["pipeline"].build()
        cycle["pipeline"].run()
        cycle["self"] = cycle
        del cycle

        def collect_in_worker(*args):  # what a busy worker's collector does sooner or later
            import faulthandler

            # A worker stuck tearing down an inherited pipeline exits (the test fails, not hangs).
            faulthandler.dump_traceback_later(60, exit=True)
            gc.enable()
            gc.collect()
            faulthandler.cancel_dump_traceback_later()

        monkeypatch.setattr(convert, "_init_worker", collect_in_worker)
        report, out = _convert(release, workers=1)
    finally:
        gc.enable()
    assert report.rows == N and LabelStore(out).header.num_rows == N
