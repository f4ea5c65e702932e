"""DALI graphs for ReLabel training, validation and the teacher pass of ``dali-relabel generate``.

Every graph starts from a :class:`~dali_relabel.sources.BatchSource`: one call per batch (made ahead on
a thread of this process, or in DALI worker processes) hands over the image paths, which the plugin's
C++ file reader ``relabel.read_files`` reads (DALI's ``io.file.read`` reads ``s3://`` URLs), and (for
training) the rows' label maps and random keys.

Train: ``peek_image_shape`` -> ``relabel.random_crop_window`` (random-resized crop and flip keyed by
``(seed, epoch, row)``; ``relabel.sample_draws`` adds colour jitter and random interpolation) ->
``decoders.image_slice(axis_names="HW")`` (``mixed`` on a GPU, ``cpu`` without) -> ``resize`` ->
``crop_mirror_normalize``, and the fused ``relabel.label_pooling`` operator fed with the same crop
window, image shape and mirror flag, so the soft target always describes exactly the pixels the
model sees. With ``DataConfig.crops_per_image`` k > 1 each image is decoded whole once
(``decoders.image``) and k crops are resized from it (``resize`` with a region of interest), each
through the same steps with its own key (:func:`augment`), and stacked per sample (``[k, ...]``).

From a region store (FKD's stored crops) the windows and flips are the stored ones the source chose
(:func:`stored_window` in place of ``relabel.random_crop_window``), the rest of the augmentation is
keyed as usual, and the graph passes each crop's stored top-k labels on (``region_ids``,
``region_values``) in place of pooled targets: the loaders make them dense a batch at a time.

Validation: decode -> resize the shorter side -> centre crop -> normalize; hard labels and row ids.

Each graph's output names are exported next to it (:data:`VALIDATION_OUTPUTS`, :func:`train_outputs`...),
made from the fields of :mod:`dali_relabel.fields`; the graph returns its outputs in that order and
the loaders name DALI's outputs from there. The decode steps (:func:`decoder_args`,
:func:`resize_square`, :func:`normalize`) are public for the benchmarks' plain-DALI baselines
(``benchmarks/baselines.py``).

Execution settings (batch size, threads, device, seed, source workers) are given where a graph is
built: ``train_pipeline(..., **pipeline_kwargs(config, batch_size, device_id))``; ``device_id=None``
runs a graph on the CPU alone, with the ``cpu`` decoder.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from nvidia.dali import fn, pipeline_def, types

from dali_relabel.config import DataConfig
from dali_relabel.devices import worker_start_method
from dali_relabel.fields import (AFFINE, CANVAS_CHECKS, FLIP, GEOMETRY_FIELDS, IMAGES, JPEGS, LABELS, MAP_FIELDS,
                                 MIX_BOX, PASTED, REGION_FLIP, REGION_IDS, REGION_LABEL_FIELDS, REGION_VALUES,
                                 REGION_WINDOW, ROWS, SHAPES, SHARD_FIELDS, SHARD_KIND_FIELDS, STORED_BOXES,
                                 STORED_FLIPS, STORED_IDS, STORED_VALUES, TARGETS, VALID, WINDOW, Field)
from dali_relabel.fields import names as field_names
from dali_relabel.ops.plugin import load_plugin
from dali_relabel.prefetch import PrefetchingSource
from dali_relabel.shards import ShardSet
from dali_relabel.sources import BatchSource, output_types

# Largest ImageNet training images are about 5,980 x 6,430; hints spare the mixed decoder regrowing.
_DECODER_HINTS = dict(preallocate_width_hint=5980, preallocate_height_hint=6430)
# Shared-memory bytes per sample of the source's batch (a path and a 15x15 top-5 map need ~3.5 KB).
_SOURCE_BYTES_PER_SAMPLE = 8 << 10
# Samples the webdataset reader shuffles among (on top of the per-epoch order of the shards), at most.
_SHUFFLE_BUFFER = 4096
# ... and at most this share of a rank's epoch: each pass has a pipeline of its own, and what its buffer
# holds when the pass ends was read for nothing (a 4096 buffer cost 0.15-0.2 s per 2,048-sample epoch).
_SHUFFLE_SHARE = 8
# Bytes the webdataset reader reserves for each output of a sample it prepares; a sample's tensors
# grow to its data. Restoring a checkpoint prepares the whole shuffle buffer at once: with DALI's
# default (1 MB) that is 4096 samples x 5 outputs = 20 GB of heap committed per resumed pipeline.
_READER_TENSOR_BYTES = 16 << 10


def pipeline_kwargs(config: DataConfig, batch_size: int, device_id: Optional[int], checkpointing: bool = False) -> dict:
    """Execution settings every graph is built with (the loaders', the teacher pass's and the
    benchmarks'); ``checkpointing``: DALI's pipeline checkpoints (the shard loaders resume from them)."""
    kwargs = dict(batch_size=batch_size, num_threads=config.num_threads, device_id=device_id,
                  seed=config.seed, py_num_workers=config.py_num_workers,
                  py_start_method=worker_start_method(config.py_start_method),
                  prefetch_queue_depth=config.prefetch_queue_depth, exec_dynamic=True)
    if checkpointing:
        kwargs["enable_checkpointing"] = True
    if needs_conditionals(config):
        kwargs["enable_conditionals"] = True
    return kwargs


def needs_conditionals(config: DataConfig) -> bool:
    """The augmentation policies and random erasing choose per sample with DALI conditionals."""
    return config.auto_augment is not None or config.random_erase_probability > 0


def in_order(outputs: Dict[str, object], order: Sequence[str]) -> tuple:
    """A graph's ``outputs`` (by name) as the tuple it returns, in its exported ``order``."""
    return tuple(outputs[name] for name in order)


def read_batches(source: BatchSource, config: DataConfig) -> dict:
    """The source's outputs by name, plus ``jpegs``: the encoded files, read by DALI.

    With ``config.py_num_workers`` DALI worker processes run the source; with 0 it runs in this
    process, its batches made ahead on a thread (:class:`~dali_relabel.prefetch.PrefetchingSource`)."""
    dtypes, ndims = output_types(source)
    if config.py_num_workers > 0:
        where = dict(source=source, parallel=True, prefetch_queue_depth=config.prefetch_queue_depth,
                     bytes_per_sample_hint=_SOURCE_BYTES_PER_SAMPLE)
    else:
        where = dict(source=PrefetchingSource(source, depth=config.prefetch_queue_depth))
    outputs = fn.external_source(num_outputs=len(source.names), batch=True, batch_info=True, dtype=dtypes,
                                 ndim=ndims, **where)
    data = dict(zip(source.names, outputs))
    load_plugin()
    if getattr(source, "remote", False):
        # s3:// URLs: DALI's own reader (its AWS SDK client), each path cut to its length (the
        # count of its non-zero bytes: stored paths hold no NUL)
        paths = data["paths"]
        length = fn.reductions.sum(fn.cast(paths != 0, dtype=types.INT32))
        data[JPEGS.name] = fn.io.file.read(paths[:length], dont_use_mmap=True)
        return data
    # The plugin's reader takes the zero-padded rows as they come (io.file.read needs each path cut
    # to length by one more operator, and maps each file): 15 % more samples/s in the feed benchmark.
    data[JPEGS.name] = fn.relabel.read_files(data["paths"])
    return data


_INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
                  "nearest": types.INTERP_NN, "lanczos": types.INTERP_LANCZOS3}


