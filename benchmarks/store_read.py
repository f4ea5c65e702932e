"""Store-read suite: a random batch of label maps from the HDF5 store vs ``torch.load`` of as many
per-image ``.pt`` files (the authors' release format).

    python -m benchmarks.store_read                     # 32,768-row store, batches of 256, 5 repeats

The suite writes a store of ``--rows`` random maps in chunks, and ``.pt`` files only for the rows
the ``.pt`` measurements read. Every measurement reads a batch of ``--batch-size`` rows no other
measurement reads. Methods, alternating (who goes first rotates): ``pt-files`` (``torch.load`` of each
file + ``torch.stack``), ``store-sorted`` and ``store-unsorted`` (``LabelStore.read`` of the rows in
sorted / random order). Both page-cache states: ``page-cached``, and ``evicted`` (the files' pages
dropped with ``posix_fadvise(DONTNEED)`` before each measurement, the store reopened). Writes
``store-read-<date>.json`` / ``.png`` and ``latest-store-read.md``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np

from .common import BenchError, add_folder_arguments, log, main_for, positive_int
from .data import DATA_VERSION, class_name, open_store, random_topk_maps, write_release_map
from .report import finish, header_lines, new_result, pyplot, save_figure, summary, warning_lines, write_outputs


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=positive_int, default=32768, help="rows of the generated store")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="rows per measurement")
    parser.add_argument("--repeats", type=positive_int, default=5, help="measurements per method and cache state")
    parser.add_argument("--classes", type=positive_int, default=1000)
    add_folder_arguments(parser)


STORE_METHODS = ("pt-files", "store-sorted", "store-unsorted")


def _evict(path: str) -> bool:
    """Drop ``path``'s pages from the page cache (``posix_fadvise DONTNEED``); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_store_rows(rows: int, batch: int, repeats: int) -> None:
    needed = 2 * len(STORE_METHODS) * repeats * batch + 1
    if rows < needed:
        raise BenchError(f"--rows {rows} is too small: {repeats} repeats x {len(STORE_METHODS)} methods "
                         f"x 2 cache modes x {batch} rows (+ row 0) need {needed} distinct rows")


def prepare_store_read(data_dir: str, rows: int, batch: int, repeats: int, num_classes: int = 1000,
                       seed: int = 0, k: int = 5, grid: int = 15, chunk_rows: int = 4096,
                       log: Callable[[str], None] = log):
    """A store of ``rows`` random maps (written in chunks) and ``.pt`` files for the rows that
    the ``pt-files`` measurements read; returns ``(root, store_path, row_sets)`` where
    ``row_sets[cache][method][repeat]`` is a batch of distinct rows no other measurement reads."""
    from dali_relabel.store import StoreWriter

    _check_store_rows(rows, batch, repeats)
    root = os.path.join(data_dir, f"store-read-r{rows}-c{num_classes}-k{k}-g{grid}-s{seed}-v{DATA_VERSION}")
    store_path = os.path.join(root, "store.h5")
    maps_dir = os.path.join(root, "maps")
    permutation = np.random.default_rng([seed, 2]).permutation(rows - 1) + 1  # row 0 is read untimed
    row_sets, start = {}, 0
    for cache in ("page-cached", "evicted"):
        row_sets[cache] = {}
        for method in STORE_METHODS:
            row_sets[cache][method] = []
            for _ in range(repeats):
                row_sets[cache][method].append(permutation[start:start + batch])
                start += batch
    pt_rows = sorted({int(r) for cache in row_sets for rs in row_sets[cache]["pt-files"] for r in rs})
    marker = os.path.join(root, f"pt-b{batch}-r{repeats}.done")
    if not os.path.exists(store_path):
        log(f"writing a {rows}-row store in chunks of {chunk_rows} rows -> {store_path}")
        os.makedirs(root, exist_ok=True)
        paths = [f"{class_name(r % num_classes)}/{class_name(r % num_classes)}_{r:07d}.JPEG" for r in range(rows)]
        writer = StoreWriter(store_path, paths, num_classes, k, grid, grid, layout="WH",
                             class_names=[class_name(c) for c in range(num_classes)], source="benchmark",
                             teacher="random", resume=False)
        try:
            for begin in range(0, rows, chunk_rows):
                count = min(chunk_rows, rows - begin)
                logits, ids = random_topk_maps(np.random.default_rng([seed, 3, begin]), count, k, grid, grid,
                                               num_classes)
                writer.write(begin, logits, ids, np.arange(begin, begin + count) % num_classes,
                             np.tile([375, 500], (count, 1)))
            writer.finish()
        except BaseException:
            writer.close()
            raise
        _fsync(store_path)
    if not os.path.exists(marker):
        log(f"writing {len(pt_rows)} per-image .pt files (authors' format) -> {maps_dir}")
        with open_store(store_path) as store:
            maps = store.read(pt_rows)
            for i, row in enumerate(pt_rows):
                path = os.path.join(maps_dir, f"{row:07d}.pt")
                write_release_map(path, maps.logits[i], maps.class_ids[i])
                _fsync(path)
        open(marker, "w").close()
    return root, store_path, maps_dir, row_sets


