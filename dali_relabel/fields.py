"""The fields of a batch, declared once: name, dtype, per-sample rank and shape, tar extension.

Every part of the data path names its tensors from this table: the batch source's outputs
(:data:`SOURCE_FIELDS`, :mod:`dali_relabel.sources`), a shard sample's tar members
(:data:`SHARD_FIELDS`, written by :mod:`dali_relabel.shards` and read by the shard graphs), and the
graphs' outputs, whose names ``pipelines/graphs.py`` exports next to each graph for the loaders to
take. Adding a field is one entry here, its place in the tuples that carry it, and the code that
computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Field:
    """One tensor of a batch.

    Attributes:
        name: its name in the graphs and in the loaders' batch dicts.
        dtype: numpy dtype name of a sample; ``None``: given by the data (a store's logits are float16,
            or float32 in older stores; its class ids the smallest type that holds the classes; images
            ``DataConfig.output_dtype``).
        ndim: rank of one sample (``None``: it depends on the settings).
        shape: one sample's shape, for documentation and messages.
        tar_ext: extension of its member in a shard sample (``None``: not stored in shards).
    """

    name: str
    dtype: Optional[str]
    ndim: Optional[int]
    shape: str
    tar_ext: Optional[str] = None

    def dali_type(self, dtype: Optional[str] = None):
        """DALI's type of ``dtype`` (default: the field's own; ``None`` where neither says one)."""
        from nvidia.dali import types

        dtype = dtype or self.dtype
        return None if dtype is None else types.to_dali_type(np.dtype(dtype).name)


# -- what the source hands over, what shards store ----------------------------------------------------
PATHS = Field("paths", "uint8", 1, "[L] zero-padded absolute image path")
JPEGS = Field("jpegs", "uint8", 1, "[bytes] the encoded image", tar_ext="jpg")
LOGITS = Field("logits", None, 3, "[k, H, W] top-k logits of the label map", tar_ext="logits")
CLASS_IDS = Field("class_ids", None, 3, "[k, H, W] class ids of the label map", tar_ext="ids")
LABELS = Field("labels", "int32", 1, "[1] hard label", tar_ext="label")
ROWS = Field("rows", "int64", 1, "[1] store row (image index)", tar_ext="row")
VALID = Field("valid", "uint8", 1, "[1] VALID, PADDING or SKIPPED (dali_relabel.sources)")
EPOCHS = Field("epochs", "int64", 0, "[] the key epoch of the sample's random choices (its epoch, or with "
                "repeated augmentation epoch * repeats + copy)")
REGION_WINDOW = Field("region_window", "int32", 2, "[c, 4] the windows (y0, x0, h, w) in source pixels of the c "
                      "stored crops of a region store the sample uses (c = crops_per_image; each box's corners "
                      "rounded to whole pixels: dali_relabel.store.pixel_windows)")
REGION_FLIP = Field("region_flip", "int32", 1, "[c] their stored flips (1: mirrored)")
REGION_IDS = Field("region_ids", "int32", 2, "[c, k] their stored top-k class ids; out of a graph, per crop [k] "
                   "([crops, k] with crops_per_image > 1), like the targets")
REGION_VALUES = Field("region_values", "float32", 2, "[c, k] their stored top-k probabilities; out of a graph as "
                      "region_ids")
#: A region store's stored crops as a shard sample keeps them: all R of the image, in the store's dtypes.
STORED_BOXES = Field("stored_boxes", "float32", 2, "[R, 4] every stored crop's box (x0, y0, w, h) in source pixels, "
                     "as the region store holds it", tar_ext="boxes")
STORED_FLIPS = Field("stored_flips", "uint8", 1, "[R] every stored crop's flip (1: mirrored)", tar_ext="flips")
STORED_IDS = Field("stored_ids", None, 2, "[R, k] every stored crop's top-k class ids (the store's dtype)",
                   tar_ext="rids")
STORED_VALUES = Field("stored_values", None, 2, "[R, k] every stored crop's top-k probabilities (float16 or "
                      "float32, the store's dtype)", tar_ext="values")
MIX_BOX = Field("mix_box", "float32", 1, "[4] CutMix box (y0, x0, y1, x1) in output fractions (zeros: not mixed); "
                "[k, 4], one per crop, with crops_per_image k > 1")

# -- what the graphs make ----------------------------------------------------------------------------
IMAGES = Field("images", None, 3, "[3, S, S], or [S, S, 3] for channels_last")
TARGETS = Field("targets", "float32", None, "[C] soft targets, or [C, oh, ow] on an output grid")
PASTED = Field("pasted", "float32", None, "as targets: the map pooled over the CutMix box")
SHAPES = Field("shapes", "int64", 1, "[3] the encoded image's (H, W, C)")
WINDOW = Field("window", "int32", 1, "[4] the crop window x0, y0, w, h in source pixels")
FLIP = Field("flip", "int32", 0, "[] 1 where the crop was mirrored horizontally")
AFFINE = Field("affine", "float32", 2, "[2, 3] output pixel -> pixel of the resized, flipped crop (centres "
               "at i + 0.5); the identity when no geometric op ran")
CANVAS_CHECKS = Field("canvas_checks", "float32", 3, "[m, 2, 3] output pixel -> each intermediate canvas of a "
                      "chain of geometric ops: a pixel shows content iff affine and every check map it into the "
                      "canvas (identities where nothing is to check)")

#: The label map of a sample.
MAP_FIELDS: Tuple[Field, ...] = (LOGITS, CLASS_IDS)
#: The stored crops of a sample from a region store (what the graph cuts, and the labels it passes on).
REGION_FIELDS: Tuple[Field, ...] = (REGION_WINDOW, REGION_FLIP, REGION_IDS, REGION_VALUES)
#: What a training graph over a region store hands out in place of ``targets`` (the loaders make the
#: dense targets of a batch from them).
REGION_LABEL_FIELDS: Tuple[Field, ...] = (REGION_IDS, REGION_VALUES)
#: The outputs a :class:`~dali_relabel.sources.BatchSource` can have, in their order.
SOURCE_FIELDS: Tuple[Field, ...] = (PATHS, LOGITS, CLASS_IDS, *REGION_FIELDS, LABELS, ROWS, VALID, EPOCHS,
                                    MIX_BOX)
#: What ``return_geometry=True`` adds to a training batch, in its order.
GEOMETRY_FIELDS: Tuple[Field, ...] = (WINDOW, FLIP, AFFINE, CANVAS_CHECKS)
#: What a training graph makes per crop: with ``DataConfig.crops_per_image`` k > 1 a graph's sample
#: holds each of these as ``[k, ...]`` (the loaders flatten a batch to ``[B, ...]``, crops of one image
#: adjacent); the other outputs (labels, rows, valid) come once per image and are repeated per crop.
PER_CROP_FIELDS: Tuple[Field, ...] = (IMAGES, TARGETS, PASTED, MIX_BOX, WINDOW, FLIP, AFFINE, CANVAS_CHECKS,
                                      *REGION_LABEL_FIELDS)
#: A shard sample's tar members, in their order in the tar, for shards of a label-map store.
SHARD_FIELDS: Tuple[Field, ...] = (JPEGS, LOGITS, CLASS_IDS, LABELS, ROWS)
#: The stored crops of a region store's shard sample: all R of the image.
STORED_REGION_FIELDS: Tuple[Field, ...] = (STORED_BOXES, STORED_FLIPS, STORED_IDS, STORED_VALUES)
#: A shard sample's tar members, in their order in the tar, by the shards' kind: ``"maps"`` (from a
#: label-map store), ``"regions"`` (from a region store) or ``"images"`` (no store: validation sets).
SHARD_KIND_FIELDS = {
    "maps": SHARD_FIELDS,
    "regions": (JPEGS, *STORED_REGION_FIELDS, LABELS, ROWS),
    "images": (JPEGS, LABELS, ROWS),
}


def names(*fields: Field) -> Tuple[str, ...]:
    """The fields' names, in order."""
    return tuple(field.name for field in fields)