def normalize(images, config: DataConfig, mirror=None, dtype=None):
    """Flip, ``(x / 255 - mean) / std``, and the layout: HWC for channels-last images (the iterator
    hands them out as ``[B, 3, H, W]`` in ``torch.channels_last`` memory format), else CHW. bfloat16
    images leave DALI as float32 (DALI has no bfloat16) and are converted by the iterator."""
    kwargs = {} if mirror is None else {"mirror": mirror}
    if dtype is None:
        dtype = types.FLOAT16 if config.output_dtype == "float16" else types.FLOAT
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC" if config.channels_last else "CHW",
                                    mean=[255.0 * m for m in config.mean], std=[255.0 * s for s in config.std],
                                    **kwargs)


def decoder_args(decoder_device: str, config: DataConfig) -> dict:
    args = dict(device=decoder_device, output_type=types.RGB, adjust_orientation=config.adjust_orientation)
    if decoder_device == "mixed":
        args.update(hw_decoder_load=config.hw_decoder_load, **_DECODER_HINTS)
    return args


def resize_square(images, config: DataConfig, interpolation=None, window=None):
    """The crop resized to ``image_size``; ``interpolation``: per-sample choices (0 bilinear,
    1 bicubic) for ``interpolation="random"``. ``window``: ``(anchor [y, x], crop [h, w])`` in pixels of
    ``images`` to resize from (the whole of ``images`` by default), read in place: no copy of it is cut."""
    if config.interpolation == "random":
        choice = fn.cast(interpolation + int(types.INTERP_LINEAR), dtype=types.INTERP_TYPE)
    else:
        choice = _INTERPOLATION[config.interpolation]
    roi = {}
    if window is not None:
        start = fn.cast(window[0], dtype=types.FLOAT)
        roi = dict(roi_start=start, roi_end=start + fn.cast(window[1], dtype=types.FLOAT), roi_relative=False)
    return fn.resize(images, size=[config.image_size, config.image_size], antialias=True, interp_type=choice, **roi)


# Streams of a sample's key (crops.py): 0-2 crop, jitter, interpolation; 3 the vertical flip; the
# augmentation policy and random erasing draw from their own ranges (dali_relabel.augment.randomness).
_VFLIP_STREAM = 3
POLICY_STREAMS = 16
ERASE_STREAMS = 64


