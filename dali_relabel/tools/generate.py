"""Make a label store for any ImageFolder data set with your own teacher (``dali-relabel generate``).

The ReLabel authors released maps for ImageNet train only, and not the tool that made them. This
module makes them the way the paper describes:

1. **Full image, no crop.** Each image is decoded by DALI (``mixed`` on a GPU, ``cpu`` without) and
   resized to ``size x size`` *ignoring its aspect ratio* (the paper feeds whole images at 475 x 475
   to EfficientNet-L2; a centre crop would lose the borders the map must describe). The resize is
   linear with antialiasing, as PIL's bilinear resize of the authors' torchvision transforms; the
   image is normalised with the ImageNet mean/std of :class:`~dali_relabel.config.DataConfig`.
   The graph is ``pipelines/graphs.py:teacher_pipeline``.
2. **The modified classifier** (:mod:`dali_relabel.tools.teachers`). The teacher's global pooling is removed
   and its final linear classifier is applied as a 1x1 convolution to the last feature map:
   ``[B, F, h, w]`` -> ``[B, C, h, w]`` logits per location. Averaging that map over ``h, w`` gives the
   model's ordinary logits exactly (for every supported family except MobileNetV3), so the map is a
   spatial decomposition of the teacher's prediction.
3. **Grid and top-k.** The map is brought to ``grid x grid`` (``teachers.topk_grid``): adaptive average
   pooling along an axis longer than the grid, bilinear interpolation (``align_corners=False``) along
   an axis shorter than it (ResNet-50 at 224 px has a 7 x 7 map; EfficientNet-L2 or ResNet-50 at
   475 px has exactly 15 x 15, where pooling is the identity). Each cell keeps its top-``k`` logits
   (``torch.topk``, descending) and their class ids.
4. **The store.** Rows are written in ImageFolder order with :class:`~dali_relabel.store.StoreWriter`:
   layout ``"HW"`` (geometric), ``source = "generate"``, the teacher's name and input size, the
   folder labels as hard labels and each image's original ``(H, W)`` (from DALI's
   ``peek_image_shape``, without EXIF rotation, like PIL's ``Image.size``).

**Resuming.** An interrupted run leaves ``<out>.partial`` (and ``<out>.generate.json``, the settings
it was made with: a fingerprint of the weights, size, normalisation, AMP...). Rerunning the same
command resumes at ``rows_written`` (rounded down to a batch boundary, so batches are composed as in
an uninterrupted run; rows already written are not written again). A partial file made with other
settings is discarded and started again; one that cannot be opened (held by another process, or
damaged) is kept and the run stops saying why. One run per output: ``<out>.lock`` is held from before
the image readers start until the store is published, and the readers start while the partial file
is closed (none of them holds it open after a crash; they die with the main process).

**Several processes (torchrun).** Rank ``r`` of ``w`` processes the contiguous rows
``[r * N // w, (r + 1) * N // w)`` and writes them as a normal store ``<out>.part{r}of{w}``; after a
barrier rank 0 merges the parts into ``<out>`` in global row order (:func:`merge_parts`) and deletes
them. Every part resumes on its own; a part that is already complete is reused.

**Region labels.** ``generate --regions R`` (:mod:`dali_relabel.tools.generate_regions`) writes a
region store through the same driver (:func:`generate_store`): what differs per store kind (settings,
writer, teacher graph, how a batch becomes rows, how parts merge) is a *job*, :class:`MapJob` here and
``RegionJob`` there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import DataConfig
from ..distributed import init_from_env
from ..imagefolder import list_images
from ..outputs import OutputLock
from ..store import PARTIAL_SUFFIX, LabelStore, StoreError, StoreWriter, open_store
from .teachers import GenerateError, build_teacher, dense_classifier, grid_pair, model_fingerprint, topk_grid

SOURCE_NAME = "generate"
SETTINGS_SUFFIX = ".generate.json"
RESIZE_DESCRIPTION = "full image, resized to size x size ignoring aspect ratio, linear + antialias"


# --------------------------------------------------------------------------------------------------
# Row plan (duck-typed :class:`~dali_relabel.plan.EpochPlan`)


@dataclass(frozen=True)
class RowPlan:
    """Rows ``start .. stop - 1`` read in order (every epoch the same) in batches of ``batch_size``;
    the last batch is padded with repeats marked invalid. Stands in for
    :class:`~dali_relabel.plan.EpochPlan` in :class:`~dali_relabel.sources.BatchSource`."""

    start: int
    stop: int
    batch_size: int

    def __post_init__(self):
        if self.stop <= self.start or self.batch_size < 1:
            raise ValueError(f"empty plan: rows [{self.start}, {self.stop}), batch {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def rows(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        total = self.num_batches * self.batch_size
        order = np.arange(self.start, self.stop, dtype=np.int64)
        return np.resize(order, total), np.arange(total) < len(order)


def shard_bounds(num_rows: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of ``rank`` among ``world_size`` (sizes differ by <= 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def part_path(out, rank: int, world_size: int) -> str:
    """``<out>.part{rank}of{world_size}``: the store one rank writes."""
    return f"{os.fspath(out)}.part{rank}of{world_size}"


# --------------------------------------------------------------------------------------------------
# Generation


def _settings_path(target: str) -> str:
    return target + SETTINGS_SUFFIX


def _read_settings(target: str) -> Optional[dict]:
    try:
        with open(_settings_path(target)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_settings(target: str, settings: dict) -> None:
    tmp = _settings_path(target) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    os.replace(tmp, _settings_path(target))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _complete_part_fits(target: str, paths: Sequence[str], settings: dict) -> bool:
    """``target`` is a complete store of ``paths`` made with ``settings`` (reuse it)."""
    if not os.path.exists(target) or _read_settings(target) != settings:
        return False
    try:
        store = open_store(target, verify="header")
    except StoreError:
        return False
    try:
        return store.paths.tolist() == list(paths)
    finally:
        store.close()


@dataclass
class TeacherRun:
    """The teacher as a job's ``write`` runs it: the model on its device, with AMP or without."""

    model: torch.nn.Module
    device: str  #: ``"cpu"`` or ``"gpu"``
    torch_device: torch.device
    amp: bool

    def autocast(self):
        """float16 autocast on the GPU with AMP, else nothing."""
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()


