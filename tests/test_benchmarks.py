"""Smoke tests of the benchmarks (`dali-relabel bench`), with tiny settings: every contender measures
a positive rate, the outputs have their keys, the chart is a PNG, and the operator benchmark checked
that the fused operator computed the reference's targets."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

TINY = ["--images", "48", "--classes", "10", "--batch-size", "8", "--repeats", "1", "--workers", "1",
        "--image-size", "64", "--op-batch-sizes", "8,16", "--gen-workers", "2"]


def _bench(tmp_path, *extra, timeout=240):
    command = [sys.executable, "-m", "dali_relabel.cli", "bench", "--data-dir", str(tmp_path / "data"),
               "--out-dir", str(tmp_path / "results"), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


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


def _check_throughput(tmp_path, device):
    results = tmp_path / "results"
    with open(_single(str(results / f"throughput-{device}-*.json"))) as f:
        result = json.load(f)
    for key in ("machine", "versions", "arguments", "contenders", "ratios", "op_microbenchmark", "op_speedups",
                "data", "method", "warnings", "load_average_end"):
        assert key in result, key
    for key in ("platform", "cpu_model", "cpu_count", "memory_bytes", "gpu"):
        assert key in result["machine"], key
    for key in ("python", "torch", "torchvision", "dali", "dali_relabel"):
        assert result["versions"].get(key), key
    assert result["arguments"]["batch_size"] == 8 and result["device"] == device
    assert set(result["contenders"]) == {"plain-dali", "dali-relabel", "authors"}
    for name, entry in result["contenders"].items():
        assert len(entry["all"]) == 1 and all(v > 0 for v in entry["all"]), name
        assert entry["min"] <= entry["median"] <= entry["max"], name
    for name in ("dali-relabel", "authors"):  # real soft targets came out
        assert result["contenders"][name]["soft_target_sum_max_error"] < 1e-3
    assert set(result["ratios"]) == {"relabel_over_plain", "relabel_over_authors"}
    assert all(v > 0 for v in result["ratios"].values())
    # The generated JPEGs are ImageNet-like in size.
    assert 60_000 < result["data"]["mean_jpeg_bytes"] < 160_000
    op = result["op_microbenchmark"]
    rows = [r for r in op["results"] if r["device"] == device]
    assert [r["batch_size"] for r in rows] == [8, 16]
    for row in op["results"]:
        assert row["max_abs_diff"] <= 1e-5, row
        assert row["reference_on_device_max_abs_diff"] <= 1e-5, row
        assert row["fused_ms"] > 0 and row["feed_ms"] > 0 and row["reference_ms"] > 0
        assert row["raw_speedup"] > 0
    assert op["correct"] and op["max_abs_diff"] <= 1e-5
    assert "8" in result["op_speedups"][device]
    _assert_png(result["files"]["png"])
    with open(result["files"]["markdown"]) as f:
        table = f.read()
    assert "| contender | median images/s" in table and "dali-relabel" in table
    return result


def test_throughput_benchmark_smoke_cpu(tmp_path):
    out = _bench(tmp_path, "--device", "cpu", "--op-devices", "cpu", *TINY)
    assert "mean" in out and "KB" in out  # the generator prints the mean JPEG size
    _check_throughput(tmp_path, "cpu")


@pytest.mark.gpu
def test_throughput_benchmark_smoke_gpu(tmp_path):
    _bench(tmp_path, "--device", "gpu", "--op-devices", "all", *TINY)
    result = _check_throughput(tmp_path, "gpu")
    assert {r["device"] for r in result["op_microbenchmark"]["results"]} == {"cpu", "gpu"}


def test_store_read_benchmark_smoke(tmp_path):
    from dali_relabel.cli import main

    # In-process (no DALI involved): spares a second start of torch, torchvision and matplotlib.
    assert main(["bench", "--store-read", "--store-rows", "1600", "--store-batch", "32", "--repeats", "2",
                 "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "results")]) == 0
    with open(_single(str(tmp_path / "results" / "store-read-*.json"))) as f:
        result = json.load(f)
    assert result["store"]["rows"] == 1600 and result["store"]["bytes_per_image"] > 0
    assert result["pt_bytes_per_image"] > 0 and isinstance(result["warnings"], list)
    for cache in ("page-cached", "evicted"):
        for method in ("pt-files", "store-sorted", "store-unsorted"):
            entry = result["results"][cache][method]
            assert len(entry["all"]) == 2 and entry["median"] > 0
        assert result["ratios"][cache]["pt_over_store_sorted"] > 0
    _assert_png(result["files"]["png"])
    assert os.path.exists(result["files"]["markdown"])


def test_bench_refuses_bad_settings(tmp_path, capsys):
    from dali_relabel.cli import main

    common = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "results")]
    assert main(["bench", "--store-read", "--store-rows", "100", *common]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["bench", "--contenders", "plain,nonsense", *common]) == 2
    assert "unknown contender" in capsys.readouterr().err
    assert main(["bench", "--images", "4", "--batch-size", "8", "--contenders", "relabel", *common]) == 2
    assert "do not fill one batch" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "data")  # nothing generated for refused settings


def test_random_maps_have_distinct_classes_per_cell():
    from dali_relabel.bench import distinct_class_ids, random_topk_maps

    rng = np.random.default_rng(0)
    ids = distinct_class_ids(rng, 50, 5, 4, 3, 6)
    assert ids.shape == (50, 5, 4, 3) and ids.min() >= 0 and ids.max() < 6
    cells = np.moveaxis(ids, 1, -1).reshape(-1, 5)
    assert all(len(set(cell)) == 5 for cell in cells)
    assert len(np.unique(cells[:, 0])) == 6  # every class shows up
    logits, _ = random_topk_maps(rng, 4, 5, 15, 15, 1000)
    assert logits.dtype == np.float16 and (np.diff(logits.astype(np.float32), axis=1) <= 0).all()
