"""Evaluating image classifiers on DALI validation batches: top-1 / top-5 and ReaL accuracy.

* :func:`topk_correct` counts top-k hits of a batch of logits against hard labels.
* ReaL accuracy (Beyer et al. 2020, *Are we done with ImageNet?*) scores a top-1 prediction as correct
  when it is in the image's set of valid labels; images whose set is empty are left out.
  :func:`load_real_labels` reads ``real.json``, :func:`align_real_labels` puts its entries in the
  order of a :class:`~dali_relabel.loader.ValidationLoader`'s file list, :func:`real_correct` scores
  a batch given the file-list rows of its images.
* :class:`EvalMeter` (alias :class:`MultiLabelAccuracy`) accumulates the counts over batches and sums
  them over ``torch.distributed`` ranks.
* :func:`evaluate` runs a model over a loader; :func:`evaluate_checkpoint` does the whole job of the
  ``dali-relabel evaluate`` command (checkpoint -> model -> loader -> numbers).

Other label sets are evaluated through the loader's ``classes=`` argument (class names in label
order): a folder set whose folders carry the training class names gets the training label ids.
ImageNetV2 names its folders by class index; :func:`imagenetv2_classes` gives the class list that
maps folder ``"i"`` to label ``i``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .distributed import init_from_env
from .errors import DaliRelabelError

#: Validation file names of ImageNet-1k; ReaL's ``real.json`` entry ``n - 1`` belongs to image ``n``.
_ILSVRC_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")


class EvaluationError(DaliRelabelError, ValueError):
    """A checkpoint, label file or image set that cannot be evaluated as asked; the message says why."""


# --------------------------------------------------------------------------------------------------
# Counting


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k`` in ``ks``.

    Args:
        logits: ``[B, C]`` scores.
        labels: ``[B]`` class ids.
        ks: the ``k`` values; a ``k`` larger than ``C`` counts every sample as a hit.

    Returns:
        ``{k: count}`` (Python ints).
    """
    hits = _topk_hits(logits, labels, ks)
    return {k: int(v) for k, v in hits.items()}


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> Dict[int, torch.Tensor]:
    """Like :func:`topk_correct`, but the counts stay 0-d tensors on the logits' device (no sync)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    labels = labels.reshape(-1).to(logits.device, non_blocking=True)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # [B, maxk], best first
    hit = top == labels[:, None]
    return {k: hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks}


def load_real_labels(path) -> List[List[int]]:
    """Read ReaL's ``real.json``: one list of valid class ids per validation image.

    The file is a JSON list; entry ``i`` belongs to the ``i``-th validation image in sorted file
    order (for ImageNet: ``ILSVRC2012_val_{i+1:08d}.JPEG``). An empty list means the image is
    excluded from ReaL accuracy.
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise EvaluationError(f"{path}: expected a JSON list (one list of labels per image), "
                              f"got {type(data).__name__}")
    labels = []
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                  for c in entry):
            raise EvaluationError(f"{path}: entry {i} is {entry!r}, not a list of class ids")
        labels.append([int(c) for c in entry])
    return labels


def align_real_labels(real_labels: Sequence[Sequence[int]], relpaths: Sequence[str]) -> List[List[int]]:
    """The ReaL label list of each image of a file list (``relpaths[row]`` gets entry ``row``).

    When every file is named like ImageNet's ``ILSVRC2012_val_NNNNNNNN.<ext>``, the number picks the
    entry (``NNNNNNNN - 1``), whatever folders the images were sorted into: ``real.json`` follows
    the validation numbering, a class-folder tree does not. Otherwise the entries must already be
    in the file list's order (``ValidationLoader.images.relpaths``: class folder, then file name)
    and there must be exactly one per image.
    """
    names = [path.rsplit("/", 1)[-1] for path in relpaths]
    matches = [_ILSVRC_VAL_NAME.match(name) for name in names]
    if names and all(matches):
        aligned = []
        for path, match in zip(relpaths, matches):
            index = int(match.group(1)) - 1
            if not 0 <= index < len(real_labels):
                raise EvaluationError(f"{path}: ReaL labels have {len(real_labels)} entries, none for "
                                      f"validation image {index + 1}")
            aligned.append(list(real_labels[index]))
        return aligned
    if len(real_labels) != len(relpaths):
        raise EvaluationError(f"ReaL labels have {len(real_labels)} entries but the image set has "
                              f"{len(relpaths)} images (entries must follow the sorted file list)")
    return [list(entry) for entry in real_labels]


