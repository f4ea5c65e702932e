"""Region labels for any ImageFolder data set with your own teacher (``dali-relabel generate --regions R``).

FKD ("A Fast Knowledge Distillation Framework for Visual Recognition", Shen & Xing, ECCV 2022)
stores, per training image, R random-resized crops with the teacher's top-k soft label for each. This
module makes such a region store (``docs/store_format.md``, "The region store") with any teacher:

1. **Crops, keyed.** Crop ``j`` (0 <= j < R) of row ``r`` is the random-resized crop and flip of
   ``relabel.random_crop_window`` keyed by ``(seed, epoch=j, row=r)``: torchvision's
   ``RandomResizedCrop.get_params`` (area fraction in ``scale``, FKD's default (0.08, 0.936); aspect
   ratio log-uniform in ``ratio``, (3/4, 4/3); 10 attempts, then the centred fallback) and a flip
   with probability ``flip_probability`` (0.5). Its Python twin is
   ``dali_relabel.crops.crop_window(H, W, sample_keys(seed, j, [r])[0], scale, ratio, 10, flip_probability)``.
   The same seed, image set and R give the same boxes whatever the batch size, device or resume.
2. **The teacher sees exactly that crop.** Each image is decoded once (DALI, ``mixed`` on a GPU,
   ``cpu`` without); its R windows are sliced from it and resized to ``size x size`` with
   antialiasing and ``interpolation`` (FKD: bicubic); then, a batch at a time in torch, mirrored
   where the flip says so and normalised with the mean/std of the :class:`DataConfig`. The graph is
   ``pipelines/graphs.py:region_teacher_pipeline``.
3. **Soft labels.** The teacher's logits of each crop, softmax (float32), top-``k`` (``torch.topk``,
   descending): the class ids and probabilities, stored as float16 with ``label_type
   "marginal_smoothing"`` (FKD's ``marginal_smoothing_k5`` for k = 5: a loader gives the top-k their
   probability and spreads the rest evenly over the other classes). The stored box is the window in
   source pixels ``(x0, y0, w, h)`` (whole pixels), the flip 0/1, the image size the one
   ``peek_image_shape`` reads (as today's ``generate``).

**Memory.** DALI holds a batch's crops as uint8: ``batch_size x R x size^2 x 3`` bytes (R = 500 at
224 px: 75 MB per image), times the batches in flight (``prefetch_queue_depth``, 2, plus the one
being labelled). The teacher runs on chunks of ``crop_batch`` crops (float ``crop_batch x 3 x
size^2`` plus its activations). Choose ``batch_size`` (images) from R: the CLI's default is
``max(1, 256 // R)``. The graph has R branches (about five DALI operators each).

**Resume, ranks.** As the map ``generate`` (:mod:`dali_relabel.tools.generate`, whose driver this
reuses): ``<out>.partial`` with ``<out>.generate.json`` (the settings: weights fingerprint, size,
normalisation, AMP, R, k, the crop ranges, seed, interpolation) is resumed by the same command and
started again when made with other settings; ``torchrun`` ranks write parts that rank 0 merges.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import DataConfig
from ..imagefolder import list_images
from ..outputs import OutputLock
from ..store import RegionStore, RegionWriter
from .generate import SOURCE_NAME, TeacherRun, generate_store
from .teachers import GenerateError, UnsupportedModelError, dense_classifier

#: FKD's defaults: RandomResizedCrop's area range in its generator, torchvision's aspect range and flip.
DEFAULT_SCALE = (0.08, 0.936)
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_FLIP_PROBABILITY = 0.5
#: How a dense target is recovered from the stored top-k (``dali_relabel.store.LABEL_TYPES``).
LABEL_TYPE = "marginal_smoothing"
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")


def default_batch_size(regions: int) -> int:
    """Images per batch for R crops each: about 256 crops per batch, at least one image."""
    return max(1, 256 // max(1, int(regions)))


class RegionJob:
    """What ``generate --regions`` does (a job of :func:`~dali_relabel.tools.generate.generate_store`):
    R keyed crops per decoded image, the teacher's softmax top-k per crop, a
    :class:`~dali_relabel.store.RegionWriter`."""

    store_class = RegionStore

    def __init__(self, regions: int, size: int, k: int, class_names: Sequence[str], scale=DEFAULT_SCALE,
                 ratio=DEFAULT_RATIO, flip_probability: float = DEFAULT_FLIP_PROBABILITY, seed: int = 0,
                 interpolation: str = "bicubic", crop_batch: int = 256, teacher_name: str = "",
                 mean: Sequence[float] = DataConfig.mean, std: Sequence[float] = DataConfig.std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.regions, self.size, self.k = int(regions), int(size), int(k)
        self.class_names, self.teacher_name = list(class_names), teacher_name
        self.scale, self.ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        self.flip_probability, self.seed = float(flip_probability), int(seed)
        self.interpolation, self.crop_batch = interpolation, int(crop_batch)

    def settings(self) -> dict:
        """What a resumed partial store must have been made with, besides the common settings."""
        return dict(regions=self.regions, k=self.k, scale=list(self.scale), ratio=list(self.ratio),
                    flip_probability=self.flip_probability, seed=self.seed, interpolation=self.interpolation,
                    label_type=LABEL_TYPE, crops="relabel.random_crop_window keyed (seed, epoch=crop, row)")

    def writer(self, target: str, relpaths: Sequence[str], resume: bool, lock: OutputLock) -> RegionWriter:
        return RegionWriter(target, relpaths, len(self.class_names), self.regions, self.k, LABEL_TYPE,
                            self.class_names, teacher=self.teacher_name, teacher_input_size=self.size,
                            source=SOURCE_NAME, resume=resume, lock=lock)

    @staticmethod
    def outputs() -> List[str]:
        from ..pipelines.graphs import REGION_TEACHER_OUTPUTS

        return list(REGION_TEACHER_OUTPUTS)

    def pipeline(self, source, config: DataConfig, decoder_device: str, half_input: bool, kwargs: dict):
        """The (unbuilt) region teacher graph over ``source`` (outputs: :meth:`outputs`)."""
        from ..pipelines.graphs import region_teacher_pipeline

        return region_teacher_pipeline(source, config, self.size, self.regions, self.scale, self.ratio,
                                       self.flip_probability, self.seed, interpolation=self.interpolation,
                                       decoder_device=decoder_device, **kwargs)

    def write(self, writer: RegionWriter, start: int, batch: dict, keep: np.ndarray, labels: np.ndarray,
              shapes: np.ndarray, run: TeacherRun) -> None:
        """Label every crop of the ``keep`` samples of ``batch``; write them from row ``start``."""
        index = torch.from_numpy(np.nonzero(keep)[0])

        def kept(name):  # the kept samples of an output (no copy when all are kept)
            return batch[name] if keep.all() else batch[name][index.to(batch[name].device)]

        crops = kept("images")  # [n, R, S, S, 3] uint8
        flips = kept("flip").reshape(len(index), self.regions)
        windows = kept("window").reshape(len(index), self.regions, 4)
        values, ids = self.label_crops(crops.reshape((-1,) + tuple(crops.shape[2:])), flips.reshape(-1), run)
        shape = (len(index), self.regions, self.k)
        writer.write(start, windows.cpu().numpy().astype(np.float32), flips.cpu().numpy(),
                     ids.reshape(shape).numpy(), values.reshape(shape).numpy(), shapes, labels)

    def label_crops(self, crops: torch.Tensor, flips: torch.Tensor,
                    run: TeacherRun) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 probabilities and int64 class ids ``[N, k]`` (CPU) of the teacher's softmax top-k
        for uint8 crops ``[N, S, S, 3]``, mirrored where ``flips`` ``[N]`` is 1, in chunks of
        :attr:`crop_batch`."""
        mean = torch.tensor(self.mean, device=run.torch_device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=run.torch_device).view(1, 3, 1, 1) * 255
        values, ids = [], []
        for begin in range(0, len(crops), self.crop_batch):
            x = crops[begin:begin + self.crop_batch].to(run.torch_device, non_blocking=True)
            mirror = flips[begin:begin + self.crop_batch].to(run.torch_device).bool().view(-1, 1, 1, 1)
            x = torch.where(mirror, x.flip(2), x).permute(0, 3, 1, 2).float()  # NHWC -> NCHW (a view)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last if run.device == "gpu"
                                              else torch.contiguous_format)
            with torch.inference_mode(), run.autocast():
                logits = run.model(x)
            if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
                raise GenerateError(f"the teacher gave logits of shape {tuple(logits.shape)} for {len(x)} crops; "
                                    f"expected [{len(x)}, {len(self.class_names)}] (one per class)")
            top = torch.softmax(logits.float(), dim=1).topk(self.k, dim=1)
            values.append(top.values.cpu())
            ids.append(top.indices.cpu())
        return torch.cat(values), torch.cat(ids)

    @staticmethod
    def merge_writer(store: RegionStore, out: str, paths: Sequence[str], resume: bool,
                     lock: OutputLock) -> RegionWriter:
        """A writer of ``out`` with the header of the part ``store`` (for ``merge_parts``)."""
        h = store.header
        values_dtype = store.read(np.arange(1)).values.dtype
        return RegionWriter(out, paths, h.num_classes, h.regions, h.k, h.label_type, store.class_names,
                            values_dtype=values_dtype, teacher=h.teacher, teacher_input_size=h.teacher_input_size,
                            source=h.source, resume=resume, lock=lock)

    @staticmethod
    def merge_rows(store: RegionStore, begin: int, end: int) -> tuple:
        """Rows ``[begin, end)`` of a part as the writer's ``write`` arguments after ``start``."""
        crops = store.read(np.arange(begin, end))
        return (crops.boxes, crops.flips, crops.class_ids, crops.values, store.image_sizes[begin:end],
                store.labels[begin:end])


