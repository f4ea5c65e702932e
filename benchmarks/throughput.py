"""Throughput suite: training-loader images/s and feed-only samples/s, per batch size.

    python -m benchmarks.throughput --device cpu --threads 2          # batch 64, 128 and 256
    python -m benchmarks.throughput --device gpu --contenders plain,relabel,feed --batch-sizes 256

For each batch size, on one generated ImageNet-like image set (:mod:`benchmarks.data`) and in one
process:

1. **Loaders**, alternating (:mod:`benchmarks.timing`): ``plain`` (plain DALI on our decode path: the
   ceiling), ``example`` (DALI's example graph), ``relabel`` (:class:`ReLabelLoader`, soft targets)
   and ``authors`` (the authors' DataLoader approach); see :mod:`benchmarks.contenders`. Ratios:
   relabel/plain, relabel/example, relabel/authors (medians).
2. **Feed only** (``feed``), alternating, CPU, ``--feed-threads`` DALI threads: ``readers.file`` alone
   vs our source (BatchSource + ``relabel.read_files``), no decoding.
3. **Source workers**: ``relabel`` and ``source`` run with ``--workers`` DALI source workers
   (``DataConfig.py_num_workers``; 0, the default, runs the source in the loader's process); each count
   in ``--compare-workers`` (default: 1 worker process if ``--workers`` is 0, else 0) adds
   ``relabel-w<n>`` and ``source-w<n>`` to the same alternation, so they are compared under the same
   conditions.

4. **Several crops per decoded image** (``crops``, only when chosen: ``--contenders crops``),
   alternating, in crops/s: ``plain`` (one crop per decode, the fastest plain graph) against
   ``relabel-k<k>`` (:class:`ReLabelLoader` with ``DataConfig.crops_per_image=k``, soft targets) for
   each k of ``--crops-per-image`` (default 1,2,4), every contender's batch ``B`` crops (``B / k``
   images). Ratios ``relabel_k<k>_over_plain``; target: k = 4 at least 1.8x plain's crops/s.

    python -m benchmarks.throughput --device cpu --contenders crops --batch-sizes 64,128,256

Writes ``throughput-<device>-<date>.json`` / ``.png`` and ``latest-throughput-<device>.md`` (a
partial run adds its contenders to the name: ``throughput-cpu-crops-...``).
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List

from . import contenders as C
from .common import (BenchError, add_folder_arguments, int_list, log, main_for, non_negative_int, positive_int,
                     usable_cores)
from .data import prepare_image_set, prepare_shards
from .report import finish, new_result, plugin_info, summary, write_outputs
from .throughput_report import markdown, plot
from .timing import alternate, close_all, take

#: What a run measures by default.
DEFAULT_GROUPS = C.LOADERS + ("shards", "feed")
GROUPS = DEFAULT_GROUPS + ("crops",)
SETTLE = ("after each segment, wait until this process and its children use < 0.1 core over 0.3 s (the "
          "contender has refilled its prefetch) before the next contender's segment")
#: What the suite reports against (the issue's targets).
TARGETS = {"relabel_over_plain": 0.97, "relabel_over_plain_small_epochs": 0.95, "shards_over_plain_shards": 0.97,
           "feed_source_samples_per_s": 20_000.0, "crops_k4_over_plain": 1.8}
#: Epochs of at most this many batches are small (fine-tuning on small data sets: ``--images 1024
#: --batch-sizes 256``): every pass's end is a large share of the work, and ``relabel / plain`` there
#: is held to ``relabel_over_plain_small_epochs``.
SMALL_EPOCH_BATCHES = 4


def add_arguments(parser) -> None:
    from dali_relabel.config import DataConfig

    default = DataConfig()
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu",
                        help="where the loaders decode and pool (gpu: mixed decoder, CUDA operator)")
    parser.add_argument("--contenders", default=",".join(DEFAULT_GROUPS),
                        help="comma-separated subset of plain, example, relabel, authors, shards, feed, crops "
                             "(default: all but crops)")
    parser.add_argument("--crops-per-image", type=int_list, default=[1, 2, 4],
                        help="crops per decoded image of the crops round's dali-relabel contenders (each must "
                             "divide every batch size; default 1,2,4)")
    parser.add_argument("--batch-sizes", type=int_list, default=[64, 128, 256],
                        help="batch sizes to run the whole comparison at (default: 64,128,256)")
    parser.add_argument("--images", type=positive_int, default=2048, help="images in the generated set")
    parser.add_argument("--classes", type=positive_int, default=1000, help="classes (folders and map classes)")
    parser.add_argument("--jpeg-kb", type=float, default=110.0, help="target mean JPEG size in KB")
    parser.add_argument("--image-size", type=positive_int, default=default.image_size, help="training crop side")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="DALI CPU threads of the loaders (default: the usable cores)")
    parser.add_argument("--workers", type=non_negative_int, default=default.py_num_workers,
                        help="DALI worker processes of our source (DataConfig.py_num_workers; 0: the loader's "
                             "process; default %(default)s)")
    parser.add_argument("--compare-workers", type=int_list, default=None,
                        help="other worker counts timed as relabel-w<n> / source-w<n> ('' for none; default: "
                             "1 if --workers is 0, else 0)")
    parser.add_argument("--dataloader-workers", type=positive_int, default=2,
                        help="DataLoader workers of the authors' approach")
    parser.add_argument("--hw-decoder-load", type=float, default=default.hw_decoder_load,
                        help="share of JPEGs for the GPU's hardware decoder (--device gpu)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed segments per contender")
    parser.add_argument("--batches", type=positive_int, default=None,
                        help="timed batches per loader segment (default: one epoch, images // batch size)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches per contender before timing (default: one epoch, at least 2)")
    parser.add_argument("--no-settle", dest="settle", action="store_false",
                        help="do not wait for a contender's prefetch refill after its segment (see timing.py)")
    parser.add_argument("--augment", default=None, metavar="POLICY",
                        help="an augmentation policy (e.g. rand-m9-n2-mstd0.5) run by every DALI contender: "
                             "dali-relabel with keyed draws and labels that follow the pixels, the plain "
                             "graphs with the same policy and DALI's random operators (default: none)")
    parser.add_argument("--reprob", type=float, default=0.0,
                        help="random-erasing probability of every DALI contender (default: 0)")
    parser.add_argument("--shard-mb", type=float, default=32.0, help="size of the tar shards (shards round)")
    parser.add_argument("--feed-threads", type=positive_int, default=2, help="DALI threads of the feed-only pipelines")
    parser.add_argument("--feed-batches", type=positive_int, default=None,
                        help="timed batches per feed-only segment (default: four epochs)")
    parser.add_argument("--gen-workers", type=positive_int, default=None, help="processes generating JPEGs")
    add_folder_arguments(parser)


def _parse_contenders(text: str) -> List[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [c for c in chosen if c not in GROUPS]
    if unknown or not chosen:
        raise BenchError(f"unknown contender {unknown[0]!r}; choose from {', '.join(GROUPS)}" if unknown
                         else "no contender chosen")
    return [g for g in GROUPS if g in chosen]


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _check(args, chosen: List[str]) -> str:
    device = args.device
    if device == "auto":
        device = "gpu" if _gpu_available() else "cpu"
    if device == "gpu" and not _gpu_available():
        raise BenchError("--device gpu needs a CUDA GPU that torch can see")
    if not args.batch_sizes:
        raise BenchError("--batch-sizes is empty")
    too_big = [b for b in args.batch_sizes if b > args.images]
    if too_big:
        raise BenchError(f"--images {args.images} do not fill one batch of {too_big[0]}")
    if "crops" in chosen:
        if not args.crops_per_image:
            raise BenchError("--crops-per-image is empty")
        odd = [(b, k) for b in args.batch_sizes for k in args.crops_per_image if b % k]
        if odd:
            raise BenchError(f"batch size {odd[0][0]} is not a multiple of {odd[0][1]} crops per image")
    if args.compare_workers is None:
        args.compare_workers = [1 if args.workers == 0 else 0]
    if args.workers in args.compare_workers:
        args.compare_workers = [w for w in args.compare_workers if w != args.workers]
    return device


def _entry(rates: List[float], contender, batch_size: int, timed: int) -> dict:
    entry = dict(summary(rates), label=contender.label, batch_size=batch_size, timed_batches=timed,
                 untimed_drain_batches=contender.drain, settings=contender.settings,
                 settle_seconds=[round(s, 2) for s in contender.settled])
    if contender.cpu_ms_per_sample:
        entry["cpu_ms_per_sample"] = summary(contender.cpu_ms_per_sample)
    if contender.check is not None and contender.last_batch is not None:
        entry["soft_target_sum_max_error"] = contender.check(contender.last_batch)
    return entry


def _ratios(entries: Dict[str, dict], pairs):
    """``(ratios of medians, paired ratios, CPU-time ratios)`` for ``pairs`` of contender names.

    A paired ratio is the median over repeats of ``a_i / b_i``: the two segments of a repeat ran back to
    back, so a change in the machine's load between repeats cancels out. The CPU-time ratio is
    ``cpu_b / cpu_a`` of the medians of CPU ms per sample: the rate ratio ``a / b`` that a machine with
    nothing else running and busy cores would give."""
    ratios, paired, cpu = {}, {}, {}
    for a, b in pairs:
        if a in entries and b in entries:
            key = f"{a}_over_{b}".replace("-", "_")
            ratios[key] = entries[a]["median"] / entries[b]["median"]
            per_repeat = [x / y for x, y in zip(entries[a]["all"], entries[b]["all"])]
            paired[key] = dict(summary(per_repeat))
            if (entries[a].get("cpu_ms_per_sample", {}).get("median")  # 0: too short a segment to see
                    and "cpu_ms_per_sample" in entries[b]):
                cpu[key] = entries[b]["cpu_ms_per_sample"]["median"] / entries[a]["cpu_ms_per_sample"]["median"]
    return ratios, paired, cpu


def loaders_round(args, data, config, batch_size: int, device: str, chosen: List[str]) -> dict:
    """Build the chosen loaders at ``batch_size``, time them alternating, summarise, close them."""
    names = [n for n in C.LOADERS if n in chosen]
    variants = [f"relabel-w{w}" for w in args.compare_workers] if "relabel" in names else []
    per_epoch = args.images // batch_size
    timed = args.batches or max(1, per_epoch)
    warmup = args.warmup if args.warmup is not None else max(2, per_epoch)
    built = []
    # The DataLoader forks its workers before any DALI pipeline (and its threads) exists.
    for name in [n for n in ("authors", "relabel") if n in names] + variants + [n for n in names
                                                                               if n in ("plain", "example")]:
        start = time.time()
        if name == "authors":
            c = C.make_authors(data, config, batch_size, device, args.dataloader_workers)
        elif name.startswith("relabel"):
            workers = int(name[len("relabel-w"):]) if "-w" in name else config.py_num_workers
            c = C.make_relabel(data, config.replace(py_num_workers=workers), batch_size, device, name)
        elif name == "plain":
            c = C.make_plain(data, config, batch_size, device)
        else:
            c = C.make_example(data, config, batch_size, device)
        take(c, 1)  # starts workers, builds pipelines
        log(f"[B={batch_size}] built {c.name} in {time.time() - start:.1f} s")
        built.append(c)
    order = [m for n in names for m in ([n] + variants if n == "relabel" else [n])]  # variants after relabel
    built.sort(key=lambda c: order.index(c.name))
    rates = alternate(built, warmup, timed, args.repeats, device, "images/s", prefix=f"[B={batch_size}] ",
                      settle=args.settle)
    entries = {c.name: _entry(rates[c.name], c, batch_size, timed) for c in built}
    start = time.time()
    close_all(built)
    log(f"[B={batch_size}] closed the loaders in {time.time() - start:.1f} s")
    pairs = [("relabel", "plain"), ("relabel", "example"), ("relabel", "authors"), ("example", "plain")]
    pairs += [(v, "plain") for v in variants] + [(v, "relabel") for v in variants]
    ratios, paired, cpu = _ratios(entries, pairs)
    return {"contenders": entries, "ratios": ratios, "paired_ratios": paired, "cpu_time_ratios": cpu,
            "method": {"warmup_batches": warmup, "timed_batches_per_repeat": timed, "batches_per_epoch": per_epoch,
                       "order": [c.name for c in built], "settle": SETTLE if args.settle else None}}


def shards_round(args, shards_dir: str, config, batch_size: int, device: str) -> dict:
    """Plain DALI on the tar shards vs :class:`ShardReLabelLoader` on them, alternating."""
    per_epoch = args.images // batch_size
    timed = args.batches or max(1, per_epoch)
    warmup = args.warmup if args.warmup is not None else max(2, per_epoch)
    built = []
    makers = (C.make_plain_shards, C.make_shards, lambda *a: C.make_shard_graph(*a, plain=True),
              lambda *a: C.make_shard_graph(*a, plain=False))
    for make in makers:
        start = time.time()
        c = make(shards_dir, config, batch_size, device)
        take(c, 1)
        log(f"[B={batch_size} shards] built {c.name} in {time.time() - start:.1f} s")
        built.append(c)
    rates = alternate(built, warmup, timed, args.repeats, device, "images/s", prefix=f"[B={batch_size} shards] ",
                      settle=args.settle)
    entries = {c.name: _entry(rates[c.name], c, batch_size, timed) for c in built}
    close_all(built)
    ratios, paired, cpu = _ratios(entries, [("shards", "plain-shards"), ("shards-graph", "plain-shards-graph"),
                                            ("shards", "shards-graph")])
    return {"contenders": entries, "ratios": ratios, "paired_ratios": paired, "cpu_time_ratios": cpu,
            "epoch_end": epoch_end_cost(entries, per_epoch * batch_size),
            "method": {"warmup_batches": warmup, "timed_batches_per_repeat": timed, "batches_per_epoch": per_epoch,
                       "shards": shards_dir, "settle": SETTLE if args.settle else None,
                       "note": "our loader reads one pipeline per epoch (its shard order), the next one "
                               "built while a pass takes its last batches; the plain reader runs on across "
                               "epochs"}}


def crops_round(args, data, config, batch_size: int, device: str) -> dict:
    """Plain DALI (one crop per decode) vs dali-relabel with each of ``--crops-per-image`` crops per
    decode, alternating, in crops/s: every contender's batch is ``batch_size`` crops."""
    per_epoch = args.images // batch_size  # plain's batches per epoch (dali-relabel's: k times more)
    timed = args.batches or max(1, per_epoch)
    warmup = args.warmup if args.warmup is not None else max(2, per_epoch)
    built = []
    for crops in args.crops_per_image:  # our loaders first, as in the loaders' round
        start = time.time()
        c = C.make_relabel_crops(data, config, batch_size, device, crops)
        take(c, 1)
        log(f"[B={batch_size} crops] built {c.name} in {time.time() - start:.1f} s")
        built.append(c)
    plain = C.make_plain(data, config, batch_size, device)
    take(plain, 1)
    built.insert(0, plain)
    rates = alternate(built, warmup, timed, args.repeats, device, "crops/s", prefix=f"[B={batch_size} crops] ",
                      settle=args.settle)
    entries = {c.name: _entry(rates[c.name], c, batch_size, timed) for c in built}
    close_all(built)
    names = [C.crops_name(k) for k in args.crops_per_image]
    ratios, paired, cpu = _ratios(entries, [(n, "plain") for n in names]
                                  + [(n, C.crops_name(1)) for n in names if n != C.crops_name(1)
                                     and C.crops_name(1) in names])
    return {"contenders": entries, "ratios": ratios, "paired_ratios": paired, "cpu_time_ratios": cpu,
            "crops_per_image": list(args.crops_per_image),
            "method": {"warmup_batches": warmup, "timed_batches_per_repeat": timed, "batches_per_epoch": per_epoch,
                       "order": [c.name for c in built], "unit": "crops/s", "settle": SETTLE if args.settle else None,
                       "note": "every batch holds batch_size crops: plain decodes one window per crop "
                               "(decoders.image_slice), dali-relabel with k crops per decode decodes batch_size / k "
                               "whole images (decoders.image) and cuts k crops from each"}}


