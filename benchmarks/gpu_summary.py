"""The report of ``benchmarks/gpu_check.sh``: one ``summary.json`` that alone tells how the check went,
and what goes back from the GPU machine.

The GPU machine returns at most 8 files from its output folder, 16 MiB each, at most two folders
down. So the check writes its logs and results into a work folder, and this module leaves in the
output folder only:

- ``summary.json``: every step's status (``ok``, ``failed``, ``not reached``, ``skipped``), seconds and
  detail; the key figures (operator speedups, loader images/s and ratios, feed samples/s, the
  plugin, the machine); the tests' pass/fail/skip counts and the failing tests' names;
- ``results.tar.gz``: the work folder's ``results/`` and ``logs/`` (each log at most its last
  :data:`LOG_LIMIT` bytes);
- ``tail-<step>.log``: the last :data:`TAIL_LINES` lines of each failed step's log, at most
  :data:`MAX_TAILS` of them.

Standard library only (it also runs where the project could not be installed)::

    python3 -m benchmarks.gpu_summary WORK OUT --mode gpu --budget 300 --seconds 281 [--final]
    python3 -m benchmarks.gpu_summary --show summary.json    # the summary in a few lines

``WORK/steps.tsv`` has one line per step that ran or was passed over:
``name<TAB>status<TAB>seconds<TAB>detail``. Steps of ``--steps`` missing from it are
``not reached``. Without ``--final`` only ``summary.json`` is written (after every step, so a check
killed outright still leaves one).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional

#: The steps of gpu_check.sh, in the order they run.
STEPS = ("stage", "preflight", "install", "install-check", "plugin", "gpu-tests", "operator", "throughput",
         "tests")
#: pytest steps and the junit file each writes into ``WORK/results``.
TEST_STEPS = {"gpu-tests": "junit-gpu.xml", "tests": "junit.xml"}
STATUSES = ("ok", "failed", "not reached", "skipped")
#: Files the machine returns: summary.json, the archive, and this many log tails.
MAX_FILES = 8
MAX_TAILS = MAX_FILES - 2
TAIL_LINES = 150
#: Bytes kept of each log in the archive (its end), and the largest results file archived.
LOG_LIMIT = 2 * 2**20
RESULT_LIMIT = 8 * 2**20
#: Failing test names listed per pytest step.
MAX_FAILING = 40
ARCHIVE = "results.tar.gz"
SUMMARY = "summary.json"


# -- steps --------------------------------------------------------------------------------------------
def read_steps(path: str, names=STEPS, final: bool = True) -> List[dict]:
    """The steps recorded in ``path`` in the order of ``names`` (then any others as recorded); a step
    never recorded is ``not reached``."""
    recorded: Dict[str, dict] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 3:
                    continue
                name, status, seconds = fields[:3]
                detail = fields[3] if len(fields) > 3 else ""
                if status not in STATUSES:
                    raise ValueError(f"{path}: step {name} has an unknown status {status!r}")
                recorded[name] = {"step": name, "status": status, "seconds": int(float(seconds)),
                                  "detail": detail}
    missing = "the check stopped before it" if final else "not yet"
    steps = [recorded.pop(name, {"step": name, "status": "not reached", "seconds": 0, "detail": missing})
             for name in names]
    return steps + list(recorded.values())


# -- tests ----------------------------------------------------------------------------------------------
def junit_counts(path: str) -> Optional[dict]:
    """``{passed, failed, errors, skipped, total, failing: [names]}`` of a pytest junit file, or
    ``None`` when it is missing or unreadable."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        if case.find("failure") is not None:
            counts["failed"] += 1
            failing.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failing.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    counts["failing"] = failing[:MAX_FAILING]
    if len(failing) > MAX_FAILING:
        counts["failing_not_listed"] = len(failing) - MAX_FAILING
    return counts


_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")
_FAILED_LINE = re.compile(r"^(FAILED|ERROR) (\S+)")


