"""relabel.read_files: whole files from zero-padded path rows; errors name the file."""
import os
import socket

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # every test builds and runs a DALI pipeline


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from dali_relabel.ops.plugin import load_plugin

    load_plugin()


def _read(paths, threads=2):
    """The operator's output for ``paths`` (str) given as one zero-padded [B, L] matrix."""
    from nvidia.dali import fn, pipeline_def, types

    encoded = [p.encode() for p in paths]
    matrix = np.zeros((len(encoded), max(len(e) for e in encoded) + 3), np.uint8)
    for i, e in enumerate(encoded):
        matrix[i, :len(e)] = np.frombuffer(e, np.uint8)

    @pipeline_def(batch_size=len(paths), num_threads=threads, device_id=None, exec_dynamic=True)
    def graph():
        return fn.relabel.read_files(fn.external_source(source=lambda: matrix, batch=True, dtype=types.UINT8, ndim=1))

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]).tobytes() for i in range(len(paths))]


def test_every_file_comes_back_whole_and_in_order(tmp_path):
    rng = np.random.default_rng(0)
    contents = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in (1, 0, 200_000, 4096, 77)]
    paths = []
    for i, data in enumerate(contents):
        path = tmp_path / ("d" * (i * 9)) / f"f{i}.bin"  # path lengths differ, so the padding does
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
    assert _read(paths) == contents
    assert _read(paths[::-1], threads=1) == contents[::-1]


def test_a_path_filling_its_whole_row_needs_no_terminator(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    path = tmp_path / "exact.bin"
    path.write_bytes(b"abc")
    row = np.frombuffer(str(path).encode(), np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return fn.relabel.read_files(fn.external_source(source=lambda: [row], batch=True, dtype=types.UINT8, ndim=1))

    pipe = graph()
    pipe.build()
    assert np.array(pipe.run()[0][0]).tobytes() == b"abc"


def _fifo(directory):
    path = directory / "fifo.jpg"
    os.mkfifo(path)  # nobody writes to it: a blocking open would wait forever
    return str(path)


def _socket(directory):
    path = directory / "socket.jpg"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.jpg"), "cannot open '{path}': No such file or directory"),
    (lambda d: str(d), "cannot open '{path}': Is a directory"),
    (_fifo, "cannot open '{path}': not a regular file (a FIFO)"),
    (_socket, "cannot open '{path}': No such device or address"),
    (lambda d: "/dev/null", "cannot open '{path}': not a regular file (a character device)"),
])
def test_an_unreadable_path_is_named_in_the_error(tmp_path, make, message):
    good = tmp_path / "good.jpg"
    good.write_bytes(b"x")
    bad = make(tmp_path)
    with pytest.raises(RuntimeError) as error:
        _read([str(good), bad])
    assert "relabel.read_files: sample 1: " + message.format(path=bad) in str(error.value)


def test_paths_must_be_byte_vectors():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return fn.relabel.read_files(fn.external_source(source=lambda: [np.zeros(4, np.int32)], batch=True,
                                                        dtype=types.INT32, ndim=1))

    pipe = graph()
    pipe.build()
    with pytest.raises(RuntimeError, match="paths must be uint8 vectors"):
        pipe.run()
