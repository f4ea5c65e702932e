"""Teachers for ``dali-relabel generate``: a classifier applied at every location of its last
feature map, brought to the map's grid and top-k.

:func:`dense_classifier` splits a torchvision or timm classifier at its global pooling and applies
its final linear layer as a 1x1 convolution to the last feature map: ``[B, F, h, w]`` ->
``[B, C, h, w]`` logits per location (:func:`dense_logit_map`). Averaging that map over ``h, w`` gives
the model's ordinary logits exactly (every supported family but MobileNetV3), so the map is a spatial
decomposition of the teacher's prediction. :func:`topk_grid` brings it to ``grid x grid`` and keeps
each cell's top-k. :func:`build_teacher` makes a teacher from a model name and local weights.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DaliRelabelError


class GenerateError(DaliRelabelError, ValueError):
    """A teacher, weights file or image set that cannot be used to generate maps; the message says why."""


class UnsupportedModelError(GenerateError):
    """The teacher's architecture has no supported way to apply its classifier at every location."""


# --------------------------------------------------------------------------------------------------
# The modified classifier


@dataclass
class DenseClassifier:
    """A classifier split at its global pooling.

    Attributes:
        features: images ``[B, 3, S, S]`` -> last feature map ``[B, F, h, w]``.
        head: ``[B, F, h, w]`` -> logit map ``[B, C, h, w]`` (the classifier at every location).
        num_classes: C.
        family: the architecture family recognised.
        exact: the mean of the logit map over ``h, w`` equals the model's logits.
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    family: str
    exact: bool = True


def linear_as_conv1x1(linear: torch.nn.Linear, feature_map: torch.Tensor) -> torch.Tensor:
    """Apply ``linear`` (``[C, F]`` weight) at every location of ``[B, F, h, w]`` -> ``[B, C, h, w]``."""
    weight = linear.weight
    return F.conv2d(feature_map, weight.reshape(weight.shape[0], weight.shape[1], 1, 1), linear.bias)


def _single_linear(head: torch.nn.Module, what: str) -> torch.nn.Linear:
    """The one Linear of ``head`` (a Linear, or a Sequential of Dropout/Identity/Flatten + one Linear)."""
    if isinstance(head, torch.nn.Linear):
        return head
    if isinstance(head, torch.nn.Sequential):
        layers = [m for m in head if not isinstance(m, (torch.nn.Dropout, torch.nn.Identity, torch.nn.Flatten))]
        if len(layers) == 1 and isinstance(layers[0], torch.nn.Linear):
            return layers[0]
    raise UnsupportedModelError(f"the {what} is not a single linear layer after the global pooling "
                                f"({type(head).__name__}); it cannot be applied at every location")


def _resnet(model) -> DenseClassifier:
    def features(x):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))

    fc = _single_linear(model.fc, "fc")
    return DenseClassifier(features, lambda f: linear_as_conv1x1(fc, f), fc.out_features, "resnet")


def _regnet(model) -> DenseClassifier:
    fc = _single_linear(model.fc, "fc")
    return DenseClassifier(lambda x: model.trunk_output(model.stem(x)), lambda f: linear_as_conv1x1(fc, f),
                           fc.out_features, "regnet")


def _features_then_linear(model, family: str, attribute: str = "classifier",
                          features: Optional[Callable] = None) -> DenseClassifier:
    linear = _single_linear(getattr(model, attribute), f"{family} {attribute}")
    return DenseClassifier(features or model.features, lambda f: linear_as_conv1x1(linear, f),
                           linear.out_features, family)


def _mobilenet_v3(model) -> DenseClassifier:
    # classifier = Linear(F, hidden), Hardswish, Dropout, Linear(hidden, C): both linears become 1x1
    # convolutions at every location. The hidden non-linearity makes this per-location, not a
    # decomposition: the map's mean is not the model's logits.
    layers = [m for m in model.classifier if not isinstance(m, (torch.nn.Dropout, torch.nn.Identity))]
    if len(layers) != 3 or not isinstance(layers[0], torch.nn.Linear) or not isinstance(layers[2], torch.nn.Linear):
        raise UnsupportedModelError(f"unexpected MobileNetV3 classifier {model.classifier}")
    first, activation, last = layers

    def head(f):
        return linear_as_conv1x1(last, activation(linear_as_conv1x1(first, f)))

    return DenseClassifier(model.features, head, last.out_features, "mobilenet_v3", exact=False)


def _convnext(model) -> DenseClassifier:
    # classifier = LayerNorm2d, Flatten, Linear, applied to the pooled vector. The LayerNorm of the
    # pooled vector p is affine in p once its mean and variance are fixed, so normalising every
    # location with the statistics of p (per image) makes the map average to the model's logits
    # exactly: the map is the spatial decomposition of the prediction, as for a ResNet.
    layers = [m for m in model.classifier if not isinstance(m, (torch.nn.Dropout, torch.nn.Flatten, torch.nn.Identity))]
    if len(layers) != 2 or not isinstance(layers[0], torch.nn.LayerNorm) or not isinstance(layers[1], torch.nn.Linear):
        raise UnsupportedModelError(f"unexpected ConvNeXt classifier {model.classifier}")
    norm, linear = layers

    def head(f):
        pooled = f.float().mean(dim=(2, 3))
        mean = pooled.mean(dim=1)[:, None, None, None]
        inv_std = torch.rsqrt(pooled.var(dim=1, unbiased=False) + norm.eps)[:, None, None, None]
        normed = (f.float() - mean) * inv_std
        if norm.weight is not None:
            normed = normed * norm.weight.float()[None, :, None, None]
        if norm.bias is not None:
            normed = normed + norm.bias.float()[None, :, None, None]
        return linear_as_conv1x1(linear, normed.to(f.dtype))

    return DenseClassifier(model.features, head, linear.out_features, "convnext")


def _swin(model) -> DenseClassifier:
    # features -> norm (per token) -> permute to NCHW -> pool -> head: the norm is already per location.
    linear = _single_linear(model.head, "Swin head")
    return DenseClassifier(lambda x: model.permute(model.norm(model.features(x))),
                           lambda f: linear_as_conv1x1(linear, f), linear.out_features, "swin")


def _squeezenet(model) -> DenseClassifier:
    # classifier = Dropout, Conv2d(F, C, 1), ReLU, AdaptiveAvgPool2d: already dense before the pool.
    layers = [m for m in model.classifier if not isinstance(m, (torch.nn.Dropout, torch.nn.Identity))]
    if len(layers) != 3 or not isinstance(layers[0], torch.nn.Conv2d):
        raise UnsupportedModelError(f"unexpected SqueezeNet classifier {model.classifier}")
    conv, activation = layers[0], layers[1]
    return DenseClassifier(model.features, lambda f: activation(conv(f)), conv.out_channels, "squeezenet")


def _timm_style(model) -> DenseClassifier:
    classifier = model.get_classifier()
    if not isinstance(classifier, torch.nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__}.get_classifier() is a "
                                    f"{type(classifier).__name__}, not a linear layer")
    return DenseClassifier(model.forward_features, lambda f: linear_as_conv1x1(classifier, f),
                           classifier.out_features, "timm", exact=True)


_CHECKED_GENERIC: "weakref.WeakSet" = weakref.WeakSet()  # generic models whose decomposition was checked

SUPPORTED_FAMILIES = ("ResNet/ResNeXt/Wide ResNet", "RegNet", "EfficientNet (v1, v2)", "MobileNetV2",
                      "MobileNetV3 (per-location head)", "ConvNeXt", "DenseNet", "MNASNet",
                      "ShuffleNetV2", "SqueezeNet", "Swin", "timm CNNs with forward_features + a "
                      "linear get_classifier() after average pooling")


def dense_classifier(model: torch.nn.Module) -> DenseClassifier:
    """Split ``model`` into feature extractor and per-location classifier (the modified classifier).

    Supported torchvision families: ResNet/ResNeXt/Wide ResNet and RegNet (``fc``), EfficientNet,
    MobileNetV2, DenseNet, MNASNet (``classifier[-1]``), ShuffleNetV2 (``fc``), ConvNeXt (LayerNorm
    with the pooled vector's statistics + ``classifier[-1]``), Swin (``head``), SqueezeNet (already
    convolutional), and MobileNetV3 (its two-layer head at every location; the only family whose map
    does not average to the model's logits). timm-style models (``forward_features`` returning
    ``[B, F, h, w]`` and a linear ``get_classifier()``) are accepted after a numerical check that the
    map averages to the model's logits. Anything else (ViT, MaxViT, VGG, AlexNet, Inception,
    GoogLeNet, ...) raises :class:`UnsupportedModelError`.
    """
    import torchvision.models as tvm

    table = [(tvm.ResNet, _resnet), (tvm.RegNet, _regnet),
             (tvm.EfficientNet, lambda m: _features_then_linear(m, "efficientnet")),
             (tvm.MobileNetV3, _mobilenet_v3),
             (tvm.MobileNetV2, lambda m: _features_then_linear(m, "mobilenet_v2")),
             (tvm.ConvNeXt, _convnext),
             (tvm.DenseNet, lambda m: _features_then_linear(
                 m, "densenet", features=lambda x: F.relu(m.features(x)))),
             (tvm.MNASNet, lambda m: _features_then_linear(m, "mnasnet", features=m.layers)),
             (tvm.ShuffleNetV2, lambda m: _features_then_linear(
                 m, "shufflenet_v2", "fc",
                 features=lambda x: m.conv5(m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(x)))))))),
             (tvm.SqueezeNet, _squeezenet), (tvm.SwinTransformer, _swin)]
    for cls, make in table:
        if isinstance(model, cls):
            return make(model)
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "get_classifier", None)):
        dense = _timm_style(model)
        if model not in _CHECKED_GENERIC:
            _check_decomposition(model, dense)
            _CHECKED_GENERIC.add(model)
        return dense
    raise UnsupportedModelError(
        f"{type(model).__name__}: no supported way to apply its classifier at every location (supported: "
        f"{', '.join(SUPPORTED_FAMILIES)}). Transformers with a class token (ViT) and models whose "
        "classifier sees a flattened spatial grid (VGG, AlexNet) have no per-location classifier.")


def _check_decomposition(model: torch.nn.Module, dense: DenseClassifier, size: int = 64) -> None:
    """Refuse a generic model whose dense map does not average to its logits (its head is not avg+linear)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=generator).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feature_map = dense.features(x)
            if feature_map.dim() != 4:
                raise UnsupportedModelError(f"{type(model).__name__}.forward_features returns shape "
                                            f"{tuple(feature_map.shape)}, not a [B, F, h, w] map")
            expected = model(x).float()
            actual = dense.head(feature_map).float().mean(dim=(2, 3))
    except UnsupportedModelError:
        raise
    except Exception as error:  # the model may refuse the probe input (fixed-size transformers)
        raise UnsupportedModelError(f"{type(model).__name__}: its per-location classifier cannot be checked "
                                    f"({type(error).__name__}: {error})") from error
    finally:
        model.train(was_training)
    scale = float(expected.abs().max()) + 1e-6
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * scale):
        raise UnsupportedModelError(f"{type(model).__name__}: applying get_classifier() at every location "
                                    "does not reproduce the model's logits (its head is more than average "
                                    "pooling + one linear layer)")


