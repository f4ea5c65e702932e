"""ImageNet-scale start-up and memory: what each rank pays before its first batch, at 1.28M images.

Generates (once, cached in ``--data-dir``) a full-size store (1,281,167 rows, top-5 15x15 maps over
1,000 classes, ~5.9 GB) and an image tree of as many files (hard links to one small JPEG, so the tree
costs inodes, not disk), then measures, each in a fresh process:

* ``dali-relabel --help`` (start-up of the command line);
* opening the store (``LabelStore``, default verification), page cache dropped ("cold") and warm;
* ``dali-relabel info`` and ``info --verify``;
* building a ``ReLabelLoader`` (batch 256, CPU; imports not timed): the first time (the tree is listed
  once and the result remembered), then cold and warm; the parent's memory, and each source worker's
  private memory after it served 20 batches.

"Cold" drops the store's pages from the page cache (``posix_fadvise(DONTNEED)``; with ``--drop-caches``
and root, all caches via ``/proc/sys/vm/drop_caches``). Run from the repository root::

    python -m benchmarks.scale                  # full size (first run generates ~6 GB, minutes)
    python -m benchmarks.scale --rows 128000    # smaller

Results: ``benchmarks/results/scale-<date>.json`` and ``latest-scale.md``.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

IMAGENET_ROWS = 1_281_167
CLASSES = 1000

# Measured on the code before issue #15 (same 2-core VM, same sizes), from the text.
BEFORE = {
    "loader_construction_cold_s": 122.0, "loader_construction_warm_s": 16.0,
    "store_open_cold_s": 115.0, "store_open_warm_s": 4.9, "info_cold_s": 116.0,
    "worker_private_mb": 229.0, "help_s": 1.45, "spawn_pickle_mb": 43.0,
}


def _log(message: str) -> None:
    print(message, flush=True)


def _class_name(c: int) -> str:
    return f"n{c:08d}"


def relpaths(rows: int):
    """ImageNet-like names, sorted the way ``list_images`` orders them."""
    per_class = -(-rows // CLASSES)
    paths = [f"{_class_name(c)}/{_class_name(c)}_{i:06d}.JPEG" for c in range(CLASSES) for i in range(per_class)]
    return paths[:rows]


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _written_by_older_writer(store_path: str) -> bool:
    """Whether a cached store has another format version or hash-block size than the writer's now."""
    import h5py

    from dali_relabel.store import FORMAT_VERSION
    from dali_relabel.store.format import HASH_CHUNK_ROWS

    with h5py.File(store_path, "r") as f:
        return (int(f.attrs.get("format_version", 0)) != FORMAT_VERSION
                or int(f.attrs.get("hash_chunk_rows", 0)) != HASH_CHUNK_ROWS)