def run(args) -> dict:
    """Random batches from the HDF5 store vs ``torch.load`` of per-image ``.pt`` files; returns the
    written result."""
    import gc

    import torch

    rows, batch, repeats = args.rows, args.batch_size, args.repeats
    _check_store_rows(rows, batch, repeats)
    result = new_result("store-read", args)  # the machine's load before anything is generated
    torch.set_num_threads(1)
    root, store_path, maps_dir, row_sets = prepare_store_read(args.data_dir, rows, batch, repeats,
                                                             num_classes=args.classes, seed=args.seed)
    result.update(store={"path": store_path, "rows": rows, "file_bytes": os.path.getsize(store_path),
                         "bytes_per_image": os.path.getsize(store_path) / rows},
                  batch_size=batch, results={}, ratios={})
    pt_sizes = [os.path.getsize(os.path.join(maps_dir, f)) for f in os.listdir(maps_dir)[:256]]
    result["pt_bytes_per_image"] = float(np.mean(pt_sizes))

    def load_pt(batch_rows):
        tensors = [torch.load(os.path.join(maps_dir, f"{int(r):07d}.pt"), map_location="cpu", weights_only=True)
                   for r in batch_rows]
        return torch.stack(tensors)

    store = open_store(store_path)
    store.read([0])
    evict_ok = True
    times = {cache: {m: [] for m in STORE_METHODS} for cache in row_sets}
    for cache in ("page-cached", "evicted"):
        for repeat in range(repeats):
            methods = STORE_METHODS[repeat % 3:] + STORE_METHODS[:repeat % 3]  # rotate who goes first
            for method in methods:
                batch_rows = row_sets[cache][method][repeat]
                if method == "store-sorted":
                    batch_rows = np.sort(batch_rows)
                if cache == "evicted":
                    if method == "pt-files":
                        for r in batch_rows:
                            evict_ok &= _evict(os.path.join(maps_dir, f"{int(r):07d}.pt"))
                    else:
                        store.close()
                        gc.collect()
                        evict_ok &= _evict(store_path)
                        store = open_store(store_path)
                        store.read([0])  # opens and maps the file; row 0 is never timed
                start = time.perf_counter()
                if method == "pt-files":
                    out = load_pt(batch_rows)
                    assert out.shape[0] == len(batch_rows)
                else:
                    maps = store.read(batch_rows)
                    assert len(maps.logits) == len(batch_rows)
                times[cache][method].append(1e3 * (time.perf_counter() - start))
        for method in STORE_METHODS:
            result["results"].setdefault(cache, {})[method] = dict(summary(times[cache][method]), unit="ms")
        pt = result["results"][cache]["pt-files"]["median"]
        result["ratios"][cache] = {
            "pt_over_store_sorted": pt / result["results"][cache]["store-sorted"]["median"],
            "pt_over_store_unsorted": pt / result["results"][cache]["store-unsorted"]["median"]}
        log(f"{cache}: " + ", ".join(f"{m} {result['results'][cache][m]['median']:.2f} ms" for m in STORE_METHODS))
    store.close()
    result["evicted_with_posix_fadvise"] = evict_ok
    result["notes"] = ("every measurement reads a batch of rows no other measurement reads; "
                       "'evicted' drops the file pages with posix_fadvise(DONTNEED) before each measurement "
                       "(works only for clean, unmapped pages); pt-files = torch.load of each file + torch.stack")
    spreads = {f"{c} {m}": e["spread_pct"] for c, ms in result["results"].items() for m, e in ms.items()
               if e["median"] >= 10.0}  # sub-10-ms timings jitter by nature
    finish(result, spreads, spread_limit=50.0)
    return write_outputs(result, args.out_dir, "store-read", plot, markdown)


def markdown(result: dict) -> str:
    lines = header_lines(result, "Store read vs per-image .pt files")
    lines += [f"Batch of {result['batch_size']} random rows from a {result['store']['rows']}-row store "
              f"({result['store']['bytes_per_image']:.0f} bytes/image) vs torch.load of "
              f"{result['batch_size']} .pt files ({result['pt_bytes_per_image']:.0f} bytes/image), "
              f"{result['arguments'].get('repeats')} repeats, different rows every time.", "",
              "| page cache | .pt files ms | store sorted ms | store unsorted ms | .pt / sorted | .pt / unsorted |",
              "|---|---:|---:|---:|---:|---:|"]
    for cache, methods in result["results"].items():
        ratio = result["ratios"][cache]
        lines.append(f"| {cache} | {methods['pt-files']['median']:.2f} | {methods['store-sorted']['median']:.2f} | "
                     f"{methods['store-unsorted']['median']:.2f} | {ratio['pt_over_store_sorted']:.1f}x | "
                     f"{ratio['pt_over_store_unsorted']:.1f}x |")
    lines += [""] + warning_lines(result)
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    caches = list(result["results"])
    x = np.arange(len(caches))
    for i, method in enumerate(STORE_METHODS):
        med = [result["results"][c][method]["median"] for c in caches]
        err = [[result["results"][c][method]["median"] - result["results"][c][method]["min"] for c in caches],
               [result["results"][c][method]["max"] - result["results"][c][method]["median"] for c in caches]]
        ax.bar(x + (i - 1) * 0.27, med, 0.27, yerr=err, capsize=4, label=method)
    ax.set_xticks(x)
    ax.set_xticklabels(caches)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per batch of {result['batch_size']} (median)")
    ax.set_title("label maps: HDF5 store vs per-image .pt")
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> int:
    return main_for(__doc__, add_arguments, run, argv, prog="python -m benchmarks.store_read")


if __name__ == "__main__":
    sys.exit(main())