class Crop(NamedTuple):
    """One crop of every sample of a batch, as :func:`augment` made it: the normalised ``images``,
    the window (``anchor`` ``[y, x]`` and ``crop`` ``[h, w]``, int32, in source pixels), the ``mirror``
    flag, ``affine`` (``None`` when nothing moved the pixels after the flip): per sample the
    ``[2, 3]`` map from output pixels to pixels of the resized, flipped crop, and ``checks``
    (``None`` unless a policy of several slots ran): per sample the ``[m, 2, 3]`` canvas checks that
    make ``affine`` exact for chains of geometric ops (:func:`dali_relabel.augment.geometry.canvas_checks`)."""

    images: object
    anchor: object
    crop: object
    mirror: object
    affine: object
    checks: object = None


def random_window(shape, rows, epochs, config: DataConfig, index: int = 0):
    """``(anchor, crop, mirror)`` of every sample: the random-resized-crop window and horizontal
    flip keyed by ``(config.seed, epoch, row)`` (``relabel.random_crop_window``; its Python twin is
    :func:`dali_relabel.crops.crop_window`). The window source :func:`augment` uses by default
    (``index``, the crop's number, is not needed: its key epoch already tells the crops apart)."""
    return fn.relabel.random_crop_window(
        shape, rows, epochs, seed=config.seed, random_area=list(config.scale),
        random_aspect_ratio=list(config.ratio), num_attempts=config.num_attempts,
        flip_probability=config.flip_probability)


def stored_window(data: dict):
    """The window source (for :func:`augment`) of a region store's stored crops: crop ``index`` of a
    sample is cut with the source's ``region_window[index]`` (``(y0, x0, h, w)``, whole source pixels)
    and mirrored as ``region_flip[index]`` says, whatever the key (the colour jitter, interpolation,
    policy and erasing that follow stay keyed)."""
    windows, flips = data[REGION_WINDOW.name], data[REGION_FLIP.name]

    def window(shape, rows, epochs, config: DataConfig, index: int = 0):
        return windows[index, 0:2], windows[index, 2:4], flips[index]

    return window


def crop_key_epochs(epochs, crops: int, index: int):
    """The key epochs of crop ``index`` of ``crops`` per image: ``epochs * crops + index`` (``epochs``
    itself for one crop); the graph's twin of :func:`dali_relabel.crops.crop_key_epoch`."""
    return epochs if crops == 1 else epochs * crops + index


def augment(jpegs, rows, epochs, config: DataConfig, decoder_device: str, window=random_window):
    """Every sample's ``config.crops_per_image`` crops: the window, flip, resize, colour jitter,
    augmentation policy and random erasing of each, every choice drawn from ``(config.seed, key
    epoch, row)``. Returns ``(shape, crops)``: the encoded image's shape (what the label pooling
    needs besides each crop's window and flip) and a list of :class:`Crop`.

    One crop per image decodes only its window (``decoders.image_slice``). With k > 1 each image is
    decoded once (``decoders.image``) and each of the k windows is resized from it in place (``resize``
    with a region of interest: cutting a copy first cost 15 % more CPU per crop); crop j is
    keyed with the key epoch ``epochs * k + j`` (:func:`crop_key_epochs`), so it draws its own
    window, flip and augmentation.

    ``window``: where each crop's window comes from, ``(shape, rows, key_epochs, config, index) ->
    (anchor [y, x], crop [h, w], mirror)``, ``index`` the crop's number ``j`` (default
    :func:`random_window`; :func:`stored_window` for a region store); :func:`augment_crop` does the rest.
    """
    shape = fn.peek_image_shape(jpegs, adjust_orientation=config.adjust_orientation)
    count = config.crops_per_image
    if count == 1:
        anchor, crop, mirror = window(shape, rows, epochs, config, 0)
        images = fn.decoders.image_slice(jpegs, anchor, crop, axis_names="HW", **decoder_args(decoder_device, config))
        return shape, [augment_crop(images, anchor, crop, mirror, rows, epochs, config)]
    decoded = fn.decoders.image(jpegs, **decoder_args(decoder_device, config))
    crops = []
    for index in range(count):
        keys = None if epochs is None else crop_key_epochs(epochs, count, index)
        anchor, crop, mirror = window(shape, rows, keys, config, index)
        crops.append(augment_crop(decoded, anchor, crop, mirror, rows, keys, config, cut=False))
    return shape, crops


def draws_after_crop(config: DataConfig) -> bool:
    """Whether :func:`augment_crop` draws anything from the sample keys (colour jitter, random
    interpolation, a vertical flip or policy, random erasing): with stored windows
    (:func:`stored_window`) nothing else needs the source's ``epochs``."""
    return bool(config.color_jitter) or config.interpolation == "random" or config.moves_pixels or \
        config.random_erase_probability > 0


