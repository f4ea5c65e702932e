"""The augmentation graph against timm and torchvision: draws, magnitudes, ops, geometry, erasing.

Tolerances (mean absolute difference in levels on a fixed 48x64 image):
- exact (0): AutoContrast, Invert, Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness,
  Sharpness, Desaturate, torchvision's integer translations;
- geometric ops with bilinear sampling: mean <= 0.6 and at most 0.5% of the values more than 1
  level off (DALI samples in float32, PIL in float64: pixels whose source lies on the image edge
  can fall on either side of it);
- Equalize: mean <= 1.5, max <= 6 (DALI's OpenCV lookup table vs PIL's);
- GaussianBlur: mean <= 0.5 (PIL's three box blurs vs a Gaussian).
Draw statistics: >= 10,240 images per policy, with both random sources (keyed by (seed, epoch, row)
and DALI's RNG); two-sample chi-square / Kolmogorov-Smirnov tests with p > 1e-3 (fixed seeds and
rows, so each test is deterministic).
"""
from collections import Counter

import numpy as np
import pytest
import torch
stats = pytest.importorskip("scipy.stats")

from augment_helpers import fixed_image, record_timm, record_torchvision, run_pipeline, run_rows_pipeline
from dali_relabel.augment import Erasing, apply_op, apply_policy, parse_policy, random_erase
from dali_relabel.augment.randomness import ERASING_STREAM_BASE, POLICY_STREAM_BASE, KeyedRandom

pytestmark = pytest.mark.slow
P_MIN = 1e-3
TIMM_FILL = (124, 116, 104)


def _diff(ours, reference):
    return np.abs(ours.astype(int) - np.asarray(reference).astype(int))


