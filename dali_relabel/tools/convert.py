"""Convert the ReLabel authors' released label maps (one ``.pt`` per image) into one HDF5 store.

The release holds ``<maps>/<wnid>/<image stem>.pt``, each a tensor ``[2, k, H, W]`` (index 0: top-k
logits, index 1: class ids stored as floats). The converter walks the ImageFolder image tree, pairs
every image with its map, loads the maps in parallel and streams them into a store marked with the
authors' box convention (layout ``"WH"``, see ``docs/store_format.md``). Token Labeling's release
(``release_format="token-labeling"``) holds the same tensors under its own file names and grid
orientation (:mod:`.release_formats`). An interrupted run leaves only ``<out>.partial``; running the
same command again resumes it.

One conversion per output: ``<out>.lock`` is held from before the loading processes start until the
store is published (a second run is refused, naming the first). The loading processes die with the
main process (``PR_SET_PDEATHSIG``) and are started while the partial file is closed, so none of them
holds it open (or its HDF5 lock) after a crash.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..imagefolder import ImageList, list_images
from ..outputs import OutputLock
from ..processes import die_with_parent
from ..store import StoreWriter
from .release_formats import (RELEASE_TEACHER, RELEASE_TEACHER_SIZE, ConversionError,  # noqa: F401
                              check_class_id_precision, format_by_name, map_relpaths, relabel_map_relpath)


@dataclass
class ConversionReport:
    """What a conversion found and wrote."""

    rows: int = 0
    images_without_map: List[str] = field(default_factory=list)
    maps_without_image: List[str] = field(default_factory=list)
    unreadable_image_headers: List[str] = field(default_factory=list)
    files_with_more_crops: List[str] = field(default_factory=list)  #: FKD files of which the first R were kept
    resumed_from_row: int = 0
    out: str = ""

    def summary(self) -> str:
        lines = [f"wrote {self.rows} rows to {self.out}"]
        if self.resumed_from_row:
            lines.append(f"resumed an interrupted conversion at row {self.resumed_from_row}")
        for name, items in (("images without a map (skipped)", self.images_without_map),
                            ("maps without an image (ignored)", self.maps_without_image),
                            ("images whose size could not be read", self.unreadable_image_headers),
                            ("label files with more stored crops than kept (the first kept)",
                             self.files_with_more_crops)):
            if items:
                lines.append(f"{len(items)} {name}, first: {items[0]}")
        return "\n".join(lines)


map_relpath = relabel_map_relpath


def list_map_files(maps_dir, suffix: str = ".pt") -> List[str]:
    """Relative paths of all files ending in ``suffix`` below ``maps_dir``."""
    found = []
    for dirpath, _, filenames in os.walk(maps_dir):
        for name in filenames:
            if name.endswith(suffix):
                found.append(os.path.relpath(os.path.join(dirpath, name), maps_dir).replace(os.sep, "/"))
    return sorted(found)


def load_release_map(path: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Load one release file ``[2, k, H, W]`` as ``(logits float32, class_ids int64)``, checked."""
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise ConversionError(f"{path}: cannot be loaded as a tensor ({type(error).__name__}: {error})")
    if not torch.is_tensor(tensor) or tensor.dim() != 4 or tensor.shape[0] != 2:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ConversionError(f"{path}: expected a tensor [2, k, H, W], found {shape}")
    check_class_id_precision(tensor, num_classes, path)
    array = tensor.float().numpy()
    logits, ids = array[0], array[1]
    if not np.isfinite(logits).all():
        raise ConversionError(f"{path}: holds non-finite logits")
    if np.abs(logits).max() > np.finfo(np.float16).max:
        raise ConversionError(f"{path}: logit {float(np.abs(logits).max()):g} exceeds the float16 range "
                              "of the store")
    if not (np.isfinite(ids).all() and (ids == np.round(ids)).all()):
        raise ConversionError(f"{path}: class ids are not whole numbers")
    ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= num_classes:
        raise ConversionError(f"{path}: class id {int(ids.max() if ids.max() >= num_classes else ids.min())}"
                              f" is outside [0, {num_classes})")
    return logits, ids