def augment_crop(images, anchor, crop, mirror, rows, epochs, config: DataConfig, cut: bool = True) -> Crop:
    """The rest of one crop once its window is cut (``images``: HWC uint8, the window's pixels; with
    ``cut=False`` the whole decoded image, the window resized from it in place): resize, colour
    jitter, flips, the augmentation policy (its geometric ops compose into
    ``affine``), normalisation, random erasing, in torchvision's and timm's order, every draw keyed by
    ``(config.seed, epochs, rows)``. Returns the :class:`Crop`."""
    jitter = interpolation = None
    if config.color_jitter or config.interpolation == "random":
        jitter, interpolation = fn.relabel.sample_draws(rows, epochs, seed=config.seed,
                                                        color_jitter=list(config.color_jitter or (0, 0, 0, 0)))
    images = resize_square(images, config, interpolation, None if cut else (anchor, crop))
    if config.color_jitter:
        # torchvision's ColorJitter applies these in a random order around the image's mean grey;
        # DALI's color_twist in this fixed order, contrast around mid-grey.
        images = fn.color_twist(images, brightness=jitter[0], contrast=jitter[1], saturation=jitter[2],
                                hue=jitter[3])
    erasing = config.random_erase_probability > 0
    dtype = types.FLOAT if erasing else None  # erase in float32, then cast (float16 images)
    affine = checks = None
    if config.moves_pixels:
        images, affine, checks = _move_pixels(images, rows, epochs, mirror, config)
        images = normalize(images, config, dtype=dtype)
    else:
        images = normalize(images, config, mirror, dtype=dtype)
    if erasing:
        from dali_relabel.augment import random_erase
        from dali_relabel.augment.randomness import KeyedRandom

        images = random_erase(images, config.erasing(), layout="HWC" if config.channels_last else "CHW",
                              rng=KeyedRandom(rows, epochs, seed=config.seed, stream_base=ERASE_STREAMS))
        if config.output_dtype == "float16":
            images = fn.cast(images, dtype=types.FLOAT16)
    return Crop(images, anchor, crop, mirror, affine, checks)


def _move_pixels(images, rows, epochs, mirror, config: DataConfig):
    """The flips and the augmentation policy on the resized crops (HWC uint8): ``(images, affine,
    checks)``; ``checks`` (the policy's canvas checks, whole-canvas flips need none) is ``None``
    unless the policy has several slots."""
    from dali_relabel.augment import apply_policy
    from dali_relabel.augment.geometry import compose, identity
    from dali_relabel.augment.randomness import KeyedRandom

    vflip = None
    if config.vflip_probability > 0:
        draw = fn.relabel.keyed_uniforms(rows, epochs, seed=config.seed, stream=_VFLIP_STREAM, count=1)
        vflip = fn.cast(draw[0] < float(config.vflip_probability), dtype=types.INT32)
        images = fn.flip(images, horizontal=mirror, vertical=vflip)
    else:
        images = fn.flip(images, horizontal=mirror)
    affine, checks = identity(), None
    if config.auto_augment is not None:
        from dali_relabel.augment.policies import parse_policy

        policy = parse_policy(config.auto_augment)
        # timm fills uncovered pixels with the normalisation mean (its img_mean); torchvision with 0
        fill = tuple(min(255, round(255 * m)) for m in config.mean) if policy.family.startswith("timm") else None
        images, affine, checks = apply_policy(images, policy, fill=fill, return_checks=True,
                                              rng=KeyedRandom(rows, epochs, seed=config.seed,
                                                              stream_base=POLICY_STREAMS))
        checks = checks if policy.num_slots > 1 else None  # one slot: an identity, nothing to check
    if vflip is not None:  # output -> (policy) -> vertically flipped crop -> the flipped crop
        size = float(config.image_size)
        v = fn.cast(vflip, dtype=types.FLOAT)
        flip_matrix = fn.reshape(fn.stack(v * 0.0 + 1.0, v * 0.0, v * 0.0, v * 0.0, 1.0 - 2.0 * v, v * size),
                                 shape=[2, 3])
        affine = compose(flip_matrix, affine)
    return images, affine, checks


def soft_targets(data: dict, shape, anchor, crop, mirror, config: DataConfig, num_classes: int, layout: str,
                 decoder_device: str, mix_box=None, affine=None, checks=None):
    """``[targets]`` pooled from ``data["logits"]``/``data["class_ids"]`` over each crop (one-hot hard
    labels when ``data`` has no maps); with ``mix_box`` in ``"localized"`` CutMix mode
    ``[crop minus box, box]``. With ``affine`` (geometric augmentation) the map is pooled over what
    each output pixel shows: sampled at the inverse-mapped positions, fill left out (with ``checks``,
    the policy's canvas checks, also what an earlier op of a chain pushed off the canvas)."""
    if "logits" not in data:  # hard labels: one-hot targets, same augmentation
        targets = fn.reshape(fn.one_hot(data["labels"], num_classes=num_classes, dtype=types.FLOAT),
                             shape=[num_classes])
        return [targets.gpu() if decoder_device == "mixed" else targets]
    pool = dict(device="gpu" if decoder_device == "mixed" else "cpu", num_classes=num_classes,
                output_size=list(config.output_size), temperature=config.temperature, layout=layout)
    if affine is not None:
        pool.update(affine=affine, output_image_size=[config.image_size, config.image_size])
        if checks is not None:
            pool.update(canvas_checks=checks)
    inputs = (data["logits"], data["class_ids"], anchor, crop, shape, mirror)
    if mix_box is not None and config.cutmix_mode == "localized":
        return [fn.relabel.label_pooling(*inputs, mix_box, region_mode=mode, **pool) for mode in ("outside", "inside")]
    return [fn.relabel.label_pooling(*inputs, **pool)]