# --- (b) each op on a fixed image against the original ------------------------------------------------
EXACT = {"AutoContrast", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
         "Brightness", "Sharpness", "Desaturate", "TranslateX", "TranslateY"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _check_op(name, diff):
    if name in EXACT:
        assert diff.max() == 0, name
    elif name in GEOMETRIC:
        assert diff.mean() <= 0.6 and (diff > 1).mean() <= 0.005, (name, diff.mean())
    elif name == "Equalize":
        assert diff.mean() <= 1.5 and diff.max() <= 6, diff.mean()
    elif name == "GaussianBlur":
        assert diff.mean() <= 0.5, diff.mean()
    else:
        raise AssertionError(f"no tolerance for {name}")


def test_timm_ops_match_timm_on_a_fixed_image():
    from PIL import Image
    aa = pytest.importorskip("timm.data.auto_augment")
    cases = [("AutoContrast", 0), ("Equalize", 0), ("Invert", 0), ("Rotate", 27.0), ("Rotate", -13.5),
             ("Posterize", 2), ("Posterize", 1), ("Solarize", 128), ("Solarize", 77), ("Solarize", 256),
             ("SolarizeAdd", 99), ("Color", 0.3), ("Color", 1.7), ("Contrast", 0.2), ("Contrast", 1.8),
             ("Brightness", 0.6), ("Brightness", 1.9), ("Sharpness", 0.1), ("Sharpness", 1.9),
             ("ShearX", 0.27), ("ShearY", -0.2), ("TranslateXRel", 0.3), ("TranslateYRel", -0.4),
             ("Desaturate", 0.7), ("GaussianBlur", 1.3)]
    policy_of = {"Desaturate": "rand-t3aw", "GaussianBlur": "rand-t3aw"}
    img = fixed_image()
    outs = run_pipeline(lambda x: [apply_op(x, policy_of.get(n, "rand"), n, a)[0] for n, a in cases],
                        [img])[0]
    pil = Image.fromarray(img)
    for (name, arg), out in zip(cases, outs):
        args = () if aa.LEVEL_TO_ARG[name] is None else (arg,)
        ref = aa.NAME_TO_OP[name](pil, *args, fillcolor=TIMM_FILL, resample=Image.BILINEAR)
        _check_op(name, _diff(out[0], ref))


def test_posterize_to_zero_bits_is_black():
    """timm maps low levels to 0 bits (v0's Posterize at magnitude 2); old Pillow gave a black image,
    Pillow >= 11 raises. We give black."""
    img = fixed_image()
    out = run_pipeline(lambda x: apply_op(x, "rand", "Posterize", 0)[0], [img])[0][0][0]
    assert out.max() == 0


def test_torchvision_ops_match_torchvision_on_a_fixed_image():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import autoaugment as tv
    cases = [("ShearX", 0.5), ("ShearY", -0.7), ("TranslateX", 13), ("TranslateY", -9),
             ("Rotate", 100.0), ("Rotate", -30.0), ("Brightness", 0.5), ("Color", 1.8),
             ("Contrast", 0.4), ("Sharpness", 1.9), ("Posterize", 3), ("Solarize", 127.5),
             ("AutoContrast", 0), ("Equalize", 0)]
    img = fixed_image()
    outs = run_pipeline(lambda x: [apply_op(x, "ta_wide", n, a)[0] for n, a in cases], [img])[0]
    pil = Image.fromarray(img)
    for (name, arg), out in zip(cases, outs):
        magnitude = arg - 1.0 if name in ("Brightness", "Color", "Contrast", "Sharpness") else arg
        ref = tv._apply_op(pil, name, float(magnitude), interpolation=InterpolationMode.BILINEAR,
                           fill=None)
        diff = _diff(out[0], ref)
        _check_op("ShearX" if name == "Rotate" else name, diff)


# --- (a) draws and magnitudes over >= 10,000 images -----------------------------------------------------
SIZE = (10, 12)  # H, W of the tiny images the draw tests run on
BATCH, BATCHES = 512, 20
SOURCES = ["keyed", "dali"]  # KeyedRandom over rows 0.. in epoch 3, or DaliRandom (seed=)


def _our_draws(text, source):
    """Per image the applied ops as (name, argument), plus the raw debug draws."""
    policy = parse_policy(text)
    keys = ("op", "applied", "level", "negate", "arg")
    if source == "keyed":
        images = [np.zeros(SIZE + (3,), np.uint8)] * (BATCH * BATCHES)

        def keyed_graph(x, rows, epochs):
            rng = KeyedRandom(rows, epochs, seed=6, stream_base=POLICY_STREAM_BASE)
            info = apply_policy(x, policy, rng=rng, debug=True)[-1]
            return tuple(info[k] for k in keys)

        outs = run_rows_pipeline(keyed_graph, images, np.arange(len(images)), 3, BATCH)
        raw = [np.stack(out) for out in outs]
    else:
        def graph(x):
            info = apply_policy(x, policy, seed=5, debug=True)[-1]
            return tuple(info[k] for k in keys)

        runs = run_pipeline(graph, [np.zeros(SIZE + (3,), np.uint8)] * BATCH, batches=BATCHES)
        raw = [np.concatenate([np.stack(r[k]) for r in runs]) for k in range(5)]
    op, applied, level, negate, arg = raw
    names = policy.op_names
    seqs = [tuple((names[o], float(a)) for o, ap, a in zip(op[i], applied[i], arg[i]) if ap)
            for i in range(len(op))]
    return policy, seqs, raw


def _same_distribution(ours, theirs, what):
    keys = sorted(set(ours) | set(theirs))
    table = np.array([[ours.get(k, 0) for k in keys], [theirs.get(k, 0) for k in keys]])
    if len(keys) < 2:
        return
    p = stats.chi2_contingency(table)[1]
    assert p > P_MIN, (what, p, dict(zip(keys, table.T.tolist())))


def _compare_draws(ours, theirs):
    _same_distribution(Counter(len(s) for s in ours), Counter(len(s) for s in theirs), "ops per image")
    for position in range(max(len(s) for s in theirs)):
        _same_distribution(Counter(s[position][0] for s in ours if len(s) > position),
                           Counter(s[position][0] for s in theirs if len(s) > position),
                           f"op at position {position}")
    by_op_ours, by_op_theirs = {}, {}
    for seqs, by_op in ((ours, by_op_ours), (theirs, by_op_theirs)):
        for s in seqs:
            for name, arg in s:
                by_op.setdefault(name, []).append(arg)
    assert set(by_op_ours) == set(by_op_theirs)
    for name in by_op_theirs:
        a, b = np.array(by_op_ours[name]), np.array(by_op_theirs[name])
        if len(np.unique(b)) <= 64:  # discrete arguments: same values, same frequencies
            _same_distribution(Counter(np.round(a, 9)), Counter(np.round(b, 9)), f"{name} arguments")
        else:
            assert stats.ks_2samp(a, b).pvalue > P_MIN, name


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("text", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101-mmax12-p0.8",
                                  "rand-m9-n3-tweights", "original-mstd0.5", "v0"])
