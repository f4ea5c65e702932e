"""The contenders of the throughput suite, each built as a :class:`~benchmarks.timing.Contender`.

Training loaders (images/s; all decode the same generated JPEGs):

- ``plain``: ``plain_train_pipeline`` (:mod:`benchmarks.baselines`), plain DALI on **our decode path** (``readers.file`` ->
  ``peek_image_shape`` -> ``random_crop_generator`` -> ``decoders.image_slice`` -> resize ->
  ``crop_mirror_normalize``), hard labels: the ceiling;
- ``example``: ``example_train_pipeline``, DALI's example graph (``decoders.image_random_crop``);
- ``relabel``: :class:`~dali_relabel.loader.ReLabelLoader` with soft targets;
- ``authors``: the ReLabel authors' approach: a PyTorch ``DataLoader`` (PIL decode, torchvision
  random-resized crop with its coordinates, flip, ``ToTensor`` + ``Normalize``, one ``torch.load`` of
  the image's ``.pt`` map per sample), then per batch the dense scatter into ``zeros[B, C, 15, 15]`` +
  ``roi_align`` + softmax (:func:`~dali_relabel.ops.reference.reference_label_pooling`, layout ``"WH"``).

Several crops per decoded image (crops/s, the ``crops`` round; the same generated JPEGs):

- ``plain``: as above, one crop per decode (the fastest plain graph: the decoder reads the window
  alone), hard labels: the contender to beat;
- ``relabel-k<k>``: :class:`~dali_relabel.loader.ReLabelLoader` with ``crops_per_image=k``: each image
  decoded once (whole, on the same decoder) and k crops cut from it, soft targets; ``relabel-k1`` is
  the ``relabel`` loader.

Tar shards (images/s; the same images packed by ``dali-relabel shard``, :func:`benchmarks.data.prepare_shards`):

- ``plain-shards``: ``plain_shard_train_pipeline``, ``readers.webdataset`` (JPEG + label) on the
  same decode path as ``plain``, hard labels: the ceiling of the shard path;
- ``shards``: :class:`~dali_relabel.shard_loader.ShardReLabelLoader` with soft targets (maps read
  from the shards; one pipeline per epoch, with its shard order, the next built while a pass ends);
- ``plain-shards-graph``, ``shards-graph``: the two graphs alone (``pipeline.run()`` across reader
  epochs, no iterator, no per-epoch pipeline): the steady state, without what an epoch's end costs.

Feed only (samples/s, CPU, no decode; every output kept so DALI prunes nothing):

- ``reader``: ``fn.readers.file`` alone (encoded bytes + labels);
- ``source``: our :class:`~dali_relabel.sources.BatchSource` + ``read_batches`` (the files read by
  ``relabel.read_files``, the maps, rows, labels, valid flags and epochs).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .data import BenchData, open_store
from .timing import Contender, endless

LABELS = {
    "plain": "plain DALI, same decode path (hard labels)",
    "example": "DALI's example graph (image_random_crop)",
    "relabel": "dali-relabel (soft targets)",
    "authors": "authors' approach (DataLoader + .pt + dense RoIAlign)",
    "plain-shards": "plain DALI on tar shards, same decode path (hard labels)",
    "shards": "dali-relabel on tar shards (soft targets)",
    "plain-shards-graph": "plain graph on tar shards, pipeline.run() only",
    "shards-graph": "dali-relabel's shard graph, pipeline.run() only",
    "reader": "readers.file alone",
    "source": "our source (BatchSource + relabel.read_files)",
}
LOADERS = ("plain", "example", "relabel", "authors")
SHARD_LOADERS = ("plain-shards", "shards", "plain-shards-graph", "shards-graph")


def label(name: str) -> str:
    """``relabel-w2`` -> "dali-relabel (soft targets), 2 source workers"; ``-w0``: the source in the
    loader's process."""
    base, _, workers = name.partition("-w")
    text = LABELS[base]
    if workers == "0":
        return f"{text}, source in the loader's process"
    return f"{text}, {workers} source worker{'s' if workers != '1' else ''}" if workers else text


def soft_target_error(targets) -> float:
    """Largest deviation of a soft-target row sum from 1 (a cheap check that real targets came out)."""
    import torch

    if not torch.is_tensor(targets):
        return 0.0
    targets = targets.float()
    return float((targets.reshape(len(targets), -1).sum(1) - 1).abs().max())


def _exec_settings(config, batch_size: int, device_id=None) -> dict:
    """Execution settings shared by every DALI contender: the loaders' own."""
    from dali_relabel.pipelines.graphs import pipeline_kwargs

    return pipeline_kwargs(config, batch_size, device_id)


def _settings(config, **extra) -> dict:
    return dict(num_threads=config.num_threads, prefetch_queue_depth=config.prefetch_queue_depth, **extra)