class MapJob:
    """What ``generate`` does for a label-map store: the full-image teacher graph, the modified
    classifier's ``grid x grid`` top-k logits, a :class:`~dali_relabel.store.StoreWriter`.

    A job tells the shared driver (:func:`generate_store`, :func:`merge_parts`) what is particular to
    a store kind: its settings, writer, teacher graph and how a batch becomes rows
    (:class:`~dali_relabel.tools.generate_regions.RegionJob` is the region store's).
    """

    store_class = LabelStore

    def __init__(self, dense, size: int, grid: Tuple[int, int], k: int, class_names: Sequence[str],
                 teacher_name: str = ""):
        self.dense, self.size, self.grid, self.k = dense, int(size), tuple(grid), int(k)
        self.class_names, self.teacher_name = list(class_names), teacher_name

    def settings(self) -> dict:
        """What a resumed partial store must have been made with, besides the common settings."""
        return dict(resize=RESIZE_DESCRIPTION, grid=list(self.grid), k=self.k)

    def writer(self, target: str, relpaths: Sequence[str], resume: bool, lock: OutputLock) -> StoreWriter:
        return StoreWriter(target, relpaths, len(self.class_names), self.k, self.grid[0], self.grid[1], layout="HW",
                           class_names=self.class_names, teacher=self.teacher_name, teacher_input_size=self.size,
                           source=SOURCE_NAME, resume=resume, lock=lock)

    @staticmethod
    def outputs() -> List[str]:
        from ..pipelines.graphs import TEACHER_OUTPUTS

        return list(TEACHER_OUTPUTS)

    def pipeline(self, source, config: DataConfig, decoder_device: str, half_input: bool, kwargs: dict):
        """The (unbuilt) teacher graph over ``source`` (outputs: :meth:`outputs`)."""
        from ..pipelines.graphs import teacher_pipeline

        teacher_config = config.replace(output_dtype="float16" if half_input else "float32",
                                        channels_last=decoder_device == "mixed")
        return teacher_pipeline(source, teacher_config, self.size, decoder_device=decoder_device, **kwargs)

    def write(self, writer: StoreWriter, start: int, batch: dict, keep: np.ndarray, labels: np.ndarray,
              shapes: np.ndarray, run: TeacherRun) -> None:
        """Label the ``keep`` samples of ``batch`` and write them from row ``start`` of ``writer``
        (``labels``, ``shapes``: theirs)."""
        x = batch["images"]
        if run.device == "gpu":
            x = x.permute(0, 3, 1, 2)  # NHWC from DALI: a channels_last NCHW view, no copy
        x = x.to(run.torch_device, non_blocking=True)
        if not run.amp:
            x = x.float()
        with torch.inference_mode(), run.autocast():
            logit_map = self.dense.head(self.dense.features(x))
        values, ids = topk_grid(logit_map, self.grid, self.k)
        index = torch.from_numpy(np.nonzero(keep)[0])
        values = values[index.to(values.device)].cpu().numpy()
        ids = ids[index.to(ids.device)].cpu().numpy()
        writer.write(start, values, ids, labels, shapes)

    @staticmethod
    def merge_writer(store: LabelStore, out: str, paths: Sequence[str], resume: bool, lock: OutputLock) -> StoreWriter:
        """A writer of ``out`` with the header of the part ``store`` (for :func:`merge_parts`)."""
        h = store.header
        return StoreWriter(out, paths, h.num_classes, h.k, h.grid_h, h.grid_w, layout=h.layout,
                           class_names=store.class_names, teacher=h.teacher, teacher_input_size=h.teacher_input_size,
                           source=h.source, resume=resume, lock=lock)

    @staticmethod
    def merge_rows(store: LabelStore, begin: int, end: int) -> tuple:
        """Rows ``[begin, end)`` of a part as the writer's ``write`` arguments after ``start``."""
        maps = store.read(np.arange(begin, end))
        return maps.logits, maps.class_ids, store.labels[begin:end], store.image_sizes[begin:end]