def test_timm_draws_match_timm(text, source, monkeypatch):
    aa = pytest.importorskip("timm.data.auto_augment")
    policy, ours, (op, applied, level, negate, arg) = _our_draws(text, source)
    assert len(ours) >= 10_000
    _compare_draws(ours, record_timm(text, len(ours), seed=1, size=SIZE))
    # every argument is timm's LEVEL_TO_ARG of the drawn level and sign, to the last bit
    for o, lv, ng, ag in zip(op.ravel()[:4000], level.ravel(), negate.ravel(), arg.ravel()):
        fn = aa.LEVEL_TO_ARG[policy.op_names[o]]
        if fn is None:
            continue
        monkeypatch.setattr(aa, "_randomly_negate", (lambda v: -v) if ng else (lambda v: v))
        assert fn(float(lv), dict(aa._HPARAMS_DEFAULT))[0] == ag
    if policy.weights is not None:  # timm draws weighted ops without replacement
        assert all(len(set(row)) == len(row) for row in op)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("text", ["ta_wide", "imagenet", "ra", "ra-m13"])
def test_torchvision_draws_match_torchvision(text, source):
    _, ours, _ = _our_draws(text, source)
    from torchvision.transforms import autoaugment as tv
    transform = tv.RandAugment(magnitude=13) if text == "ra-m13" else None
    _compare_draws(ours, record_torchvision(text, len(ours), seed=1, size=SIZE, transform=transform))


def test_torchvision_translate_pixels_follow_the_image_size():
    """RandAugment's translation range is 150/331 of the size: every bin's int() as torchvision."""
    from nvidia.dali import fn, types
    from torchvision.transforms import autoaugment as tv
    from dali_relabel.augment.magnitudes import slot_argument
    sizes = [(224, 224), (160, 192), (37, 331), (331, 150), (97, 113)]
    policy = parse_policy("ra")
    bins = policy.num_bins

    def graph(x):
        shape = x.shape(dtype=types.FLOAT64)
        zero = fn.cast(shape[0] * 0, dtype=types.INT32)
        outs = []
        for name in ("TranslateX", "TranslateY"):
            for b in range(bins):
                outs.append(slot_argument(policy, zero + policy.op_names.index(name),
                                          fn.cast(zero + b, dtype=types.FLOAT64), zero,
                                          shape[1], shape[0]))
        return outs

    outs = run_pipeline(graph, [np.zeros(size + (3,), np.uint8) for size in sizes])[0]
    k = 0
    for name in ("TranslateX", "TranslateY"):
        for b in range(bins):
            for i, size in enumerate(sizes):
                expected = float(int(tv.RandAugment()._augmentation_space(bins, size)[name][0][b]))
                assert float(outs[k][i]) == expected, (name, b, size)
            k += 1