def prepare(data_dir: str, rows: int, chunk: int = 16384) -> tuple:
    """``(image_root, store_path)`` of the generated set (reused when present)."""
    from tqdm import tqdm

    from dali_relabel.store import StoreWriter

    root = os.path.join(data_dir, f"scale-r{rows}-c{CLASSES}-v1")
    image_root, store_path = os.path.join(root, "images"), os.path.join(root, "store.h5")
    paths = relpaths(rows)
    done_tree = os.path.join(root, "tree.done")
    if not os.path.exists(done_tree):
        originals = os.path.join(root, "originals")  # one per class: file systems cap links per inode
        os.makedirs(originals, exist_ok=True)
        data = _jpeg()
        for c in range(CLASSES):
            os.makedirs(os.path.join(image_root, _class_name(c)), exist_ok=True)
            with open(os.path.join(originals, _class_name(c) + ".JPEG"), "wb") as f:
                f.write(data)
        for path in tqdm(paths, desc="tree (hard links)", unit="file", mininterval=2):
            target = os.path.join(image_root, path)
            if not os.path.exists(target):
                os.link(os.path.join(originals, path.split("/")[0] + ".JPEG"), target)
        open(done_tree, "w").close()
    if os.path.exists(store_path) and _written_by_older_writer(store_path):
        os.remove(store_path)  # measure the store the current writer makes
    if not os.path.exists(store_path):
        writer = StoreWriter(store_path, paths, CLASSES, 5, 15, 15, layout="WH",
                             class_names=[_class_name(c) for c in range(CLASSES)], source="benchmark",
                             teacher="random")
        labels = np.array([int(p[1:9]) for p in paths], np.int32)
        bar = tqdm(total=rows, initial=writer.rows_written, desc="store", unit="row", mininterval=2)
        try:
            for start in range(writer.rows_written, rows, chunk):
                n = min(chunk, rows - start)
                rng = np.random.default_rng([1, start])
                logits = -np.sort(-rng.normal(2.0, 3.0, size=(n, 5, 15, 15)), axis=1).astype(np.float16)
                base = rng.integers(0, CLASSES, size=(n, 1, 15, 15))
                step = rng.integers(1, CLASSES // 5, size=(n, 1, 15, 15))
                ids = (base + step * np.arange(5).reshape(1, 5, 1, 1)) % CLASSES  # distinct per cell
                writer.write(start, logits, ids, labels[start:start + n], np.tile([375, 500], (n, 1)))
                bar.update(n)
            writer.finish()
        except BaseException:
            writer.close()
            raise
        finally:
            bar.close()
    return image_root, store_path


def _drop(path: str, everything: bool) -> None:
    if everything:
        try:
            subprocess.run(["sync"], check=False)
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _probe(args: list, timeout: int = 1800) -> dict:
    """Run ``python -m benchmarks.scale --probe ...`` in a fresh process; its JSON result."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--probe"] + args, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"probe {args} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_mb(pid: int, field: str) -> float:
    """A ``/proc/<pid>/smaps_rollup`` field in MB. ``Private_Dirty`` is the memory only this process
    holds; ``Private_Clean`` is mostly file pages (libraries, the store) only it has touched, which
    the page cache shares and can drop."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list:
    from dali_relabel.outputs import _parent_pid

    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _parent_pid(int(entry)) == pid]


def run_probe(kind: str, image_root: str, store_path: str) -> dict:
    """One measurement in this (fresh) process (imports are not timed: every script pays them)."""
    if kind == "open":
        from dali_relabel.store import LabelStore

        started = time.perf_counter()
        store = LabelStore(store_path)
        return {"seconds": time.perf_counter() - started, "rss_mb": _rss_mb(os.getpid()), "rows": len(store)}
    if kind == "loader":
        from dali_relabel.config import DataConfig
        from dali_relabel.loader import ReLabelLoader

        config = DataConfig(image_size=32, num_threads=2, py_num_workers=1)
        started = time.perf_counter()
        loader = ReLabelLoader(image_root, store_path, batch_size=256, config=config, device="cpu")
        built = time.perf_counter() - started
        parent_rss = _rss_mb(os.getpid())
        batches = iter(loader)
        for _ in range(20):
            next(batches)
        workers = _children(os.getpid())
        import pickle

        pickled = len(pickle.dumps(loader.source))
        return {"seconds": built, "parent_rss_mb": parent_rss,
                "worker_private_mb": [_memory_mb(pid, "Private_Dirty") for pid in workers],
                "worker_private_clean_mb": [_memory_mb(pid, "Private_Clean") for pid in workers],
                "spawn_pickle_bytes": pickled, "parent_private_mb": _memory_mb(os.getpid(), "Private_Dirty")}
    raise ValueError(kind)


