"""Drop-in iterators: ``for images, targets in ReLabelLoader(...)`` in an ordinary PyTorch loop.

:class:`ReLabelLoader` builds the training graph (``pipelines/graphs.py``) over an image tree and its
label store (label maps, or FKD's stored crops in a region store: :mod:`dali_relabel.regions`) and
yields ``(images, soft_targets)`` (optionally hard labels too) on the pipeline's device;
:class:`ValidationLoader` yields ``(images, labels)``. Both behave like a
``torch.utils.data.DataLoader`` where training scripts rely on it: ``len()``, every ``iter()`` starts a
new pass, ``set_epoch``, ``state_dict``/``load_state_dict``. They shard by **global** rank (from
``torch.distributed`` or the ``torchrun`` environment) and never yield padding samples.

Their base, :class:`~dali_relabel.passes.PipelineBatches`, drives one DALI pipeline fed by a
:class:`~dali_relabel.sources.BatchSource` pass after pass; its own base,
:class:`~dali_relabel.loader_state.LoaderState`, keeps the position (shared with the shard loaders).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .config import DataConfig, data_fingerprint
from .fields import PER_CROP_FIELDS
from .devices import device_index, resolve_device
from .distributed import resolve_rank
from .imagefolder import list_images
from .loader_state import LoaderDataset, Pass
from .training.losses import smooth_targets
from .mixing import CutMixSpec, apply_cutmix, apply_mixup, mixup_weights
from .passes import PipelineBatches
from .paths import PathTable
from .plan import EpochPlan
from .regions import check_region_settings, open_training_store, region_targets
from .sources import BatchSource
from .store import RegionStore, StoreError
from .tree_check import check_store_matches_images

_PER_CROP = frozenset(field.name for field in PER_CROP_FIELDS)


def training_batch(batch: dict, config: DataConfig, return_labels: bool, return_rows: bool,
                   return_geometry: bool = False) -> tuple:
    """``(images, targets[, labels][, rows][, geometry])`` of a training batch as the loaders hand it
    out; ``geometry``: ``{"window": [B, 4] (x0, y0, w, h), "flip": [B], "affine": [B, 2, 3],
    "canvas_checks": [B, m, 2, 3]}``."""
    out = [_as_torch_images(batch["images"], config), batch["targets"]]
    if return_labels:
        out.append(batch["labels"].reshape(-1).long())
    if return_rows:
        out.append(batch["rows"].reshape(-1))
    if return_geometry:
        out.append({"window": batch["window"], "flip": batch["flip"].reshape(-1), "affine": batch["affine"],
                    "canvas_checks": batch["canvas_checks"]})
    return tuple(out)


def flatten_crops(batch: dict, crops: int) -> dict:
    """A batch of ``B / k`` images with ``k = crops`` crops each (the graph's ``[B / k, k, ...]``
    outputs of :data:`~dali_relabel.fields.PER_CROP_FIELDS`) as the flat batch of ``B`` crops the
    loaders hand out, crops of one image adjacent; the per-image outputs (labels, rows, valid) are
    repeated per crop. Views and one ``repeat_interleave`` per output: nothing per sample. One crop:
    the batch as it is."""
    if crops == 1:
        return batch
    flat = {}
    for name, value in batch.items():
        if name in _PER_CROP:
            flat[name] = value.reshape(value.shape[0] * crops, *value.shape[2:])
        else:
            flat[name] = value.repeat_interleave(crops, dim=0)
    return flat


def pad_targets(targets: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, C, ...]`` targets zero-padded to ``[B, width, ...]`` (classes the data does not have)."""
    missing = width - targets.shape[1]
    if missing <= 0:
        return targets
    pad = torch.zeros((targets.shape[0], missing, *targets.shape[2:]), dtype=targets.dtype, device=targets.device)
    return torch.cat([targets, pad], dim=1)


def validation_batch(batch: dict, config: DataConfig, return_rows: bool) -> tuple:
    """``(images, labels[, rows])`` of a validation batch as the loaders hand it out."""
    out = [_as_torch_images(batch["images"], config), batch["labels"].reshape(-1).long()]
    if return_rows:
        out.append(batch["rows"].reshape(-1))
    return tuple(out)


