"""Run a policy on a batch in the DALI graph and return the images and their composed affine (and,
on request, the canvas checks that make it exact for chains of geometric ops).

:func:`apply_policy` is the entry point; it must be called inside a
``@pipeline_def(enable_conditionals=True)`` function. Per slot it draws (``draws``), maps levels to
arguments (``magnitudes``), computes the slot's matrix and composes it (``geometry``), then sends
each sample through one kernel with DALI conditionals: all geometric ops share the ``warp`` kernel
(their matrix differs), photometric ops run their ``ops`` kernel, samples whose op does not run take
``identity``. Only the samples of a branch go through it. Every random choice comes from one random
source (:mod:`~dali_relabel.augment.randomness`): keyed by ``(seed, epoch, row)`` in training.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

from dali_relabel.augment import geometry, magnitudes, ops
from dali_relabel.augment.draws import DRAW_SEED_TAG, draw_slots
from dali_relabel.augment.policies import Policy, PolicyError, parse_policy
from dali_relabel.augment.randomness import Random, resolve


def _dispatch(kernel_id, lo: int, hi: int, kernels: Sequence[str], images, arg, matrix, valid,
              context):
    """``kernels[kernel_id](...)`` per sample, as a binary tree of DALI conditionals.

    Returns ``(images, valid)``; ``valid`` (the content mask, or None) changes only in ``warp``.
    """
    if lo == hi:
        name = kernels[lo]
        if name == "warp":
            out = geometry.warp(images, matrix, context["fill"], context["interpolation"],
                                context["device"])
            if valid is not None:
                valid = geometry.warp_mask(valid, matrix)
            return out, valid
        return ops.KERNELS[name](images, arg, context["device"]), valid
    mid = (lo + hi) // 2
    if kernel_id <= mid:
        out, valid = _dispatch(kernel_id, lo, mid, kernels, images, arg, matrix, valid, context)
    else:
        out, valid = _dispatch(kernel_id, mid + 1, hi, kernels, images, arg, matrix, valid, context)
    return out, valid


def _fill(policy: Policy, fill) -> Tuple[int, int, int]:
    fill = policy.fill if fill is None else fill
    if np.isscalar(fill):
        fill = (fill,) * 3
    fill = tuple(int(v) for v in fill)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise PolicyError(f"fill must be one or three values in [0, 255], got {fill}")
    return fill


def apply_op(images, policy: Union[str, Policy], op_name: str, arg, *, fill=None,
             interpolation: str = "bilinear"):
    """Apply one op of ``policy`` with a given argument to every image (tests, previews).

    ``arg`` is the op's argument (a number or a float64 CPU DataNode per sample; see
    :mod:`~dali_relabel.augment.magnitudes`). Returns ``(images, matrix)`` as :func:`apply_policy`.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    if op_name not in policy.op_names:
        raise PolicyError(f"unknown augmentation op {op_name!r} for policy {policy.text!r}; "
                          f"its ops: {', '.join(policy.op_names)}")
    if interpolation not in geometry.INTERPOLATIONS:
        raise PolicyError(f"interpolation must be one of {', '.join(geometry.INTERPOLATIONS)}, "
                          f"got {interpolation!r}")
    index = policy.op_names.index(op_name)
    shape = images.shape(dtype=types.FLOAT64)
    height, width = shape[0], shape[1]
    if not isinstance(arg, DataNode):
        arg = width * 0.0 + float(arg)
    op = fn.cast(width * 0.0, dtype=types.INT32) + index
    applied = op * 0 + 1
    matrix = geometry.slot_matrix(policy, op, arg, applied, width, height)
    spec = policy.ops[index]
    if spec.kernel == "warp":
        out = geometry.warp(images, matrix, _fill(policy, fill), interpolation, images.device or "cpu")
    else:
        out = ops.KERNELS[spec.kernel](images, arg, images.device or "cpu")
    return out, matrix