#: Images per rank and epoch of ImageNet-1k on 8 ranks, for :func:`epoch_end_cost`'s projection.
IMAGENET_RANK_EPOCH = 1_281_167 // 8


def epoch_end_cost(entries: Dict[str, dict], epoch_images: int) -> dict:
    """What an epoch's end costs the shard loader (a new pipeline per epoch, and the batches the old
    one prefetched past the end), in seconds per epoch, and the ratio to plain-shards that cost would
    leave on an ImageNet epoch of :data:`IMAGENET_RANK_EPOCH` images per rank.

    Without epoch ends the loader would run at ``plain-shards x (shards-graph / plain-shards-graph)``
    (the graphs' steady ratio applied to the plain loader, iterator and copies included); the cost is
    its measured epoch time minus the epoch at that rate."""
    loader, plain = entries["shards"]["median"], entries["plain-shards"]["median"]
    steady = plain * entries["shards-graph"]["median"] / entries["plain-shards-graph"]["median"]
    seconds = max(0.0, epoch_images / loader - epoch_images / steady)
    projected = IMAGENET_RANK_EPOCH / (IMAGENET_RANK_EPOCH / steady + seconds)
    return {"seconds_per_epoch": seconds, "epoch_images_here": epoch_images, "steady_images_per_s": steady,
            "imagenet_rank_epoch_images": IMAGENET_RANK_EPOCH,
            "projected_shards_over_plain_shards_imagenet": projected / plain}


