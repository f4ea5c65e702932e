"""Smoke tests of the benchmark suites in benchmarks/ with tiny settings: every contender measures a
positive rate, the outputs have their keys, the charts are PNGs, the operator benchmark found the fused
operator equal to the reference, and the GPU check runs end to end in its dry-run mode."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 generated JPEGs over 5 classes, shared by the tests of this module (generated once).
TINY_DATA = ["--images", "24", "--classes", "5", "--gen-workers", "2"]
TINY_LOADERS = ["--image-size", "32", "--repeats", "1", "--batches", "2", "--warmup", "1", "--feed-batches", "2",
                "--threads", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-data"))


def _run(*command, timeout=240):
    done = subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done


def _single(pattern):
    found = glob.glob(pattern)
    assert len(found) == 1, found
    return found[0]


def _assert_png(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def _check_common(result):
    for key in ("machine", "versions", "arguments", "warnings", "load_average_end", "files"):
        assert key in result, key
    for key in ("platform", "cpu_model", "cpu_count", "usable_cores", "memory_bytes", "gpu", "load_average"):
        assert key in result["machine"], key
    for key in ("python", "torch", "torchvision", "dali", "dali_relabel", "git_commit"):
        assert result["versions"].get(key), key
    _assert_png(result["files"]["png"])
    assert os.path.getsize(result["files"]["markdown"]) > 0


def _check_entry(entry, repeats=1):
    assert len(entry["all"]) == repeats and all(v > 0 for v in entry["all"])
    assert entry["min"] <= entry["median"] <= entry["max"]


@pytest.mark.slow
def test_throughput_smoke_cpu(tmp_path, data_dir):
    from dali_relabel.config import DataConfig

    workers = DataConfig().py_num_workers  # 0 (the loader's process) and 1 worker are compared
    other = 1 if workers == 0 else 0
    out = tmp_path / "results"
    done = _run(sys.executable, "-m", "benchmarks.throughput", "--device", "cpu", "--batch-sizes", "4,8",
                "--data-dir", data_dir, "--out-dir", str(out), *TINY_DATA, *TINY_LOADERS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mean" in done.stdout and "KB" in done.stdout  # the generator prints the mean JPEG size
    with open(_single(str(out / "throughput-cpu-*.json"))) as f:
        result = json.load(f)
    _check_common(result)
    assert result["device"] == "cpu" and result["batch_sizes"] == [4, 8] and result["plugin"].get("directory")
    assert 60_000 < result["data"]["mean_jpeg_bytes"] < 160_000  # ImageNet-like JPEGs
    for batch in ("4", "8"):
        run = result["runs"][batch]
        assert set(run["contenders"]) == {"plain", "example", "relabel", f"relabel-w{other}", "authors"}
        for name, entry in run["contenders"].items():
            _check_entry(entry)
            assert entry["batch_size"] == int(batch), name
        for name in ("relabel", f"relabel-w{other}", "authors"):  # real soft targets came out
            assert run["contenders"][name]["soft_target_sum_max_error"] < 1e-3
        assert run["contenders"]["relabel"]["settings"]["py_num_workers"] == workers
        assert run["contenders"][f"relabel-w{other}"]["settings"]["py_num_workers"] == other
        assert {"relabel_over_plain", "relabel_over_example", "relabel_over_authors",
                f"relabel_w{other}_over_plain"} <= set(run["ratios"])
        assert run["paired_ratios"]["relabel_over_plain"]["median"] > 0
        assert all(v > 0 for v in run["ratios"].values())
        feed = run["feed"]
        assert set(feed["contenders"]) == {"reader", "source", f"source-w{other}"}
        for entry in feed["contenders"].values():
            _check_entry(entry)
        assert feed["method"]["threads"] == 2 and feed["ratios"]["source_over_reader"] > 0
        shards = run["shards"]
        assert set(shards["contenders"]) == {"plain-shards", "shards", "plain-shards-graph", "shards-graph"}
        assert shards["epoch_end"]["projected_shards_over_plain_shards_imagenet"] > 0
        for entry in shards["contenders"].values():
            _check_entry(entry)
        assert shards["contenders"]["shards"]["soft_target_sum_max_error"] < 1e-3
        assert run["ratios"]["shards_over_plain_shards"] > 0
    compared = result["py_num_workers"]
    assert compared["default"] == workers and compared["compared"] == [other]
    assert set(compared["by_batch_size"]["8"]["loader"]["median_by_workers"]) == {str(workers), str(other)}
    assert set(compared["by_batch_size"]["8"]["feed"]["median_by_workers"]) == {str(workers), str(other)}
    assert set(result["targets"]) == {"relabel_over_plain", "shards_over_plain_shards", "feed_source_samples_per_s"}
    assert set(result["targets"]["relabel_over_plain"]["by_batch_size"]) == {"4", "8"}
    with open(result["files"]["markdown"]) as f:
        table = f.read()
    assert "| B=4 | B=8 |" in table and "relabel / plain" in table and "## Targets" in table
    assert "## Tar shards" in table and "shards / plain on shards" in table


@pytest.mark.slow
def test_operator_smoke_cpu(tmp_path):
    from benchmarks.operator import main

    assert main(["--devices", "cpu", "--batch-sizes", "8,16", "--repeats", "1", "--target-seconds", "0.01",
                 "--threads", "2", "--out-dir", str(tmp_path)]) == 0
    with open(_single(str(tmp_path / "operator-*.json"))) as f:
        result = json.load(f)
    _check_common(result)
    assert [r["batch_size"] for r in result["results"]] == [8, 16] and result["devices"] == ["cpu"]
    for row in result["results"]:
        assert row["max_abs_diff"] <= 1e-5 and row["reference_on_device_max_abs_diff"] <= 1e-5, row
        assert row["fused_ms"] > 0 and row["feed_ms"] > 0 and row["reference_ms"] > 0 and row["raw_speedup"] > 0
        assert row["geometry_max_abs_diff"] <= 1e-5 and row["geometry_ms"] > 0 and row["geometry_identity_ms"] > 0
    assert result["correct"] and result["max_abs_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.gpu
def test_operator_smoke_gpu(tmp_path):
    from benchmarks.operator import main

    assert main(["--devices", "all", "--batch-sizes", "8", "--repeats", "1", "--target-seconds", "0.01",
                 "--out-dir", str(tmp_path)]) == 0
    with open(_single(str(tmp_path / "operator-*.json"))) as f:
        result = json.load(f)
    assert {r["device"] for r in result["results"]} == {"cpu", "gpu"} and result["correct"]


@pytest.mark.slow
@pytest.mark.gpu
def test_throughput_smoke_gpu(tmp_path, data_dir):
    done = _run(sys.executable, "-m", "benchmarks.throughput", "--device", "gpu", "--contenders", "plain,relabel",
                "--batch-sizes", "8", "--compare-workers", "", "--data-dir", data_dir, "--out-dir", str(tmp_path),
                *TINY_DATA, *TINY_LOADERS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(_single(str(tmp_path / "throughput-gpu-*.json"))) as f:
        result = json.load(f)
    assert result["machine"]["gpu"] and result["runs"]["8"]["ratios"]["relabel_over_plain"] > 0


@pytest.mark.slow
def test_store_read_smoke(tmp_path):
    from benchmarks.store_read import main

    # In-process (no DALI involved): spares a second start of torch and matplotlib.
    assert main(["--rows", "1600", "--batch-size", "32", "--repeats", "2", "--data-dir", str(tmp_path / "data"),
                 "--out-dir", str(tmp_path / "results")]) == 0
    with open(_single(str(tmp_path / "results" / "store-read-*.json"))) as f:
        result = json.load(f)
    _check_common(result)
    assert result["store"]["rows"] == 1600 and result["store"]["bytes_per_image"] > 0
    assert result["pt_bytes_per_image"] > 0
    for cache in ("page-cached", "evicted"):
        for method in ("pt-files", "store-sorted", "store-unsorted"):
            _check_entry(result["results"][cache][method], repeats=2)
        assert result["ratios"][cache]["pt_over_store_sorted"] > 0


def test_suites_refuse_bad_settings(tmp_path, capsys):
    from benchmarks import operator, store_read, throughput

    common = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "results")]
    assert store_read.main(["--rows", "100", *common]) == 2
    assert "too small" in capsys.readouterr().err
    assert throughput.main(["--contenders", "plain,nonsense", *common]) == 2
    assert "unknown contender" in capsys.readouterr().err
    assert throughput.main(["--images", "4", "--batch-sizes", "8", "--contenders", "relabel", *common]) == 2
    assert "do not fill one batch" in capsys.readouterr().err
    assert operator.main(["--batch-sizes", "", "--out-dir", str(tmp_path / "results")]) == 2
    with pytest.raises(SystemExit):  # argparse: not a positive integer
        throughput.main(["--batch-sizes", "64,0", *common])
    assert not os.path.exists(tmp_path / "data")  # nothing generated for refused settings


@pytest.mark.slow
def test_every_suite_has_help():
    for suite in ("throughput", "operator", "store_read"):
        done = _run(sys.executable, "-m", f"benchmarks.{suite}", "--help", timeout=120)
        assert done.returncode == 0 and f"python -m benchmarks.{suite}" in done.stdout, done.stderr[-2000:]


def test_random_maps_have_distinct_classes_per_cell():
    from benchmarks.data import distinct_class_ids, random_topk_maps

    rng = np.random.default_rng(0)
    ids = distinct_class_ids(rng, 50, 5, 4, 3, 6)
    assert ids.shape == (50, 5, 4, 3) and ids.min() >= 0 and ids.max() < 6
    cells = np.moveaxis(ids, 1, -1).reshape(-1, 5)
    assert all(len(set(cell)) == 5 for cell in cells)
    assert len(np.unique(cells[:, 0])) == 6  # every class shows up
    logits, _ = random_topk_maps(rng, 4, 5, 15, 15, 1000)
    assert logits.dtype == np.float16 and (np.diff(logits.astype(np.float32), axis=1) <= 0).all()


GPU_CHECK = os.path.join("benchmarks", "gpu_check.sh")


@pytest.mark.slow
def test_gpu_check_arguments(tmp_path):
    done = _run("bash", GPU_CHECK, "--help", timeout=30)
    assert done.returncode == 0
    for word in ("--dry-run", "stage", "preflight", "install", "plugin", "operator", "throughput", "tests"):
        assert word in done.stdout, word
    assert _run("bash", GPU_CHECK, "--bogus", timeout=30).returncode == 2
    assert _run("bash", GPU_CHECK, "--threads", "many", "--out", str(tmp_path), timeout=30).returncode == 2
    elsewhere = subprocess.run(["bash", os.path.join(ROOT, GPU_CHECK), "--dry-run", "--out", str(tmp_path)],
                               cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert elsewhere.returncode == 2 and "repository root" in elsewhere.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DALI_RELABEL_GPU_CHECK") == "1", reason="already inside a GPU check")
def test_gpu_check_dry_run(tmp_path, data_dir):
    """The whole GPU check on this CPU machine: every step but the staging runs and passes."""
    out = tmp_path / "out"
    done = _run("bash", GPU_CHECK, "--dry-run", "--tiny", "--out", str(out), "--data-dir", data_dir,
                "--threads", "2", "--tests", "tests/test_benchmarks.py::test_random_maps_have_distinct_classes_per_cell",
                timeout=400)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert done.returncode == 0 and summary["ok"], done.stdout[-4000:]
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"stage": "skipped (dry run)", "preflight": "ok", "install": "ok", "install-check": "ok",
                      "plugin": "ok", "operator": "ok", "throughput": "ok", "tests": "ok"}
    for name in ("preflight", "plugin"):
        with open(out / "results" / f"{name}.json") as f:
            assert json.load(f)
    with open(_single(str(out / "results" / "throughput-cpu-*.json"))) as f:
        assert set(json.load(f)["runs"]["8"]["contenders"]) == {"plain", "relabel"}
    assert os.path.exists(out / "results" / "junit.xml")
    for path in glob.glob(str(out / "**"), recursive=True):  # at most two folders deep
        assert len(os.path.relpath(path, out).split(os.sep)) <= 2, path