# --- (c) the affine follows the pixels -----------------------------------------------------------------
def _coordinate_image(height, width):
    """R and G encode x and y (4 levels per pixel, pixel centre i + 0.5 holds 4 i), B is 128."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([4 * x, 4 * y, np.full_like(x, 128)], -1).astype(np.uint8)


def _geometric_policy(text):
    policy = parse_policy(text)
    return policy.__class__(**{**policy.__dict__,
                               "ops": tuple(o for o in policy.ops if o.geometry.active)})


@pytest.mark.parametrize("text", ["rand-m9-n3-p1.0-mstd0.5", "ta_wide"])
def test_affine_maps_output_pixels_to_their_source(text):
    height, width = 48, 60
    image = _coordinate_image(height, width)
    policy = _geometric_policy(text)
    outs = run_pipeline(lambda x: apply_policy(x, policy, seed=3, fill=(0, 0, 0), return_mask=True),
                        [image] * 64, batches=2)
    checked = lost = 0
    for images, affines, masks in outs:
        for out, affine, mask in zip(images, affines, masks):
            mask = mask[..., 0] == 1
            yy, xx = np.mgrid[0:height, 0:width] + 0.5
            xs = affine[0, 0] * xx + affine[0, 1] * yy + affine[0, 2]
            ys = affine[1, 0] * xx + affine[1, 1] * yy + affine[1, 2]
            inside = (xs >= 1.5) & (xs < width - 1.5) & (ys >= 1.5) & (ys < height - 1.5)
            outside = (xs < -2) | (xs >= width + 2) | (ys < -2) | (ys >= height + 2)
            blue = out[..., 2]
            # where the matrix leaves the input: fill (blended at most), and the mask says so
            assert (blue[outside] < 128).all() and not mask[outside].any()
            assert not outside.any() or (blue[outside] == 0).mean() > 0.9
            # where the mask says fill, the pixel is fill (or blended with it)
            assert (blue[~mask] < 128).all()
            # content: from exactly where the matrix says
            content = inside & mask & (blue == 128)
            assert (content == (inside & mask)).mean() > 0.97
            decoded_x = out[..., 0] / 4.0 + 0.5
            decoded_y = out[..., 1] / 4.0 + 0.5
            for decoded, expected in ((decoded_x, xs), (decoded_y, ys)):
                error = np.abs(decoded[content] - expected[content])
                # up to three chained uint8 warps: 1/8 px rounding each, edge clamping near the canvas
                assert error.max() < 1.0 and error.mean() < 0.3, (error.max(), error.mean())
            checked += int(content.sum())
            lost += int((inside & ~mask).sum())
    assert checked > 10_000
    if text == "ta_wide":  # one op per image: the affine alone marks every fill pixel
        assert lost == 0


def _batch_source(array):
    batch = list(array)
    return lambda: batch  # no argument: DALI would pass an iteration number to a one-argument one


def _maps_onto_canvas(matrix, xx, yy, height, width):
    """Where ``matrix`` sends the points ``(xx, yy)`` inside ``[0, W] x [0, H]``, and their distance
    to that canvas's edge (negative outside)."""
    xs = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    ys = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    margin = np.minimum(np.minimum(xs, width - xs), np.minimum(ys, height - ys))
    return margin >= 0, margin


