"""`dali-relabel generate`: the modified classifier, grid/top-k, the store it writes, resume, ranks, CLI.

Everything runs on the CPU with a small random-init torchvision ResNet-18 (3 classes) over a tiny
ImageFolder of smooth JPEGs of different sizes.
"""
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.tools.generate import GenerateError, generate_label_maps, merge_parts, part_path
from dali_relabel.tools.teachers import UnsupportedModelError, build_teacher, dense_classifier, dense_logit_map, topk_grid
from dali_relabel.imagefolder import list_images
from dali_relabel.store import LabelStore, StoreError, StoreWriter
from generate_helpers import (copy_files, interrupt_second_write, one_torch_thread,  # noqa: F401 (autouse)
                              record_write_starts, smooth_image_tree)
from helpers import wait_until_gone

pytest.importorskip("nvidia.dali")

SIZE, GRID, K, BATCH = 96, 4, 2, 5  # ResNet-18 at 96 px: a 3x3 feature map, interpolated to 4x4
CONFIG = DataConfig(num_threads=1)
IMAGE_SIZES = [(48, 64), (64, 48), (40, 56), (56, 72)]


def _resnet18(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    image_root = str(root / "images")
    sizes = smooth_image_tree(image_root, 3, 4, IMAGE_SIZES)
    weights = str(root / "resnet18_3.pt")
    torch.save(_resnet18().state_dict(), weights)
    return dict(root=root, images=image_root, sizes=sizes, weights=weights)


def _generate(data, out, model=None, **kwargs):
    args = dict(size=SIZE, grid=GRID, k=K, batch_size=BATCH, device="cpu", config=CONFIG, progress=False,
                teacher_name="resnet18")
    args.update(kwargs)
    return generate_label_maps(data["images"], str(out), model if model is not None else _resnet18(), **args)


@pytest.fixture(scope="module")
def store_path(data):
    return _generate(data, data["root"] / "single.h5")


def _sha(path):
    store = LabelStore(path)
    try:
        return store.header.content_sha256
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------
# The modified classifier and the grid


def _small(name):
    """Narrow members of the heavier families (same torchvision classes, a fraction of the cost)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.densenet import DenseNet
    from torchvision.models.swin_transformer import SwinTransformer

    if name == "convnext":
        return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                        num_classes=7)
    if name == "swin":
        return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                               window_size=[4, 4], num_classes=7)
    if name == "densenet":
        return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=7)
    return torchvision.models.get_model(name, weights=None, num_classes=7)


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf", "efficientnet_b0", "mobilenet_v2",
                                  "convnext", "densenet", "mnasnet0_5", "shufflenet_v2_x0_5",
                                  "squeezenet1_1", "swin"])
def test_dense_map_averages_to_the_models_logits(name):
    torch.manual_seed(0)
    model = _small(name).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = dense_logit_map(model, images)
        logits = model(images)
    assert dense.dim() == 4 and dense.shape[:2] == (2, 7) and min(dense.shape[2:]) >= 1
    scale = float(logits.abs().max())
    torch.testing.assert_close(dense.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4 * scale)
    assert dense_classifier(model).exact


def test_resnet_dense_map_is_fc_at_every_location_of_layer4():
    model = _resnet18()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features = torch.nn.Sequential(*list(model.children())[:-2])(images)  # everything before avgpool
        expected = torch.einsum("bfhw,cf->bchw", features, model.fc.weight) + model.fc.bias[None, :, None, None]
        dense = dense_logit_map(model, images)
    assert dense.shape == (2, 3, 3, 3)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


def test_mobilenet_v3_head_is_applied_per_location_and_marked_inexact():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    with torch.no_grad():
        dense = dense_logit_map(model, torch.randn(1, 3, 64, 64))
    assert dense.shape == (1, 5, 2, 2)
    assert not dense_classifier(model).exact


def test_unsupported_architectures_get_a_clear_error():
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(UnsupportedModelError, match="no supported way to apply its classifier.*ResNet"):
        dense_classifier(flat)
    model = _resnet18()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    with pytest.raises(UnsupportedModelError, match="not a single linear layer"):
        dense_classifier(model)


def test_generic_forward_features_models_are_checked():
    class TimmLike(torch.nn.Module):
        def __init__(self, pool="avg"):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.fc = torch.nn.Linear(8, 4)
            self.pool = pool

        def forward_features(self, x):
            return torch.relu(self.conv(x))

        def get_classifier(self):
            return self.fc

        def forward(self, x):
            f = self.forward_features(x)
            pooled = f.mean((2, 3)) if self.pool == "avg" else f.amax((2, 3))
            return self.fc(pooled)

    torch.manual_seed(0)
    model = TimmLike().eval()
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(dense_logit_map(model, x).mean((2, 3)), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError, match="does not reproduce the model's logits"):
        dense_classifier(TimmLike(pool="max").eval())


def test_topk_grid_keeps_the_top_classes_of_every_cell():
    torch.manual_seed(0)
    logit_map = torch.randn(2, 7, 5, 5)
    values, ids = topk_grid(logit_map, 5, 3)  # grid == map size: pooling is the identity
    assert values.shape == ids.shape == (2, 3, 5, 5)
    expected_ids = torch.argsort(logit_map, dim=1, descending=True)[:, :3]
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(values, torch.gather(logit_map, 1, expected_ids))
    assert bool((values[:, :-1] >= values[:, 1:]).all())


def test_topk_grid_pools_larger_maps_and_interpolates_smaller_ones():
    torch.manual_seed(1)
    big = torch.randn(1, 4, 6, 6)
    values, ids = topk_grid(big, 3, 4)
    pooled = F.avg_pool2d(big, 2)
    torch.testing.assert_close(torch.gather(values, 1, torch.argsort(ids, dim=1)), pooled)
    small = torch.randn(1, 4, 2, 2)
    values, ids = topk_grid(small, 4, 4)
    upsampled = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.gather(values, 1, torch.argsort(ids, dim=1)), upsampled)
    mixed = torch.randn(1, 4, 8, 2)  # pooled along H, interpolated along W
    values, _ = topk_grid(mixed, (4, 4), 1)
    assert values.shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="k=5"):
        topk_grid(small, 2, 5)


# --------------------------------------------------------------------------------------------------
# The store


@pytest.mark.slow
def test_store_header_rows_labels_and_sizes(data, store_path):
    images = list_images(data["images"])
    with LabelStore(store_path) as store:
        store.verify_checksum()
        h = store.header
        assert (h.num_rows, h.num_classes, h.k, h.grid_h, h.grid_w) == (12, 3, K, GRID, GRID)
        assert (h.layout, h.source, h.teacher, h.teacher_input_size) == ("HW", "generate", "resnet18", SIZE)
        assert store.paths.tolist() == images.relpaths
        assert store.class_names == ["class_0", "class_1", "class_2"]
        assert store.labels.tolist() == images.labels
        assert store.image_sizes.tolist() == [list(s) for s in data["sizes"]]
        maps = store.read(np.arange(12))
        assert maps.logits.dtype == np.float16 and maps.logits.shape == (12, K, GRID, GRID)
        assert (np.diff(maps.logits.astype(np.float32), axis=1) <= 0).all(), "top-k not in descending order"
        assert (maps.class_ids[:, 0] != maps.class_ids[:, 1]).all()
    leftovers = [f for f in os.listdir(data["root"]) if f.startswith("single.h5") and f != "single.h5"]
    assert not leftovers


def _pil_maps(data, model, relpaths):
    """Each image preprocessed with PIL (full image, bilinear to SIZE x SIZE, ImageNet mean/std)."""
    mean = 255 * torch.tensor(CONFIG.mean).view(1, 3, 1, 1)
    std = 255 * torch.tensor(CONFIG.std).view(1, 3, 1, 1)
    batch = []
    for rel in relpaths:
        with Image.open(os.path.join(data["images"], rel)) as image:
            pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32)
        batch.append(torch.from_numpy(pixels).permute(2, 0, 1))
    x = (torch.stack(batch) - mean) / std
    with torch.no_grad():
        return dense_logit_map(model, x), model(x)


@pytest.mark.slow
def test_every_row_holds_the_map_of_its_own_image(data, store_path):
    model = _resnet18()
    with LabelStore(store_path) as store:
        dense, logits = _pil_maps(data, model, store.paths.tolist())
        maps = store.read(np.arange(len(store)))
    values, ids = topk_grid(dense, GRID, K)
    stored = torch.from_numpy(maps.logits.astype(np.float32))
    stored_ids = torch.from_numpy(maps.class_ids.astype(np.int64))
    scale = float(values.abs().max())
    # Row r is closest to image r's own map among all images (the rows are not shuffled).
    distance = (stored[:, None] - values[None]).abs().flatten(2).mean(2)  # [row, image]
    assert torch.equal(distance.argmin(1), torch.arange(len(stored)))
    torch.testing.assert_close(stored, values, rtol=0.05, atol=0.02 * scale)  # PIL vs DALI resize
    assert float((stored_ids[:, 0] == ids[:, 0]).float().mean()) > 0.9
    # The map's mean predicts what the model predicts on the whole image.
    assert torch.equal(dense.mean((2, 3)).argmax(1), logits.argmax(1))


def test_a_model_with_other_outputs_is_refused(data, tmp_path):
    with pytest.raises(GenerateError, match="the teacher has 4 outputs but .* gives 3 classes"):
        _generate(data, tmp_path / "x.h5", model=_resnet18(num_classes=4))
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------------
# Resume, ranks, CLI


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """The partial files of a run stopped by an error in its second write (rows 0..4 written)."""
    folder = tmp_path_factory.mktemp("interrupted")
    interrupt_second_write(folder, "resumed.h5", StoreWriter, lambda out: _generate(data, out))
    return folder


def _copy_partial(interrupted, tmp_path):
    return copy_files(interrupted, tmp_path, "resumed.h5")


def _record_write_starts(monkeypatch):
    return record_write_starts(monkeypatch, StoreWriter)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_store(data, store_path, interrupted, tmp_path, monkeypatch):
    out = _copy_partial(interrupted, tmp_path)
    with h5py.File(str(out) + ".partial", "r") as f:
        assert int(f.attrs["rows_written"]) == BATCH
    starts = _record_write_starts(monkeypatch)
    _generate(data, out)
    assert starts == [5, 10], "rows already written were written again"
    assert _sha(out) == _sha(store_path)
    assert sorted(os.listdir(tmp_path)) == ["resumed.h5"]


@pytest.mark.slow
def test_resume_with_another_batch_size_writes_only_missing_rows(data, store_path, interrupted, tmp_path,
                                                                 monkeypatch):
    out = _copy_partial(interrupted, tmp_path)
    starts = _record_write_starts(monkeypatch)
    _generate(data, out, batch_size=4)  # restarts at row 4 (a batch boundary), writes from row 5
    assert starts == [5, 8]
    with LabelStore(out) as resumed, LabelStore(store_path) as single:
        a, b = resumed.read(np.arange(12)), single.read(np.arange(12))
        np.testing.assert_allclose(a.logits.astype(np.float32), b.logits.astype(np.float32), rtol=1e-2, atol=1e-2)
        assert np.array_equal(a.class_ids, b.class_ids)


@pytest.mark.slow
def test_a_partial_store_of_other_weights_is_started_again(data, store_path, interrupted, tmp_path,
                                                           monkeypatch):
    out = _copy_partial(interrupted, tmp_path)
    starts = _record_write_starts(monkeypatch)
    with pytest.warns(UserWarning, match="other settings"):
        _generate(data, out, model=_resnet18(seed=1))
    assert starts == [0, 5, 10]
    assert _sha(out) != _sha(store_path)


@pytest.mark.slow
def test_two_ranks_and_a_merge_equal_one_process(data, store_path, tmp_path):
    single = _generate(data, tmp_path / "single3.h5", batch_size=3)
    out = tmp_path / "ranks.h5"
    parts = [_generate(data, out, batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert parts == [part_path(out, 0, 2), part_path(out, 1, 2)]
    with LabelStore(parts[1]) as part:
        assert part.paths.tolist() == list_images(data["images"]).relpaths[6:]
    assert merge_parts(out, 2) == str(out)
    assert _sha(out) == _sha(single)
    assert sorted(os.listdir(tmp_path)) == ["ranks.h5", "single3.h5"]
    with LabelStore(out) as merged, LabelStore(store_path) as reference:
        np.testing.assert_allclose(merged.read(np.arange(12)).logits.astype(np.float32),
                                   reference.read(np.arange(12)).logits.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_cli_generate_end_to_end(data, store_path, tmp_path, capsys):
    from dali_relabel.tools.cli import main

    out = str(tmp_path / "cli.h5")
    names = tmp_path / "classes.txt"
    names.write_text("class_0\nclass_1\nclass_2\n")
    code = main(["generate", "--images", data["images"], "--out", out, "--model", "resnet18",
                 "--weights", data["weights"], "--class-names", str(names), "--size", str(SIZE),
                 "--grid", str(GRID), "--k", str(K), "--batch-size", str(BATCH), "--device", "cpu",
                 "--workers", "1", "--threads", "1", "--quiet"])
    assert code == 0
    assert "wrote 12 rows" in capsys.readouterr().out
    assert _sha(out) == _sha(store_path)
    with LabelStore(out) as store:
        assert store.header.teacher == "resnet18" and store.header.source == "generate"

    code = main(["generate", "--images", data["images"], "--out", out, "--model", "resnet34",
                 "--weights", data["weights"], "--device", "cpu", "--quiet"])
    assert code == 2
    assert "does not fit resnet34" in capsys.readouterr().err


def test_build_teacher_reads_state_dicts_and_checkpoints(data, tmp_path):
    plain = build_teacher("resnet18", data["weights"], 3)
    state = torch.load(data["weights"], weights_only=True)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}, checkpoint)
    wrapped = build_teacher("resnet18", checkpoint, 3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapped(x))
        torch.testing.assert_close(plain(x), _resnet18()(x))
    assert not plain.training
    with pytest.raises(GenerateError, match="classifier has 3 outputs but 5 classes"):
        build_teacher("resnet18", data["weights"], 5)
    with pytest.raises(GenerateError, match="unknown model 'not_a_model'"):
        build_teacher("not_a_model", data["weights"], 3)
    with pytest.raises(FileNotFoundError):
        build_teacher("resnet18", tmp_path / "missing.pt", 3)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(GenerateError, match="needs timm, which is not installed"):
            build_teacher("timm:resnet50", data["weights"], 3)


# --------------------------------------------------------------------------------------------------
# Faults: a killed run, two runs of one output, a damaged partial file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The generation of _generate(data, out), stopped after its first write: reports its pid and its
# child processes (the DALI readers), then waits to be killed.
_PAUSED_GENERATE = """
import json, os, sys, time
import torch, torchvision
from dali_relabel.config import DataConfig
from dali_relabel.tools.generate import generate_label_maps
from dali_relabel.store import StoreWriter

images, out = sys.argv[1:3]
write = StoreWriter.write

def children():
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(name))
        except (OSError, ValueError):
            pass
    return found