def feed_round(args, data, config, batch_size: int) -> dict:
    """``readers.file`` alone vs our source (and its worker variants), alternating, no decoding."""
    feed_config = config.replace(num_threads=args.feed_threads)
    per_epoch = args.images // batch_size
    timed = args.feed_batches or 4 * per_epoch
    built = [C.make_feed_reader(data, feed_config, batch_size)]
    for workers in [args.workers] + list(args.compare_workers):
        name = "source" if workers == args.workers else f"source-w{workers}"
        built.append(C.make_feed_source(data, feed_config.replace(py_num_workers=workers), batch_size, name))
    for c in built:
        start = time.time()
        take(c, 1)
        log(f"[B={batch_size} feed] built {c.name} in {time.time() - start:.1f} s")
    rates = alternate(built, max(2, per_epoch), timed, args.repeats, "cpu", "samples/s",
                      prefix=f"[B={batch_size} feed] ", settle=args.settle)
    entries = {c.name: _entry(rates[c.name], c, batch_size, timed) for c in built}
    close_all(built)
    pairs = [(c.name, "reader") for c in built[1:]] + [(c.name, "source") for c in built[2:]]
    ratios, paired, cpu = _ratios(entries, pairs)
    return {"contenders": entries, "ratios": ratios, "paired_ratios": paired, "cpu_time_ratios": cpu,
            "method": {"warmup_batches": max(2, per_epoch), "timed_batches_per_repeat": timed,
                       "batches_per_epoch": per_epoch, "threads": args.feed_threads,
                       "settle": SETTLE if args.settle else None,
                       "note": "pipeline.run() only: outputs stay DALI TensorLists (no copy to torch); "
                               "our source runs on across epochs as the loader drives it (one stream), "
                               "and so does readers.file"}}


