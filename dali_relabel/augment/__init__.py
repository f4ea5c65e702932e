"""Automatic augmentation policies and random erasing in the DALI graph, with the geometry exposed.

- :func:`apply_policy` runs a timm or torchvision policy string on HWC uint8 images (the resized,
  flipped crops) and returns the images and, per sample, the composed ``[2, 3]`` affine from output
  pixels to input pixels, so labels can follow the pixels.
- :func:`random_erase` is timm's / torchvision's ``RandomErasing`` on the normalised float images.
- :func:`validate_policy` and :meth:`Erasing.validate` check settings without building a graph.
- Their random choices come from ``rng=``: :class:`KeyedRandom` (keyed by ``(seed, epoch, row)``,
  as the crop: the same whatever the batch, thread count, rank or resume point) or
  :class:`DaliRandom` (DALI's random operators; what ``seed=`` builds).

Both must be called inside a ``@pipeline_def(enable_conditionals=True)`` function.
"""
from dali_relabel.augment.apply import apply_op, apply_policy
from dali_relabel.augment.erasing import Erasing, ErasingError, random_erase
from dali_relabel.augment.policies import Policy, PolicyError, parse_policy, validate_policy
from dali_relabel.augment.randomness import (ERASING_STREAM_BASE, POLICY_STREAM_BASE, DaliRandom, KeyedRandom,
                                             RandomnessError)

__all__ = ["apply_policy", "apply_op", "random_erase", "Erasing", "ErasingError", "Policy", "PolicyError",
           "parse_policy", "validate_policy", "KeyedRandom", "DaliRandom", "RandomnessError",
           "POLICY_STREAM_BASE", "ERASING_STREAM_BASE"]