def _teacher_outputs(model: torch.nn.Module) -> Optional[int]:
    """The number of classes of a supported classifier family (``None``: checked on the first batch)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dense_classifier(model).num_classes
    except UnsupportedModelError:
        return None


def generate_region_labels(image_root, out, model: torch.nn.Module, regions: int, size: int = 224, k: int = 5,
                           scale: Sequence[float] = DEFAULT_SCALE, ratio: Sequence[float] = DEFAULT_RATIO,
                           flip_probability: float = DEFAULT_FLIP_PROBABILITY, seed: int = 0,
                           interpolation: str = "bicubic", batch_size: Optional[int] = None, crop_batch: int = 256,
                           device: Optional[str] = "auto", rank: int = 0, world_size: int = 1,
                           class_names: Optional[Sequence[str]] = None, teacher_name: str = "",
                           progress: bool = True, config: Optional[DataConfig] = None, amp: bool = False,
                           device_id: Optional[int] = None, restart: bool = False,
                           merge: Optional[bool] = None) -> str:
    """Run ``model`` over R keyed crops of every image of ``image_root``; write the region store ``out``.

    Args:
        image_root: an ImageFolder tree (``root/<class>/<image>``); rows follow its sorted order.
        out: the region store to write.
        model: the teacher: any ``nn.Module`` mapping ``[N, 3, size, size]`` normalised images to
            ``[N, C]`` logits, C the number of classes. Put in eval mode and moved to the device in place.
        regions: R, crops per image.
        size: the teacher's input side (every crop is resized to ``size x size``; FKD: 475 for
            EfficientNet-L2, 224 for most teachers).
        k: classes kept per crop (top-k of the softmax).
        scale, ratio, flip_probability: the random-resized crop's area range (fractions of the image),
            aspect-ratio range (w/h) and flip probability.
        seed: the crops' key seed (crop j of row r: key ``(seed, epoch=j, row=r)``).
        interpolation: of the crop resize: ``bicubic`` (FKD's), ``bilinear``, ``lanczos`` or ``nearest``.
        batch_size: images per DALI batch (default :func:`default_batch_size`); crop_batch: crops per
            teacher forward pass.
        device, rank, world_size, class_names, teacher_name, progress, config, amp, device_id, restart,
        merge: as :func:`~dali_relabel.tools.generate.generate_label_maps`'s (``config`` gives the
            mean/std, DALI workers and threads and ``adjust_orientation``).

    Returns the path written: ``out``, or this rank's part path when the parts are not merged here.
    """
    image_root = os.fspath(image_root)
    images = list_images(image_root, classes=class_names)
    num_classes = len(images.classes)
    outputs = _teacher_outputs(model)
    if outputs is not None and outputs != num_classes:
        raise GenerateError(f"the teacher has {outputs} outputs but {image_root} gives {num_classes} classes; pass "
                            f"the teacher's {outputs} class names in class-id order (--class-names FILE)")
    problems = []
    if regions is None or int(regions) < 1:
        problems.append(f"regions={regions} must be at least 1")
    if not 1 <= k <= num_classes:
        problems.append(f"k={k} must lie in [1, {num_classes}]")
    if size < 1 or crop_batch < 1:
        problems.append(f"size and crop_batch must be positive (got {size}, {crop_batch})")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        problems.append(f"the crop scale must satisfy 0 < lo <= hi <= 1 (fractions of the image area), got "
                        f"{tuple(scale)}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        problems.append(f"the crop ratio must satisfy 0 < lo <= hi (w/h), got {tuple(ratio)}")
    if not 0 <= flip_probability <= 1:
        problems.append(f"flip_probability={flip_probability} must lie in [0, 1]")
    if interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if problems:
        raise GenerateError("; ".join(problems))
    config = config or DataConfig()
    job = RegionJob(regions, size, k, images.classes, scale=scale, ratio=ratio, flip_probability=flip_probability,
                    seed=seed, interpolation=interpolation, crop_batch=crop_batch, teacher_name=teacher_name,
                    mean=config.mean, std=config.std)
    return generate_store(job, images, out, model, batch_size=batch_size or default_batch_size(regions),
                          device=device, rank=rank, world_size=world_size, progress=progress, config=config, amp=amp,
                          device_id=device_id, restart=restart, merge=merge)
