"""The plain-DALI graphs the throughput suite measures dali-relabel against (no label maps).

They read the same files with ``readers.file`` (or the same tar shards with ``readers.webdataset``)
and decode them with the package's own decode steps (:func:`~dali_relabel.pipelines.graphs.decoder_args`,
``resize_square``, ``normalize``), so the only difference left is what ReLabel adds: keyed crops,
the maps and their pooling. Each graph's outputs are :data:`PLAIN_OUTPUTS`. Execution settings as
for every graph: ``graph(..., **pipeline_kwargs(config, batch_size, device_id))``.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def

from dali_relabel.config import DataConfig
from dali_relabel.fields import IMAGES, JPEGS, LABELS, names
from dali_relabel.pipelines.graphs import decoder_args, normalize, read_shards, resize_square
from dali_relabel.shards import ShardSet

#: Outputs of every baseline graph: images and hard labels.
PLAIN_OUTPUTS = names(IMAGES, LABELS)


def _fixed_interpolation(config: DataConfig) -> DataConfig:
    """The plain graphs have no per-sample draws: bilinear stands in for ``"random"``."""
    return config.replace(interpolation="bilinear") if config.interpolation == "random" else config


def _plain_reader(file_root: str, shard_id: int, num_shards: int):
    return fn.readers.file(file_root=file_root, random_shuffle=True, shard_id=shard_id,
                           num_shards=num_shards, pad_last_batch=True, name="Reader")


def _plain_augment(jpegs, config: DataConfig, decoder_device: str):
    """``peek_image_shape`` -> ``random_crop_generator`` -> ``decoders.image_slice`` -> resize -> flip
    + normalize, with DALI's own random draws (no keys, no coordinates kept). With
    ``config.auto_augment`` the same policy runs on the flipped crops, and with
    ``config.random_erase_probability`` the same erasing after normalisation (:mod:`dali_relabel.augment`
    with DALI's random operators): the hard-label twin of an augmented dali-relabel graph."""
    shape = fn.peek_image_shape(jpegs, adjust_orientation=config.adjust_orientation)
    anchor, crop = fn.random_crop_generator(shape, random_area=list(config.scale),
                                            random_aspect_ratio=list(config.ratio),
                                            num_attempts=config.num_attempts)
    images = fn.decoders.image_slice(jpegs, anchor, crop, axis_names="HW",
                                     **decoder_args(decoder_device, config))
    images = resize_square(images, _fixed_interpolation(config))
    mirror = fn.random.coin_flip(probability=config.flip_probability)
    if config.auto_augment is None:
        images = normalize(images, config, mirror)
    else:
        from dali_relabel.augment import apply_policy

        images, _ = apply_policy(fn.flip(images, horizontal=mirror), config.auto_augment, seed=config.seed)
        images = normalize(images, config)
    if config.random_erase_probability > 0:
        from dali_relabel.augment import random_erase

        images = random_erase(images, config.erasing(), layout="HWC" if config.channels_last else "CHW",
                              seed=config.seed)
    return images


@pipeline_def
def plain_train_pipeline(file_root: str, config: DataConfig, decoder_device: str = "cpu",
                         shard_id: int = 0, num_shards: int = 1):
    """Plain DALI on the same decode path as ``train_pipeline``, without maps: ``readers.file`` ->
    ``peek_image_shape`` -> ``random_crop_generator`` -> ``decoders.image_slice`` -> resize -> flip +
    normalize. Outputs: images, hard labels. The throughput benchmark's ceiling."""
    jpegs, labels = _plain_reader(file_root, shard_id, num_shards)
    return _plain_augment(jpegs, config, decoder_device), labels


@pipeline_def
def plain_shard_train_pipeline(shards: ShardSet, config: DataConfig, decoder_device: str = "cpu",
                               shard_id: int = 0, num_shards: int = 1, reader_seed: int = 0):
    """Plain DALI over tar shards: ``readers.webdataset`` (the JPEG and its label only, the same
    shuffle buffer as ``shard_train_pipeline``) -> the decode path of :func:`plain_train_pipeline`.
    Outputs: images, hard labels. The shard benchmark's ceiling."""
    data = read_shards(shards, [s["name"] for s in shards.shards], shard_id, num_shards, shuffle=True,
                       reader_seed=reader_seed, fields=[JPEGS, LABELS])
    return _plain_augment(data["jpegs"], config, decoder_device), data["labels"]


@pipeline_def
def example_train_pipeline(file_root: str, config: DataConfig, decoder_device: str = "cpu",
                           shard_id: int = 0, num_shards: int = 1):
    """DALI's example ImageNet graph (``decoders.image_random_crop``, the crop fused into the decoder)
    with our resize and normalisation: ``readers.file`` -> ``image_random_crop`` -> resize -> flip +
    normalize. Outputs: images, hard labels."""
    jpegs, labels = _plain_reader(file_root, shard_id, num_shards)
    images = fn.decoders.image_random_crop(jpegs, random_area=list(config.scale),
                                           random_aspect_ratio=list(config.ratio),
                                           num_attempts=config.num_attempts,
                                           **decoder_args(decoder_device, config))
    images = normalize(resize_square(images, _fixed_interpolation(config)), config,
                       fn.random.coin_flip(probability=config.flip_probability))
    return images, labels
