"""Geometric ops as affine matrices the graph computes, the PIL-style warp, and their composition.

Coordinates: continuous pixel coordinates in which pixel ``i`` covers ``[i, i + 1)`` (its centre at
``i + 0.5``), as PIL's ``Image.transform`` and DALI's ``fn.warp_affine`` use them. A matrix
``[[a, b, c], [d, e, f]]`` maps an OUTPUT point ``(x, y)`` to the INPUT point
``(a x + b y + c, d x + e y + f)``.

- :func:`slot_matrix`: the matrix of one slot per sample: PIL's ``rotate`` about the image centre
  ``(W/2, H/2)``, shears about the top-left corner (``x_in = x + f y``), translations (timm: ``+pct *
  W``, content moves left for positive values; torchvision: ``-t`` pixels, content moves right); the
  identity where the slot's op is photometric or does not run.
- :func:`compose`: ``A_k = A_{k-1} @ M_k``: output pixels of op ``k`` to pixels of the policy's input.
- :func:`canvas_checks`: the partial compositions ``M_k @ ... @ M_n`` that say which output pixels
  still show content after a chain of ops (content an earlier op moved off the canvas is lost).
- :func:`warp`: PIL's ``transform``: bilinear (or nearest) sampling with the edge pixels repeated
  inside the image, and ``fill`` (per channel) wherever the source point falls outside
  ``[0, W) x [0, H)`` (a hard edge, as PIL; DALI's own ``fill_value`` would blend it in and is one value).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.constants import f64_constant
from dali_relabel.augment.policies import Policy

INTERPOLATIONS = {"bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}


def identity(batch_like=None):
    """Per-sample 2x3 float32 identity matrices (a DALI source: one per sample of the batch)."""
    return fn.transforms.translation(offset=[0.0, 0.0])


def _coefficients(policy: Policy) -> np.ndarray:
    """``[ops, 7]``: rotate, shear_x, shear_y, tx, tx_w, ty, ty_h of each op (see ``Geometry``)."""
    return np.asarray([[g.rotate, g.shear_x, g.shear_y, g.tx, g.tx_w, g.ty, g.ty_h]
                       for g in (op.geometry for op in policy.ops)], np.float64)


def slot_matrix(policy: Policy, op, arg, applied, width, height):
    """Per-sample output -> input matrix ``[2, 3]`` float32 of one slot (identity when not geometric).

    ``op`` int32 op index, ``arg`` float64 argument, ``applied`` int32 0/1, ``width``/``height``
    float64 sizes (all CPU per-sample scalars).
    """
    row = f64_constant(_coefficients(policy))[op]
    rotate, shear_x, shear_y, tx, tx_w, ty, ty_h = (row[i] for i in range(7))
    v = arg * fn.cast(applied, dtype=types.FLOAT64)
    theta = rotate * v * (math.pi / 180.0)
    cos, sin = dmath.cos(theta), dmath.sin(theta)
    cx, cy = width * 0.5, height * 0.5
    a, b = cos, shear_x * v - sin
    d, e = sin + shear_y * v, cos
    c = cx - cos * cx + sin * cy + tx * v + tx_w * v * width
    f = cy - sin * cx - cos * cy + ty * v + ty_h * v * height
    return fn.reshape(fn.cast(fn.stack(a, b, c, d, e, f), dtype=types.FLOAT), shape=[2, 3])


def compose(affine, matrix):
    """``affine @ matrix``: first ``matrix`` (output -> intermediate), then ``affine``."""
    return fn.transforms.combine(matrix, affine)


def canvas_checks(matrices: Sequence):
    """The canvas checks of a chain of slots: per sample ``[n - 1, 2, 3]`` float32 (CPU), or ``None``
    for fewer than two slots.

    ``matrices``: the slots' output -> input matrices ``M_1 .. M_n`` in the order they run (each the
    identity where the slot moved nothing). An output point ``q`` shows content only if every
    intermediate point ``S_k q``, ``S_k = M_k @ ... @ M_n``, lies on the canvas ``[0, W] x [0, H]``:
    content slot ``k - 1`` moved off the canvas shows fill after it whatever the later slots do,
    although ``S_1`` (the composed affine) maps it inside. Check ``k - 1`` (``k = 2 .. n``) is ``S_k``
    where ``M_{k-1}`` moved the pixels, else the identity (its point is the same as that of a check
    already made: ``S_{k-1} = S_k``); ``S_1`` is the composed affine's own check. With at most one
    slot that moves pixels every check is the identity, which the pooling operator skips.
    """
    n = len(matrices)
    if n < 2:
        return None
    suffix = [None] * n
    suffix[n - 1] = matrices[n - 1]
    for k in range(n - 2, 0, -1):
        suffix[k] = compose(matrices[k], suffix[k + 1])
    eye = types.Constant(np.eye(2, 3, dtype=np.float32))
    checks = []
    for k in range(1, n):
        # 1.0 where M_{k-1} is not exactly the identity; selecting with it is exact (x * 1 + 0 = x)
        moved = fn.cast(fn.reductions.max(dmath.abs(matrices[k - 1] - eye)) > 0, dtype=types.FLOAT)
        checks.append(suffix[k] * moved + eye * (1.0 - moved))
    return fn.stack(*checks)


def warp(images, matrix, fill: Sequence[int], interpolation: str, device: str):
    """Warp HWC uint8 ``images`` by the output -> input ``matrix`` as PIL's ``Image.transform``."""
    interp = INTERPOLATIONS[interpolation]
    warped = fn.warp_affine(images, matrix=matrix, fill_value=None, interp_type=interp,
                            inverse_map=True)
    inside = fn.warp_affine(fn.ones_like(images[:, :, 0:1]), matrix=matrix, fill_value=0,
                            interp_type=types.INTERP_NN, inverse_map=True)
    fill = types.Constant(np.asarray(fill, np.uint8), dtype=types.UINT8, device=device)
    outside = types.Constant(1, dtype=types.UINT8, device=device) - inside
    return warped * inside + fill * outside


def warp_mask(mask, matrix):
    """Carry an HW1 uint8 content mask through a warp: 1 where the output shows input content."""
    return fn.warp_affine(mask, matrix=matrix, fill_value=0, interp_type=types.INTERP_NN,
                          inverse_map=True)
