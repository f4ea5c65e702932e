"""The per-image ``.pt`` label-map releases ``dali-relabel convert`` reads, and how each is named and
oriented.

Both releases hold one file per training image, a tensor ``[2, k, H, W]`` whose index 0 is the
teacher's top-k logits and index 1 their class ids stored as floats. They differ in where a file
lies, which way its grid points and which teacher made it (``docs/store_format.md``, "Converting the
released maps"):

* ``relabel`` (Yun et al., naver-ai/relabel_imagenet): ``<class>/<stem>.pt``, ``[2, 5, 15, 15]``,
  EfficientNet-L2-NS at 475 px. Stores are marked ``WH``: the authors' loader pools the transposed
  crop box, and their published results used it.
* ``token-labeling`` (Jiang et al., LV-ViT, zihangJiang/TokenLabeling ``generate_label.py``): the
  image path's last two components with everything from the first dot on replaced by ``.pt``,
  float16, NFNet-F6 at 576 px (an 18x18 grid). The generator writes the teacher's feature map as it
  lies (grid axis 2 along the image height, axis 3 along its width), so stores are marked ``HW``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from ..errors import DaliRelabelError

RELEASE_TEACHER = "tf_efficientnet_l2_ns_475"
RELEASE_TEACHER_SIZE = 475
TOKEN_LABELING_TEACHER = "dm_nfnet_f6"
TOKEN_LABELING_TEACHER_SIZE = 576


class ConversionError(DaliRelabelError, RuntimeError):
    """The inputs of a conversion do not fit together (missing/extra maps, bad map files)."""


def relabel_map_relpath(image_relpath: str) -> str:
    """``'<wnid>/<stem>.JPEG'`` -> ``'<wnid>/<stem>.pt'`` (the ReLabel release's naming)."""
    return os.path.splitext(image_relpath)[0] + ".pt"


def token_labeling_map_relpath(image_relpath: str) -> str:
    """The map file Token Labeling's generator and loader use for an image (``/``-separated path).

    They keep the path's last two components (class folder and file name) and cut them at the first
    dot: ``'n01440764/n01440764_10026.JPEG'`` -> ``'n01440764/n01440764_10026.pt'``, but
    ``'c/img.v2.jpg'`` -> ``'c/img.pt'`` and ``'c/sub/x.jpg'`` -> ``'sub/x.pt'``.
    """
    last_two = "/".join(image_relpath.split("/")[-2:])
    return last_two.split(".", 1)[0] + ".pt"


@dataclass(frozen=True)
class ReleaseFormat:
    """How one release names its files and what a store converted from it records.

    Attributes:
        name: the ``--format`` value.
        map_relpath: image path relative to the image root -> map path relative to the release root.
        layout: the store layout (``"HW"`` or ``"WH"``, ``docs/store_format.md``).
        teacher, teacher_input_size, source: provenance written to the store.
        square_grid: every map of the release is square (its generator asserts it: the teacher sees a
            square centre crop).
    """

    name: str
    map_relpath: Callable[[str], str]
    layout: str
    teacher: str
    teacher_input_size: int
    source: str
    square_grid: bool = False

    def check_shape(self, path: str, k: int, grid_h: int, grid_w: int) -> None:
        """Refuse a map shape this release never has (the converter checks the first map; every
        other map must have the same shape)."""
        if self.square_grid and grid_h != grid_w:
            raise ConversionError(
                f"{path}: {self.name} maps are square, this one reads as k={k} on a {grid_h}x{grid_w} "
                "grid. A tensor saved as [2, H, W, k] (the classes last) reads like this; it must be "
                "[2, k, H, W].")


FORMATS: Dict[str, ReleaseFormat] = {
    "relabel": ReleaseFormat("relabel", relabel_map_relpath, "WH", RELEASE_TEACHER, RELEASE_TEACHER_SIZE,
                             "relabel-release"),
    "token-labeling": ReleaseFormat("token-labeling", token_labeling_map_relpath, "HW",
                                    TOKEN_LABELING_TEACHER, TOKEN_LABELING_TEACHER_SIZE,
                                    "token-labeling-release", square_grid=True),
}


def format_by_name(name: str) -> ReleaseFormat:
    """The format called ``name`` (one of :data:`FORMATS`)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown release format {name!r}; known: {', '.join(FORMATS)}") from None


def map_relpaths(fmt: ReleaseFormat, image_relpaths: Sequence[str]) -> List[str]:
    """Each image's map path; two images that the format gives one file are an error naming both
    (their generator wrote the second over the first, so the file cannot be attributed)."""
    owner: Dict[str, str] = {}
    wanted = []
    for rel in image_relpaths:
        name = fmt.map_relpath(rel)
        if name in owner:
            raise ConversionError(
                f"images {owner[name]} and {rel} both have the map {name} under the {fmt.name} naming "
                "(it keeps the last folder and the file name up to its first dot), so the file cannot "
                "be attributed to either; rename one of the images")
        owner[name] = rel
        wanted.append(name)
    return wanted


def check_class_id_precision(tensor, num_classes: int, path: str) -> None:
    """Refuse class ids stored in a float type too narrow for ``num_classes``.

    A float type holds every whole number exactly only up to ``2 / eps`` (2048 for float16, 256 for
    bfloat16): above it, a saved id may already be another class's (float16 turns 2049 into 2048).
    """
    import torch

    if tensor.is_floating_point():
        exact = int(round(2 / torch.finfo(tensor.dtype).eps))
        if num_classes - 1 > exact:
            raise ConversionError(
                f"{path}: class ids are stored as {str(tensor.dtype).replace('torch.', '')}, which holds "
                f"whole numbers exactly only up to {exact}; with {num_classes} classes a saved id may "
                "have been rounded to another class's. Save the ids in a wider type.")