def _as_torch_images(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """DALI's images as PyTorch wants them: ``[B, 3, H, W]``, in ``channels_last`` memory format when
    asked (a view of DALI's HWC output, no copy), and bfloat16 when asked (DALI makes float32)."""
    if config.channels_last:
        images = images.permute(0, 3, 1, 2)
    if config.output_dtype == "bfloat16":
        images = images.to(torch.bfloat16)
    return images


def mix_batch(batch: dict, config: DataConfig, epoch: int, batch_index: int, mixing: bool = True) -> dict:
    """CutMix (from the batch's ``mix_box``, and ``pasted`` in ``"localized"`` mode), Mixup for the
    pairs CutMix left alone, then label smoothing: the batch-level work of the training loaders on
    the flat batch (:func:`flatten_crops`), before padding is removed (pairs need the full batch).
    ``batch_index`` and ``epoch`` key Mixup's weights; ``mixing`` off (timm's ``mixup_enabled``)
    leaves Mixup out.

    Pairs are positions ``i`` and ``B - 1 - i`` of the flat batch. With ``crops_per_image`` k > 1 that
    pairs crop j of image i with crop k - 1 - j of image B / k - 1 - i; the two come from one image
    only where B / k is odd, for the middle image's crops (crop j with its crop k - 1 - j, and with
    k odd too, its middle crop with itself, left unmixed as the middle of an odd batch is)."""
    if "mix_box" in batch:
        images, targets, _ = apply_cutmix(batch["images"], batch["mix_box"], batch["targets"],
                                          batch.get("pasted"), channels_last=config.channels_last)
        batch = dict(batch, images=images, targets=targets)
        batch.pop("pasted", None)
    stopped = config.cutmix_stop_epoch is not None and epoch >= config.cutmix_stop_epoch
    if config.mixup_alpha > 0 and mixing and not stopped:
        size = batch["images"].shape[0]
        lam = mixup_weights(size, config.mixup_alpha, config.seed, epoch, batch_index, config.mixup_probability,
                            per_batch=config.mix_granularity == "batch")
        untouched = (batch["mix_box"].reshape(size, 4) == 0).all(1) if "mix_box" in batch \
            else torch.ones(size, dtype=torch.bool)
        images, targets = apply_mixup(batch["images"], batch["targets"], lam, untouched)
        batch = dict(batch, images=images, targets=targets)
    if config.num_classes is not None:  # before smoothing: timm smooths over the head's classes
        batch = dict(batch, targets=pad_targets(batch["targets"], config.num_classes))
    if config.label_smoothing:
        batch = dict(batch, targets=smooth_targets(batch["targets"], config.label_smoothing))
    return batch


class ReLabelLoader(PipelineBatches):
    """Training batches ``(images, soft_targets)`` with ReLabel targets from a label store (or FKD's
    stored crop labels from a region store).

    Args:
        image_root: the ImageFolder tree; store row paths are relative to it.
        store: path of the store (or an open :class:`LabelStore` or :class:`RegionStore`), either
            kind, told apart by its ``format`` attribute; ``None`` trains on the tree's hard labels
            (one-hot targets, the baseline) with the same pipeline.
        batch_size: samples (crops) per batch on this rank; with ``config.crops_per_image`` k it holds
            ``batch_size / k`` images x k crops (a multiple of k; else :class:`~dali_relabel.config.BatchSizeError`).
        config: data settings (:class:`DataConfig`); ``config.layout`` overrides the store's.
        device: where images and targets are made: ``"cuda"``, ``"cuda:1"``, a ``torch.device``
            (decode on DALI's ``mixed`` backend, pool on the GPU), ``"cpu"``, or ``"auto"``.
        device_id: CUDA device when ``device`` names none (default: torch's current device).
        rank, world_size: default from ``torch.distributed`` or ``RANK``/``WORLD_SIZE``.
        shuffle: new permutation every epoch.
        return_labels: yield ``(images, targets, labels)``.
        return_rows: also yield the store rows of the batch (with several crops per image the row
            of each crop: crops of one image are adjacent and share it).
        return_geometry: also yield (last) a dict of every sample's geometry: ``window`` ``[B, 4]``
            int32 (x0, y0, w, h of the crop in source pixels), ``flip`` ``[B]`` (1: mirrored), and
            ``affine`` ``[B, 2, 3]`` float32 mapping an output pixel (centres at i + 0.5) to a pixel
            of the resized, flipped crop: the identity when no geometric augmentation ran, and
            ``canvas_checks`` ``[B, m, 2, 3]`` float32: with several geometric ops, content an
            earlier one moved off the canvas shows fill, and an output pixel shows content iff
            ``affine`` and every check map it into the canvas ``[0, S] x [0, S]`` (identities where
            nothing is to check). The order is window, resize, flip, geometric ops, erasing.
        check_files: at start-up, refuse a store whose rows do not match the image tree (checked
            once per store and tree, then remembered while the tree's folders are unchanged; see
            :mod:`dali_relabel.tree_check`).
        skip_bad_images: leave undecodable images out instead of raising (counted in
            :attr:`skipped_images`).
        start_epoch: epoch number of the first epoch (resuming).
        resume_batch: batches of ``start_epoch`` already trained on (from :meth:`state_dict`).

    Behaves like a ``torch.utils.data.DataLoader`` where training scripts rely on it: ``len()``,
    every ``iter()`` a new pass, ``set_epoch`` (also ``loader.sampler.set_epoch``), ``dataset``,
    ``batch_size``, ``drop_last``, ``state_dict``/``load_state_dict``, and ``mixup_enabled`` (timm
    switches mixing off with it).

    Crops, flips, colour jitter and random interpolation are drawn per sample from
    ``(config.seed, epoch, row)`` (:mod:`dali_relabel.crops`), so a resumed run sees exactly the crops
    an uninterrupted one would. CutMix and Mixup (``config.cutmix_probability``,
    ``config.mixup_alpha``) are applied before the batch is handed out: images carry their partner's
    pixels and targets are mixed (:mod:`dali_relabel.mixing`); ``config.label_smoothing`` last.

    Images are ``[B, 3, S, S]`` (``torch.channels_last`` memory format with ``config.channels_last``)
    in ``config.output_dtype``, targets ``[B, C]`` float32 (``[B, C, oh, ow]`` for an output grid).
    With ``last_batch="pad"`` the last batch may be smaller; it never contains padding.

    **Several crops per image** (``config.crops_per_image`` k > 1, FKD's ``--num_crops``): each image
    is read and decoded once and gives k crops, each with its own window, flip, augmentation and
    target (keyed with ``epoch * k + j``, :mod:`dali_relabel.crops`). A pass reads every image once
    and yields k samples per image: ``len(loader)`` batches of ``batch_size`` crops, ``len(sampler)``
    = this rank's images x k (iterating it gives each image's row k times, as the crops come),
    ``len(dataset)`` the images, ``batch_size`` the crops of a batch; positions and states count
    images (:class:`~dali_relabel.plan.EpochPlan` deals images, ``batch_size / k`` per batch). FKD's
    script counts each such pass as k epochs of its schedule.

    **Region stores** (FKD's soft labels, :class:`~dali_relabel.store.RegionStore`): each sample's
    ``crops_per_image`` stored crops of an epoch are chosen keyed by ``(config.seed, key epoch, row)``
    (:meth:`~dali_relabel.store.RegionStore.select`); each is cut at its stored box (corners rounded
    to whole pixels, :func:`~dali_relabel.store.pixel_windows`) and flipped as stored (``config``'s
    ``scale``, ``ratio`` and ``flip_probability`` are not used); colour jitter, interpolation, erasing
    and photometric policies stay keyed as usual. Targets are the stored soft labels made dense per
    the store's ``label_type``, a batch at a time on the loader's device (nothing is pooled); CutMix
    and Mixup mix them by area. Settings a stored label cannot follow are refused
    (:func:`~dali_relabel.regions.check_region_settings`), and so is ``crops_per_image`` above the
    store's R. ``return_geometry``'s window is the stored box as cut, its flip the stored flip.
    """

    def __init__(self, image_root, store, batch_size: int, config: Optional[DataConfig] = None,
                 device="auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, shuffle: bool = True,
                 return_labels: bool = False, return_rows: bool = False, check_files: bool = True,
                 skip_bad_images: bool = False, start_epoch: int = 0, resume_batch: int = 0,
                 return_geometry: bool = False):
        from .pipelines.graphs import draws_after_crop, pipeline_kwargs, train_outputs, train_pipeline
        from .ops.plugin import load_plugin, require_gpu_backend

        self.config = config = config or DataConfig()
        images_per_batch = config.images_per_batch(batch_size)  # refuses a batch size k does not divide
        self.crops_per_image = config.crops_per_image
        self.image_root = os.fspath(image_root)
        if store is None:  # hard labels of the image tree, as one-hot targets
            self.store = None
            images = list_images(self.image_root)
            paths, labels, self.class_names = PathTable.from_strings(images.relpaths), images.labels, images.classes
            self.num_classes, self.layout = len(images.classes), "HW"
            if config.cutmix_probability > 0 and config.cutmix_mode == "localized":
                raise ValueError("localized CutMix needs label maps (a store)")
        else:
            self.store = open_training_store(store)
            paths, labels = None, None  # the source maps the store's own in its worker
            if self.store.verified == "header":  # a store opened without the path checks
                try:
                    self.store.paths.check_confined("stored image paths")
                except ValueError as error:
                    raise StoreError(self.store.path, str(error)) from None
            if self.regions:
                check_region_settings(config, self.store)
            if check_files:
                check_store_matches_images(self.store, self.image_root)
            self.class_names = self.store.class_names
            self.num_classes = self.store.num_classes
            self.layout = config.layout or ("HW" if self.regions else self.store.layout)
        data_classes, self.num_classes = self.num_classes, config.target_width(self.num_classes)
        rank, world_size = resolve_rank(rank, world_size)
        self.device = resolve_device(device)
        index = device_index(device, device_id)
        load_plugin()  # the crop-window operator, and the pooling operator for soft targets
        if self.device == "gpu" and self.store is not None:
            require_gpu_backend()
        num_samples = len(self.store) if self.store is not None else len(paths)
        plan = EpochPlan(num_samples, images_per_batch, rank, world_size, seed=config.seed,
                         shuffle=shuffle, last_batch=config.last_batch, repeats=config.aug_repeats)
        cutmix = None
        if config.cutmix_probability > 0:
            cutmix = CutMixSpec(config.cutmix_probability, config.cutmix_alpha, config.image_size,
                                seed=config.seed, stop_epoch=config.cutmix_stop_epoch,
                                per_batch=config.mix_granularity == "batch")
        output_map = train_outputs(config, cutmix is not None, return_geometry, self.regions)
        keyed = not self.regions or draws_after_crop(config)  # the graph reads the key epochs
        store_path = self.store.path if self.store else None
        execution = pipeline_kwargs(config, images_per_batch, index)
        decoder = "mixed" if self.device == "gpu" else "cpu"

        def make_source(control, bad_rows):
            return BatchSource(self.image_root, plan, control, store_path=store_path, paths=paths,
                               labels=labels, epochs=keyed, cutmix=cutmix, bad_rows=bad_rows,
                               crops_per_image=config.crops_per_image, regions=self.regions, seed=config.seed)

        def make_pipeline(source):
            return train_pipeline(source, config, data_classes, self.layout, decoder_device=decoder,
                                  geometry=return_geometry, **execution)

        self.return_labels = return_labels
        self.return_rows = return_rows
        self.return_geometry = return_geometry
        self.mixup_enabled = True
        self.dataset = LoaderDataset(self.image_root, self.class_names, num_samples)
        self.drop_last = config.last_batch == "drop"
        targets = "original" if self.store is None else "regions" if self.regions else "relabel"
        self._data = {**data_fingerprint(config), "targets": targets,
                      "layout": self.layout,
                      "dataset": (self.store.header.content_sha256 or f"store of {len(self.store)} rows")
                      if self.store is not None else None}
        self._tree = (paths, labels)
        super().__init__(plan, make_source, make_pipeline, output_map, start_epoch=start_epoch,
                         resume_batch=resume_batch, skip_bad_images=skip_bad_images,
                         timeout=config.worker_timeout)

    def _data_fingerprint(self) -> dict:
        """What defines the epoch's samples and targets: the store's content hash (or, for one-hot
        targets, the tree's listing), the targets kind, the layout, and the data settings
        (:func:`~dali_relabel.config.data_fingerprint`)."""
        if self._data["dataset"] is None:  # hashed once, when first asked
            self._data["dataset"] = listing_sha256(*self._tree)
        return {"data": self._data}

    def _mixing_enabled(self) -> bool:
        return self.mixup_enabled

    @property
    def regions(self) -> bool:
        """Whether the store is a region store (stored crops and their labels, no maps)."""
        return isinstance(self.store, RegionStore)

    def _transform(self, batch: dict, current: Pass) -> dict:
        batch = flatten_crops(batch, self.crops_per_image)
        if self.regions:  # the stored top-k labels of the batch's crops, made dense once per batch
            batch = region_targets(batch, self.store.num_classes, self.store.label_type)
        return mix_batch(batch, self.config, current.epoch, current.first + current.consumed - 1, current.mixing)

    def __iter__(self):
        for batch in self._batches():
            yield training_batch(batch, self.config, self.return_labels, self.return_rows, self.return_geometry)


class ValidationLoader(PipelineBatches):
    """Validation batches ``(images, labels)`` over an ImageFolder tree, every image exactly once per
    pass (over all ranks).

    Args:
        image_root: the tree (``root/<class>/<image>``).
        batch_size: samples per batch on this rank.
        config: data settings (``image_size``, ``crop_pct`` or ``val_resize``, ``val_interpolation``,
            normalisation, ``output_dtype``, ``channels_last``).
        classes: class names in label order (default: sorted folders; pass the store's
            ``class_names`` when evaluating a model trained on a store).
        return_rows: also yield the index of each image in the sorted file list (for ReaL labels).
        Other arguments as :class:`ReLabelLoader`; the DataLoader-like attributes too.
    """

    def __init__(self, image_root, batch_size: int, config: Optional[DataConfig] = None,
                 device="auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, return_rows: bool = False):
        from .pipelines.graphs import VALIDATION_OUTPUTS, pipeline_kwargs, validation_pipeline

        self.config = config = (config or DataConfig()).replace(last_batch="pad")
        self.images = list_images(image_root, classes=classes)
        rank, world_size = resolve_rank(rank, world_size)
        self.device = resolve_device(device)
        plan = EpochPlan(len(self.images), batch_size, rank, world_size, shuffle=False, last_batch="pad")
        paths = PathTable.from_strings(self.images.relpaths)
        labels = np.asarray(self.images.labels, dtype=np.int32)
        execution = pipeline_kwargs(config, batch_size, device_index(device, device_id))
        decoder = "mixed" if self.device == "gpu" else "cpu"

        def make_source(control, bad_rows):
            return BatchSource(self.images.root, plan, control, paths=paths, labels=labels, bad_rows=bad_rows)

        def make_pipeline(source):
            return validation_pipeline(source, config, decoder_device=decoder, **execution)

        self.return_rows = return_rows
        self.dataset = LoaderDataset(self.images.root, self.images.classes, len(self.images))
        self.drop_last = False
        self._data = {**data_fingerprint(config, validation=True), "dataset": None}
        self._tree = (paths, labels)
        super().__init__(plan, make_source, make_pipeline, list(VALIDATION_OUTPUTS),
                         timeout=config.worker_timeout)

    def _data_fingerprint(self) -> dict:
        if self._data["dataset"] is None:
            self._data["dataset"] = listing_sha256(*self._tree)
        return {"data": self._data}

    def __iter__(self):
        for batch in self._batches():
            yield validation_batch(batch, self.config, self.return_rows)


def listing_sha256(paths: PathTable, labels) -> str:
    """Content hash of an image tree's listing: its relative paths and labels, in row order."""
    import hashlib

    digest = hashlib.sha256()
    for start in range(0, len(paths), 65536):
        digest.update("\n".join(paths[i] for i in range(start, min(len(paths), start + 65536))).encode("utf-8"))
        digest.update(b"\n")
    digest.update(np.ascontiguousarray(np.asarray(labels, np.int64)).tobytes())
    return "tree:" + digest.hexdigest()