# -- training loaders -------------------------------------------------------------------------------
def _plain_like(name: str, graph, source, config, batch_size: int, device: str, **graph_args) -> Contender:
    """A plain DALI ``graph`` over ``source`` (image root or shard set) through ``DALIGenericIterator``."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from .baselines import PLAIN_OUTPUTS

    pipe = graph(source, config, decoder_device="mixed" if device == "gpu" else "cpu", **graph_args,
                 **_exec_settings(config, batch_size, 0 if device == "gpu" else None))
    iterator = DALIGenericIterator([pipe], list(PLAIN_OUTPUTS), reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def epoch():
        for outputs in iterator:
            yield outputs[0]["images"], outputs[0]["labels"]

    return Contender(name, label(name), endless(epoch), lambda b: len(b[0]), drain=2 * config.prefetch_queue_depth,
                     settings=_settings(config, decoder="mixed" if device == "gpu" else "cpu"))


def make_plain(data: BenchData, config, batch_size: int, device: str) -> Contender:
    from .baselines import plain_train_pipeline

    return _plain_like("plain", plain_train_pipeline, data.image_root, config, batch_size, device)


def make_example(data: BenchData, config, batch_size: int, device: str) -> Contender:
    from .baselines import example_train_pipeline

    return _plain_like("example", example_train_pipeline, data.image_root, config, batch_size, device)


def make_relabel(data: BenchData, config, batch_size: int, device: str, name: str = "relabel") -> Contender:
    from dali_relabel.loader import ReLabelLoader

    loader = ReLabelLoader(data.image_root, data.store_path, batch_size=batch_size, config=config, device=device)
    return Contender(name, label(name), endless(lambda: iter(loader)), lambda b: len(b[0]),
                     drain=2 * config.prefetch_queue_depth, check=lambda b: soft_target_error(b[1]),
                     settings=_settings(config, py_num_workers=config.py_num_workers,
                                        decoder="mixed" if device == "gpu" else "cpu"),
                     close=loader.close)


def crops_name(crops: int) -> str:
    """The ``crops`` round's name of dali-relabel with ``crops`` crops per decode."""
    return f"relabel-k{crops}"


def make_relabel_crops(data: BenchData, config, batch_size: int, device: str, crops: int) -> Contender:
    """:class:`ReLabelLoader` with ``crops`` crops per decoded image: batches of ``batch_size`` crops
    (``batch_size / crops`` images)."""
    from dali_relabel.loader import ReLabelLoader

    config = config.replace(crops_per_image=crops)
    loader = ReLabelLoader(data.image_root, data.store_path, batch_size=batch_size, config=config, device=device)
    name = crops_name(crops)
    text = f"dali-relabel, {crops} crop{'s' if crops > 1 else ''} per decode (soft targets)"
    return Contender(name, text, endless(lambda: iter(loader)), lambda b: len(b[0]),
                     drain=2 * config.prefetch_queue_depth, check=lambda b: soft_target_error(b[1]),
                     settings=_settings(config, py_num_workers=config.py_num_workers, crops_per_image=crops,
                                        images_per_batch=batch_size // crops,
                                        decoder="mixed" if device == "gpu" else "cpu"),
                     close=loader.close)


def make_plain_shards(shards_dir: str, config, batch_size: int, device: str) -> Contender:
    from dali_relabel.shards import ShardSet

    from .baselines import plain_shard_train_pipeline

    return _plain_like("plain-shards", plain_shard_train_pipeline, ShardSet.load(shards_dir), config, batch_size,
                       device, reader_seed=config.seed)


def make_shards(shards_dir: str, config, batch_size: int, device: str) -> Contender:
    from dali_relabel.shard_loader import ShardReLabelLoader

    loader = ShardReLabelLoader(shards_dir, batch_size=batch_size, config=config, device=device)
    return Contender("shards", label("shards"), endless(lambda: iter(loader)), lambda b: len(b[0]),
                     drain=2 * config.prefetch_queue_depth, check=lambda b: soft_target_error(b[1]),
                     settings=_settings(config, decoder="mixed" if device == "gpu" else "cpu"),
                     close=getattr(loader, "close", None))


def make_shard_graph(shards_dir: str, config, batch_size: int, device: str, plain: bool) -> Contender:
    """One shard graph run with ``pipeline.run()`` epoch after epoch (the reader wraps around)."""
    from dali_relabel.pipelines.graphs import shard_train_pipeline
    from dali_relabel.shards import ShardSet

    from .baselines import plain_shard_train_pipeline

    shards = ShardSet.load(shards_dir)
    settings = dict(decoder_device="mixed" if device == "gpu" else "cpu",
                    **_exec_settings(config, batch_size, 0 if device == "gpu" else None))
    if plain:
        pipe = plain_shard_train_pipeline(shards, config, reader_seed=config.seed, **settings)
    else:
        names = [s["name"] for s in shards.shards]
        pipe = shard_train_pipeline(shards, names, 0, config, shards.num_classes, config.layout or shards.layout,
                                    reader_seed=config.seed, **settings)
    pipe.build()

    def stream():
        while True:
            pipe.run()
            yield batch_size

    name = "plain-shards-graph" if plain else "shards-graph"
    return Contender(name, label(name), stream(), lambda n: n, drain=2 * config.prefetch_queue_depth,
                     settings=_settings(config, decoder=settings["decoder_device"]))


