"""benchmarks.gpu_summary: what the GPU check brings back (summary.json, one archive, failed steps'
log tails; at most 8 files), read from a work folder written here by hand."""
import json
import os
import shutil
import tarfile

import pytest

from benchmarks import gpu_summary
from benchmarks.gpu_summary import STEPS

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok_too" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[spawn]" time="0.1"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_b" name="test_broken" time="0.1"><error message="fixture">y</error></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0.0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>
"""


def _work(tmp_path, steps):
    """A work folder with steps.tsv lines ``steps`` [(name, status, seconds, detail)] and a log each."""
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "results").mkdir()
    with open(work / "steps.tsv", "w") as f:
        for name, status, seconds, detail in steps:
            f.write(f"{name}\t{status}\t{seconds}\t{detail}\n")
            (work / "logs" / f"{name}.log").write_text("".join(f"{name} line {i}\n" for i in range(400)))
    return work


def test_steps_never_recorded_are_not_reached(tmp_path):
    work = _work(tmp_path, [("stage", "ok", 31, ""), ("preflight", "failed", 4, "exit status 1")])
    summary = gpu_summary.build_summary(str(work), "gpu", 300, 40, final=True)
    assert [s["step"] for s in summary["steps"]] == list(STEPS)
    assert summary["steps"][0] == {"step": "stage", "status": "ok", "seconds": 31, "detail": ""}
    assert summary["steps"][2] == {"step": "install", "status": "not reached", "seconds": 0,
                                   "detail": "the check stopped before it"}
    assert not summary["ok"] and not summary["complete"] and summary["failed_steps"] == ["preflight"]
    interim = gpu_summary.build_summary(str(work), "gpu", 300, 40, final=False)
    assert interim["steps"][2]["detail"] == "not yet" and not interim["final"]


def test_a_later_line_of_a_step_wins_and_unknown_statuses_are_refused(tmp_path):
    work = _work(tmp_path, [("stage", "skipped", 0, "dry run"), ("stage", "failed", 0, "DALI is not importable")])
    assert gpu_summary.build_summary(str(work), "gpu", 300, 5, True)["steps"][0]["status"] == "failed"
    work = _work(tmp_path / "b", [("stage", "fine", 0, "")])
    with pytest.raises(ValueError, match="unknown status 'fine'"):
        gpu_summary.read_steps(str(work / "steps.tsv"))


def test_junit_counts_and_failing_names(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    counts = gpu_summary.junit_counts(str(path))
    assert counts == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1, "total": 5,
                      "failing": ["tests.test_a::test_bad[spawn]", "tests.test_b::test_broken"]}
    assert gpu_summary.junit_counts(str(tmp_path / "missing.xml")) is None
    (tmp_path / "cut.xml").write_text("<testsuites><testsuite")  # written half-way
    assert gpu_summary.junit_counts(str(tmp_path / "cut.xml")) is None


def test_counts_from_the_log_without_a_junit_file(tmp_path):
    work = _work(tmp_path, [("tests", "failed", 9, "exit status 1")])
    (work / "logs" / "tests.log").write_text(
        "....F..s\nFAILED tests/test_x.py::test_y - AssertionError: no\nERROR tests/test_z.py::test_w\n"
        "= 1 failed, 6 passed, 1 skipped, 1 error in 3.21s =\n")
    assert gpu_summary.pytest_counts(str(work))["tests"] == {
        "passed": 6, "failed": 1, "errors": 1, "skipped": 1, "total": 9, "from": "log",
        "failing": ["tests/test_x.py::test_y", "tests/test_z.py::test_w"]}


def test_key_figures_from_the_suites_json(tmp_path):
    work = _work(tmp_path, [])
    for name in ("operator-2026-11-30.json", "throughput-cpu-plain-relabel-2026-11-30-b256.json"):
        shutil.copy(os.path.join(RESULTS, name), work / "results" / name)
    (work / "results" / "plugin.json").write_text(json.dumps({"how": "built now in 50 s", "cuda": True}))
    (work / "results" / "preflight.json").write_text(json.dumps(
        {"python": "3.12.3", "gpu": "NVIDIA H200", "modules": {"torch": "2.11.0", "nvidia.dali": "2.4.0"},
         "nvcc": "Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0", "missing": []}))
    figures = gpu_summary.key_figures(str(work))
    assert figures["machine"]["gpu"] == "NVIDIA H200" and figures["machine"]["nvcc"] == "13.0, V13.0.88"
    assert figures["plugin"]["how"] == "built now in 50 s" and figures["plugin"]["cuda"]
    operator = figures["operator"]
    assert operator["correct"] and {r["batch_size"] for r in operator["results"]} == {64, 256, 1024}
    assert all(r["raw_speedup"] > 1 for r in operator["results"])
    run = figures["throughput"]["by_batch_size"]["256"]
    assert set(run["images_per_s"]) == {"plain", "relabel", "relabel-w1"}
    assert run["ratios"]["relabel_over_plain"] == pytest.approx(0.989, abs=1e-3)
    assert run["paired_ratios"]["relabel_over_plain"] == pytest.approx(0.980, abs=1e-3)
    assert figures["throughput"]["targets"]["relabel_over_plain"]["met"] is True


def test_what_comes_back_is_at_most_eight_files(tmp_path, monkeypatch):
    """Eight failed steps: summary.json, the archive and six log tails come back; the archive holds
    every log (a long one cut to its end) and the results."""
    monkeypatch.setattr(gpu_summary, "LOG_LIMIT", 1000)
    work = _work(tmp_path, [(name, "failed", 1, "exit status 1") for name in STEPS[:8]] +
                 [("tests", "not reached", 60, "cut by the 300 s budget after 60 s")])
    (work / "results" / "junit.xml").write_text(JUNIT)
    out = tmp_path / "out"
    assert gpu_summary.main([str(work), str(out), "--budget", "300", "--seconds", "290", "--final",
                             "--commit", "abc"]) == 0
    files = sorted(os.listdir(out))
    assert len(files) == 8 and "summary.json" in files and "results.tar.gz" in files
    assert files.count("tail-tests.log") == 0  # not reached is not failed
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["tails_not_written"] == ["operator", "throughput"]  # the first six have theirs
    assert set(summary["files"]) == set(files) and summary["commit"] == "abc"
    assert summary["tests"]["tests"]["failed"] == 1 and summary["not_reached_steps"] == ["tests"]
    tail = (out / "tail-stage.log").read_text().splitlines()
    assert tail[-1] == "stage line 399" and len(tail) <= gpu_summary.TAIL_LINES + 1
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/junit.xml" in tar.getnames() and "logs/tests.log" in tar.getnames()
        log = tar.extractfile("logs/stage.log").read()
    assert len(log) == 1000 and log.endswith(b"stage line 399\n")
    assert summary["archive"]["cut_to_last_bytes"] == sorted(f"logs/{n}.log" for n in STEPS)


def test_interim_summary_alone(tmp_path):
    work = _work(tmp_path, [("stage", "ok", 20, "")])
    out = tmp_path / "out"
    assert gpu_summary.main([str(work), str(out), "--budget", "300", "--seconds", "21"]) == 0
    assert os.listdir(out) == ["summary.json"]


def test_show_prints_steps_tests_and_figures(tmp_path, capsys):
    work = _work(tmp_path, [("stage", "ok", 20, ""), ("tests", "not reached", 80, "cut by the 300 s budget")])
    (work / "results" / "junit.xml").write_text(JUNIT)
    shutil.copy(os.path.join(RESULTS, "throughput-cpu-plain-relabel-2026-11-30-b256.json"), work / "results")
    out = tmp_path / "out"
    gpu_summary.main([str(work), str(out), "--budget", "300", "--seconds", "290"])
    capsys.readouterr()
    assert gpu_summary.main(["--show", str(out / "summary.json")]) == 0
    shown = capsys.readouterr().out
    assert "ok=True complete=False in 290 s of 300" in shown
    assert "tests         not reached    80 s  cut by the 300 s budget" in shown
    assert "tests: 2 passed, 1 failed, 1 errors, 1 skipped\n    tests.test_a::test_bad[spawn]" in shown
    assert "throughput cpu B=256: images/s plain 576.3, relabel 570.1" in shown
    assert "relabel_over_plain 0.989 (paired 0.98, CPU time 0.992)" in shown
    with pytest.raises(SystemExit):
        gpu_summary.main([str(work)])  # no OUT, budget or seconds
