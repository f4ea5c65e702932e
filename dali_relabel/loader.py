"""Drop-in iterators: ``for images, targets in ReLabelLoader(...)`` in an ordinary PyTorch loop.

:class:`ReLabelLoader` builds the training graph (``pipelines/graphs.py``) over an image tree and its
label store and yields ``(images, soft_targets)`` (optionally hard labels too) on the pipeline's
device; :class:`ValidationLoader` yields ``(images, labels)``. Both have ``__len__``, reshuffle every
epoch, shard by **global** rank (from ``torch.distributed`` or the ``torchrun`` environment), and never
yield padding samples.
"""
from __future__ import annotations

import gc
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig
from .distributed import rank_and_world
from .imagefolder import list_images
from .mixing import CutMixSpec, apply_cutmix, apply_mixup, mixup_weights
from .sources import SKIPPED, VALID, BadImageError, EpochPlan, SampleSource
from .store import LabelStore, StoreError


def resolve_device(device: Optional[str]) -> str:
    """``"gpu"`` or ``"cpu"``; ``None``/``"auto"`` picks the GPU when torch sees one."""
    if device in (None, "auto"):
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise RuntimeError("device='gpu' was requested but torch sees no CUDA GPU")
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")


def check_store_matches_images(store: LabelStore, image_root: str, allow_extra_images: bool = False) -> None:
    """Refuse a store that does not describe the images under ``image_root`` (first offending path).

    Every store row needs its image; every image under the root needs a row (unless
    ``allow_extra_images``); the class folder of each row must be the class name of its label.
    """
    images = list_images(image_root, classes=None)
    on_disk = set(images.relpaths)
    for row, path in enumerate(store.paths):
        if path not in on_disk:
            raise StoreError(store.path, f"row {row} refers to {path}, which is not under {image_root} "
                                         "(is this store made for another image set?)")
    if not allow_extra_images and len(on_disk) != len(store.paths):
        in_store = set(store.paths)
        extra = next(p for p in images.relpaths if p not in in_store)
        raise StoreError(store.path, f"{len(on_disk) - len(in_store)} images under {image_root} have no "
                                     f"map, first: {extra}")
    for row, path in enumerate(store.paths):
        label = int(store.labels[row])
        folder = path.split("/", 1)[0]
        if label >= 0 and store.class_names[label] != folder:
            raise StoreError(store.path, f"row {row} ({path}) has label {label} = "
                                         f"{store.class_names[label]!r}, but lies in folder {folder!r}")


