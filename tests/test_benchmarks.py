"""Smoke tests of the benchmark suites in benchmarks/ with tiny settings: every contender measures a
positive rate, the outputs have their keys, the charts are PNGs, the operator benchmark found the fused
operator equal to the reference, and the GPU check runs end to end in its dry-run mode."""
import glob
import json
import os
import subprocess
import sys
import tarfile

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
    assert set(result["targets"]) == {"relabel_over_plain", "relabel_over_plain_small_epochs",
                                      "shards_over_plain_shards", "feed_source_samples_per_s"}
    assert set(result["targets"]["relabel_over_plain"]["by_batch_size"]) == {"4"}  # 6 batches an epoch
    assert set(result["targets"]["relabel_over_plain_small_epochs"]["by_batch_size"]) == {"8"}  # 3 batches
    with open(result["files"]["markdown"]) as f:
        table = f.read()
    assert "| B=4 | B=8 |" in table and "relabel / plain" in table and "## Targets" in table
    assert "## Tar shards" in table and "shards / plain on shards" in table


@pytest.mark.slow
def test_throughput_crops_smoke_cpu(tmp_path, data_dir):
    """The crops round alone: plain DALI (one crop per decode) against dali-relabel with 1, 2 and 4
    crops per decode, in crops/s, with the ratios and the k = 4 target."""
    out = tmp_path / "results"
    done = _run(sys.executable, "-m", "benchmarks.throughput", "--device", "cpu", "--contenders", "crops",
                "--batch-sizes", "8", "--crops-per-image", "1,2,4", "--data-dir", data_dir, "--out-dir", str(out),
                *TINY_DATA, *TINY_LOADERS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(_single(str(out / "throughput-cpu-crops-*.json"))) as f:
        result = json.load(f)
    _check_common(result)
    crops = result["runs"]["8"]["crops"]
    assert set(crops["contenders"]) == {"plain", "relabel-k1", "relabel-k2", "relabel-k4"}
    assert crops["method"]["order"][0] == "plain" and crops["method"]["unit"] == "crops/s"
    for name, entry in crops["contenders"].items():
        _check_entry(entry)
        assert entry["batch_size"] == 8, name
    for k in (1, 2, 4):
        entry = crops["contenders"][f"relabel-k{k}"]
        assert entry["soft_target_sum_max_error"] < 1e-3
        assert entry["settings"]["crops_per_image"] == k and entry["settings"]["images_per_batch"] == 8 // k
        assert crops["ratios"][f"relabel_k{k}_over_plain"] > 0
        assert crops["paired_ratios"][f"relabel_k{k}_over_plain"]["median"] > 0
    assert crops["ratios"]["relabel_k4_over_relabel_k1"] > 0
    target = result["targets"]["crops_k4_over_plain"]
    assert target["threshold"] == 1.8 and set(target["by_batch_size"]) == {"8"}
    with open(result["files"]["markdown"]) as f:
        table = f.read()
    assert "## Several crops per decoded image" in table and "relabel, 4 crops per decode / plain" in table
    assert "crops/s of relabel with 4 crops per decode" in table


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
    assert throughput.main(["--batch-sizes", "6", "--contenders", "crops", "--crops-per-image", "1,4", *common]) == 2
    assert "not a multiple of 4 crops" in capsys.readouterr().err
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


# -- without .git (the Docker image, the GPU machine's copy) -----------------------------------------
_NOT_COPIED = {"__pycache__", "build", "dist", "gpu-check-out", "demo_output"}  # .git is a file in a worktree


def copy_of_tree(dest) -> str:
    """The source tree copied to ``dest`` without ``.git`` and other hidden folders (virtual
    environments, caches, staged wheels, generated data), build outputs and run outputs. Tests that
    run from it write nothing into the source tree, which may be read-only (the Docker image)."""
    import shutil

    def ignore(folder, names):
        return [n for n in names if n in _NOT_COPIED or n == ".git" or n.endswith((".egg-info", ".so"))
                or (n.startswith(".") and os.path.isdir(os.path.join(folder, n)))]

    shutil.copytree(ROOT, str(dest), ignore=ignore)
    return str(dest)


def _env_without_git(copy: str, **extra) -> dict:
    """An environment in which git finds no repository around ``copy`` and no commit is given."""
    env = {k: v for k, v in os.environ.items() if k != "DALI_RELABEL_GIT_COMMIT"}
    env.update(GIT_CEILING_DIRECTORIES=os.path.dirname(copy), **extra)
    return env


@pytest.mark.slow
def test_benchmarks_run_in_a_copy_without_git(tmp_path):
    """No .git: the results record the commit as "unknown" (and the table names none)."""
    copy = copy_of_tree(tmp_path / "tree")
    assert not os.path.exists(os.path.join(copy, ".git"))
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.operator", "--devices", "cpu", "--batch-sizes", "8",
                           "--repeats", "1", "--target-seconds", "0.01", "--threads", "2", "--out-dir", str(out)],
                          cwd=copy, env=_env_without_git(copy), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(_single(str(out / "operator-*.json"))) as f:
        result = json.load(f)
    _check_common(result)
    assert result["versions"]["git_commit"] == "unknown" and result["versions"]["git_dirty"] is None
    assert result["versions"]["dali_relabel_path"] == os.path.join(copy, "dali_relabel")  # the copy ran
    with open(result["files"]["markdown"]) as f:
        assert "unknown" not in f.read()