def _job_of(store):
    """The job class that writes stores like ``store`` (a part being merged)."""
    from .generate_regions import RegionJob

    return RegionJob if isinstance(store, RegionJob.store_class) else MapJob


def _make_loader(job, image_root: str, relpaths: Sequence[str], labels: Sequence[int], first_row: int,
                 stop_row: int, batch_size: int, device: str, device_id: Optional[int], config: DataConfig,
                 half_input: bool):
    from ..passes import PipelineBatches
    from ..paths import PathTable
    from ..pipelines.graphs import pipeline_kwargs
    from ..sources import BatchSource

    plan = RowPlan(int(first_row), int(stop_row), int(batch_size))
    paths = PathTable.from_strings(relpaths)
    labels = np.asarray(labels, dtype=np.int32)
    kwargs = pipeline_kwargs(config, batch_size, device_id)
    decoder_device = "mixed" if device == "gpu" else "cpu"

    def make_source(control, bad_rows):
        return BatchSource(image_root, plan, control, paths=paths, labels=labels, bad_rows=bad_rows)

    def make_pipeline(source):
        return job.pipeline(source, config, decoder_device, half_input, kwargs)

    return PipelineBatches(plan, make_source, make_pipeline, job.outputs())


def generate_label_maps(image_root, out, model: torch.nn.Module, size: int = 224, grid=15, k: int = 5,
                        batch_size: int = 64, device: Optional[str] = "auto", rank: int = 0,
                        world_size: int = 1, class_names: Optional[Sequence[str]] = None,
                        teacher_name: str = "", progress: bool = True,
                        config: Optional[DataConfig] = None, amp: bool = False,
                        device_id: Optional[int] = None, restart: bool = False,
                        merge: Optional[bool] = None) -> str:
    """Run ``model`` over every image of ``image_root`` and write its label maps to the store ``out``.

    Args:
        image_root: an ImageFolder tree (``root/<class>/<image>``); rows follow its sorted order.
        out: the store to write.
        model: the teacher, an ``nn.Module`` classifier of a family :func:`dense_classifier` supports,
            with as many outputs as there are classes. It is put in eval mode and moved to the device
            (channels_last on a GPU) in place.
        size: the teacher's input side: every full image is resized to ``size x size``.
        grid: side of the stored map (int or ``(gh, gw)``).
        k: logits kept per cell.
        batch_size: images per teacher batch.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"`` (decode with ``mixed``, run the teacher on the GPU).
        rank, world_size: this process's shard; with ``world_size > 1`` the rows
            ``shard_bounds(N, rank, world_size)`` are written to ``part_path(out, rank, world_size)``.
        class_names: classes in class-id order (default: the sorted folder names); their number
            must equal the teacher's outputs.
        teacher_name: stored as the ``teacher`` attribute.
        progress: show a progress bar (rank 0 only).
        config: a :class:`DataConfig` (normalisation, workers, threads, ``adjust_orientation``).
        amp: float16 autocast on the GPU (ignored on the CPU).
        device_id: CUDA device (default: the current one).
        restart: discard an interrupted run instead of resuming it.
        merge: with ``world_size > 1``, wait for all ranks (``torch.distributed`` barrier) and let rank
            0 merge the parts into ``out``. Default: merge when ``torch.distributed`` is initialised;
            otherwise call :func:`merge_parts` yourself once every rank has finished.

    Returns the path written: ``out``, or this rank's part path when the parts are not merged here.
    """
    image_root = os.fspath(image_root)
    images = list_images(image_root, classes=class_names)
    dense = dense_classifier(model)
    num_classes = len(images.classes)
    if dense.num_classes != num_classes:
        raise GenerateError(f"the teacher has {dense.num_classes} outputs but {image_root} gives "
                            f"{num_classes} classes; pass the teacher's {dense.num_classes} class names "
                            "in class-id order (--class-names FILE)")
    gh, gw = grid_pair(grid)
    if not 1 <= k <= num_classes:
        raise GenerateError(f"k={k} must lie in [1, {num_classes}]")
    if size < 1:
        raise GenerateError(f"size must be positive (got {size})")
    if not dense.exact:
        warnings.warn(f"{dense.family}: the classifier has a hidden layer; it is applied at every location, "
                      "so the map's mean is not the model's logits", stacklevel=2)
    job = MapJob(dense, size, (gh, gw), k, images.classes, teacher_name)
    return generate_store(job, images, out, model, batch_size=batch_size, device=device, rank=rank,
                          world_size=world_size, progress=progress, config=config, amp=amp, device_id=device_id,
                          restart=restart, merge=merge)