def _timed(command: list, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args) -> dict:
    image_root, store_path = prepare(args.data_dir, args.rows)
    cli = [sys.executable, "-m", "dali_relabel.tools.cli"]
    result = {"benchmark": "scale", "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "rows": args.rows, "store_bytes": os.path.getsize(store_path),
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                          "load_average": list(os.getloadavg())},
              "before": BEFORE if args.rows == IMAGENET_ROWS else None, "after": {}}
    after = result["after"]
    _log("dali-relabel --help ...")
    after["help_s"] = _timed(cli + ["--help"])
    probe_args = ["--image-root", image_root, "--store", store_path]
    _log("store open, cold and warm ...")
    _drop(store_path, args.drop_caches)
    after["store_open_cold_s"] = _probe(["open"] + probe_args)["seconds"]
    after["store_open_warm_s"] = statistics.median(_probe(["open"] + probe_args)["seconds"] for _ in range(3))
    _log("dali-relabel info / info --verify ...")
    _drop(store_path, args.drop_caches)
    after["info_cold_s"] = _timed(cli + ["info", store_path], repeats=1)
    after["info_warm_s"] = _timed(cli + ["info", store_path], repeats=3)
    _drop(store_path, args.drop_caches)
    after["info_verify_cold_s"] = _timed(cli + ["info", store_path, "--verify"], repeats=1)
    _log("loader construction: first (lists the tree once), cold, warm ...")
    cache = os.path.join(args.data_dir, "xdg-cache")
    os.environ["XDG_CACHE_HOME"] = cache  # a private cache: the first construction really lists
    subprocess.run(["rm", "-rf", os.path.join(cache, "dali_relabel", "tree-checks")], check=False)
    plugin = os.path.join(os.path.expanduser("~"), ".cache", "dali_relabel", "plugin")
    if os.path.isdir(plugin) and not os.path.exists(os.path.join(cache, "dali_relabel", "plugin")):
        os.makedirs(os.path.join(cache, "dali_relabel"), exist_ok=True)
        os.symlink(plugin, os.path.join(cache, "dali_relabel", "plugin"))  # reuse the built plugin
    first = _probe(["loader"] + probe_args)
    after["loader_construction_first_s"] = first["seconds"]
    _drop(store_path, args.drop_caches)
    cold = _probe(["loader"] + probe_args)
    after["loader_construction_cold_s"] = cold["seconds"]
    warm = [_probe(["loader"] + probe_args) for _ in range(3)]
    after["loader_construction_warm_s"] = statistics.median(w["seconds"] for w in warm)
    after["parent_rss_mb"] = warm[0]["parent_rss_mb"]
    after["parent_private_mb"] = warm[0]["parent_private_mb"]
    after["worker_private_mb"] = max(max(w["worker_private_mb"] or [0]) for w in warm)
    after["worker_private_clean_mb"] = max(max(w["worker_private_clean_mb"] or [0]) for w in warm)
    after["spawn_pickle_mb"] = warm[0]["spawn_pickle_bytes"] / 2**20
    result["load_average_end"] = list(os.getloadavg())
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"scale-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(os.path.join(args.out_dir, "latest-scale.md"), "w") as f:
        f.write(table)
    print(table)
    return result


ROWS = [("loader construction, first ever (lists the tree once)", "loader_construction_first_s", "s"),
        ("loader construction, cold", "loader_construction_cold_s", "s"),
        ("loader construction, warm", "loader_construction_warm_s", "s"),
        ("store open, cold", "store_open_cold_s", "s"), ("store open, warm", "store_open_warm_s", "s"),
        ("dali-relabel info, cold", "info_cold_s", "s"), ("dali-relabel info, warm", "info_warm_s", "s"),
        ("dali-relabel info --verify, cold", "info_verify_cold_s", "s"),
        ("source worker private memory (Private_Dirty, after 20 batches)", "worker_private_mb", "MB"),
        ("source worker file pages only it touched (Private_Clean: page cache)", "worker_private_clean_mb", "MB"),
        ("main process RSS after construction", "parent_rss_mb", "MB"),
        ("source pickled into a spawned worker", "spawn_pickle_mb", "MB"),
        ("dali-relabel --help", "help_s", "s")]


def markdown(result: dict) -> str:
    before, after = result.get("before") or {}, result["after"]
    lines = [f"# Start-up and memory at {result['rows']:,} rows, {result['created'][:10]}", "",
             f"Store {result['store_bytes'] / 1e9:.2f} GB; {result['machine']['cores']} cores; load average at "
             f"start {', '.join(f'{x:.2f}' for x in result['machine']['load_average'])}.", "",
             "| what | before (issue #15) | after |", "|---|---:|---:|"]
    for label, key, unit in ROWS:
        old = f"{before[key]:,.2f} {unit}" if key in before else "-"
        new = f"{after[key]:,.2f} {unit}" if key in after else "-"
        lines.append(f"| {label} | {old} | {new} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=IMAGENET_ROWS)
    parser.add_argument("--data-dir", default=os.path.join("benchmarks", ".data"))
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--drop-caches", action="store_true",
                        help="cold = all caches dropped (root; /proc/sys/vm/drop_caches) instead of the store's pages")
    parser.add_argument("--probe", choices=["open", "loader"], help=argparse.SUPPRESS)
    parser.add_argument("--image-root", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(run_probe(args.probe, args.image_root, args.store)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
