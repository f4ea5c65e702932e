"""Model construction by name: every torchvision classifier, plus two small built-in networks.

The built-ins exist for CPU-sized work: ``tiny_cnn`` (no batch norm, so a DDP run and a single
process compute the same function; used by the tests), and ``small_resnet`` / ``medium_resnet``
(4-stage residual networks of widths 16 and 32, the demo's student and teacher at 64 px).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DaliRelabelError


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class _FeaturesThenLinear(nn.Module):
    """``fc(avgpool(features(x)))``, with the timm-style hooks ``dali-relabel generate`` uses."""

    features: nn.Module
    fc: nn.Linear

    def forward_features(self, x):
        """The last feature map ``[B, F, h, w]``."""
        return self.features(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallResNet(_FeaturesThenLinear):
    """A small residual network (widths w, 2w, 4w, 8w; stride 16) with a ``fc`` classifier."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        layers = [_conv_bn(3, widths[0], 2)]
        cin = widths[0]
        for i, cout in enumerate(widths):
            layers.append(_Residual(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)


class TinyCNN(_FeaturesThenLinear):
    """Two convolutions and a linear layer, no batch norm."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(width, width * 2, 3, 2, 1), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, num_classes)


BUILTIN = {"tiny_cnn": TinyCNN, "small_resnet": lambda num_classes: SmallResNet(num_classes, width=16),
           "medium_resnet": lambda num_classes: SmallResNet(num_classes, width=32)}


def create_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier: a built-in name or any ``torchvision.models`` name."""
    if name in BUILTIN:
        return BUILTIN[name](num_classes)
    import torchvision

    try:
        return torchvision.models.get_model(name, num_classes=num_classes, weights=None)
    except ValueError as error:
        raise ValueError(f"unknown model {name!r}: not built in ({', '.join(BUILTIN)}) and not a "
                         f"torchvision model ({error})") from None


class WeightsError(DaliRelabelError, ValueError):
    """A weights file is missing, unreadable or holds no state dict."""


def load_problem(error: Exception) -> str:
    """The telling line of a failed ``torch.load`` (with ``weights_only=True``: the global it refused,
    rather than torch's advice to retry with ``weights_only=False``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line]
    return (telling or lines or [type(error).__name__])[0]


def load_weights(path):
    """``(state_dict, args)`` from a weights file.

    Accepts a plain state dict, or a checkpoint dict holding it under ``"model"`` or ``"state_dict"``
    (with its training arguments under ``"args"``, a dict or an ``argparse.Namespace``; ``{}`` when
    absent). Loaded with ``weights_only=True``, so a file cannot run code; ``module.`` (DDP) and
    ``_orig_mod.`` (``torch.compile``) prefixes are stripped from the keys.
    """
    import argparse
    import contextlib
    import os

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    safe = getattr(torch.serialization, "safe_globals", None)
    context = safe([argparse.Namespace]) if safe is not None else contextlib.nullcontext()
    try:
        with context:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many ways
        raise WeightsError(f"{path}: cannot be loaded as a weights-only checkpoint ({load_problem(error)})") \
            from error
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(checkpoint).__name__}")
    args = {}
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            args = checkpoint.get("args") or {}
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsError(f"{path}: neither a state dict nor a checkpoint with a 'model' state dict "
                           f"(keys: {sorted(map(str, checkpoint))[:8]})")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise WeightsError(f"{path}: 'args' is a {type(args).__name__}, expected a dict or Namespace")
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in checkpoint):
            checkpoint = {key[len(prefix):]: value for key, value in checkpoint.items()}
    return dict(checkpoint), dict(args)
