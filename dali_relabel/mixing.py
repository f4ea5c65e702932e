"""CutMix with ReLabel targets.

Samples are mixed in fixed pairs: position ``i`` of the batch the loader hands out with position
``B - 1 - i`` (the order is shuffled every epoch, so pairs are random). Both samples of a pair share
one box, drawn by the data source per batch from ``(seed, epoch, batch)``, pixel-aligned to the
output image; each sample shows its partner's pixels inside the box. With several crops per image
(``DataConfig.crops_per_image`` k) the batch is the flat one of ``B`` crops, crops of an image
adjacent: crop ``j`` of image ``i`` pairs with crop ``k - 1 - j`` of image ``B / k - 1 - i``, every
crop with its own box (the source hands the graph ``[k, 4]`` boxes per image); a pair comes from one
image only for the middle image of a batch with an odd number of images. Two ways to build the target:

* ``"authors"`` (the ReLabel authors' recipe, default): ``lam * t_own + (1 - lam) * t_partner``, both
  pooled over the whole crop, ``lam`` the share of the image left to the sample's own pixels;
* ``"localized"``: ``lam * t_own(crop minus box) + (1 - lam) * t_partner(box)``: the pasted region's
  target is the partner's map pooled over exactly the pasted box (mapped back through the partner's
  crop and mirror), the rest is the sample's own map pooled over its crop without the box. Both
  pools run in the fused operator (its ``region`` input).

Pairs that CutMix leaves alone can be mixed with Mixup instead (:func:`apply_mixup`): images and soft
targets both ``lam * own + (1 - lam) * partner``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class CutMixSpec:
    """CutMix settings carried by the data source.

    Args:
        probability: chance that a pair (or, with ``per_batch``, the batch) is mixed.
        alpha: ``lam ~ Beta(alpha, alpha)`` before the box is clipped.
        image_size: side of the (square) output image, to align boxes to pixels.
        seed: base seed (the same on every rank; pairs differ because rows differ).
        stop_epoch: epochs from this one on are not mixed (``None``: never stop).
        per_batch: one draw (mixed or not, and the box) for all pairs of a batch, as timm's
            ``mode='batch'``; else one per pair.
    """

    probability: float
    alpha: float
    image_size: int
    seed: int = 0
    stop_epoch: Optional[int] = None
    per_batch: bool = False

    def boxes(self, epoch: int, batch_index: int, batch_size: int) -> np.ndarray:
        """float32 ``[B, 4]`` boxes ``(y0, x0, y1, x1)`` in output fractions of one batch; position
        ``i`` and its partner ``B - 1 - i`` share a box, all zeros where the pair is not mixed.

        Drawn from ``(seed, epoch, batch_index)`` in one go, so every rank and every resumed run
        draws the same boxes for the same batch.
        """
        boxes = np.zeros((batch_size, 4), np.float32)
        pairs = batch_size // 2
        if pairs == 0 or (self.stop_epoch is not None and epoch >= self.stop_epoch):
            return boxes
        rng = np.random.default_rng([self.seed, epoch, batch_index, 0xC0FFEE])
        draws = 1 if self.per_batch else pairs
        mixed = rng.random(draws) < self.probability
        lam = rng.beta(self.alpha, self.alpha, size=draws)
        centre = rng.integers(0, self.image_size, size=(draws, 2))
        size = self.image_size
        cut = np.round(np.sqrt(1.0 - lam) * size).astype(np.int64)
        low = np.clip(centre - (cut // 2)[:, None], 0, size)
        high = np.clip(centre + (cut - cut // 2)[:, None], 0, size)
        mixed &= (high > low).all(axis=1)
        pair_boxes = (np.concatenate([low, high], axis=1).astype(np.float64) / size).astype(np.float32)
        pair_boxes[~mixed] = 0
        pair_boxes = np.broadcast_to(pair_boxes, (pairs, 4))
        boxes[:pairs] = pair_boxes
        boxes[batch_size - pairs:] = pair_boxes[::-1]
        return boxes


def partners(batch_size: int, device=None) -> torch.Tensor:
    """Index of each position's partner: ``B - 1 - i``."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, H, W]`` bool mask of each box ``(y0, x0, y1, x1)`` given in output fractions."""
    rows = torch.arange(height, device=boxes.device).view(1, -1, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    y0, x0, y1, x1 = (torch.round(boxes[:, i] * s).long().view(-1, 1, 1)
                      for i, s in zip(range(4), (height, width, height, width)))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def apply_cutmix(images: torch.Tensor, boxes: torch.Tensor, own: torch.Tensor,
                 pasted: Optional[torch.Tensor] = None, channels_last: bool = False):
    """Paste each partner's box into each image and mix the targets.

    Args:
        images: ``[B, C, H, W]`` (or ``[B, H, W, C]`` with ``channels_last``).
        boxes: ``[B, 4]`` pair boxes in output fractions (zero area: not mixed).
        own: ``[B, num_classes]`` each sample's own target (whole crop for ``"authors"``, crop
            minus box for ``"localized"``).
        pasted: ``[B, num_classes]`` each sample's target over its box (``"localized"``); ``None``
            mixes the partner's ``own`` target (``"authors"``).

    Returns:
        ``(images, targets, lam)``: ``lam`` ``[B]`` is each image's share of its own pixels.
    """
    batch = images.shape[0]
    height, width = (images.shape[1], images.shape[2]) if channels_last else images.shape[-2:]
    boxes = boxes.to(images.device, torch.float32)
    mask = box_mask(boxes, height, width)
    partner = partners(batch, images.device)
    lam = 1.0 - mask.flatten(1).float().mean(1)
    pixel_mask = mask.unsqueeze(-1) if channels_last else mask.unsqueeze(1)
    mixed_images = torch.where(pixel_mask, images[partner], images)
    donor = own if pasted is None else pasted
    weight = lam.to(own.dtype).view(-1, *([1] * (own.dim() - 1)))
    targets = weight * own + (1 - weight) * donor[partner.to(donor.device)]
    return mixed_images, targets, lam


def mixup_weights(batch_size: int, alpha: float, seed: int, epoch: int, batch_index: int,
                  probability: float = 1.0, per_batch: bool = False) -> torch.Tensor:
    """``[B]`` Mixup weights, one per pair (shared by both samples; 1 where the pair is not mixed):
    with chance ``probability`` ``lam ~ Beta(alpha, alpha)``. ``per_batch``: one draw for all pairs.
    Drawn from ``(seed, epoch, batch_index)`` so every rank and every resumed run draws the same."""
    rng = np.random.default_rng([seed, epoch, batch_index, 0x313])
    draws = 1 if per_batch else (batch_size + 1) // 2
    pair_lam = rng.beta(alpha, alpha, size=draws)
    pair_lam[rng.random(draws) >= probability] = 1.0
    pair_lam = np.broadcast_to(pair_lam, ((batch_size + 1) // 2,))
    index = np.minimum(np.arange(batch_size), np.arange(batch_size)[::-1])
    return torch.from_numpy(pair_lam[index].astype(np.float32))


def apply_mixup(images: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor):
    """Mix each sample selected by ``mask`` ``[B]`` with its partner: ``lam * own + (1 - lam) * partner``
    for images ``[B, ...]`` and targets ``[B, C]``; the others are returned unchanged."""
    partner = partners(images.shape[0], images.device)
    weight = torch.where(mask.to(lam.device), lam, torch.ones_like(lam))
    w_images = weight.to(images.device, images.dtype).view(-1, *([1] * (images.dim() - 1)))
    w_targets = weight.to(targets.device, targets.dtype).view(-1, *([1] * (targets.dim() - 1)))
    mixed_images = w_images * images + (1 - w_images) * images[partner]
    mixed_targets = w_targets * targets + (1 - w_targets) * targets[partner.to(targets.device)]
    return mixed_images, mixed_targets