def apply_policy(images, policy: Union[str, Policy], *, rng: Optional[Random] = None,
                 seed: Optional[int] = None, fill: Union[None, int, Sequence[int]] = None,
                 interpolation: str = "bilinear", return_checks: bool = False, return_mask: bool = False,
                 debug: bool = False):
    """Apply an automatic augmentation policy to a batch of images inside a DALI graph.

    Args:
        images: DataNode of HWC uint8 RGB images (the resized, flipped crops), CPU or GPU.
        policy: a policy string (:func:`~dali_relabel.augment.policies.parse_policy`) or a Policy.
        rng: where every random choice comes from (op, applied, level noise, sign, sub-policy,
            GaussianBlurRand's radius): a :class:`~dali_relabel.augment.randomness.KeyedRandom`
            (training: keyed by ``(seed, epoch, row)``, stream base
            :data:`~dali_relabel.augment.randomness.POLICY_STREAM_BASE`) or a
            :class:`~dali_relabel.augment.randomness.DaliRandom`.
        seed: without ``rng``, a ``DaliRandom`` seeded from ``seed`` (``None``: DALI's per-operator
            seeds); not together with ``rng``.
        fill: RGB fill of the area a geometric op uncovers; ``None``: the original's default
            (timm: ``round(255 * IMAGENET_DEFAULT_MEAN)`` = (124, 116, 104); torchvision: 0).
        interpolation: ``"bilinear"`` (torchvision's reference default; timm's fixed bilinear) or
            ``"nearest"`` (torchvision's class default). timm's ``random`` (bilinear or bicubic per
            op) has no DALI counterpart: ``fn.warp_affine`` has no bicubic.
        return_checks: also return, per sample, the canvas checks ``[max(n - 1, 1), 2, 3]`` float32
            (CPU; ``n`` the policy's slots) the pooling operator takes as ``canvas_checks`` (see
            below and :func:`~dali_relabel.augment.geometry.canvas_checks`).
        return_mask: also return, per sample, an HW1 uint8 mask: 1 where the output pixel shows
            content of the input, 0 where it shows fill (see below).
        debug: also return the draws (see below).

    Returns:
        ``(images, affine)``: the augmented images (same device, layout and dtype) and per sample the
        composed ``[2, 3]`` float32 matrix (CPU) mapping an output pixel coordinate (centres at
        ``i + 0.5``) to a pixel coordinate of the input image; the identity when no geometric op ran.
        Photometric ops leave it unchanged. With several geometric ops the affine says where each
        pixel's content comes from, but content an earlier op moved off the canvas is lost and
        shows fill although the composed affine maps inside the input. ``return_checks=True`` adds
        as the next element the canvas checks that tell it exactly: the output point ``q`` shows
        content iff the affine and every check map ``q`` into ``[0, W] x [0, H]`` (the partial
        compositions of the slots' matrices; identities where no check is needed, so all of them
        with at most one geometric op). ``return_mask=True`` adds the content mask per pixel (one
        nearest-neighbour warp of a 1-channel mask per geometric op) as the next element. With
        ``debug=True`` a last element, a dict of CPU
        DataNodes with one entry per slot: ``op`` (int32 index into ``policy.ops``), ``applied``,
        ``negate`` (int32 0/1), ``level`` (float64: timm magnitude after noise, torchvision bin),
        ``arg`` (float64 op argument) and, for sub-policy families, ``sub``.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    rng = resolve(rng, seed, DRAW_SEED_TAG, "apply_policy")
    if interpolation not in geometry.INTERPOLATIONS:
        raise PolicyError(f"interpolation must be one of {', '.join(geometry.INTERPOLATIONS)}, "
                          f"got {interpolation!r} (DALI's warp_affine has no bicubic)")
    context = {"fill": _fill(policy, fill), "interpolation": interpolation,
               "device": images.device or "cpu"}
    affine = geometry.identity()
    valid = fn.ones_like(images[:, :, 0:1]) if return_mask else None
    slots = policy.num_slots
    if slots == 0:
        checks = _no_checks() if return_checks else None
        return _result(images, affine, checks, valid, {} if debug else None)
    draws = draw_slots(policy, rng)
    shape = images.shape(dtype=types.FLOAT64)
    height, width = shape[0], shape[1]
    kernels = policy.kernels
    kernel_of = np.array([kernels.index(op.kernel) for op in policy.ops], np.int32)
    needs_uniform = "GaussianBlurRand" in policy.op_names
    uniforms = rng.uniform((slots,)) if needs_uniform else None
    args, matrices = [], []
    for slot in range(slots):
        op = draws["op"][slot]
        applied, negate, level = draws["applied"][slot], draws["negate"][slot], draws["level"][slot]
        arg = magnitudes.slot_argument(policy, op, level, negate, width, height,
                                       None if uniforms is None else uniforms[slot])
        args.append(arg)
        matrix = geometry.slot_matrix(policy, op, arg, applied, width, height)
        matrices.append(matrix)
        affine = geometry.compose(affine, matrix)
        kernel_id = types.Constant(kernel_of, dtype=types.INT32)[op] * applied
        images, valid = _dispatch(kernel_id, 0, len(kernels) - 1, kernels, images, arg, matrix,
                                  valid, context)
    checks = None
    if return_checks:
        checks = geometry.canvas_checks(matrices) if slots > 1 else _no_checks()
    info: Optional[Dict[str, object]] = None
    if debug:
        info = dict(draws)
        info["arg"] = fn.stack(*args)
    return _result(images, affine, checks, valid, info)


def _no_checks():
    """One identity canvas check per sample, ``[1, 2, 3]``: nothing to check."""
    return fn.reshape(geometry.identity(), shape=[1, 2, 3])


def _result(images, affine, checks, valid, info):
    out = (images, affine) + tuple(x for x in (checks, valid) if x is not None)
    return out + ((info,) if info is not None else ())
