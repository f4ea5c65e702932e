"""Accuracy counting: top-1 / top-5 against hard labels and ReaL accuracy against sets of labels.

* :func:`topk_correct` counts top-k hits of a batch of logits against hard labels.
* ReaL accuracy (Beyer et al. 2020, *Are we done with ImageNet?*) scores a top-1 prediction as correct
  when it is in the image's set of valid labels; images whose set is empty are left out.
  :func:`load_real_labels` reads ``real.json``, :func:`align_real_labels` puts its entries in the
  order of a :class:`~dali_relabel.loader.ValidationLoader`'s file list, :func:`real_correct` scores
  a batch given the file-list rows of its images.
* :class:`EvalMeter` (alias :class:`MultiLabelAccuracy`) accumulates the counts over batches and sums
  them over ``torch.distributed`` ranks.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import DaliRelabelError

#: Validation file names of ImageNet-1k; ReaL's ``real.json`` entry ``n - 1`` belongs to image ``n``.
_ILSVRC_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")


class EvaluationError(DaliRelabelError, ValueError):
    """A checkpoint, label file or image set that cannot be evaluated as asked; the message says why."""


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