def _validation_images(jpegs, config: DataConfig, decoder_device: str):
    """The shorter side resized to ``config.resize_size``, the centre ``image_size`` crop, normalised."""
    images = fn.decoders.image(jpegs, **decoder_args(decoder_device, config))
    interpolation = config.val_interpolation or (
        "bilinear" if config.interpolation == "random" else config.interpolation)
    images = fn.resize(images, resize_shorter=config.resize_size, antialias=True,
                       interp_type=_INTERPOLATION[interpolation])
    images = fn.crop(images, crop=[config.image_size, config.image_size], out_of_bounds_policy="pad")
    return normalize(images, config)


#: Outputs of :func:`train_pipeline` (and the tree loaders' batches) before the CutMix ones.
TRAIN_OUTPUTS = field_names(IMAGES, TARGETS, LABELS, ROWS, VALID)


def mix_outputs(config: DataConfig, cutmix: bool) -> Tuple[str, ...]:
    """The outputs a training graph adds with CutMix boxes (``cutmix``): ``mix_box``, and in
    ``"localized"`` mode ``pasted``."""
    if not cutmix:
        return ()
    return field_names(MIX_BOX, PASTED) if config.cutmix_mode == "localized" else field_names(MIX_BOX)


#: Outputs of :func:`train_pipeline` over a region store before the CutMix ones: the stored labels
#: of each crop in place of ``targets``.
REGION_TRAIN_OUTPUTS = field_names(IMAGES, REGION_IDS, REGION_VALUES, LABELS, ROWS, VALID)


def train_outputs(config: DataConfig, cutmix: bool, geometry: bool = False, regions: bool = False) -> List[str]:
    """Names of :func:`train_pipeline`'s outputs, in order (``cutmix``: its source draws CutMix boxes;
    ``geometry``: the crop window, flip and affine of every sample follow; ``regions``: its source
    reads a region store)."""
    first = REGION_TRAIN_OUTPUTS if regions else TRAIN_OUTPUTS
    return list(first + mix_outputs(config, cutmix) + (field_names(*GEOMETRY_FIELDS) if geometry else ()))


def geometry_outputs(anchor, crop, mirror, affine, checks=None) -> dict:
    """``window`` (x0, y0, w, h), ``flip``, ``affine`` (the identity where nothing moved the pixels) and
    ``canvas_checks`` (``[m, 2, 3]``; one identity where there is nothing to check) by name: what
    ``return_geometry=True`` hands out."""
    from dali_relabel.augment.geometry import identity

    window = fn.cast(fn.stack(anchor[1], anchor[0], crop[1], crop[0]), dtype=types.INT32)
    if checks is None:
        checks = fn.reshape(identity(), shape=[1, 2, 3])
    return {WINDOW.name: window, FLIP.name: mirror, AFFINE.name: identity() if affine is None else affine,
            CANVAS_CHECKS.name: checks}


def crop_outputs(data: dict, shape, crops: Sequence[Crop], config: DataConfig, num_classes: int, layout: str,
                 decoder_device: str, mix_box=None, geometry: bool = False) -> dict:
    """What a training graph makes of its ``crops`` (from :func:`augment`), by name: ``images``,
    ``targets`` (:func:`soft_targets` over each crop's own window, flip and affine; with ``mix_box``
    in ``"localized"`` CutMix mode also ``pasted``) and with ``geometry`` :func:`geometry_outputs`.
    From a region store (``data`` has ``region_ids``) each crop's stored ``region_ids`` and
    ``region_values`` in place of ``targets`` (on the GPU with the ``mixed`` decoder).
    One crop: as they are. Several: each stacked per sample to ``[k, ...]`` (crop j of a sample is
    pooled with ``mix_box[j]``, its own box)."""
    several = len(crops) > 1
    per_crop = []
    for index, crop in enumerate(crops):
        outputs = {IMAGES.name: crop.images}
        if REGION_IDS.name in data:  # stored labels of the stored crop: nothing to pool
            for field in REGION_LABEL_FIELDS:
                labels = data[field.name][index]
                outputs[field.name] = labels.gpu() if decoder_device == "mixed" else labels
        else:
            box = mix_box[index] if several and mix_box is not None else mix_box
            targets = soft_targets(data, shape, crop.anchor, crop.crop, crop.mirror, config, num_classes, layout,
                                   decoder_device, box, crop.affine, crop.checks)
            outputs[TARGETS.name] = targets[0]
            if len(targets) > 1:
                outputs[PASTED.name] = targets[1]
        if geometry:
            outputs.update(geometry_outputs(crop.anchor, crop.crop, crop.mirror, crop.affine, crop.checks))
        per_crop.append(outputs)
    if not several:
        return per_crop[0]
    return {name: fn.stack(*[outputs[name] for outputs in per_crop]) for name in per_crop[0]}