class AuthorsDataset:
    """The authors' per-sample work: PIL decode, random-resized crop with its coordinates, flip,
    ``ToTensor`` + ``Normalize``, and one ``torch.load`` of the image's ``.pt`` map."""

    def __init__(self, image_root: str, maps_dir: str, relpaths: Sequence[str], labels: Sequence[int], config):
        self.image_root, self.maps_dir = image_root, maps_dir
        self.relpaths, self.labels = list(relpaths), list(labels)
        self.size = config.image_size
        self.scale, self.ratio = tuple(config.scale), tuple(config.ratio)
        self.flip_probability = config.flip_probability
        self.mean = list(config.mean)  # 0-1 units, as Normalize after ToTensor wants
        self.std = list(config.std)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int):
        import random

        import torch
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        from dali_relabel.tools.convert import map_relpath

        relpath = self.relpaths[index]
        with open(os.path.join(self.image_root, relpath), "rb") as f:
            image = Image.open(f).convert("RGB")
        width, height = image.size
        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
        flip = random.random() < self.flip_probability
        if flip:
            image = F.hflip(image)
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        label_map = torch.load(os.path.join(self.maps_dir, map_relpath(relpath)), map_location="cpu",
                               weights_only=True)
        coords = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width])
        return tensor, self.labels[index], label_map, coords, flip


def authors_targets(label_maps, coords, flips, num_classes: int, device: str):
    """The authors' per-batch target computation (on the GPU for ``device="gpu"``)."""
    from dali_relabel.ops.reference import reference_label_pooling

    logits, class_ids = label_maps[:, 0], label_maps[:, 1]
    if device == "gpu":
        logits, class_ids = logits.cuda(non_blocking=True), class_ids.cuda(non_blocking=True)
    return reference_label_pooling(logits, class_ids.long(), coords, num_classes, layout="WH", flips=flips)


def make_authors(data: BenchData, config, batch_size: int, device: str, workers: int) -> Contender:
    import torch

    store = open_store(data.store_path)
    dataset = AuthorsDataset(data.image_root, data.maps_dir, store.paths.tolist(),
                             np.asarray(store.labels).tolist(), config)
    num_classes = store.num_classes
    store.close()
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device == "gpu", generator=generator)

    def epoch():
        for images, labels, label_maps, coords, flips in loader:
            if device == "gpu":
                images = images.cuda(non_blocking=True)
            yield images, authors_targets(label_maps, coords, flips, num_classes, device)

    return Contender("authors", label("authors"), endless(epoch), lambda b: len(b[0]),
                     drain=2 * max(workers, 1),  # DataLoader's prefetch_factor (2) per worker
                     check=lambda b: soft_target_error(b[1]), settings={"dataloader_workers": workers})


# -- feed only --------------------------------------------------------------------------------------
def _feed_graphs():
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.pipelines.graphs import read_batches

    @pipeline_def
    def reader_graph(file_root: str):
        jpegs, labels = fn.readers.file(file_root=file_root, random_shuffle=True, pad_last_batch=True,
                                        name="Reader")
        return jpegs, labels

    @pipeline_def
    def source_graph(source, config):
        data = read_batches(source, config)
        return tuple(data[name] for name in ["jpegs"] + source.names)

    return reader_graph, source_graph


def make_feed_reader(data: BenchData, config, batch_size: int) -> Contender:
    """``readers.file`` alone; it runs epoch after epoch without stopping."""
    reader_graph, _ = _feed_graphs()
    pipe = reader_graph(data.image_root, **_exec_settings(config, batch_size))
    pipe.build()

    def stream():
        while True:
            pipe.run()
            yield batch_size

    return Contender("reader", label("reader"), stream(), lambda n: n, drain=2 * config.prefetch_queue_depth,
                     settings=_settings(config))


def make_feed_source(data: BenchData, config, batch_size: int, name: str = "source") -> Contender:
    """Our source as the loader drives it: one stream that runs on from epoch to epoch (the
    :class:`~dali_relabel.sources.EpochControl` entry stops at :data:`~dali_relabel.sources.FOREVER`),
    so DALI's epoch never ends between passes."""
    from dali_relabel.passes import start_workers
    from dali_relabel.plan import EpochPlan
    from dali_relabel.sources import FOREVER, BatchSource, EpochControl

    _, source_graph = _feed_graphs()
    with open_store(data.store_path) as store:
        num_samples = len(store)
    plan = EpochPlan(num_samples, batch_size, seed=config.seed)
    control = EpochControl()
    control.begin(0, 0, 0, FOREVER)
    # As ReLabelLoader builds it: paths and labels are the store's own, mapped in the worker.
    source = BatchSource(data.image_root, plan, control, store_path=data.store_path, epochs=True)
    pipe = source_graph(source, config, **_exec_settings(config, batch_size))
    start_workers(pipe)
    pipe.build()

    def stream():
        while True:
            pipe.run()
            yield batch_size

    return Contender(name, label(name), stream(), lambda n: n, drain=2 * config.prefetch_queue_depth,
                     settings=_settings(config, py_num_workers=config.py_num_workers), close=control.close)