@pytest.mark.parametrize("text", ["rand-m9-n3-p1.0-mstd0.5", "ta_wide"])
def test_canvas_checks_pool_what_the_pixels_show(text):
    """The policy's affine and canvas checks, fed to the pooling operator on a per-pixel grid: a
    pixel's target is uniform (fill) exactly where ``return_mask``'s content mask says fill (but
    within 2 pixels of a canvas edge, where the mask's chain of nearest-neighbour warps rounds every
    intermediate point to a pixel), and equals the dense reference given the same checks."""
    from nvidia.dali import fn

    from dali_relabel.ops.plugin import load_plugin
    from dali_relabel.ops.reference import reference_warp_pooling

    load_plugin()
    height, width, batch, classes = 24, 30, 32, 7
    policy = _geometric_policy(text)
    rng = np.random.default_rng(5)
    logits = np.full((batch, 1, 4, 5), 9.0, np.float32)
    ids = rng.integers(0, classes, size=(batch, 1, 4, 5)).astype(np.int32)
    anchors = np.zeros((batch, 2), np.int32)
    shapes = image_shapes = np.tile(np.array([height, width], np.int32), (batch, 1))
    fields = [logits, ids, anchors, shapes, image_shapes]

    def graph(x):
        images, affine, checks, mask = apply_policy(x, policy, seed=3, fill=(0, 0, 0), return_checks=True,
                                                    return_mask=True)
        inputs = [fn.external_source(_batch_source(f), batch=True) for f in fields]
        targets = fn.relabel.label_pooling(*inputs, num_classes=classes, output_size=[height, width],
                                           affine=affine, canvas_checks=checks, output_image_size=[height, width])
        return affine, checks, mask, targets

    (affines, checks, masks, targets), = run_pipeline(graph, [_coordinate_image(height, width)] * batch)
    affines, checks, masks = np.stack(affines), np.stack(checks), np.stack(masks)[..., 0] == 1
    targets = torch.from_numpy(np.stack(targets))
    assert checks.shape == (batch, max(policy.num_slots - 1, 1), 2, 3)
    expected = reference_warp_pooling(logits, ids, anchors, shapes, image_shapes, affines, (height, width), classes,
                                      output_size=(height, width), canvas_checks=checks)
    torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-7)

    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    fill = (targets - 1.0 / classes).abs().amax(1).numpy() < 1e-6  # [B, H, W]: the uniform pixels
    detected = 0
    for n in range(batch):
        shown, near = np.ones((height, width), bool), np.zeros((height, width), bool)
        for matrix in [affines[n]] + list(checks[n]):
            inside, margin = _maps_onto_canvas(matrix.astype(np.float64), xx, yy, height, width)
            shown &= inside
            near |= np.abs(margin) < 2.0
        np.testing.assert_array_equal(fill[n], ~shown)
        assert not ((fill[n] != ~masks[n]) & ~near).any(), n
        affine_only = _maps_onto_canvas(affines[n].astype(np.float64), xx, yy, height, width)[0]
        detected += int((affine_only & ~shown & ~near).sum())  # fill only the checks find
    if text == "ta_wide":  # one op per image: nothing to check
        np.testing.assert_array_equal(checks, np.tile(np.eye(2, 3, dtype=np.float32), (batch, 1, 1, 1)))
    else:
        assert detected > 100, detected


def test_affine_is_identity_without_geometric_ops():
    image = fixed_image()
    photometric = parse_policy("rand-m9-n3-p1.0")
    photometric = photometric.__class__(**{**photometric.__dict__, "ops": tuple(
        o for o in photometric.ops if not o.geometry.active)})
    never = parse_policy("rand-m9-n3-p0")

    def graph(x):
        images, affine_never = apply_policy(x, never, seed=1)
        return apply_policy(x, photometric, seed=1)[1], images, affine_never

    (a1, images, a2), = run_pipeline(graph, [image] * 8)
    for affine in list(a1) + list(a2):
        np.testing.assert_array_equal(affine, [[1, 0, 0], [0, 1, 0]])
    for out in images:
        np.testing.assert_array_equal(out, image)


# --- random erasing ------------------------------------------------------------------------------------
def _erase_runs(erasing, size, batches, layout="CHW", source="dali"):
    """``batches`` runs of ``BATCH`` ones images: per run (images, boxes, counts)."""
    from nvidia.dali import fn, pipeline_def
    shape = (3,) + size if layout == "CHW" else size + (3,)
    if source == "keyed":
        def graph(x, rows, epochs):
            x = fn.reshape(x, layout=layout)
            rng = KeyedRandom(rows, epochs, seed=4, stream_base=ERASING_STREAM_BASE)
            out, info = random_erase(x, erasing, layout=layout, rng=rng, debug=True)
            return out, info["boxes"], info["count"]

        n = BATCH * batches
        outs = run_rows_pipeline(graph, [np.ones(shape, np.float32)] * n, np.arange(n) + 1000, 0, BATCH)
        return [[out[i:i + BATCH] for out in outs] for i in range(0, n, BATCH)]
    images = [np.ones(shape, np.float32)] * BATCH

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, enable_conditionals=True, seed=2)
    def pipe():
        x = fn.external_source(lambda: images, batch=True, layout=layout)
        out, info = random_erase(x, erasing, layout=layout, seed=4, debug=True)
        return out, info["boxes"], info["count"]

    p = pipe()
    p.build()
    return [[[np.array(t) for t in o] for o in p.run()] for _ in range(batches)]