def real_correct(logits: torch.Tensor, rows: torch.Tensor,
                 real_labels: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """ReaL hits of a batch: ``(correct, counted)``.

    Args:
        logits: ``[B, C]`` scores; the prediction is the arg-max.
        rows: ``[B]`` index of each image in the file list (``ValidationLoader(return_rows=True)``).
        real_labels: valid labels per file-list row (see :func:`align_real_labels`).

    An image with an empty label list is not counted; otherwise it is correct when its top-1
    prediction is in its list.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    predictions = logits.argmax(dim=1).tolist()
    rows = rows.reshape(-1).tolist()
    if len(rows) != len(predictions):
        raise ValueError(f"{len(predictions)} rows of logits but {len(rows)} row ids")
    correct = counted = 0
    for prediction, row in zip(predictions, rows):
        if not 0 <= row < len(real_labels):
            raise IndexError(f"row {row} is outside the {len(real_labels)} ReaL entries")
        valid = real_labels[row]
        if valid:
            counted += 1
            correct += prediction in valid
    return correct, counted


class _RealTable:
    """ReaL labels as a padded ``[N, L]`` tensor (-1 = no label), scored on any device without a sync."""

    def __init__(self, real_labels: Sequence[Sequence[int]]):
        width = max([len(entry) for entry in real_labels] + [1])
        table = torch.full((len(real_labels), width), -1, dtype=torch.int64)
        for row, entry in enumerate(real_labels):
            if entry:
                table[row, :len(entry)] = torch.as_tensor(list(entry), dtype=torch.int64)
        self.size = len(real_labels)
        self._tables = {torch.device("cpu"): table}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self._tables[torch.device("cpu")].to(device)
        return self._tables[device]

    def score(self, predictions: torch.Tensor, rows: torch.Tensor):
        rows = rows.reshape(-1)
        if rows.device.type == "cpu" and rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < self.size):
            raise IndexError(f"row ids {int(rows.min())}..{int(rows.max())} are outside the {self.size} "
                             "ReaL entries")
        table = self.on(predictions.device)[rows.to(predictions.device, non_blocking=True).long()]
        counted = table[:, 0] >= 0
        correct = (table == predictions[:, None]).any(dim=1) & counted
        return correct.sum(), counted.sum()


class EvalMeter:
    """Top-k and ReaL counts accumulated over batches (and, with :meth:`reduce`, over ranks).

    Args:
        real_labels: valid labels per file-list row (see :func:`align_real_labels`), or ``None``
            for no ReaL accuracy.
        ks: the top-k accuracies to keep (``top1`` and ``top5`` by default).

    Counts stay on the logits' device between batches, so :meth:`update` does not synchronise
    with the GPU. Call :meth:`reduce` once after the last batch on every rank, then :meth:`result`.
    """

    def __init__(self, real_labels: Optional[Sequence[Sequence[int]]] = None, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self._real = _RealTable(real_labels) if real_labels is not None else None
        self._counts: Optional[torch.Tensor] = None  # [num_images, hits per k..., real correct, real counted]
        self.reduced = False

    @property
    def has_real(self) -> bool:
        return self._real is not None

    def update(self, logits: torch.Tensor, labels: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Add one batch: ``logits [B, C]``, ``labels [B]``, and ``rows [B]`` when ReaL is kept."""
        if self.reduced:
            raise RuntimeError("EvalMeter.update after reduce(): the counts are already summed over ranks")
        hits = _topk_hits(logits, labels, self.ks)
        values = [torch.full((), logits.shape[0], dtype=torch.int64, device=logits.device)]
        values += [hits[k] for k in self.ks]
        if self._real is not None:
            if rows is None:
                raise ValueError("ReaL accuracy needs the file-list rows of the batch "
                                 "(ValidationLoader(return_rows=True))")
            values += list(self._real.score(logits.argmax(dim=1), rows))
        else:
            values += [torch.zeros((), dtype=torch.int64, device=logits.device)] * 2
        batch = torch.stack([v.to(torch.int64) for v in values])
        if self._counts is None:
            self._counts = batch
        else:
            self._counts = self._counts.to(batch.device) + batch

    def counts(self) -> Dict[str, int]:
        """The raw counts: ``num_images``, ``top{k}_correct``, ``real_correct``, ``num_real_images``."""
        values = self._counts.tolist() if self._counts is not None else [0] * (len(self.ks) + 3)
        out = {"num_images": values[0]}
        out.update({f"top{k}_correct": v for k, v in zip(self.ks, values[1:])})
        out["real_correct"], out["num_real_images"] = values[-2], values[-1]
        return out

    def reduce(self) -> "EvalMeter":
        """Sum the counts over all ``torch.distributed`` ranks (a no-op without a process group).

        Every rank must call it (it is a collective); calling it again does nothing. Works with
        any backend: the small count tensor goes to the current CUDA device for NCCL, else stays
        on the CPU (gloo).
        """
        if self.reduced:
            return self
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = str(dist.get_backend()).lower()
            if "nccl" in backend and "cpu" not in backend:
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
            counts = self._counts if self._counts is not None else torch.zeros(len(self.ks) + 3,
                                                                               dtype=torch.int64)
            counts = counts.to(device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            self._counts = counts
        self.reduced = True
        return self

    def result(self) -> dict:
        """``top1``, ``top5`` (percent; ``None`` without images), ``real`` (percent, ``None``
        without ReaL labels or without a counted image), ``num_images``, ``num_real_images``."""
        counts = self.counts()
        n = counts["num_images"]
        out = {f"top{k}": (100.0 * counts[f"top{k}_correct"] / n if n else None) for k in self.ks}
        m = counts["num_real_images"]
        out["real"] = 100.0 * counts["real_correct"] / m if self.has_real and m else None
        out["num_images"] = n
        out["num_real_images"] = m if self.has_real else 0
        return out


#: The name the task description uses for the meter.
MultiLabelAccuracy = EvalMeter


# --------------------------------------------------------------------------------------------------
# Running a model


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def evaluate(model: torch.nn.Module, loader, real_labels: Optional[Sequence[Sequence[int]]] = None,
             device=None, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> dict:
    """Top-1, top-5 and (optionally) ReaL accuracy of ``model`` over one pass of ``loader``.

    Args:
        model: a classifier returning ``[B, C]`` logits; it is put in ``eval()`` mode.
        loader: an iterable of ``(images, labels)``, or of ``(images, labels, rows)`` when
            ``loader.return_rows`` is true: normally a :class:`~dali_relabel.loader.ValidationLoader`.
            Images are ``[B, 3, H, W]`` in any memory format.
        real_labels: ReaL labels as read by :func:`load_real_labels` (``real.json`` order). When the
            loader has a file list (``loader.images.relpaths``) they are put in its order with
            :func:`align_real_labels`; otherwise they are indexed by the yielded rows directly. Needs
            a loader built with ``return_rows=True``.
        device: where to run; default: where the model's parameters are (the model is moved when
            a device is given).
        amp_dtype: run the forward pass under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); ``None`` for full precision.
        channels_last: convert the model and the images to the channels-last memory format.

    Label ids: the model's class ``i`` must be the loader's label ``i``. The loader numbers classes
    by its ``classes=`` list (class names in label order; default the sorted folder names). To
    evaluate a model trained on a label store, build the loader with the training store's
    ``class_names`` as ``classes``; then any folder set whose folders use the same class names
    (e.g. another ImageNet test set sorted into wnid folders) gets the training label ids. For
    ImageNetV2 (folders named by class index) pass ``classes=imagenetv2_classes(root)``.

    Under ``torch.distributed`` every rank evaluates its shard and the counts are summed
    (:meth:`EvalMeter.reduce`), so each rank returns the global numbers.

    Returns:
        :meth:`EvalMeter.result` plus ``seconds`` (this rank's wall time) and ``images_per_second``
        (all images over that time).
    """
    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return_rows = bool(getattr(loader, "return_rows", False))
    if real_labels is not None:
        if not return_rows:
            raise ValueError("ReaL accuracy needs the images' rows: build the loader with return_rows=True")
        relpaths = getattr(getattr(loader, "images", None), "relpaths", None)
        if relpaths is not None:
            real_labels = align_real_labels(real_labels, relpaths)
    dtype = _model_dtype(model)
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    meter = EvalMeter(real_labels=real_labels)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            if return_rows:
                images, labels, rows = batch[0], batch[1], batch[-1]
            else:
                images, labels, rows = batch[0], batch[1], None
            images = images.to(device, non_blocking=True).to(dtype)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(images)
            meter.update(logits.float(), labels, rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    meter.reduce()
    result = meter.result()
    result["seconds"] = seconds
    result["images_per_second"] = result["num_images"] / seconds if seconds > 0 else None
    return result


# --------------------------------------------------------------------------------------------------
# Label sets


def imagenetv2_classes(root, num_classes: Optional[int] = None) -> List[str]:
    """Class list for an ImageNetV2 tree, whose folders are named by class index (``"0"``..``"999"``).

    Returns ``["0", "1", ..., str(n - 1)]`` (the folder names sorted by integer value), with ``n``
    ``num_classes`` or one more than the largest folder index, so that ``ValidationLoader(root,
    classes=imagenetv2_classes(root))`` gives label ``i`` to folder ``"i"``, also when some folders
    are absent. (Sorted as strings, folder ``"10"`` would come before ``"2"``.) Index ``i`` is the
    ``i``-th ImageNet class in the standard (sorted wnid) order.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root} is not a directory")
    folders = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    bad = sorted(name for name in folders if not re.fullmatch(r"0|[1-9][0-9]*", name))
    if bad:
        raise EvaluationError(f"{root}: folder {bad[0]!r} is not a class index (ImageNetV2 folders are "
                              f"named 0..999; {len(bad)} such folders)")
    if not folders:
        raise EvaluationError(f"{root}: no class folders")
    largest = max(int(name) for name in folders)
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise EvaluationError(f"{root}: folder {largest!r} is not a class index below {num_classes}")
    return [str(i) for i in range(num_classes)]


# --------------------------------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(path) -> Tuple[dict, dict]:
    """``(state_dict, args)`` of a training checkpoint or a bare state dict
    (:func:`dali_relabel.models.load_weights`); problems raise :class:`EvaluationError`."""
    from .models import WeightsError, load_weights

    try:
        return load_weights(path)
    except WeightsError as error:
        raise EvaluationError(str(error)) from error


def infer_num_classes(state_dict: dict) -> Optional[int]:
    """Rows of the last 2-D ``*.weight`` in the state dict (the classifier's), or ``None``."""
    for key in reversed(list(state_dict)):
        value = state_dict[key]
        if key.endswith("weight") and isinstance(value, torch.Tensor) and value.ndim == 2:
            return int(value.shape[0])
    return None


def build_model(state_dict: dict, args: dict, model_name: Optional[str] = None,
                num_classes: Optional[int] = None) -> Tuple[torch.nn.Module, str, int]:
    """``(model, name, num_classes)``: a model (:func:`dali_relabel.models.create_model`) with the
    checkpoint's weights.

    The name is ``model_name`` if given, else ``args["model"]``, else ``"resnet50"``; the number of
    classes ``num_classes``, else ``args["num_classes"]``, else the classifier's rows.
    """
    name = model_name or args.get("model") or "resnet50"
    if num_classes is None:
        num_classes = args.get("num_classes") or infer_num_classes(state_dict)
    if num_classes is None:
        raise EvaluationError("the number of classes is neither in the checkpoint's args nor inferable "
                              "from its weights")
    from .models import create_model

    try:
        model = create_model(name, int(num_classes))
    except ValueError as error:
        raise EvaluationError(f"cannot build model {name!r}: {error}") from error
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        raise EvaluationError(f"the checkpoint's weights do not fit {name}(num_classes={num_classes}): "
                              + " ".join(line.strip() for line in lines[:3])[:600]) from error
    return model, name, int(num_classes)


def evaluate_checkpoint(checkpoint, val_root, real=None, model_name: Optional[str] = None,
                        batch_size: int = 128, device: str = "auto", classes_from_store=None,
                        imagenetv2: bool = False, config=None) -> dict:
    """The ``dali-relabel evaluate`` job: build the model from ``checkpoint`` and score it on ``val_root``.

    Args:
        checkpoint: path of a checkpoint (see :func:`load_checkpoint`).
        val_root: ImageFolder tree of the evaluation images.
        real: path of ReaL's ``real.json`` (or ``None``).
        model_name: torchvision model name (overrides the checkpoint's ``args["model"]``).
        batch_size: images per batch and rank.
        device: ``"auto"``, ``"cpu"`` or ``"gpu"``.
        classes_from_store: a label store whose ``class_names`` give the label order (the store the
            model was trained on); default: the sorted folder names.
        imagenetv2: the tree's folders are class indices (:func:`imagenetv2_classes`).
        config: a :class:`~dali_relabel.config.DataConfig`; its ``image_size`` / ``val_resize`` are
            replaced by the checkpoint's ``args`` (``image_size`` or ``val_crop_size``, ``val_resize``
            or ``val_resize_size``) when present (without a resize, ``crop_pct`` decides it).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined if needed and every rank
    evaluates its shard. Returns :func:`evaluate`'s dict plus what was evaluated (model, classes,
    image size, ...) and ``rank``.
    """
    from .config import DataConfig
    from .devices import resolve_device
    from .distributed import rank_and_world
    from .loader import ValidationLoader

    state_dict, args = load_checkpoint(checkpoint)
    model, name, num_classes = build_model(state_dict, args, model_name=model_name)
    config = config or DataConfig()
    image_size = args.get("image_size") or args.get("val_crop_size") or config.image_size
    val_resize = args.get("val_resize") or args.get("val_resize_size") or config.val_resize
    config = config.replace(image_size=int(image_size), val_resize=int(val_resize) if val_resize else None)

    classes = None
    if classes_from_store is not None:
        from .store import LabelStore

        store = LabelStore(classes_from_store, verify="header")
        classes = list(store.class_names)
        store.close()
        if len(classes) != num_classes:
            raise EvaluationError(f"{classes_from_store} has {len(classes)} classes but the model has "
                                  f"{num_classes} outputs")
    if imagenetv2:
        if classes is not None and classes != sorted(classes):
            raise EvaluationError(f"ImageNetV2 folder i is the i-th class in sorted order, but the class "
                                  f"names of {classes_from_store} are not sorted, so the model's ids differ")
        classes = imagenetv2_classes(val_root, num_classes)

    use_gpu = resolve_device(device) == "gpu"
    joined = init_from_env(use_gpu)
    try:
        loader = ValidationLoader(val_root, batch_size, config=config, device="gpu" if use_gpu else "cpu",
                                  classes=classes, return_rows=real is not None)
        if len(loader.images.classes) > num_classes:
            raise EvaluationError(f"{val_root} has {len(loader.images.classes)} classes but the model has "
                                  f"{num_classes} outputs")
        real_labels = load_real_labels(real) if real is not None else None
        target = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        result = evaluate(model, loader, real_labels=real_labels, device=target)
        rank, world_size = rank_and_world()
        result.update(rank=rank, world_size=world_size)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    result.update(checkpoint=os.fspath(checkpoint), val=os.fspath(val_root), model=name,
                  num_classes=num_classes, image_size=config.image_size, val_resize=config.resize_size,
                  real_file=os.fspath(real) if real is not None else None,
                  label_order="store" if classes_from_store is not None and not imagenetv2
                  else "imagenetv2" if imagenetv2 else "sorted folders")
    return result


def format_results(result: dict) -> str:
    """A small text table of an :func:`evaluate_checkpoint` / :func:`evaluate` result."""
    def percent(value):
        return "-" if value is None else f"{value:.2f}%"

    rows = [("top-1", percent(result.get("top1")), result.get("num_images")),
            ("top-5", percent(result.get("top5")), result.get("num_images"))]
    if result.get("real") is not None or result.get("real_file"):
        rows.append(("ReaL", percent(result.get("real")), result.get("num_real_images")))
    lines = []
    if "model" in result:
        lines.append(f"{result['model']} ({result['num_classes']} classes) on {result['val']}, "
                     f"{result['image_size']} px crop of {result['val_resize']} px, labels: "
                     f"{result['label_order']}")
    lines.append(f"{'metric':<8}{'accuracy':>10}{'images':>10}")
    lines += [f"{metric:<8}{value:>10}{count:>10}" for metric, value, count in rows]
    if result.get("images_per_second"):
        lines.append(f"{result['images_per_second']:.1f} images/s ({result['seconds']:.1f} s)")
    return "\n".join(lines)
