"""Operator suite: the fused ``relabel.label_pooling`` operator against the dense reference.

    python -m benchmarks.operator                       # CPU, and the GPU if there is one
    python -m benchmarks.operator --devices all         # CPU and GPU; fails without a CUDA backend

Per device and batch size, on random top-5 15x15 maps over ``--classes`` classes and random-resized
crop windows of ~500x375 images (layout ``"WH"``, 1x1 targets), three variants each take host arrays
and return a host tensor, alternating ``--repeats`` times:

- ``fused``: :class:`~dali_relabel.ops.fused.FusedLabelPooling` (a small DALI pipeline around the op);
- ``feed``: the same pipeline without the operator (inputs moved to the device); ``op = fused - feed``;
- ``reference``: dense scatter into ``zeros[B, C, 15, 15]`` + ``roi_align`` + softmax
  (:func:`~dali_relabel.ops.reference.reference_label_pooling`) on the same device.

Before timing, the fused output is compared with the CPU reference (``max_abs_diff``, tolerance
1e-5; ``correct`` in the JSON). Writes ``operator-<date>.json`` / ``.png`` and ``latest-operator.md``.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time
from typing import List, Sequence

import numpy as np

from .common import BenchError, int_list, log, main_for, positive_int, usable_cores
from .data import random_crop_batch
from .report import (finish, fmt, header_lines, new_result, plugin_info, pyplot, save_figure, warning_lines,
                     write_outputs)

TOLERANCE = 1e-5


def add_arguments(parser) -> None:
    from .common import RESULTS_DIR

    parser.add_argument("--devices", choices=["auto", "cpu", "gpu", "all"], default="auto",
                        help="auto: cpu and, if present, gpu; all: cpu and gpu (error without one)")
    parser.add_argument("--batch-sizes", type=int_list, default=[64, 256, 1024])
    parser.add_argument("--classes", type=positive_int, default=1000)
    parser.add_argument("--repeats", type=positive_int, default=5, help="measurements per variant")
    parser.add_argument("--threads", type=positive_int, default=None, help="DALI CPU threads (default: usable cores)")
    parser.add_argument("--target-seconds", type=float, default=0.2,
                        help="about how long one measurement (several calls) takes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where results go (default: benchmarks/results)")


def devices_for(choice: str) -> List[str]:
    """The devices to measure for ``--devices``."""
    if choice == "cpu":
        return ["cpu"]
    try:
        import torch

        have_gpu = torch.cuda.is_available()
    except Exception:
        have_gpu = False
    if not have_gpu:
        if choice in ("gpu", "all"):
            raise BenchError(f"--devices {choice} needs a CUDA GPU that torch can see")
        return ["cpu"]
    from dali_relabel.ops.plugin import load_plugin

    if not load_plugin().get("cuda"):
        if choice in ("gpu", "all"):
            raise BenchError(f"--devices {choice}: the plugin has no CUDA backend (was nvcc found when it was built?)")
        return ["cpu"]
    return ["gpu"] if choice == "gpu" else ["cpu", "gpu"]


def _time_calls(function, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - start) / inner


def measure(device: str, batch: int, num_classes: int, repeats: int, threads: int, seed: int,
            target_seconds: float) -> dict:
    """One row: fused, feed and reference timings (ms) and the correctness check."""
    import torch

    from dali_relabel.ops.fused import FusedLabelPooling
    from dali_relabel.ops.reference import crop_boxes, reference_label_pooling

    inputs = random_crop_batch(np.random.default_rng([seed, batch]), batch, num_classes)
    logits, ids, anchors, shapes, image_shapes, mirror = inputs
    boxes = crop_boxes(anchors, shapes, image_shapes)
    fused = FusedLabelPooling(num_classes, batch, layout="WH", device=device, num_threads=threads)
    feed = FusedLabelPooling(num_classes, batch, device=device, num_threads=threads, pool=False)
    logits_t, ids_t = torch.from_numpy(logits), torch.from_numpy(ids.astype(np.int64))
    on_device = (logits_t.cuda(), ids_t.cuda()) if device == "gpu" else (logits_t, ids_t)

    def reference():  # the dense reference on the operator's device, result on the host
        return reference_label_pooling(*on_device, boxes, num_classes, layout="WH", flips=mirror).cpu()

    variants = {"fused": functools.partial(fused, *inputs), "feed": functools.partial(feed, *inputs),
                "reference": reference}
    expected = reference_label_pooling(logits_t, ids_t, boxes, num_classes, layout="WH", flips=mirror)
    max_abs_diff = float((variants["fused"]().float() - expected).abs().max())
    reference_diff = float((reference().float() - expected).abs().max())
    inner = {}
    for name, function in variants.items():  # warm-up, and how many calls make one measurement
        function()
        inner[name] = int(min(200, max(1, round(target_seconds / max(_time_calls(function, 1), 1e-6)))))
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            times[name].append(_time_calls(function, inner[name]))
    fused_s, feed_s, ref_s = (statistics.median(times[n]) for n in ("fused", "feed", "reference"))
    op_s = fused_s - feed_s
    return {"device": device, "batch_size": batch, "num_classes": num_classes,
            "fused_ms": 1e3 * fused_s, "feed_ms": 1e3 * feed_s, "op_ms": 1e3 * op_s, "reference_ms": 1e3 * ref_s,
            "fused_samples_per_s": batch / fused_s, "reference_samples_per_s": batch / ref_s,
            "raw_speedup": ref_s / fused_s, "op_only_speedup": ref_s / op_s if op_s > 0 else None,
            "max_abs_diff": max_abs_diff, "reference_on_device_max_abs_diff": reference_diff,
            "calls_per_measurement": inner,
            "spread_pct": {n: 100.0 * (max(t) - min(t)) / statistics.median(t) for n, t in times.items()},
            **{f"{n}_ms_all": [1e3 * t for t in times[n]] for n in variants}}


def run(args) -> dict:
    """Run the suite for parsed ``args``; returns the written result."""
    if not args.batch_sizes:
        raise BenchError("--batch-sizes is empty")
    devices = devices_for(args.devices)
    args.threads = args.threads or usable_cores()
    result = new_result("operator", args)
    result.update(devices=devices, plugin=plugin_info(), results=[])
    for device in devices:
        for batch in args.batch_sizes:
            row = measure(device, batch, args.classes, args.repeats, args.threads, args.seed, args.target_seconds)
            result["results"].append(row)
            only = f"{row['op_only_speedup']:.1f}x" if row["op_only_speedup"] else "n/a (feed >= total)"
            log(f"op {device} batch {batch}: fused {row['fused_ms']:.2f} ms (feed {row['feed_ms']:.2f} ms), "
                f"dense reference {row['reference_ms']:.2f} ms -> raw {row['raw_speedup']:.1f}x, op-only {only}; "
                f"max |fused - reference| = {row['max_abs_diff']:.2e}")
    rows = result["results"]
    result["max_abs_diff"] = max(r["max_abs_diff"] for r in rows)
    result["reference_on_device_max_abs_diff"] = max(r["reference_on_device_max_abs_diff"] for r in rows)
    result["correct"] = max(result["max_abs_diff"], result["reference_on_device_max_abs_diff"]) <= TOLERANCE
    result.update(tolerance=TOLERANCE, layout="WH", output_size=[1, 1], k=5, grid=[15, 15],
                  notes="fused/feed/reference each take host arrays and return a host tensor; op_ms = fused_ms - "
                        "feed_ms; raw_speedup = reference/fused; op_only_speedup = reference/op")
    spreads = {f"{r['device']} B={r['batch_size']} fused": r["spread_pct"]["fused"]
               for r in rows if r["fused_ms"] >= 10.0}  # sub-10-ms timings jitter by nature
    finish(result, spreads, spread_limit=50.0)
    return write_outputs(result, args.out_dir, "operator", plot, markdown)


def markdown(result: dict) -> str:
    rows = result["results"]
    lines = header_lines(result, "Fused operator vs dense reference")
    lines += [f"{rows[0]['num_classes']} classes, 5x15x15 maps, 1x1 targets, layout WH, DALI threads "
              f"{result['arguments'].get('threads')}, {result['arguments'].get('repeats')} measurements per variant. "
              f"max |fused - reference| = {result['max_abs_diff']:.2e} "
              f"({'ok' if result['correct'] else 'ABOVE TOLERANCE'}).", "",
              "| device | batch | fused ms | feed ms | op ms | dense reference ms | raw speedup | op-only speedup |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['batch_size']} | {r['fused_ms']:.2f} | {r['feed_ms']:.2f} | "
                     f"{r['op_ms']:.2f} | {r['reference_ms']:.2f} | {r['raw_speedup']:.1f}x | "
                     f"{fmt(r['op_only_speedup'])}x |")
    return "\n".join(lines + [""] + warning_lines(result)) + "\n"


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    rows: Sequence[dict] = result["results"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = np.arange(len(rows))
    raw = [r["raw_speedup"] for r in rows]
    only = [r["op_only_speedup"] or 0.0 for r in rows]
    for offset, values, text in ((-0.2, raw, "raw (reference / fused call)"),
                                 (0.2, only, "op only (reference / (fused - feed))")):
        bars = ax.bar(x + offset, values, 0.4, label=text)
        for bar, value in zip(bars, values):
            if value > 0:
                ax.annotate(f"{value:.0f}x" if value >= 10 else f"{value:.1f}x",
                            (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            xytext=(0, 2), textcoords="offset points", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['device']}\nB={r['batch_size']}" for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(0.8, max(raw + only + [10.0]) * 4)
    ax.set_ylabel("speedup over the dense reference")
    ax.set_title("fused operator vs dense scatter + roi_align")
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def main(argv=None) -> int:
    return main_for(__doc__, add_arguments, run, argv, prog="python -m benchmarks.operator")


if __name__ == "__main__":
    sys.exit(main())
