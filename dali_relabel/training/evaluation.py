"""Evaluating image classifiers on DALI validation batches: top-1 / top-5 and ReaL accuracy.

The counting lives in :mod:`dali_relabel.training.metrics` (top-k, ReaL labels, :class:`EvalMeter`).

* :func:`evaluate` runs a model over a loader; :func:`evaluate_checkpoint` does the whole job of the
  ``dali-relabel evaluate`` command (checkpoint -> model -> loader -> numbers).

Other label sets are evaluated through the loader's ``classes=`` argument (class names in label
order): a folder set whose folders carry the training class names gets the training label ids.
ImageNetV2 names its folders by class index; :func:`imagenetv2_classes` gives the class list that
maps folder ``"i"`` to label ``i``.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from typing import List, Optional, Sequence, Tuple

import torch

from ..distributed import init_from_env
from .metrics import EvalMeter, EvaluationError, align_real_labels, load_real_labels


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
    (:func:`dali_relabel.training.models.load_weights`); problems raise :class:`EvaluationError`."""
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
    """``(model, name, num_classes)``: a model (:func:`dali_relabel.training.models.create_model`) with the
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
    from ..config import DataConfig
    from ..devices import resolve_device
    from ..distributed import rank_and_world
    from ..loader import ValidationLoader

    state_dict, args = load_checkpoint(checkpoint)
    model, name, num_classes = build_model(state_dict, args, model_name=model_name)
    config = config or DataConfig()
    image_size = args.get("image_size") or args.get("val_crop_size") or config.image_size
    val_resize = args.get("val_resize") or args.get("val_resize_size") or config.val_resize
    config = config.replace(image_size=int(image_size), val_resize=int(val_resize) if val_resize else None)

    classes = None
    if classes_from_store is not None:
        from ..store import LabelStore

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