def _training_outputs(made: dict, data: dict, mix_box, order: Sequence[str]) -> tuple:
    """A training graph's outputs in ``order``: ``made`` by :func:`crop_outputs`, the rest from the
    source's ``data`` and the CutMix boxes."""
    outputs = dict(data, **made)
    if mix_box is not None:
        outputs[MIX_BOX.name] = mix_box
    return in_order(outputs, order)


@pipeline_def
def train_pipeline(source: BatchSource, config: DataConfig, num_classes: int, layout: str,
                   decoder_device: str = "cpu", geometry: bool = False):
    """ReLabel training graph. Outputs (:func:`train_outputs`): images, soft targets, labels, rows, valid.

    A source without a store gives one-hot targets of the hard labels (the baseline); a source over a
    region store the stored crops (:func:`stored_window`) and, in place of the targets, their stored
    labels ``region_ids``, ``region_values`` (:data:`REGION_TRAIN_OUTPUTS`).

    With a CutMix source the outputs are followed by ``mix_box``; in ``"localized"`` mode the soft
    targets are the crop minus the box, followed by ``pasted`` (the map pooled over the box).

    With ``config.crops_per_image`` k > 1 each sample is one image: the outputs of
    :data:`~dali_relabel.fields.PER_CROP_FIELDS` hold its k crops (``[k, ...]``), labels, rows and
    valid come once (the loaders flatten the batch).

    Args:
        source: a :class:`BatchSource` with ``epochs``, usually with a store.
        config: data settings.
        num_classes: C of the soft targets.
        layout: ``"HW"`` or ``"WH"``, how boxes meet the maps.
        decoder_device: ``"mixed"`` (GPU decode; targets pooled on the GPU too) or ``"cpu"``.
        geometry: also output every sample's crop window, flip and affine (:func:`geometry_outputs`).
    """
    data = read_batches(source, config)
    regions = REGION_WINDOW.name in data
    window = stored_window(data) if regions else random_window
    # a source of stored crops hands over no epochs where nothing after the cut is keyed
    shape, crops = augment(data["jpegs"], data["rows"], data.get("epochs"), config, decoder_device, window=window)
    mix_box = data.get("mix_box")
    made = crop_outputs(data, shape, crops, config, num_classes, layout, decoder_device, mix_box, geometry)
    return _training_outputs(made, data, mix_box, train_outputs(config, mix_box is not None, geometry, regions))


#: Outputs of :func:`validation_pipeline`.
VALIDATION_OUTPUTS = field_names(IMAGES, LABELS, ROWS, VALID)


@pipeline_def
def validation_pipeline(source: BatchSource, config: DataConfig, decoder_device: str = "cpu"):
    """Validation graph: the shorter side resized to ``config.resize_size``, the centre
    ``image_size`` crop. Outputs: :data:`VALIDATION_OUTPUTS`."""
    data = read_batches(source, config)
    return in_order(dict(data, images=_validation_images(data["jpegs"], config, decoder_device)), VALIDATION_OUTPUTS)