def decode_problem(path: str) -> Optional[str]:
    """Why DALI's CPU decoder cannot decode ``path`` (run alone), or ``None`` if it can."""
    from nvidia.dali import fn, pipeline_def

    data = np.fromfile(path, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_one():
        jpeg = fn.external_source(source=lambda: [data], batch=True)
        return fn.peek_image_shape(jpeg), fn.decoders.image(jpeg, device="cpu")

    try:
        pipe = decode_one()
        pipe.build()
        pipe.run()
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = [line for line in lines if "failure" in line or "Error" in line or "error" in line]
        return (detail[-1] if detail else lines[-1])[:200]
    return None


def worker_start_method(requested: str) -> str:
    """The start method for DALI's source workers: ``requested``, but ``"spawn"`` instead of
    ``"fork"`` once this process has initialised CUDA (forked workers would break)."""
    if requested == "fork" and torch.cuda.is_available() and torch.cuda.is_initialized():
        return "spawn"
    return requested


def start_workers(pipe) -> None:
    """Start a pipeline's source workers without handing them this process's garbage.

    Forked workers inherit every object of this process. Garbage in reference cycles (for example
    an earlier loader's DALI pipeline) would be collected inside a worker, and a DALI pipeline torn
    down there crashes the worker. So collect it here first, and freeze what is left, so the
    workers' collector never looks at inherited objects.
    """
    gc.collect()
    gc.freeze()
    try:
        pipe.start_py_workers()
    finally:
        gc.unfreeze()


class PipelineBatches:
    """Batches of one DALI pipeline fed by a :class:`SampleSource`: dicts of torch tensors named by
    ``output_map``, padding and stand-ins removed, decoder failures re-raised naming the file.

    The base of the loaders below, and of the teacher pass of ``dali-relabel generate``.
    """

    def __init__(self, pipe, plan: EpochPlan, source: SampleSource, device: str, output_map: List[str],
                 start_epoch: int = 0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.plan = plan
        self.source = source
        self.device = device
        self.pipeline = pipe
        start_workers(pipe)
        pipe.build()
        self._iterator = DALIGenericIterator([pipe], output_map, size=-1, auto_reset=True,
                                             prepare_first_batch=False)
        self.epoch = start_epoch  # the epoch the next iteration over the loader yields
        self.skipped_images = 0
        self._epochs_done = 0
        self._batch_in_epoch = 0

    def __len__(self) -> int:
        """Batches of the coming epoch (fewer in an epoch resumed mid-way)."""
        return self.source.batches_in_epoch(self._epochs_done)

    def state_dict(self) -> dict:
        """Where the data order stands: ``{"epoch", "batch"}`` (batches of that epoch already yielded)."""
        first = self.source.resume_batch if self._epochs_done == 0 else 0
        return {"epoch": self.epoch, "batch": first + self._batch_in_epoch}

    def _transform(self, batch: dict) -> dict:
        """Batch-level work before padding is removed (CutMix pairs need the full batch)."""
        return batch

    def __iter__(self):
        return self._batches()

    def close(self) -> None:
        """Drop the iterator and the pipeline now, so the source's worker processes stop."""
        self._iterator = None
        self.pipeline = None

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def _batches(self):
        self._batch_in_epoch = 0
        try:
            for outputs in self._iterator:
                batch = self._transform(outputs[0])
                status = batch["valid"].reshape(-1).cpu()
                self.skipped_images += int((status == SKIPPED).sum())
                keep = status == VALID
                self._batch_in_epoch += 1
                if bool(keep.all()):
                    yield batch
                elif bool(keep.any()):
                    index = keep.nonzero().reshape(-1)
                    yield {name: value[index.to(value.device)] for name, value in batch.items()}
        except RuntimeError as error:
            raise self._explain(error) from error
        self.epoch += 1
        self._epochs_done += 1
        self._batch_in_epoch = 0

    def _explain(self, error: RuntimeError) -> Exception:
        """Name the file behind a decoder failure: decode each image of the failed batch alone."""
        rows, _ = self.plan.rows(self.epoch)
        first = self.source.resume_batch if self._epochs_done == 0 else 0
        start = (first + self._batch_in_epoch) * self.plan.batch_size
        for row in rows[start:start + self.plan.batch_size]:
            path = os.path.join(self.source.image_root, self.source.relpaths[int(row)])
            problem = decode_problem(path)
            if problem:
                return BadImageError(f"{path}: cannot be decoded (DALI: {problem})")
        return error


class ReLabelLoader(PipelineBatches):
    """Training batches ``(images, soft_targets)`` with ReLabel targets from a label store.

    Args:
        image_root: the ImageFolder tree; store row paths are relative to it.
        store: path of the label store (or an open :class:`LabelStore`); ``None`` trains on the
            tree's hard labels (one-hot targets, the baseline) with the same pipeline.
        batch_size: samples per batch on this rank.
        config: data settings (:class:`DataConfig`); ``config.layout`` overrides the store's.
        device: ``"gpu"`` (decode on ``mixed``, pool on the GPU), ``"cpu"``, or ``"auto"``.
        device_id: CUDA device for ``"gpu"`` (default: the current torch device).
        rank, world_size: default from ``torch.distributed`` or ``RANK``/``WORLD_SIZE``.
        shuffle: new permutation every epoch.
        return_labels: yield ``(images, targets, labels)``.
        return_rows: also yield the store rows of the batch (last element).
        check_files: at start-up, refuse a store whose rows do not match the image tree.
        skip_bad_images: replace undecodable images instead of raising (counted in
            :attr:`skipped_images`).
        start_epoch: epoch number of the first epoch (resuming).
        resume_batch: batches of ``start_epoch`` already trained on (from :meth:`state_dict`).

    CutMix (``config.cutmix_probability > 0``) is applied before the batch is handed out: images
    carry their partner's pixels in the pair's box and targets are mixed (:mod:`dali_relabel.mixing`).

    Images are ``[B, 3, S, S]`` (``[B, S, S, 3]`` with ``channels_last``) float16/float32, targets
    ``[B, C]`` float32 (``[B, C, oh, ow]`` for an output grid). With ``last_batch="pad"`` the last
    batch may be smaller; it never contains padding.
    """

    def __init__(self, image_root, store, batch_size: int, config: Optional[DataConfig] = None,
                 device: Optional[str] = "auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, shuffle: bool = True,
                 return_labels: bool = False, return_rows: bool = False, check_files: bool = True,
                 skip_bad_images: bool = False, start_epoch: int = 0, resume_batch: int = 0):
        from .plugin import load_plugin, require_gpu_backend
        from .pipelines.graphs import train_pipeline

        self.config = config = config or DataConfig()
        self.image_root = os.fspath(image_root)
        if store is None:  # hard labels of the image tree, as one-hot targets
            self.store = None
            images = list_images(self.image_root)
            relpaths, labels, self.class_names = images.relpaths, images.labels, images.classes
            self.num_classes, self.layout = len(images.classes), "HW"
            if config.cutmix_probability > 0 and config.cutmix_mode == "localized":
                raise ValueError("localized CutMix needs label maps (a store)")
        else:
            self.store = store if isinstance(store, LabelStore) else LabelStore(store)
            if check_files:
                check_store_matches_images(self.store, self.image_root)
            relpaths, labels, self.class_names = self.store.paths, self.store.labels, self.store.class_names
            self.num_classes = self.store.num_classes
            self.layout = config.layout or self.store.layout
        default_rank, default_world = rank_and_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        device = resolve_device(device)
        if self.store is not None:  # only soft targets use the operator
            load_plugin()
            if device == "gpu":
                require_gpu_backend()
        if device == "gpu":
            device_id = torch.cuda.current_device() if device_id is None else device_id
        else:
            device_id = None
        plan = EpochPlan(len(relpaths), batch_size, rank, world_size, seed=config.seed,
                         shuffle=shuffle, last_batch=config.last_batch)
        cutmix = None
        if config.cutmix_probability > 0:
            cutmix = CutMixSpec(config.cutmix_probability, config.cutmix_alpha, config.image_size,
                                seed=config.seed, stop_epoch=config.cutmix_stop_epoch)
        source = SampleSource(self.image_root, relpaths, labels, plan,
                              store_path=self.store.path if self.store else None, epoch_offset=start_epoch,
                              skip_bad_images=skip_bad_images, cutmix=cutmix, resume_batch=resume_batch)
        output_map = ["images", "targets", "labels", "rows", "valid"]
        if cutmix is not None:
            output_map += ["mix_box"] + (["pasted"] if config.cutmix_mode == "localized" else [])
        pipe = train_pipeline(source, config, self.num_classes, self.layout,
                              decoder_device="mixed" if device == "gpu" else "cpu",
                              batch_size=batch_size, num_threads=config.num_threads, device_id=device_id,
                              seed=config.seed * 1000 + rank + 7919 * start_epoch,
                              py_num_workers=config.py_num_workers,
                              py_start_method=worker_start_method(config.py_start_method),
                              prefetch_queue_depth=config.prefetch_queue_depth, exec_dynamic=True)
        self.return_labels = return_labels
        self.return_rows = return_rows
        super().__init__(pipe, plan, source, device, output_map, start_epoch)

    def _transform(self, batch: dict) -> dict:
        config = self.config
        if "mix_box" in batch:
            images, targets, _ = apply_cutmix(batch["images"], batch["mix_box"], batch["targets"],
                                              batch.get("pasted"), channels_last=config.channels_last)
            batch = dict(batch, images=images, targets=targets)
            batch.pop("pasted", None)
        stopped = config.cutmix_stop_epoch is not None and self.epoch >= config.cutmix_stop_epoch
        if config.mixup_alpha > 0 and not stopped:
            size = batch["images"].shape[0]
            position = self.source.resume_batch if self._epochs_done == 0 else 0
            lam = mixup_weights(size, config.mixup_alpha, config.seed, self.epoch,
                                position + self._batch_in_epoch)
            untouched = (batch["mix_box"].reshape(size, 4) == 0).all(1) if "mix_box" in batch \
                else torch.ones(size, dtype=torch.bool)
            images, targets = apply_mixup(batch["images"], batch["targets"], lam, untouched)
            batch = dict(batch, images=images, targets=targets)
        return batch

    def __iter__(self):
        for batch in self._batches():
            out = [batch["images"], batch["targets"]]
            if self.return_labels:
                out.append(batch["labels"].reshape(-1).long())
            if self.return_rows:
                out.append(batch["rows"].reshape(-1))
            yield tuple(out)


class ValidationLoader(PipelineBatches):
    """Validation batches ``(images, labels)`` over an ImageFolder tree, every image exactly once.

    Args:
        image_root: the tree (``root/<class>/<image>``).
        batch_size: samples per batch on this rank.
        config: data settings (``val_resize``, ``image_size``, normalisation).
        classes: class names in label order (default: sorted folders; pass the store's
            ``class_names`` when evaluating a model trained on a store).
        return_rows: also yield the index of each image in the sorted file list (for ReaL labels).
        Other arguments as :class:`ReLabelLoader`.
    """

    def __init__(self, image_root, batch_size: int, config: Optional[DataConfig] = None,
                 device: Optional[str] = "auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, return_rows: bool = False):
        from .pipelines.graphs import validation_pipeline

        self.config = config = (config or DataConfig()).replace(last_batch="pad")
        self.images = list_images(image_root, classes=classes)
        default_rank, default_world = rank_and_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        device = resolve_device(device)
        device_id = (torch.cuda.current_device() if device_id is None else device_id) if device == "gpu" else None
        plan = EpochPlan(len(self.images), batch_size, rank, world_size, shuffle=False, last_batch="pad")
        source = SampleSource(self.images.root, self.images.relpaths, self.images.labels, plan)
        pipe = validation_pipeline(source, config, decoder_device="mixed" if device == "gpu" else "cpu",
                                   batch_size=batch_size, num_threads=config.num_threads,
                                   device_id=device_id, seed=config.seed,
                                   py_num_workers=config.py_num_workers,
                                   py_start_method=worker_start_method(config.py_start_method),
                                   prefetch_queue_depth=config.prefetch_queue_depth, exec_dynamic=True)
        self.return_rows = return_rows
        super().__init__(pipe, plan, source, device, ["images", "labels", "rows", "valid"])

    def __iter__(self):
        for batch in self._batches():
            out = [batch["images"], batch["labels"].reshape(-1).long()]
            if self.return_rows:
                out.append(batch["rows"].reshape(-1))
            yield tuple(out)