def image_size(path: str) -> Optional[Tuple[int, int]]:
    """(height, width) from the image header, or ``None`` if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
        return height, width
    except Exception:
        return None


def _load_chunk(task):
    map_paths, image_paths, num_classes, shape = task
    logits, ids, sizes, unreadable = [], [], [], []
    for map_path, image_path in zip(map_paths, image_paths):
        lg, ci = load_release_map(map_path, num_classes)
        if shape is not None and lg.shape != shape:
            raise ConversionError(f"{map_path}: map shape {lg.shape} differs from the first map's {shape}")
        logits.append(lg)
        ids.append(ci)
        size = image_size(image_path)
        if size is None:
            unreadable.append(image_path)
            size = (0, 0)
        sizes.append(size)
    return np.stack(logits), np.stack(ids), np.asarray(sizes, dtype=np.int32), unreadable


def _init_worker(parent_pid: int):
    die_with_parent(parent_pid)  # a killed converter leaves no loader behind (holding its lock)
    import torch

    torch.set_num_threads(1)


def pair_images_with_maps(images: ImageList, maps_dir: str, allow_missing: bool, report: ConversionReport,
                          relpath_of: Callable[[str], str] = map_relpath, suffix: str = ".pt") -> List[int]:
    """Indices of the images that have a label file (``relpath_of(image relpath)`` below ``maps_dir``;
    files found are those ending in ``suffix``); fills the report; raises unless ``allow_missing``."""
    available = set(list_map_files(maps_dir, suffix))
    wanted = [relpath_of(p) for p in images.relpaths]
    keep = [i for i, m in enumerate(wanted) if m in available]
    report.images_without_map = [images.relpaths[i] for i, m in enumerate(wanted) if m not in available]
    report.maps_without_image = sorted(available - set(wanted))
    problems = []
    if report.images_without_map:
        problems.append(f"{len(report.images_without_map)} images have no map "
                        f"(first: {report.images_without_map[0]})")
    if report.maps_without_image:
        problems.append(f"{len(report.maps_without_image)} maps have no image "
                        f"(first: {report.maps_without_image[0]})")
    if problems and not allow_missing:
        raise ConversionError("; ".join(problems) + ". Check --maps and --images point at the same "
                              "image set, or pass --allow-missing to skip them.")
    if not keep:
        raise ConversionError(f"no image under {images.root} has a map under {maps_dir}")
    return keep


def convert_release(maps_dir, image_root, out, num_classes: int = 1000,
                    class_names: Optional[Sequence[str]] = None, allow_missing: bool = False,
                    workers: Optional[int] = None, chunk_rows: int = 256, restart: bool = False,
                    progress: bool = True, release_format: str = "relabel") -> ConversionReport:
    """Convert a release directory into the store ``out``.

    Args:
        maps_dir: root of the release (``<wnid>/<stem>.pt``).
        image_root: the ImageFolder tree the maps belong to.
        out: path of the store to write.
        num_classes: class ids must lie in ``[0, num_classes)``.
        class_names: names in class-id order; defaults to the sorted class folders, which must then
            number ``num_classes``.
        allow_missing: skip images without a map and ignore maps without an image (counted in the
            report) instead of failing.
        workers: processes loading maps (default: all cores).
        chunk_rows: rows per work item and per write.
        restart: discard an interrupted ``<out>.partial`` instead of resuming it.
        progress: show a progress bar.
        release_format: ``"relabel"`` or ``"token-labeling"``: the files' naming, and the layout and
            teacher the store records (:mod:`.release_formats`).

    Raises :class:`~dali_relabel.outputs.OutputBusyError` when another process writes ``out`` (or
    holds its partial file open), :class:`~dali_relabel.store.StoreError` for a partial file that
    cannot be opened (kept; remove it or pass ``restart``).
    """
    maps_dir, out = os.fspath(maps_dir), os.fspath(out)
    fmt = format_by_name(release_format)
    images = list_image_set(image_root, class_names, num_classes)
    report = ConversionReport(out=out)
    named = map_relpaths(fmt, images.relpaths)  # refuses two images named to one file
    keep = pair_images_with_maps(images, maps_dir, allow_missing, report, relpath_of=fmt.map_relpath)
    relpaths, map_paths = [images.relpaths[i] for i in keep], [os.path.join(maps_dir, named[i]) for i in keep]
    labels = np.asarray([images.labels[i] for i in keep], dtype=np.int32)
    first_logits, _ = load_release_map(map_paths[0], num_classes)
    k, grid_h, grid_w = first_logits.shape
    fmt.check_shape(map_paths[0], k, grid_h, grid_w)
    with OutputLock(out) as lock:
        writer = StoreWriter(out, relpaths, num_classes, k, grid_h, grid_w, layout=fmt.layout,
                             class_names=images.classes, teacher=fmt.teacher,
                             teacher_input_size=fmt.teacher_input_size, source=fmt.source,
                             resume=not restart, plan_salt=os.path.abspath(maps_dir), lock=lock)
        writer.close()  # reopened once the loaders run: no forked loader may inherit the open file
        start = report.resumed_from_row = writer.rows_written
        tasks = chunk_tasks(relpaths, start, chunk_rows, maps_dir, fmt.map_relpath, images.root, num_classes,
                            (k, grid_h, grid_w))

        def write(row, loaded) -> int:
            logits, ids, sizes, unreadable = loaded
            writer.write(row, logits, ids, labels[row:row + len(logits)], sizes)
            report.unreadable_image_headers.extend(unreadable)
            return len(logits)

        write_in_parallel(writer, _load_chunk, tasks, write, start, len(relpaths), workers, progress, "map")
    report.rows = len(relpaths)
    return report


def write_in_parallel(writer, load: Callable, tasks: Iterable, write: Callable, start: int, total: int,
                      workers: Optional[int], progress: bool, unit: str) -> None:
    """Run ``load`` over ``tasks`` in worker processes and hand each result, in order, to
    ``write(row, result)`` (which returns the rows it wrote), then publish ``writer``.

    ``writer`` is closed when called (the workers must not inherit the open file) and reopened once
    they run; on any error or interruption it is closed again, leaving its partial file to resume.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit=unit, desc="convert", disable=not progress)
    try:
        # fork: every loader starts at the first submit (with the lock held, the store closed).
        # The loaders inherit this process's objects. Garbage in reference cycles (a DALI pipeline
        # an earlier caller dropped) would be collected inside a loader, and tearing a pipeline
        # down there hangs or kills it (BrokenProcessPool). Frozen objects are never collected,
        # so everything is frozen while they fork.
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                 mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker, initargs=(os.getpid(),)) as pool:
            gc.freeze()
            try:
                pool.submit(int).result()
            finally:
                gc.unfreeze()
            writer.reopen()
            row = start
            for result in pool.map(load, tasks):
                written = write(row, result)
                row += written
                bar.update(written)
        writer.finish()
    except BaseException:
        writer.close()  # the partial file stays; rerunning the command resumes it
        raise
    finally:
        bar.close()


def list_image_set(image_root, class_names: Optional[Sequence[str]], num_classes: int) -> ImageList:
    """The ImageFolder tree at ``image_root``, which must hold ``num_classes`` classes."""
    images = list_images(image_root, classes=class_names)
    if len(images.classes) != num_classes:
        raise ConversionError(f"{image_root} has {len(images.classes)} class folders but num_classes is "
                              f"{num_classes}; pass the {num_classes} class names in class-id order "
                              "(--class-names FILE)")
    return images


def chunk_tasks(relpaths: Sequence[str], start: int, chunk_rows: int, label_dir: str,
                relpath_of: Callable[[str], str], image_root: str, *settings) -> list:
    """Work items of rows ``start ..`` in chunks of ``chunk_rows``: ``(label files, image files,
    *settings)`` each."""
    tasks = []
    for begin in range(start, len(relpaths), chunk_rows):
        part = relpaths[begin:begin + chunk_rows]
        tasks.append(([os.path.join(label_dir, relpath_of(p)) for p in part],
                      [os.path.join(image_root, p) for p in part], *settings))
    return tasks
