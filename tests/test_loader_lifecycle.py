"""A loader's life: dropped without ``close()`` it releases its threads, processes, files and memory
(a finalizer); ``with`` closes it; a forked child that uses its parent's loader is told at once."""
import collections
import gc
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from dali_relabel.config import DataConfig

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # every test builds DALI pipelines

SMALL = dict(image_size=16, num_threads=1, prefetch_queue_depth=1)


def _loaders(tiny_set, config):
    from dali_relabel.loader import ReLabelLoader, ValidationLoader

    return [lambda: ReLabelLoader(tiny_set.images, tiny_set.store, 8, config=config, device="cpu"),
            lambda: ValidationLoader(tiny_set.images, 8, config=config, device="cpu")]


def _our_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("dali-relabel"))


def _threads_settle(before, seconds=10.0):
    """Our named threads started since ``before`` and still running after up to ``seconds`` (a
    released thread ends on its own; earlier tests' garbage may release theirs meanwhile)."""
    deadline = time.monotonic() + seconds
    while True:
        new = sorted((collections.Counter(_our_threads()) - collections.Counter(before)).elements())
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


def _children():
    from dali_relabel.processes import parent_pid

    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and parent_pid(int(p)) == os.getpid())


def test_dropped_loaders_release_their_threads(tiny_set):
    before = _our_threads()
    for make in _loaders(tiny_set, DataConfig(**SMALL)) * 4:
        loader = make()
        for _ in loader:
            pass
        del loader
        gc.collect()
    assert _threads_settle(before) == [], "dropped loaders left their threads running"


_MEMORY_PROBE = """
import ctypes, gc, os, sys
from dali_relabel.config import DataConfig
from dali_relabel.loader import ReLabelLoader, ValidationLoader

images, store = sys.argv[1:3]
config = DataConfig(num_threads=1)
trim = ctypes.CDLL("libc.so.6").malloc_trim


def rss_mb():
    gc.collect()
    trim(0)  # hand freed heap back, so that what remains is what is still held
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def drop_one():
    for make in (lambda: ReLabelLoader(images, store, 8, config=config, device="cpu"),
                 lambda: ValidationLoader(images, 8, config=config, device="cpu")):
        loader = make()
        for _ in loader:
            pass
        del loader
        gc.collect()


for _ in range(2):  # warm-up: the plugin, DALI's and the allocator's first allocations
    drop_one()
start = rss_mb()
for _ in range(8):
    drop_one()
print(rss_mb() - start)
"""


def test_dropped_loaders_release_their_memory(tiny_set):
    """12 dropped training loaders at the default image size grew the process by 146 MB (627 -> 773):
    each left a thread that kept a heap arena of DALI's outputs. Measured in a fresh interpreter with
    freed heap trimmed (inside the suite, other tests' garbage moved the figure by 60 MB); the bound
    leaves room for the allocator's noise (about 10 MB), not for a per-loader leak."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, tiny_set.images, tiny_set.store],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    grown = float(done.stdout.split()[-1])
    assert grown < 40, f"the process grew by {grown:.0f} MB over 16 dropped loaders"


def test_dropped_loader_stops_its_source_workers(tiny_set):
    from dali_relabel.loader import ReLabelLoader
    from dali_relabel.watchdog import source_workers

    before = _our_threads()
    loader = ReLabelLoader(tiny_set.images, tiny_set.store, 8, config=DataConfig(**SMALL, py_num_workers=1),
                           device="cpu")
    next(iter(loader))  # a pass left running
    workers = [p.pid for p in source_workers(loader.pipeline)]
    assert workers and set(workers) <= set(_children())
    del loader
    gc.collect()
    deadline = time.monotonic() + 20
    while set(workers) & set(_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(workers) & set(_children()), "the dropped loader's source workers still run"
    assert _threads_settle(before) == []


@pytest.mark.parametrize("kind", ["train", "validation"])
def test_a_with_block_closes_the_loader(tiny_set, kind):
    before = _our_threads()
    make = _loaders(tiny_set, DataConfig(**SMALL))[kind == "validation"]
    with make() as loader:
        assert next(iter(loader))[0].shape[0] == 8
    assert loader.pipeline is None, "leaving the with block did not close the loader"
    assert _threads_settle(before) == []  # without any garbage collection
    with loader:  # a closed loader starts a new pipeline for its next pass
        assert len(list(loader)) == 3
    assert _threads_settle(before) == []


def _use_in_child(loader, iterator, connection):
    started = time.monotonic()
    try:
        next(iterator if iterator is not None else iter(loader))
        connection.send(("no error", time.monotonic() - started))
    except BaseException as error:  # reported to the parent
        connection.send((f"{type(error).__name__}: {error}", time.monotonic() - started))
    finally:
        connection.close()


@pytest.mark.parametrize("when", ["new pass", "running pass"])
def test_a_forked_child_using_the_parents_loader_is_told_at_once(tiny_set, when):
    """Before: the child waited for the parent's pipeline thread (which a fork does not copy) until the
    worker timeout, then blamed the pipeline."""
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(**SMALL, worker_timeout=30)
    with ReLabelLoader(tiny_set.images, tiny_set.store, 8, config=config, device="cpu") as loader:
        iterator = None
        if when == "running pass":
            iterator = iter(loader)
            next(iterator)
        receive, send = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_use_in_child, args=(loader, iterator, send))
        child.start()
        send.close()
        try:
            assert receive.poll(20), "the child got no answer within 20 s"
            message, seconds = receive.recv()
        finally:
            child.kill()
            child.join()
        assert f"built in process {os.getpid()}" in message and "must build its own loader" in message, message
        assert seconds < 5
        # the parent's loader goes on
        assert next(iterator if iterator is not None else iter(loader))[0].shape[0] == 8


def test_a_forked_child_using_the_parents_shard_loader_is_told_at_once(tiny_set, tmp_path):
    from dali_relabel.shard_loader import ShardReLabelLoader
    from dali_relabel.shards import write_shards

    shards = write_shards(tiny_set.images, tiny_set.store, tmp_path / "shards", shard_bytes=20_000, progress=False)
    with ShardReLabelLoader(shards, 8, config=DataConfig(**SMALL), device="cpu") as loader:
        receive, send = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_use_in_child, args=(loader, None, send))
        child.start()
        send.close()
        try:
            assert receive.poll(20), "the child got no answer within 20 s"
            message, _ = receive.recv()
        finally:
            child.kill()
            child.join()
        assert f"built in process {os.getpid()}" in message, message
        assert next(iter(loader))[0].shape[0] == 8
