"""Convert FKD's released soft-label files (one ``.tar`` per training image) into one region store.

FKD ("A Fast Knowledge Distillation Framework for Visual Recognition", Shen & Xing, ECCV 2022; code
``szq0214/FKD``) stores, per image, R random-resized crops with their flip and the teacher's
quantised soft label. Its generator writes ``<save_path>/.../train/<class>/<stem>.tar`` with
``torch.save([coords, flip_status, output])``; its loader reads ``<softlabel_path>/train/<class>/
<stem>.tar``. The format as found (``docs/store_format.md``, "FKD's soft-label files"):

* ``coords``: numpy float32 ``[R, 4]``, each crop's ``(top / H, left / W, height / H, width / W)``;
* ``flip_status``: numpy bool ``[R]``, the crop mirrored after cropping;
* ``output``: numpy ``[R, 2, k]`` float, row 0 the top-k class indices (as floats), row 1 their
  probabilities, for ``marginal_smoothing_k5``/``_k10`` and ``marginal_renorm``; ``[R]`` class
  indices for ``hard``; ``[R, 2]`` (index, probability) for ``smoothing``.

The files do not say their label type: it is given (``--fkd-label-type``, FKD's default
``marginal_smoothing_k5``). They are untrusted pickles: each is loaded with
``torch.load(weights_only=True)``, only numpy's array-rebuilding globals allowed, and a file that
needs anything else is refused, naming it. Boxes are converted to source pixels with each image's size
(read from its header), and every row is checked as the region store's rules say before it is written.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple

import numpy as np

from ..outputs import OutputLock
from ..store import RegionWriter
from ..store.region_format import BOX_TOLERANCE, region_value_problem
from .convert import (ConversionError, ConversionReport, chunk_tasks, image_size, list_image_set,
                      pair_images_with_maps, write_in_parallel)

#: FKD's label types: (the region store's label type, k; ``None``: any k).
FKD_LABEL_TYPES = {
    "marginal_smoothing_k5": ("marginal_smoothing", 5),
    "marginal_smoothing_k10": ("marginal_smoothing", 10),
    "marginal_renorm": ("marginal_renorm", None),
    "marginal_renorm_k5": ("marginal_renorm", 5),
    "hard": ("marginal_smoothing", 1),
    "smoothing": ("marginal_smoothing", 1),
}
FKD_SUFFIX = ".tar"


def fkd_relpath(image_relpath: str) -> str:
    """``'<class>/<stem>.JPEG'`` -> ``'<class>/<stem>.tar'``: FKD cuts the file name at its first
    dot (``path.split('.')[0]``), so ``a.b.jpg`` is ``a.tar``."""
    folder, name = os.path.split(image_relpath.replace(os.sep, "/"))
    return (folder + "/" if folder else "") + name.split(".")[0] + FKD_SUFFIX


def _numpy_globals() -> list:
    """The pickle globals a file of numpy arrays needs, under the names numpy 1 and 2 write."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct"),
               (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for kind in (np.bool_, np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8):
        dtype_class = type(np.dtype(kind))
        allowed.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return allowed


def load_fkd_file(path: str):
    """``[coords, flip_status, output]`` of one FKD file as numpy arrays, loaded weights-only."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (no soft-label file for this image)") from None
    except pickle.UnpicklingError as error:
        needed = re.search(r"GLOBAL (\S+)", str(error))
        if needed:
            raise ConversionError(f"{path}: refused: it needs {needed.group(1)}, which a file of numpy arrays "
                                  "never does (loaded weights-only; nothing of it was run)") from None
        raise ConversionError(f"{path}: cannot be loaded weights-only ({error})") from None
    except Exception as error:  # torch raises many types for a damaged file
        raise ConversionError(f"{path}: cannot be loaded as a torch.save file ({type(error).__name__}: "
                              f"{error})") from None
    if not isinstance(loaded, (list, tuple)) or len(loaded) != 3:
        found = f"a {type(loaded).__name__} of {len(loaded)}" if isinstance(loaded, (list, tuple)) else \
            type(loaded).__name__
        raise ConversionError(f"{path}: expected [coords, flip_status, output], found {found}")
    arrays = []
    for name, value in zip(("coords", "flip_status", "output"), loaded):
        if torch.is_tensor(value):
            value = value.numpy()
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            what = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ConversionError(f"{path}: {name} must be a numeric array, found {what}")
        arrays.append(value)
    return arrays


def read_fkd_file(path: str, fkd_label_type: str, num_classes: int, regions: int, image_hw: Tuple[int, int]):
    """One FKD file as a region-store row: ``(boxes [R, 4] (x0, y0, w, h) in source pixels float32,
    flips [R] uint8, class_ids [R, k] int64, values [R, k] float32, crops in the file)``, keeping its
    first ``regions`` crops; every problem raises :class:`ConversionError` naming the file."""
    label_type, k_expected = FKD_LABEL_TYPES[fkd_label_type]
    coords, flips, output = load_fkd_file(path)
    count = len(coords) if coords.ndim else 0
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ConversionError(f"{path}: coords of shape {coords.shape}, expected [R, 4]")
    if flips.shape != (count,):
        raise ConversionError(f"{path}: flip_status of shape {flips.shape}, expected [{count}] (one per crop)")
    if fkd_label_type == "hard":
        shape_ok = output.shape == (count,)
        ids, values = (output.reshape(count, 1), np.ones((count, 1))) if shape_ok else (None, None)
    elif fkd_label_type == "smoothing":
        shape_ok = output.shape == (count, 2)
        ids, values = (output[:, :1], output[:, 1:]) if shape_ok else (None, None)
    else:
        shape_ok = output.ndim == 3 and output.shape[:2] == (count, 2) and \
            (k_expected is None or output.shape[2] == k_expected)
        ids, values = (output[:, 0], output[:, 1]) if shape_ok else (None, None)
    if not shape_ok:
        expected = {"hard": "[R]", "smoothing": "[R, 2]"}.get(fkd_label_type, f"[R, 2, {k_expected or 'k'}]")
        raise ConversionError(f"{path}: output of shape {output.shape} for {count} crops, expected {expected} "
                              f"for label type {fkd_label_type}")
    if count < regions:
        raise ConversionError(f"{path}: holds {count} crops, fewer than the {regions} stored per image (the "
                              "first file's count, or --regions)")
    ids = np.asarray(ids, dtype=np.float64)[:regions]
    if not (np.isfinite(ids).all() and (ids == np.round(ids)).all()):
        raise ConversionError(f"{path}: class indices are not whole numbers")
    height, width = image_hw
    top, left, h, w = (np.asarray(coords[:regions, c], dtype=np.float64) for c in range(4))
    x0, y0, bw, bh = left * width, top * height, w * width, h * height
    # float32 fractions times the size may end a hair past the edge: clip what lies within the tolerance
    bw = np.where((x0 + bw > width) & (x0 + bw <= width + BOX_TOLERANCE), width - x0, bw)
    bh = np.where((y0 + bh > height) & (y0 + bh <= height + BOX_TOLERANCE), height - y0, bh)
    boxes = np.stack([x0, y0, bw, bh], axis=1).astype(np.float32)
    flips = np.asarray(flips[:regions])
    values = np.asarray(values, dtype=np.float32)[:regions]
    problem = region_value_problem(boxes[None], flips[None], ids.astype(np.int64)[None], values[None],
                                   np.array([[height, width]]), num_classes, label_type)
    if problem is not None:
        raise ConversionError(f"{path}: {problem[1]}")
    return boxes, flips.astype(np.uint8), ids.astype(np.int64), values, count


def _load_fkd_chunk(task):
    label_paths, image_paths, fkd_label_type, num_classes, regions = task
    rows = []
    more = []
    for label_path, image_path in zip(label_paths, image_paths):
        size = image_size(image_path)
        if size is None:
            raise ConversionError(f"{image_path}: its size cannot be read from its header (a region store needs "
                                  "every image's size to place its boxes)")
        boxes, flips, ids, values, count = read_fkd_file(label_path, fkd_label_type, num_classes, regions, size)
        if count > regions:
            more.append(label_path)
        rows.append((boxes, flips, ids, values, size))
    return tuple(np.stack([row[i] for row in rows]) for i in range(5)) + (more,)


def convert_fkd(fkd_dir, image_root, out, fkd_label_type: str = "marginal_smoothing_k5", num_classes: int = 1000,
                class_names: Optional[Sequence[str]] = None, regions: Optional[int] = None,
                allow_missing: bool = False, workers: Optional[int] = None, chunk_rows: int = 64,
                restart: bool = False, progress: bool = True, values_dtype=np.float16, teacher: str = "",
                teacher_input_size: int = 0) -> ConversionReport:
    """Convert FKD's soft-label files into the region store ``out``.

    Args:
        fkd_dir: the folder holding ``<class>/<stem>.tar`` (FKD's ``<softlabel_path>/train``).
        image_root: the ImageFolder tree the files belong to (their image sizes place the boxes).
        out: path of the store to write.
        fkd_label_type: what the files hold (:data:`FKD_LABEL_TYPES`; the files do not say).
        num_classes, class_names: as :func:`~dali_relabel.tools.convert.convert_release`'s.
        regions: R, crops kept per image (the first R of each file); default: the first file's count.
            A file with fewer is refused.
        allow_missing: skip images without a file and ignore files without an image (counted).
        workers, chunk_rows, restart, progress: as :func:`~dali_relabel.tools.convert.convert_release`'s.
        values_dtype: float16 (default) or float32 for the stored probabilities.
        teacher, teacher_input_size: provenance stored in the header (FKD's release: EfficientNet-L2 at 475).
    """
    if fkd_label_type not in FKD_LABEL_TYPES:
        raise ConversionError(f"unknown FKD label type {fkd_label_type!r}; FKD's are {', '.join(FKD_LABEL_TYPES)}")
    fkd_dir, out = os.fspath(fkd_dir), os.fspath(out)
    images = list_image_set(image_root, class_names, num_classes)
    if not any(os.path.isdir(os.path.join(fkd_dir, c)) for c in images.classes) and \
            os.path.isdir(os.path.join(fkd_dir, "train")):
        raise ConversionError(f"{fkd_dir} holds no class folders but a 'train' folder: pass "
                              f"{os.path.join(fkd_dir, 'train')} (FKD's loader reads <softlabel_path>/train/<class>)")
    report = ConversionReport(out=out)
    keep = pair_images_with_maps(images, fkd_dir, allow_missing, report, relpath_of=fkd_relpath, suffix=FKD_SUFFIX)
    relpaths = [images.relpaths[i] for i in keep]
    labels = np.asarray([images.labels[i] for i in keep], dtype=np.int32)
    first = os.path.join(fkd_dir, fkd_relpath(relpaths[0]))
    coords, _, output = load_fkd_file(first)
    regions = int(regions or len(coords))
    k = FKD_LABEL_TYPES[fkd_label_type][1] or (output.shape[2] if output.ndim == 3 else 1)
    label_type = FKD_LABEL_TYPES[fkd_label_type][0]
    with OutputLock(out) as lock:
        writer = RegionWriter(out, relpaths, num_classes, regions, k, label_type, images.classes,
                              values_dtype=values_dtype, teacher=teacher, teacher_input_size=teacher_input_size,
                              source=f"fkd:{fkd_label_type}", resume=not restart,
                              plan_salt=f"{os.path.abspath(fkd_dir)}\0{fkd_label_type}", lock=lock)
        writer.close()  # reopened once the loaders run: no forked loader may inherit the open file
        start = report.resumed_from_row = writer.rows_written
        tasks = chunk_tasks(relpaths, start, chunk_rows, fkd_dir, fkd_relpath, images.root, fkd_label_type,
                            num_classes, regions)

        def write(row, loaded) -> int:
            boxes, flips, ids, values, sizes, more = loaded
            writer.write(row, boxes, flips, ids, values, sizes, labels[row:row + len(boxes)])
            report.files_with_more_crops.extend(more)
            return len(boxes)

        write_in_parallel(writer, _load_fkd_chunk, tasks, write, start, len(relpaths), workers, progress, "image")
    report.rows = len(relpaths)
    return report