def _timm_boxes(erasing_args, size, count):
    import random
    import torch
    from timm.data.random_erasing import RandomErasing
    random.seed(0)
    torch.manual_seed(0)
    eraser = RandomErasing(device="cpu", **erasing_args)
    rows = []
    for _ in range(count):
        img = torch.ones((3,) + size)
        eraser(img)
        rows.append(_box_of(img[0].numpy() != 1))
    return rows


def _box_of(mask):
    if not mask.any():
        return (0, 0, 0, 0)
    ys, xs = np.nonzero(mask)
    return (int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1))


@pytest.mark.parametrize("rng", SOURCES)
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_erasing_boxes_match_the_original(source, rng):
    size = (24, 32)
    if source == "timm":
        pytest.importorskip("timm")
        erasing = Erasing.timm(0.4, mode="const")
        theirs = _timm_boxes(dict(probability=0.4, mode="const"), size, BATCH * BATCHES)
    else:
        import torch
        from torchvision.transforms import RandomErasing
        erasing = Erasing.torchvision(0.4)
        torch.manual_seed(0)
        eraser = RandomErasing(p=0.4)
        theirs = [_box_of(eraser(torch.ones((3,) + size))[0].numpy() != 1)
                  for _ in range(BATCH * BATCHES)]
    runs = _erase_runs(erasing, size, BATCHES, source=rng)
    ours = []
    for out, boxes, _ in runs:
        for image, rows in zip(out, boxes):
            box = _box_of(image[0] != 1)
            valid, top, left, h, w = rows[0]
            assert box == ((int(top), int(left), int(h), int(w)) if valid else (0, 0, 0, 0))
            assert (image[:, image[0] != 1] == 0).all()  # const mode writes 0 in every channel
            ours.append(box)
    ours, theirs = np.array(ours), np.array(theirs)
    _same_distribution(Counter(ours[:, 2] > 0), Counter(theirs[:, 2] > 0), "erased")
    for k, what in enumerate(("top", "left", "h", "w")):
        a, b = ours[ours[:, 2] > 0, k], theirs[theirs[:, 2] > 0, k]
        _same_distribution(Counter(a), Counter(b), what)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_erasing_modes_fill_as_timm(layout, source):
    size = (24, 32)
    for mode in ("rand", "pixel"):
        erasing = Erasing.timm(1.0, mode=mode, min_count=2, max_count=3)
        (out, boxes, counts), = _erase_runs(erasing, size, 1, layout=layout, source=source)
        values = []
        for image, rows, count in zip(out, boxes, counts):
            chw = image if layout == "CHW" else image.transpose(2, 0, 1)
            assert 2 <= int(count) <= 3 and int(rows[:, 0].sum()) <= int(count)
            assert (rows[int(count):, 0] == 0).all()
            valid = rows[rows[:, 0] > 0]
            if len(valid) == 0:
                continue
            _, top, left, h, w = valid[-1].astype(int)  # the last box is not overwritten
            patch = chw[:, top:top + h, left:left + w]
            if mode == "rand":
                assert np.allclose(patch, patch[:, :1, :1])
                values.extend(patch[:, 0, 0])
            else:
                values.extend(patch.ravel())
            erased = (chw != 1).any(0)
            expected = np.zeros_like(erased)
            for _, t, l, hh, ww in rows[rows[:, 0] > 0].astype(int):
                expected[t:t + hh, l:l + ww] = True
            assert (erased == expected).all()
        values = np.array(values)
        assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1, (mode, values.std())