def log_counts(path: str) -> Optional[dict]:
    """Counts from pytest's own last summary line in a log (when no junit file was written), and the
    names in its ``FAILED``/``ERROR`` lines; ``None`` without such a line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    summary = next((line for line in reversed(lines) if _OUTCOME.search(line) and " in " in line), None)
    if summary is None:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for number, word in _OUTCOME.findall(summary):
        key = {"error": "errors"}.get(word, word)
        if key in counts:
            counts[key] += int(number)
    counts["total"] = sum(counts.values())
    failing = [m.group(2) for m in map(_FAILED_LINE.match, lines) if m]
    counts["failing"] = list(dict.fromkeys(failing))[:MAX_FAILING]
    counts["from"] = "log"
    return counts


def pytest_counts(work: str) -> dict:
    """Counts of every pytest step that left a junit file or a log."""
    found = {}
    for step, junit in TEST_STEPS.items():
        counts = junit_counts(os.path.join(work, "results", junit))
        if counts is None:
            counts = log_counts(os.path.join(work, "logs", f"{step}.log"))
        if counts is not None:
            found[step] = counts
    return found


# -- key figures ---------------------------------------------------------------------------------------
def _load(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _newest(pattern: str) -> Optional[str]:
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    return found[-1] if found else None


def _round(value, digits: int = 3):
    return round(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def operator_figures(result: dict) -> dict:
    """Per device and batch size: fused and reference ms, raw and op-only speedups, max |difference|."""
    rows = [{key: _round(row.get(key)) for key in ("device", "batch_size", "fused_ms", "op_ms", "reference_ms",
                                                   "raw_speedup", "op_only_speedup", "max_abs_diff")}
            for row in result.get("results", [])]
    return {"correct": result.get("correct"), "max_abs_diff": result.get("max_abs_diff"), "results": rows,
            "warnings": result.get("warnings", [])}


def throughput_figures(result: dict) -> dict:
    """Per batch size: each contender's median images/s (feed: samples/s) and the ratios (of medians,
    paired, CPU time); which targets were met."""
    by_batch = {}
    for batch, run in result.get("runs", {}).items():
        entry = {"images_per_s": {name: _round(c.get("median"), 1) for name, c in run.get("contenders", {}).items()},
                 "ratios": {k: _round(v) for k, v in run.get("ratios", {}).items()},
                 "paired_ratios": {k: _round(v.get("median") if isinstance(v, dict) else v)
                                   for k, v in run.get("paired_ratios", {}).items()},
                 "cpu_time_ratios": {k: _round(v) for k, v in run.get("cpu_time_ratios", {}).items()}}
        feed = run.get("feed")
        if feed:
            entry["feed_samples_per_s"] = {name: _round(c.get("median"), 1)
                                           for name, c in feed.get("contenders", {}).items()}
            entry["feed_ratios"] = {k: _round(v) for k, v in feed.get("ratios", {}).items()}
        by_batch[batch] = entry
    targets = {name: {key: t.get(key) for key in ("threshold", "met", "met_paired", "met_cpu_time") if key in t}
               for name, t in result.get("targets", {}).items()}
    return {"device": result.get("device"), "by_batch_size": by_batch, "targets": targets,
            "warnings": result.get("warnings", [])}


def _release(nvcc_version: Optional[str]) -> Optional[str]:
    """``"13.0, V13.0.88"`` from ``nvcc --version`` output."""
    match = re.search(r"release (.+)", nvcc_version or "")
    return match.group(1).strip() if match else None


def key_figures(work: str) -> dict:
    """The figures worth reading first, from the JSON files in ``WORK/results``."""
    results = os.path.join(work, "results")
    figures = {}
    preflight = _load(os.path.join(results, "preflight.json"))
    if preflight:
        modules = preflight.get("modules", {})
        figures["machine"] = {"gpu": preflight.get("gpu"), "python": preflight.get("python"),
                              "torch": modules.get("torch"), "torch_cuda": preflight.get("torch_cuda"),
                              "dali": modules.get("nvidia.dali"), "nvcc": _release(preflight.get("nvcc")),
                              "missing": preflight.get("missing", [])}
    plugin = _load(os.path.join(results, "plugin.json"))
    if plugin:
        figures["plugin"] = {key: plugin.get(key) for key in ("how", "cuda", "load_seconds", "cuda_archs",
                                                             "nvcc_version", "build_seconds")}
    operator = _newest(os.path.join(results, "operator-*.json"))
    if operator and _load(operator):
        figures["operator"] = operator_figures(_load(operator))
    throughput = _newest(os.path.join(results, "throughput-*.json"))
    if throughput and _load(throughput):
        figures["throughput"] = throughput_figures(_load(throughput))
    return figures


# -- what goes back -----------------------------------------------------------------------------------
def _tail(path: str, lines: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        data = f.read()
    return b"\n".join(data.split(b"\n")[-lines - 1:])


def write_archive(work: str, path: str) -> dict:
    """``results/`` and ``logs/`` of ``work`` into one tar.gz (logs cut to their last LOG_LIMIT bytes,
    results files over RESULT_LIMIT left out); returns what was left out or cut."""
    left_out, cut = [], []
    with tarfile.open(path, "w:gz") as tar:
        for folder in ("results", "logs"):
            for file in sorted(glob.glob(os.path.join(work, folder, "**"), recursive=True)):
                if not os.path.isfile(file) or os.path.getsize(file) == 0:
                    continue
                name = os.path.relpath(file, work)
                size = os.path.getsize(file)
                if folder == "logs" and size > LOG_LIMIT:
                    with open(file, "rb") as f:
                        f.seek(size - LOG_LIMIT)
                        data = f.read()
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), int(os.path.getmtime(file))
                    tar.addfile(info, io.BytesIO(data))
                    cut.append(name)
                elif size > RESULT_LIMIT:
                    left_out.append(name)
                else:
                    tar.add(file, arcname=name)
    return {"left_out": left_out, "cut_to_last_bytes": cut}


def build_summary(work: str, mode: str, budget: int, seconds: int, final: bool, commit: str = "unknown",
                  names=STEPS) -> dict:
    """The summary dict (see the module docstring)."""
    steps = read_steps(os.path.join(work, "steps.tsv"), names, final)
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    not_reached = [s["step"] for s in steps if s["status"] == "not reached"]
    return {"ok": not failed, "complete": not not_reached, "final": final, "mode": mode, "commit": commit,
            "budget_s": budget, "seconds": seconds, "failed_steps": failed, "not_reached_steps": not_reached,
            "steps": steps, "tests": pytest_counts(work), "figures": key_figures(work)}


def write_outputs(work: str, out: str, summary: dict) -> dict:
    """The archive and the failed steps' log tails into ``out``; returns ``summary`` with a ``files``
    entry (name: what it holds)."""
    os.makedirs(out, exist_ok=True)
    files = {SUMMARY: "this summary"}
    archived = write_archive(work, os.path.join(out, ARCHIVE))
    files[ARCHIVE] = "results/ (JSON, PNG, markdown, junit) and logs/ of every step"
    if archived["left_out"] or archived["cut_to_last_bytes"]:
        summary["archive"] = archived
    tails = 0
    for step in summary["steps"]:
        log = os.path.join(work, "logs", f"{step['step']}.log")
        if step["status"] != "failed" or not os.path.exists(log):
            continue
        if tails == MAX_TAILS:
            summary.setdefault("tails_not_written", []).append(step["step"])
            continue
        name = f"tail-{step['step']}.log"
        with open(os.path.join(out, name), "wb") as f:
            f.write(_tail(log, TAIL_LINES))
        files[name] = f"the last {TAIL_LINES} lines of logs/{step['step']}.log"
        tails += 1
    summary["files"] = files
    return summary


def brief(summary: dict) -> str:
    """The summary in a few lines: steps, tests, key figures (printed at the end of the check, and by
    ``--show``)."""
    lines = [f"gpu_check: ok={summary['ok']} complete={summary['complete']} in {summary['seconds']} s "
             f"of {summary['budget_s']} ({summary['mode']}, commit {summary['commit']})"]
    for s in summary["steps"]:
        lines.append(f"  {s['step']:<14}{s['status']:<12}{s['seconds']:>5} s  {s['detail']}".rstrip())
    for step, counts in summary["tests"].items():
        lines.append(f"  {step}: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped" + "".join(f"\n    {n}" for n in counts["failing"][:10]))
    figures = summary.get("figures", {})
    machine = figures.get("machine")
    if machine:
        lines.append(f"  machine: {machine.get('gpu') or 'no GPU'}, torch {machine.get('torch')} "
                     f"(CUDA {machine.get('torch_cuda')}), DALI {machine.get('dali')}, nvcc {machine.get('nvcc')}")
    if figures.get("plugin"):
        lines.append(f"  plugin: {figures['plugin'].get('how')}; CUDA backend: {figures['plugin'].get('cuda')}")
    for row in figures.get("operator", {}).get("results", []):
        lines.append(f"  operator {row['device']} B={row['batch_size']}: fused {row['fused_ms']} ms, reference "
                     f"{row['reference_ms']} ms: {row['raw_speedup']}x (operator alone {row['op_only_speedup']}x), "
                     f"max |diff| {row['max_abs_diff']}")
    throughput = figures.get("throughput", {})
    for batch, run in throughput.get("by_batch_size", {}).items():
        rates = ", ".join(f"{name} {rate}" for name, rate in run["images_per_s"].items())
        lines.append(f"  throughput {throughput.get('device')} B={batch}: images/s {rates}")
        for name, ratio in run["ratios"].items():
            lines.append(f"    {name} {ratio} (paired {run['paired_ratios'].get(name)}, "
                         f"CPU time {run['cpu_time_ratios'].get(name)})")
        if run.get("feed_samples_per_s"):
            feed = ", ".join(f"{name} {rate}" for name, rate in run["feed_samples_per_s"].items())
            lines.append(f"    feed samples/s: {feed}")
    for name, target in throughput.get("targets", {}).items():
        lines.append(f"  target {name}: met {target.get('met')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_summary", description=__doc__.split("\n")[0])
    parser.add_argument("work", nargs="?", help="the check's work folder (steps.tsv, logs/, results/)")
    parser.add_argument("out", nargs="?", help="the folder that goes back (summary.json, the archive, log tails)")
    parser.add_argument("--mode", default="gpu")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--seconds", type=int)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--final", action="store_true", help="also write the archive and the log tails")
    parser.add_argument("--show", metavar="SUMMARY_JSON", help="print a summary.json in a few lines, and stop")
    args = parser.parse_args(argv)
    if args.show:
        with open(args.show, encoding="utf-8") as f:
            print(brief(json.load(f)))
        return 0
    if not (args.work and args.out) or args.budget is None or args.seconds is None:
        parser.error("WORK, OUT, --budget and --seconds are needed (or --show SUMMARY_JSON)")
    summary = build_summary(args.work, args.mode, args.budget, args.seconds, args.final, args.commit)
    os.makedirs(args.out, exist_ok=True)
    if args.final:
        summary = write_outputs(args.work, args.out, summary)
    path = os.path.join(args.out, SUMMARY)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".partial", path)
    if args.final:
        print(brief(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