def paused_write(self, start, *args, **kwargs):
    write(self, start, *args, **kwargs)
    print(json.dumps({"pid": os.getpid(), "children": children()}), flush=True)
    time.sleep(120)

StoreWriter.write = paused_write
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=3).eval()
generate_label_maps(images, out, model, size=%d, grid=%d, k=%d, batch_size=%d, device="cpu",
                    config=DataConfig(py_num_workers=1, num_threads=1), progress=False, teacher_name="resnet18")
""" % (SIZE, GRID, K, BATCH)


@pytest.mark.slow
def test_killing_generate_kills_its_readers_and_the_rerun_resumes(data, store_path, tmp_path, monkeypatch):
    """Killed alone, the main process used to leave its DALI readers alive holding the partial file
    and its HDF5 lock; the rerun then emptied the partial file and died with a BlockingIOError."""
    import json
    import signal
    import subprocess
    import sys

    from dali_relabel.outputs import processes_holding

    out = tmp_path / "killed.h5"
    # killed, it cannot remove its temporary files: they stay in this test's directory
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), DALI_RELABEL_SHARED_DIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", _PAUSED_GENERATE, data["images"], str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()[-3000:] if process.poll() is not None else "no output"
        info = json.loads(line)
        assert info["children"], "the DALI reader processes were not found"
        holders = [pid for pid, _ in processes_holding(str(out) + ".partial")]
        assert holders == [process.pid], "a reader process holds the partial file open"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    assert wait_until_gone(info["children"]) == [], "a reader process outlived generate"
    starts = _record_write_starts(monkeypatch)
    _generate(data, out)
    assert starts == [5, 10], "the rows written before the kill were lost"
    assert _sha(out) == _sha(store_path)


def test_a_second_run_of_the_same_output_is_refused_before_reading(data, tmp_path, monkeypatch):
    from dali_relabel.tools import generate
    from dali_relabel.outputs import OutputBusyError, OutputLock

    def no_loader(*args, **kwargs):
        raise AssertionError("the refused run started its readers")

    monkeypatch.setattr(generate, "_make_loader", no_loader)
    out = tmp_path / "busy.h5"
    with OutputLock(out):
        with pytest.raises(OutputBusyError, match=f"is being written by process {os.getpid()}"):
            _generate(data, out)
        with pytest.raises(OutputBusyError):
            _generate(data, out, restart=True)
    assert not os.path.exists(str(out) + ".partial")
    with OutputLock(part_path(out, 0, 2)):  # a rank's part takes one writer too
        with pytest.raises(OutputBusyError):
            _generate(data, out, rank=0, world_size=2)


@pytest.mark.slow
def test_merge_is_refused_while_another_process_writes_the_output(data, tmp_path):
    from dali_relabel.outputs import OutputBusyError, OutputLock

    out = tmp_path / "ranks.h5"
    for rank in range(2):
        _generate(data, out, batch_size=6, rank=rank, world_size=2)
    with OutputLock(out):
        with pytest.raises(OutputBusyError):
            merge_parts(out, 2)
    assert os.path.exists(part_path(out, 0, 2)) and os.path.exists(part_path(out, 1, 2))
    assert merge_parts(out, 2) == str(out)
    LabelStore(out, verify="full").close()


@pytest.mark.slow
def test_a_damaged_partial_file_is_kept(data, interrupted, tmp_path):
    out = _copy_partial(interrupted, tmp_path)
    partial = str(out) + ".partial"
    with open(partial, "r+b") as f:
        f.write(b"\0" * 64)  # the HDF5 superblock gone
    damaged = open(partial, "rb").read()
    with pytest.raises(StoreError, match="kept: remove it, or start again with --restart"):
        _generate(data, out)
    assert open(partial, "rb").read() == damaged


# --------------------------------------------------------------------------------------------------
# The built-in models (the demo's teacher)


@pytest.mark.slow
def test_cli_generate_with_a_built_in_model(data, tmp_path, capsys):
    from dali_relabel.tools.cli import main
    from dali_relabel.training.models import create_model

    torch.manual_seed(0)
    model = create_model("small_resnet", 3).eval()
    weights = tmp_path / "small_resnet.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "small_resnet"}}, weights)  # a training checkpoint
    out = str(tmp_path / "small.h5")
    code = main(["generate", "--images", data["images"], "--out", out, "--model", "small_resnet",
                 "--weights", str(weights), "--size", "64", "--grid", str(GRID), "--k", str(K),
                 "--batch-size", str(BATCH), "--device", "cpu", "--workers", "1", "--threads", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    reference = _generate(data, tmp_path / "reference.h5", model=model, size=64, teacher_name="small_resnet")
    assert _sha(out) == _sha(reference)
    with LabelStore(out) as store:
        assert store.header.teacher == "small_resnet" and store.header.teacher_input_size == 64
    torch.save(create_model("medium_resnet", 3).state_dict(), tmp_path / "medium.pt")
    assert type(build_teacher("medium_resnet", tmp_path / "medium.pt", 3)).__name__ == "SmallResNet"