def dense_logit_map(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at every location of its last feature map: ``[B, C, h, w]``.

    The global pooling is removed and the final linear classifier is applied as a 1x1 convolution
    (the paper's "modified classifier"); ``dense_logit_map(m, x).mean((2, 3))`` equals ``m(x)`` for
    every family :func:`dense_classifier` marks exact. Call it in eval mode (under ``no_grad``).
    """
    dense = dense_classifier(model)
    return dense.head(dense.features(images))


def grid_pair(grid) -> Tuple[int, int]:
    pair = (int(grid), int(grid)) if np.isscalar(grid) else tuple(int(g) for g in grid)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"grid must be a positive int or a pair of them, got {grid!r}")
    return pair


def resize_map(logit_map: torch.Tensor, grid) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, gh, gw]``: adaptive average pooling along each axis longer than the
    grid, then bilinear interpolation (``align_corners=False``) along each axis shorter than it; an
    axis equal to the grid is left as it is."""
    gh, gw = grid_pair(grid)
    h, w = logit_map.shape[-2:]
    if h > gh or w > gw:
        logit_map = F.adaptive_avg_pool2d(logit_map, (min(h, gh), min(w, gw)))
    if h < gh or w < gw:
        logit_map = F.interpolate(logit_map, size=(gh, gw), mode="bilinear", align_corners=False)
    return logit_map


def topk_grid(logit_map: torch.Tensor, grid, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring a logit map to ``grid`` (:func:`resize_map`, in float32) and keep the top ``k`` per cell.

    Returns ``(logits float32 [B, k, gh, gw], class ids int64 [B, k, gh, gw])``, descending per cell.
    """
    if logit_map.dim() != 4:
        raise ValueError(f"expected a logit map [B, C, h, w], got shape {tuple(logit_map.shape)}")
    num_classes = logit_map.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k={k} must lie in [1, num_classes={num_classes}]")
    pooled = resize_map(logit_map.float(), grid)
    values, ids = torch.topk(pooled, k, dim=1, largest=True, sorted=True)
    return values, ids


# --------------------------------------------------------------------------------------------------
# Teachers and weights


def load_state_dict_file(path) -> dict:
    """The state dict of a weights file (:func:`dali_relabel.training.models.load_weights`); problems raise
    :class:`GenerateError`."""
    from ..training.models import WeightsError, load_weights

    try:
        return load_weights(path)[0]
    except WeightsError as error:
        raise GenerateError(str(error)) from error


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _create_model(name: str, num_classes: int) -> Tuple[torch.nn.Module, str]:
    import torchvision

    from ..training.models import BUILTIN, create_model

    if name in BUILTIN:  # the small networks of dali_relabel.training.models (the demo's teacher and student)
        return create_model(name, num_classes), name
    timm_prefix = next((p for p in ("timm:", "timm/") if name.startswith(p)), None)
    if timm_prefix is None:
        classification = set(torchvision.models.list_models(module=torchvision.models))
        if name in classification:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes), name
        timm = _timm()
        if timm is None or not timm.is_model(name):
            hint = "" if timm is not None else " (timm is not installed; `pip install timm` for its models)"
            raise GenerateError(f"unknown model {name!r}: not built in ({', '.join(BUILTIN)}) and not a "
                                f"torchvision classification model{hint}")
    else:
        name = name[len(timm_prefix):]
        timm = _timm()
        if timm is None:
            raise GenerateError(f"model 'timm:{name}' needs timm, which is not installed (`pip install timm`)")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes), name
    except Exception as error:  # timm raises RuntimeError/ValueError/KeyError for unknown names
        raise GenerateError(f"timm cannot build {name!r}: {error}") from error


def build_teacher(name: str, weights_path, num_classes: int) -> torch.nn.Module:
    """A teacher in eval mode: a built-in model of :mod:`dali_relabel.training.models` (``small_resnet``,
    ``medium_resnet``, ``tiny_cnn``), the torchvision classification model ``name`` (or
    ``"timm:NAME"``, or a timm name torchvision does not know, when timm is installed) with
    ``num_classes`` outputs and the weights of ``weights_path`` (see :func:`load_state_dict_file`);
    nothing is downloaded."""
    state_dict = load_state_dict_file(weights_path)
    model, _ = _create_model(name, int(num_classes))
    expected = model.state_dict()
    mismatched = [(key, tuple(state_dict[key].shape), tuple(value.shape)) for key, value in expected.items()
                  if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)]
    if mismatched:
        key, got, want = mismatched[-1]
        hint = ""
        if got and want and got[0] != want[0] and got[1:] == want[1:]:
            hint = (f"; the weights' classifier has {got[0]} outputs but {num_classes} classes are used "
                    f"(the image tree's folders, or --class-names with the teacher's {got[0]} classes in "
                    "class-id order)")
        raise GenerateError(f"{weights_path} does not fit {name}(num_classes={num_classes}): {key} is "
                            f"{list(got)} in the file, {list(want)} in the model{hint}")
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise GenerateError(f"{weights_path} does not fit {name}: {len(missing)} missing keys "
                            f"(first: {missing[:1]}), {len(unexpected)} unexpected keys (first: "
                            f"{unexpected[:1]}); is it the weights of another architecture?")
    model.load_state_dict(state_dict)
    return model.eval()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the model's state dict."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}\n".encode())
        flat = value.detach().contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