def generate_store(job, images, out, model: torch.nn.Module, batch_size: int, device: Optional[str] = "auto",
                   rank: int = 0, world_size: int = 1, progress: bool = True, config: Optional[DataConfig] = None,
                   amp: bool = False, device_id: Optional[int] = None, restart: bool = False,
                   merge: Optional[bool] = None) -> str:
    """The driver every kind of ``generate`` shares: ``job`` (:class:`MapJob`, or
    :class:`~dali_relabel.tools.generate_regions.RegionJob`) over ``images`` (an
    :func:`~dali_relabel.imagefolder.list_images` listing) into ``out``: this rank's rows, resumed or
    reused as the module docstring says, then the merge of the parts. Arguments as
    :func:`generate_label_maps`'s."""
    from ..devices import resolve_device

    out = os.fspath(out)
    config = config or DataConfig()
    if batch_size < 1:
        raise GenerateError(f"batch_size must be positive (got {batch_size})")
    if not 0 <= rank < world_size:
        raise GenerateError(f"rank {rank} is outside world size {world_size}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    merge = distributed if merge is None else merge
    if merge and world_size > 1 and not distributed:
        raise GenerateError("merge=True with world_size > 1 needs an initialised torch.distributed group")

    device = resolve_device(device)
    use_amp = bool(amp) and device == "gpu"
    start, stop = shard_bounds(len(images), rank, world_size) if world_size > 1 else (0, len(images))
    target = part_path(out, rank, world_size) if world_size > 1 else out
    settings = dict(weights_sha256=model_fingerprint(model), model_class=type(model).__name__, size=job.size,
                    mean=list(config.mean), std=list(config.std), amp=use_amp,
                    adjust_orientation=bool(config.adjust_orientation), rows=[start, stop, len(images)],
                    **job.settings())
    relpaths = images.relpaths[start:stop]
    if stop > start and (world_size == 1 or restart or not _complete_part_fits(target, relpaths, settings)):
        with OutputLock(target) as lock:  # before any reader process starts, until the store is published
            _generate_rows(job, images, model, target, start, stop, settings, batch_size, device, device_id,
                           config, use_amp, restart, progress and rank == 0, keep_settings=world_size > 1,
                           lock=lock)
    if world_size == 1:
        return out
    if not merge:
        return target
    torch.distributed.barrier()
    if rank == 0:
        merge_parts(out, world_size, progress=progress)
    torch.distributed.barrier()
    return out


def _generate_rows(job, images, model, target, start, stop, settings, batch_size, device, device_id, config,
                   use_amp, restart, progress, keep_settings: bool, lock: OutputLock) -> None:
    """Write rows ``[start, stop)`` of ``images`` to the store ``target`` (resuming ``target.partial``).

    ``<target>.generate.json`` records the settings; it is kept after finishing for a part (so a
    complete part can be reused and checked by the merge) and removed for a final store. ``lock`` is the
    held :class:`~dali_relabel.outputs.OutputLock` of ``target``.
    """
    from tqdm import tqdm

    relpaths = images.relpaths[start:stop]
    labels = np.asarray(images.labels, dtype=np.int32)
    partial = target + PARTIAL_SUFFIX
    resume = not restart and os.path.exists(partial) and _read_settings(target) == settings
    if os.path.exists(partial) and not resume and not restart:
        warnings.warn(f"{partial} was made with other settings (weights, size, grid, ...); starting again",
                      stacklevel=4)
    _write_settings(target, settings)
    # resume=False discards the old partial file, unless another process holds it (then it is kept)
    writer = job.writer(target, relpaths, resume, lock)
    writer.close()  # reopened once the readers run: no forked reader may inherit the open file
    done = writer.rows_written
    first = (done // batch_size) * batch_size  # same batch boundaries as an uninterrupted run
    loader = None
    bar = tqdm(total=len(relpaths), initial=done, unit="img", desc="generate", disable=not progress)
    try:
        if done < len(relpaths):
            if device == "gpu":
                device_id = torch.cuda.current_device() if device_id is None else int(device_id)
            else:
                device_id = None
            # Readers start before the model moves to the GPU (they fork unless torch already
            # initialised CUDA; then they spawn, see devices.worker_start_method).
            loader = _make_loader(job, images.root, images.relpaths, labels, start + first, stop, batch_size, device,
                                  device_id, config, half_input=use_amp)
            writer.reopen()
            target_device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
            model.eval().to(target_device)
            if device == "gpu":
                model.to(memory_format=torch.channels_last)
            run = TeacherRun(model, device, target_device, use_amp)
            expected = start + first
            for batch in loader:
                rows = batch["rows"].reshape(-1).cpu().numpy().astype(np.int64)
                if not np.array_equal(rows, np.arange(expected, expected + len(rows))):
                    raise RuntimeError(f"batch rows {rows[:4]}... out of order (expected from {expected})")
                expected += len(rows)
                keep = rows - start >= writer.rows_written
                if not keep.any():
                    continue
                shapes = batch["shapes"].reshape(len(rows), -1)[:, :2].cpu().numpy()[keep]
                batch_rows = rows[keep]
                job.write(writer, int(batch_rows[0] - start), batch, keep, labels[batch_rows], shapes, run)
                bar.update(len(batch_rows))
            if expected != stop:
                raise RuntimeError(f"the loader stopped at row {expected}, expected {stop}")
        writer.finish()
        if not keep_settings:
            _remove(_settings_path(target))
    except BaseException:
        writer.close()  # the partial file stays; rerunning resumes it
        raise
    finally:
        bar.close()
        if loader is not None:
            loader.close()


#: Header attributes that need not agree between the parts of a merge.
_PER_PART = ("num_rows", "content_sha256", "values_checked")


def merge_parts(out, world_size: int, progress: bool = False, chunk_rows: int = 4096,
                delete_parts: bool = True) -> str:
    """Merge ``part_path(out, r, world_size)`` for ``r = 0 .. world_size - 1`` into ``out``.

    Parts hold contiguous row ranges in rank order (a rank with no rows has no part). They must be of
    one kind (label maps or region labels), and their headers, class names and image lists must
    agree; the merged store is what one process would have written. Resumes an interrupted merge;
    the parts (and their settings files) are deleted afterwards.
    """
    from tqdm import tqdm

    out = os.fspath(out)
    parts = [part_path(out, r, world_size) for r in range(world_size)]
    present = [p for p in parts if os.path.exists(p)]
    if not present:
        raise GenerateError(f"no parts of {out} found ({parts[0]} ...)")
    stores = []
    try:
        for path in present:
            stores.append(open_store(path, verify="header"))
        first = stores[0]
        job = _job_of(first)
        header = dataclasses.asdict(first.header)
        settings = [_read_settings(p) for p in present]
        for path, store, setting in zip(present, stores, settings):
            if type(store) is not type(first):
                raise GenerateError(f"{path} is a {store.kind}, {present[0]} a {first.kind}")
            own = dataclasses.asdict(store.header)
            different = [n for n in header if n not in _PER_PART and own[n] != header[n]]
            if store.class_names != first.class_names:
                different.append("class_names")
            if setting is not None and settings[0] is not None:
                for key in ("weights_sha256", "size", "amp", "mean", "std"):
                    if setting.get(key) != settings[0].get(key):
                        different.append(key)
            if different:
                raise GenerateError(f"{path} differs from {present[0]} in {', '.join(different)}")
        # Every rank's row range must follow the previous one (rows[start, stop, N] in the settings).
        if all(s is not None for s in settings):
            total = settings[0]["rows"][2]
            expect_start = 0
            for path, setting, store in zip(present, settings, stores):
                s, e, n = setting["rows"]
                if s != expect_start or n != total or e - s != len(store):
                    raise GenerateError(f"{path} holds rows [{s}, {e}) of {n}, expected to start at "
                                        f"{expect_start} of {total}")
                expect_start = e
            if expect_start != total:
                missing = [p for p in parts if p not in present]
                raise GenerateError(f"the parts of {out} cover {expect_start} of {total} rows (missing: "
                                    f"{missing[:1]})")
        paths = [p for store in stores for p in store.paths.tolist()]
        # Resume only a merge of these parts (not, say, an interrupted single-process run's partial).
        merged_settings = {key: value for key, value in (settings[0] or {}).items() if key != "rows"}
        merged_settings.update(merged_from=world_size, part_sha256=[s.header.content_sha256 for s in stores])
        with OutputLock(out) as lock:  # one writer of out, until it is published
            resume = os.path.exists(out + PARTIAL_SUFFIX) and _read_settings(out) == merged_settings
            _write_settings(out, merged_settings)
            # resume=False discards an old partial file, unless another process holds it
            writer = job.merge_writer(first, out, paths, resume, lock)
            bar = tqdm(total=len(paths), initial=writer.rows_written, unit="row", desc="merge",
                       disable=not progress)
            try:
                offset = 0
                for store in stores:
                    n = len(store)
                    for begin in range(max(0, writer.rows_written - offset), n, chunk_rows):
                        end = min(n, begin + chunk_rows)
                        writer.write(offset + begin, *job.merge_rows(store, begin, end))
                        bar.update(end - begin)
                    offset += n
                writer.finish()
                _remove(_settings_path(out))
            except BaseException:
                writer.close()
                raise
            finally:
                bar.close()
    finally:
        for store in stores:
            store.close()
    if delete_parts:
        for path in present:
            _remove(path)
            _remove(_settings_path(path))
    return out

# --------------------------------------------------------------------------------------------------
# The command


def read_class_names(path) -> List[str]:
    """One class name per non-empty line, in class-id order."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def run_generate(image_root, out, model_name: str, weights, size: int = 224, grid: Union[int, Tuple] = 15,
                 k: int = 5, batch_size: Optional[int] = 64, device: str = "auto", amp: bool = False,
                 class_names_file=None, teacher_name: Optional[str] = None, config: Optional[DataConfig] = None,
                 restart: bool = False, progress: bool = True, regions: Optional[int] = None,
                 region_options: Optional[dict] = None) -> dict:
    """The ``dali-relabel generate`` job: build the teacher, join ``torchrun``'s group if any, generate
    label maps, or with ``regions`` (R) a region store
    (:func:`~dali_relabel.tools.generate_regions.generate_region_labels`, given ``region_options``:
    ``scale``, ``ratio``, ``flip_probability``, ``seed``, ``interpolation``, ``crop_batch``; ``grid``
    unused; ``batch_size=None``: its default for R).

    Returns a summary dict (``out``, rows, teacher, ..., ``rank``).
    """
    from ..distributed import rank_and_world
    from ..devices import resolve_device
    from .generate_regions import generate_region_labels

    class_names = read_class_names(class_names_file) if class_names_file else None
    if class_names is None:  # list_images' rule, without walking every file (generate does that)
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image root {image_root} is not a directory")
        class_names = sorted(e.name for e in os.scandir(image_root) if e.is_dir() and not e.name.startswith("."))
    classes = list(class_names)
    model = build_teacher(model_name, weights, len(classes))
    use_gpu = resolve_device(device) == "gpu"
    joined = init_from_env(use_gpu, timeout=datetime.timedelta(hours=2))
    try:
        rank, world_size = rank_and_world()
        common = dict(size=size, k=k, device="gpu" if use_gpu else "cpu", rank=rank, world_size=world_size,
                      class_names=classes, teacher_name=teacher_name or model_name, progress=progress,
                      config=config, amp=amp, device_id=torch.cuda.current_device() if use_gpu else None,
                      restart=restart)
        if regions is not None:
            path = generate_region_labels(image_root, out, model, regions, batch_size=batch_size,
                                          **(region_options or {}), **common)
        else:
            path = generate_label_maps(image_root, out, model, grid=grid, batch_size=batch_size or 64, **common)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    result = dict(out=path, rank=rank, world_size=world_size, teacher=teacher_name or model_name, size=size, k=k,
                  num_classes=len(classes))
    if regions is not None:
        result["regions"] = int(regions)
    else:
        result["grid"] = list(grid_pair(grid))
    if rank == 0:
        store = open_store(path, verify="header")
        result.update(rows=len(store), content_sha256=store.header.content_sha256, kind=store.kind)
        store.close()
    return result