def read_shards(shards: ShardSet, names: Sequence[str], shard_id: int, num_shards: int, shuffle: bool,
                reader_seed: int, fields: Sequence[Field] = SHARD_FIELDS,
                index_paths: Optional[Sequence[str]] = None) -> dict:
    """DALI's webdataset reader over the tar ``names`` of ``shards``, in that order, reading only
    ``fields`` (of :data:`~dali_relabel.fields.SHARD_FIELDS`), by field name; the maps reshaped to
    ``[k, H, W]``. Each pipeline reads its ``shard_id`` of ``num_shards`` contiguous parts (padded to
    the same size by repeating the last sample, which the iterator drops); ``shuffle``: through a
    sample buffer. ``index_paths``: other DALI index files of those tars (a resumed epoch's unread
    samples), else the shards' own; shards on object storage are streamed by the reader itself,
    given local copies of their index files."""
    fields = list(fields)
    buffer = shuffle_buffer(shards.num_samples // max(1, num_shards))
    outputs = fn.readers.webdataset(
        paths=[shards.path(n) for n in names],
        index_paths=list(index_paths or [shards.reader_index_path(n) for n in names]),
        ext=[f.tar_ext for f in fields], dtypes=[f.dali_type(shards.dtype(f).name) for f in fields],
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle, initial_fill=buffer,
        seed=reader_seed, pad_last_batch=True, stick_to_shard=True, tensor_init_bytes=_READER_TENSOR_BYTES,
        dont_use_mmap=not shards.map_local_files, name="Reader")
    data = {}
    for field, output in zip(fields, outputs):
        data[field.name] = fn.reshape(output, shape=list(shards.map_shape)) if field in MAP_FIELDS else output
    return data


def shuffle_buffer(samples_per_rank: int) -> int:
    """Samples the webdataset reader shuffles among for a rank that reads ``samples_per_rank`` an
    epoch: 4096, or an eighth of the rank's epoch where that is less (rows are already spread randomly
    over the shards when they are written; the buffer mixes neighbouring shards)."""
    return int(max(1, min(_SHUFFLE_BUFFER, samples_per_rank // _SHUFFLE_SHARE)))


#: Outputs of :func:`shard_train_pipeline` before the CutMix ones.
SHARD_TRAIN_OUTPUTS = field_names(IMAGES, TARGETS, LABELS, ROWS)


#: Outputs of :func:`shard_train_pipeline` over a region store's shards before the CutMix ones: the
#: stored labels of each crop in place of ``targets``.
SHARD_REGION_TRAIN_OUTPUTS = field_names(IMAGES, REGION_IDS, REGION_VALUES, LABELS, ROWS)


def shard_train_outputs(config: DataConfig, cutmix: bool, geometry: bool = False, regions: bool = False) -> List[str]:
    """Names of :func:`shard_train_pipeline`'s outputs, in order (``cutmix``: with ``mix_boxes``;
    ``geometry``: the crop window, flip and affine follow; ``regions``: shards of a region store)."""
    first = SHARD_REGION_TRAIN_OUTPUTS if regions else SHARD_TRAIN_OUTPUTS
    return list(first + mix_outputs(config, cutmix) + (field_names(*GEOMETRY_FIELDS) if geometry else ()))


def stored_crops(data: dict, shape, epochs, config: DataConfig) -> dict:
    """A region store's shard sample's ``config.crops_per_image`` stored crops this epoch, by name
    (``region_window``, ``region_flip``, ``region_ids``, ``region_values``: what a
    :class:`~dali_relabel.sources.BatchSource` over the store hands the tree graph), chosen from all R
    of ``data``'s ``stored_*`` members by ``relabel.select_regions``, keyed by ``(config.seed, epoch,
    row)`` as :func:`dali_relabel.store.select_regions` chooses them, each window rounded as
    :func:`dali_relabel.store.pixel_windows` rounds it in the image of ``shape``."""
    windows, flips, ids, values, _ = fn.relabel.select_regions(
        data[STORED_BOXES.name], data[STORED_FLIPS.name], fn.cast(data[STORED_IDS.name], dtype=types.INT32),
        fn.cast(data[STORED_VALUES.name], dtype=types.FLOAT), shape, data[ROWS.name], epochs,
        seed=config.seed, count=config.crops_per_image)
    return {REGION_WINDOW.name: windows, REGION_FLIP.name: flips, REGION_IDS.name: ids, REGION_VALUES.name: values}


@pipeline_def
def shard_train_pipeline(shards: ShardSet, names: Sequence[str], epoch: int, config: DataConfig, num_classes: int,
                         layout: str, decoder_device: str = "cpu", shard_id: int = 0, num_shards: int = 1,
                         shuffle: bool = True, reader_seed: int = 0, mix_boxes=None, geometry: bool = False,
                         index_paths=None):
    """ReLabel training graph over tar shards (one epoch's order of ``names``): the same keyed
    augmentation and pooling as :func:`train_pipeline`. Outputs (:func:`shard_train_outputs`): images,
    soft targets, labels, rows, and with ``mix_boxes`` (a per-batch callable of ``BatchInfo``)
    ``mix_box`` (+ ``pasted``). Over a region store's shards the stored crops the tree path would
    choose (:func:`stored_crops`) are cut, and their stored labels ``region_ids``, ``region_values``
    come in place of the targets."""
    regions = shards.has_regions
    data = read_shards(shards, names, shard_id, num_shards, shuffle, reader_seed, index_paths=index_paths,
                       fields=SHARD_KIND_FIELDS[shards.kind])
    epochs = fn.cast(data["rows"] * 0 + epoch, dtype=types.INT64)
    window = random_window
    if regions:  # the stored crops this epoch, cut from the image of the shape peeked here
        data.update(stored_crops(data, fn.peek_image_shape(data["jpegs"], adjust_orientation=False), epochs, config))
        window = stored_window(data)
    shape, crops = augment(data["jpegs"], data["rows"], epochs, config, decoder_device, window=window)
    mix_box = None
    if mix_boxes is not None:  # [4] per sample, or [k, 4] with k crops per image
        mix_box = fn.external_source(source=mix_boxes, batch=True, batch_info=True, dtype=MIX_BOX.dali_type(),
                                     ndim=MIX_BOX.ndim + (1 if config.crops_per_image > 1 else 0))
    made = crop_outputs(data, shape, crops, config, num_classes, layout, decoder_device, mix_box, geometry)
    return _training_outputs(made, data, mix_box, shard_train_outputs(config, mix_box is not None, geometry, regions))


#: Outputs of :func:`shard_validation_pipeline`.
SHARD_VALIDATION_OUTPUTS = field_names(IMAGES, LABELS, ROWS)


@pipeline_def
def shard_validation_pipeline(shards: ShardSet, config: DataConfig, decoder_device: str = "cpu",
                              shard_id: int = 0, num_shards: int = 1, names=None, index_paths=None):
    """Validation over tar shards in their stored order (or ``names`` with ``index_paths``: a resumed
    pass's unread samples). Outputs: :data:`SHARD_VALIDATION_OUTPUTS`."""
    names = names or [s["name"] for s in shards.shards]
    data = read_shards(shards, names, shard_id, num_shards, shuffle=False,
                       reader_seed=0, fields=[JPEGS, LABELS, ROWS], index_paths=index_paths)
    return in_order(dict(data, images=_validation_images(data["jpegs"], config, decoder_device)),
                    SHARD_VALIDATION_OUTPUTS)


#: Outputs of :func:`teacher_pipeline`.
TEACHER_OUTPUTS = field_names(IMAGES, LABELS, ROWS, VALID, SHAPES)


@pipeline_def
def teacher_pipeline(source: BatchSource, config: DataConfig, size: int, decoder_device: str = "cpu"):
    """Full-image teacher input for ``dali-relabel generate``: no crop, every image resized to
    ``size x size`` ignoring its aspect ratio (as the ReLabel paper feeds EfficientNet-L2), linear with
    antialiasing, then normalized. Outputs (:data:`TEACHER_OUTPUTS`): images, labels, rows, valid, and
    the encoded image's shape ``(H, W, C)`` from ``peek_image_shape`` (the original size the map
    describes).

    ``source`` is a :class:`BatchSource` without a store and without keys."""
    data = read_batches(source, config)
    shape = fn.peek_image_shape(data["jpegs"], adjust_orientation=config.adjust_orientation)
    images = fn.decoders.image(data["jpegs"], **decoder_args(decoder_device, config))
    images = fn.resize(images, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)
    images = normalize(images, config)
    return in_order(dict(data, images=images, shapes=shape), TEACHER_OUTPUTS)


#: Outputs of :func:`region_teacher_pipeline`: per sample ``images`` ``[R, size, size, 3]`` uint8,
#: ``window`` ``[R, 4]`` int32 and ``flip`` ``[R]`` int32 (each crop's :data:`WINDOW` and :data:`FLIP`),
#: then labels, rows, valid and the encoded image's shape.
REGION_TEACHER_OUTPUTS = field_names(IMAGES, WINDOW, FLIP, LABELS, ROWS, VALID, SHAPES)


@pipeline_def
def region_teacher_pipeline(source: BatchSource, config: DataConfig, size: int, regions: int,
                            scale: Sequence[float], ratio: Sequence[float], flip_probability: float, crop_seed: int,
                            interpolation: str = "bicubic", decoder_device: str = "cpu"):
    """Teacher input of ``dali-relabel generate --regions R``: each image decoded once and R keyed
    random-resized crops cut from it. Outputs: :data:`REGION_TEACHER_OUTPUTS`.

    Crop ``j`` of row ``r`` is ``relabel.random_crop_window`` keyed by ``(crop_seed, epoch=j, row=r)``
    (``scale``/``ratio``: its area and aspect ranges, 10 attempts, ``flip_probability``), so
    ``dali_relabel.crops.crop_window(H, W, sample_keys(crop_seed, j, [r])[0], scale, ratio, 10,
    flip_probability)`` is its Python twin. The window is sliced from the decoded image (``cpu`` or
    ``mixed`` decoder; shape and EXIF handling as ``peek_image_shape`` with
    ``config.adjust_orientation``) and resized to ``size x size`` with antialiasing and
    ``interpolation`` (FKD: bicubic). The crops stay uint8 and unflipped: the flip and the
    normalisation are applied by the caller, a batch at a time. ``window`` is (x0, y0, w, h) in
    source pixels.

    The graph holds R branches (about five operators each), and a batch holds
    ``batch_size x R x size^2 x 3`` bytes of crops."""
    data = read_batches(source, config)
    shape = fn.peek_image_shape(data["jpegs"], adjust_orientation=config.adjust_orientation)
    image = fn.decoders.image(data["jpegs"], **decoder_args(decoder_device, config))
    crops, windows, mirrors = [], [], []
    for j in range(int(regions)):
        anchor, crop, mirror = fn.relabel.random_crop_window(
            shape, data["rows"], data["rows"] * 0 + j, seed=int(crop_seed), random_area=list(scale),
            random_aspect_ratio=list(ratio), flip_probability=float(flip_probability))
        window = fn.slice(image, anchor, crop, axis_names="HW")
        crops.append(fn.resize(window, size=[size, size], antialias=True, interp_type=_INTERPOLATION[interpolation]))
        windows.append(fn.cat(anchor, crop))  # (y, x, h, w)
        mirrors.append(mirror)
    yxhw = fn.stack(*windows)
    window = fn.stack(yxhw[:, 1], yxhw[:, 0], yxhw[:, 3], yxhw[:, 2], axis=1)
    return in_order(dict(data, images=fn.stack(*crops), window=window, flip=fn.stack(*mirrors), shapes=shape),
                    REGION_TEACHER_OUTPUTS)