@pytest.mark.slow
def test_git_commit_from_the_environment_wins(monkeypatch, tmp_path):
    from benchmarks import report

    monkeypatch.setenv("DALI_RELABEL_GIT_COMMIT", "0123abcd")
    assert report.git_state() == {"git_commit": "0123abcd", "git_dirty": None}
    monkeypatch.delenv("DALI_RELABEL_GIT_COMMIT")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(report, "BENCH_DIR", str(tmp_path))  # no repository there
    assert report.git_state() == {"git_commit": "unknown", "git_dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert report.git_state()["git_commit"] == "unknown"


# -- the GPU check ------------------------------------------------------------------------------------
GPU_CHECK = os.path.join("benchmarks", "gpu_check.sh")
GPU_CHECK_STEPS = ["stage", "preflight", "install", "install-check", "plugin", "gpu-tests", "operator",
                   "throughput", "tests"]


def _returned_files(out) -> list:
    """What the GPU machine would bring back from ``out``: every file, checked to be at most 8 and at
    most two folders down."""
    files = [p for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)]
    assert len(files) <= 8, files
    for path in files:
        assert len(os.path.relpath(path, out).split(os.sep)) <= 3, path
    return sorted(os.path.relpath(p, out) for p in files)


@pytest.mark.slow
def test_gpu_check_arguments(tmp_path):
    done = _run("bash", GPU_CHECK, "--help", timeout=30)
    assert done.returncode == 0
    for word in ("--dry-run", "--budget-s", "summary.json", *GPU_CHECK_STEPS):
        assert word in done.stdout, word
    assert _run("bash", GPU_CHECK, "--bogus", timeout=30).returncode == 2
    assert _run("bash", GPU_CHECK, "--threads", "many", "--out", str(tmp_path), timeout=30).returncode == 2
    elsewhere = subprocess.run(["bash", os.path.join(ROOT, GPU_CHECK), "--dry-run", "--out", str(tmp_path)],
                               cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert elsewhere.returncode == 2 and "repository root" in elsewhere.stderr


@pytest.mark.slow
def test_gpu_check_out_of_budget_is_not_a_failure(tmp_path):
    """With no time left, every step is "not reached": the check still passes, says it is not
    complete, and leaves summary.json and the archive."""
    out = tmp_path / "out"
    done = _run("bash", GPU_CHECK, "--dry-run", "--budget-s", "20", "--out", str(out), "--work", str(tmp_path / "work"),
                timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _returned_files(out) == ["results.tar.gz", "summary.json"]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["ok"] and not summary["complete"] and summary["final"] and summary["budget_s"] == 20
    assert [s["step"] for s in summary["steps"]] == GPU_CHECK_STEPS
    assert summary["steps"][0]["status"] == "skipped"
    assert all(s["status"] == "not reached" and "budget" in s["detail"] for s in summary["steps"][1:])
    assert summary["not_reached_steps"] == GPU_CHECK_STEPS[1:] and summary["failed_steps"] == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DALI_RELABEL_GPU_CHECK") == "1", reason="already inside a GPU check")
def test_gpu_check_dry_run(tmp_path, data_dir):
    """The whole GPU check on this CPU machine, from a copy of the tree without .git (as on the GPU
    machine; the source tree may be read-only): every step but the staging runs and passes, and what
    would come back is summary.json and one archive."""
    copy = copy_of_tree(tmp_path / "tree")
    out, work = tmp_path / "out", tmp_path / "work"
    before = sorted(os.listdir(ROOT))
    tests = ("tests/test_benchmarks.py::test_random_maps_have_distinct_classes_per_cell "
             "tests/test_benchmarks.py::test_operator_smoke_gpu")  # one test of each step (the GPU one skips)
    done = subprocess.run(["bash", GPU_CHECK, "--dry-run", "--tiny", "--out", str(out), "--work", str(work),
                           "--data-dir", data_dir, "--threads", "2", "--budget-s", "560", "--tests", tests],
                          cwd=copy, env=_env_without_git(copy, DALI_RELABEL_GIT_COMMIT="0123abcd"),
                          capture_output=True, text=True, timeout=600)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert done.returncode == 0 and summary["ok"] and summary["complete"], done.stdout[-4000:]
    assert _returned_files(out) == ["results.tar.gz", "summary.json"]
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"stage": "skipped", **{name: "ok" for name in GPU_CHECK_STEPS[1:]}}
    assert summary["commit"] == "0123abcd" and summary["mode"] == "dry run (CPU)"
    tests_run = summary["tests"]
    assert (tests_run["gpu-tests"]["skipped"], tests_run["gpu-tests"]["total"]) == (1, 1)
    assert (tests_run["tests"]["passed"], tests_run["tests"]["total"]) == (1, 1)
    figures = summary["figures"]
    assert figures["plugin"]["how"] and figures["machine"]["dali"]
    assert figures["operator"]["correct"] and figures["operator"]["results"][0]["raw_speedup"] > 0
    rates = figures["throughput"]["by_batch_size"]["8"]
    assert set(rates["images_per_s"]) == {"plain", "relabel"} and rates["ratios"]["relabel_over_plain"] > 0
    assert set(rates["feed_samples_per_s"]) == {"reader", "source"}

    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        throughput = json.load(tar.extractfile(_single_name(names, "results/throughput-cpu-", ".json")))
    assert {"results/preflight.json", "results/plugin.json", "results/junit.xml", "results/junit-gpu.xml",
            "logs/operator.log", "logs/tests.log"} <= names
    assert throughput["versions"]["git_commit"] == "0123abcd"
    assert sorted(os.listdir(ROOT)) == before  # nothing written into the source tree (no egg-info)


def _single_name(names, prefix, suffix):
    found = [n for n in names if n.startswith(prefix) and n.endswith(suffix)]
    assert len(found) == 1, found
    return found[0]


def _stage_fake_dali(stage, part_bytes=700):
    """A stage folder as pack_dali_wheels.sh makes one (part-00, part-01, ..., MANIFEST) holding one
    wheel that installs ``nvidia/__init__.py`` (as the nvimgcodec wheels do) and a stand-in
    ``nvidia.dali``."""
    import hashlib
    import io
    import zipfile

    files = {"nvidia/__init__.py": "", "nvidia/dali/__init__.py": "__version__ = '0.0+stand-in'\n",
             "fake_dali-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: fake-dali\nVersion: 0.1\n",
             "fake_dali-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
    files["fake_dali-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "fake_dali-0.1.dist-info/RECORD,,\n"
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("wheels/fake_dali-0.1-py3-none-any.whl")
        info.size = len(wheel.getvalue())
        tar.addfile(info, io.BytesIO(wheel.getvalue()))
    data = archive.getvalue()
    os.makedirs(stage)
    for n, start in enumerate(range(0, len(data), part_bytes)):
        with open(os.path.join(stage, f"part-{n:02d}"), "wb") as f:
            f.write(data[start:start + part_bytes])
    with open(os.path.join(stage, "MANIFEST"), "w") as f:
        f.write(hashlib.sha256(data).hexdigest() + "\n")
    assert n >= 2  # several parts


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["built-in", "staged"])
def test_gpu_check_stages_dali_then_stops_at_the_preflight(tmp_path, installer):
    """The GPU mode on a machine without DALI: the staged parts are joined, checked and installed
    (by the stage's install_dali_wheels.sh when it has one, else by the check itself), the wheels'
    nvidia/__init__.py is removed, and without a GPU the preflight stops the check."""
    import shutil

    import pip

    venv = tmp_path / "venv"  # a python3 with pip and nothing else (copied: ensurepip may be missing)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(venv / "bin" / "python3"), "-c", where], check=True, capture_output=True, text=True,
                             timeout=60).stdout.strip()
    shutil.copytree(os.path.dirname(pip.__file__), os.path.join(purelib, "pip"))
    stage, target, out = tmp_path / "stage", tmp_path / "site", tmp_path / "out"
    _stage_fake_dali(str(stage))
    if installer == "staged":
        with open(stage / "install_dali_wheels.sh", "w") as f:
            f.write('set -e\ntouch "$1/staged-installer-ran"\ncat "$1"/part-* > "$1/wheels.tar"\n'
                    'tar -C "$1" -xf "$1/wheels.tar"\n'
                    'python3 -m pip install -q --no-index --no-deps --target "$2" "$1"/wheels/*.whl\n')
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", GPU_CHECK, "--stage", str(stage), "--target", str(target), "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-s", "200"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["stage"] == "ok" and status["preflight"] == "failed", done.stdout[-3000:]
    assert all(status[name] == "skipped" for name in GPU_CHECK_STEPS[2:])
    assert (stage / "staged-installer-ran").exists() == (installer == "staged")
    assert (target / "nvidia" / "dali" / "__init__.py").exists()
    assert not (target / "nvidia" / "__init__.py").exists()  # nvidia stays a namespace package
    assert _returned_files(out) == ["results.tar.gz", "summary.json", "tail-preflight.log"]
    assert "missing: numpy, torch" in (out / "tail-preflight.log").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        preflight = json.load(tar.extractfile("results/preflight.json"))
    assert preflight["modules"]["nvidia.dali"] == "0.0+stand-in" and preflight["cuda_available"] is False


@pytest.mark.slow
def test_gpu_check_without_staged_parts_says_so(tmp_path):
    """GPU mode, python3 without DALI and an empty stage: the stage step fails naming the missing
    parts, and nothing else runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    out = tmp_path / "out"
    done = subprocess.run(["bash", GPU_CHECK, "--stage", str(tmp_path / "stage"), "--target", str(tmp_path / "site"),
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    stage = summary["steps"][0]
    assert stage["status"] == "failed" and "no MANIFEST or parts in" in stage["detail"]
    assert all(s["status"] == "skipped" for s in summary["steps"][1:]) and summary["failed_steps"] == ["stage"]
    assert _returned_files(out) == ["results.tar.gz", "summary.json", "tail-stage.log"]
