"""Shared pieces of the augmentation tests: a fixed test image, pipelines, the originals' recorders."""
import random

import numpy as np
from nvidia.dali import fn, pipeline_def


def fixed_image(height=48, width=64, seed=0):
    """A fixed RGB image with gradients, hard edges, a disc and noise (uint8 HWC)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 40 + 160 * x / width
    g = 30 + 150 * y / height
    b = 90 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (height * 0.25) ** 2
    r[disc], g[disc], b[disc] = 230, 60, 40
    g[:, : width // 6] = 10
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def run_pipeline(graph, images, batches=1, batch_size=None, **kwargs):
    """Build ``graph(x)`` over an external source of ``images`` and return ``batches`` of outputs as
    lists of numpy arrays per output."""
    batch_size = batch_size or len(images)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, enable_conditionals=True,
                  seed=11, prefetch_queue_depth=1, **kwargs)
    def pipe():
        x = fn.external_source(lambda: images, batch=True, layout="HWC")
        out = graph(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    p = pipe()
    p.build()
    results = []
    for _ in range(batches):
        outs = p.run()
        results.append([[np.array(t) for t in o] for o in outs])
    return results


def run_rows_pipeline(graph, images, rows, epochs, batch_size, num_threads=1):
    """Build ``graph(x, rows, epochs)`` over ``images`` and their ``rows`` and ``epochs`` (one value
    or one per image), fed in the given order in batches of ``batch_size``, and run it once over
    them all. Returns per output the list of every sample's numpy array, in feeding order."""
    n = len(images)
    assert n % batch_size == 0, (n, batch_size)
    rows = np.asarray(rows, np.int64)
    epochs = np.broadcast_to(np.asarray(epochs, np.int64), (n,))
    batches = [(list(images[i:i + batch_size]), rows[i:i + batch_size].copy(),
                epochs[i:i + batch_size].copy()) for i in range(0, n, batch_size)]

    def source(iteration):
        return batches[iteration % len(batches)]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None,
                  enable_conditionals=True, seed=11, prefetch_queue_depth=1)
    def pipe():
        x, r, e = fn.external_source(source=source, num_outputs=3, batch=True,
                                     layout=["HWC", "", ""])
        out = graph(x, r, e)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    p = pipe()
    p.build()
    results = None
    for _ in batches:
        outs = p.run()
        if results is None:
            results = [[] for _ in outs]
        for k, o in enumerate(outs):
            results[k].extend(np.array(t) for t in o)
    return results


def record_timm(text, count, seed, size=(10, 12)):
    """timm's transform run ``count`` times; per image the applied ops as ``(name, argument)``."""
    from PIL import Image
    from timm.data import auto_augment as aa
    random.seed(seed)
    np.random.seed(seed)
    hparams = dict(aa._HPARAMS_DEFAULT)
    if text.startswith("rand"):
        transform = aa.rand_augment_transform(text, hparams)
        ops = transform.ops
    else:
        transform = aa.auto_augment_transform(text, hparams)
        ops = [op for sub in transform.policy for op in sub]
    current = []

    def recorder(name):
        def aug_fn(img, *args, **kwargs):
            current.append((name, float(args[0]) if args else 0.0))
            return img
        return aug_fn

    for op in ops:
        op.aug_fn = recorder(op.name)
    img = Image.new("RGB", (size[1], size[0]))
    out = []
    for _ in range(count):
        current.clear()
        transform(img)
        out.append(tuple(current))
    return out


def record_torchvision(text, count, seed, size=(10, 12), transform=None):
    """torchvision's transform (by policy name, or ``transform``) run ``count`` times; per image the
    ops as ``(name, argument)``: the magnitude as ``_apply_op`` uses it (``int()`` for translations,
    ``1.0 + m`` for the enhancements)."""
    import torch
    from torchvision.transforms import autoaugment as tv
    if transform is None:
        named = {"ta_wide": tv.TrivialAugmentWide, "ra": tv.RandAugment, "randaugment": tv.RandAugment}
        transform = named[text]() if text in named else tv.AutoAugment(tv.AutoAugmentPolicy(text))
    current = []
    original = tv._apply_op

    def apply_op(img, op_name, magnitude, interpolation, fill):
        if op_name.startswith("Translate") or op_name == "Posterize":
            magnitude = float(int(magnitude))
        if op_name in ("Brightness", "Color", "Contrast", "Sharpness"):
            magnitude = 1.0 + magnitude
        current.append((op_name, float(magnitude)))
        return img

    torch.manual_seed(seed)
    img = torch.zeros((3,) + tuple(size), dtype=torch.uint8)
    out = []
    tv._apply_op = apply_op
    try:
        for _ in range(count):
            current.clear()
            transform(img)
            out.append(tuple(current))
    finally:
        tv._apply_op = original
    return out