def workers_comparison(result: dict, default_workers: int) -> dict:
    """Medians per source worker count, per batch size, for the full loader and the feed."""
    out = {}
    for batch, run in result["runs"].items():
        row = {}
        for group, base in (("loader", "relabel"), ("feed", "source")):
            entries = (run.get("feed") or {}).get("contenders", {}) if group == "feed" else run.get("contenders", {})
            medians = {}
            for name, entry in entries.items():
                if name == base:
                    medians[str(default_workers)] = entry["median"]
                elif name.startswith(base + "-w"):
                    medians[name.split("-w")[1]] = entry["median"]
            if len(medians) > 1:
                best = max(medians, key=medians.get)
                row[group] = {"median_by_workers": medians, "fastest": int(best),
                              "fastest_over_default": medians[best] / medians[str(default_workers)]}
        if row:
            out[batch] = row
    return out


def check_targets(result: dict) -> dict:
    """relabel / plain and shards / plain-shards >= 0.97 (relabel / plain >= 0.95 on small epochs,
    :data:`SMALL_EPOCH_BATCHES`), our feed >= 20k samples/s, and dali-relabel with 4 crops per decode
    >= 1.8x plain's crops/s, at every batch size measured."""
    targets = {}
    small = {b for b, r in result["runs"].items()
             if 0 < r.get("method", {}).get("batches_per_epoch", 0) <= SMALL_EPOCH_BATCHES}
    for target, key, where in (("relabel_over_plain", "relabel_over_plain", lambda b: b not in small),
                               ("relabel_over_plain_small_epochs", "relabel_over_plain", lambda b: b in small),
                               ("shards_over_plain_shards", "shards_over_plain_shards", lambda b: True)):
        ratio = {b: r["ratios"].get(key) for b, r in result["runs"].items() if where(b)}
        ratio = {b: v for b, v in ratio.items() if v is not None}
        if not ratio:
            continue
        limit = TARGETS[target]
        paired = {b: result["runs"][b]["paired_ratios"][key]["median"] for b in ratio}
        targets[target] = {"threshold": limit, "by_batch_size": ratio, "met": all(v >= limit for v in ratio.values()),
                           "paired_by_batch_size": paired, "met_paired": all(v >= limit for v in paired.values())}
        cpu = {b: result["runs"][b].get("cpu_time_ratios", {}).get(key) for b in ratio}
        if all(v is not None for v in cpu.values()):
            targets[target].update(cpu_time_by_batch_size=cpu, met_cpu_time=all(v >= limit for v in cpu.values()))
    crops = {b: r["crops"] for b, r in result["runs"].items() if r.get("crops")}
    key = "relabel_k4_over_plain"
    if any(key in run["ratios"] for run in crops.values()):
        limit = TARGETS["crops_k4_over_plain"]
        ratio = {b: run["ratios"][key] for b, run in crops.items() if key in run["ratios"]}
        paired = {b: crops[b]["paired_ratios"][key]["median"] for b in ratio}
        targets["crops_k4_over_plain"] = {"threshold": limit, "by_batch_size": ratio,
                                          "met": all(v >= limit for v in ratio.values()),
                                          "paired_by_batch_size": paired,
                                          "met_paired": all(v >= limit for v in paired.values())}
        cpu = {b: crops[b].get("cpu_time_ratios", {}).get(key) for b in ratio}
        if all(v is not None for v in cpu.values()):
            targets["crops_k4_over_plain"].update(cpu_time_by_batch_size=cpu,
                                                  met_cpu_time=all(v >= limit for v in cpu.values()))
    feed = {b: r["feed"]["contenders"]["source"]["median"] for b, r in result["runs"].items() if r.get("feed")}
    if feed:
        limit = TARGETS["feed_source_samples_per_s"]
        targets["feed_source_samples_per_s"] = {"threshold": limit, "by_batch_size": feed,
                                                "met": all(v >= limit for v in feed.values())}
    return targets


def run(args) -> dict:
    """Run the suite for parsed ``args`` (see :func:`add_arguments`); returns the written result."""
    from dali_relabel.config import DataConfig

    chosen = _parse_contenders(args.contenders)
    device = _check(args, chosen)
    args.threads = args.threads or usable_cores()
    result = new_result("throughput", args)
    result.update(device=device, batch_sizes=list(args.batch_sizes), runs={}, plugin=plugin_info())
    data = prepare_image_set(args.data_dir, args.images, args.classes, seed=args.seed, jpeg_kb=args.jpeg_kb,
                             workers=args.gen_workers)
    result["data"] = dict(data.manifest, path=data.root)
    config = DataConfig(image_size=args.image_size, num_threads=args.threads, py_num_workers=args.workers,
                        hw_decoder_load=args.hw_decoder_load, seed=args.seed, auto_augment=args.augment,
                        random_erase_probability=args.reprob)
    result["config"] = {k: v for k, v in config.to_dict().items() if k != "extra"}
    for batch_size in args.batch_sizes:
        run_b = {"contenders": {}, "ratios": {}}
        if any(c in C.LOADERS for c in chosen):
            run_b = loaders_round(args, data, config, batch_size, device, chosen)
        if "shards" in chosen:
            run_b["shards"] = shards_round(args, prepare_shards(data, args.shard_mb), config, batch_size, device)
            for key in ("ratios", "paired_ratios", "cpu_time_ratios"):  # reported beside the loaders' ratios
                run_b.setdefault(key, {}).update(run_b["shards"][key])
        if "feed" in chosen:
            run_b["feed"] = feed_round(args, data, config, batch_size)
        if "crops" in chosen:
            run_b["crops"] = crops_round(args, data, config, batch_size, device)
        result["runs"][str(batch_size)] = run_b
    result["py_num_workers"] = {"default": args.workers, "compared": list(args.compare_workers),
                                "by_batch_size": workers_comparison(result, args.workers)}
    result["targets"] = check_targets(result)
    spreads = {}
    for batch, run_b in result["runs"].items():
        for group in (run_b, run_b.get("feed") or {}, run_b.get("crops") or {}):
            for name, entry in group.get("contenders", {}).items():
                where = " crops" if group is run_b.get("crops") else ""
                spreads[f"B={batch}{where} {name}"] = entry["spread_pct"]
    finish(result, spreads)
    subset = "" if chosen == list(DEFAULT_GROUPS) else "-" + "-".join(chosen)  # a partial run keeps the full one
    if result["targets"].get("relabel_over_plain_small_epochs"):  # a small-epoch run keeps the usual one
        subset += f"-n{args.images}"
    if args.augment or args.reprob:  # an augmented run keeps the plain one
        subset += "-augmented"
    return write_outputs(result, args.out_dir, f"throughput-{device}{subset}", plot, markdown)


def main(argv=None) -> int:
    return main_for(__doc__, add_arguments, run, argv, prog="python -m benchmarks.throughput")


if __name__ == "__main__":
    sys.exit(main())
