"""The ``dali-relabel`` command line: one subcommand per job.

convert       released labels -> one HDF5 store: the per-image .pt maps of ReLabel
              and Token Labeling, or FKD's .tar soft labels
info          header, counts and sanity statistics of a store (label maps or regions)
verify        check a store of either kind at a verify level, and say which kind it is
show          an image with its label map drawn over it (PNG)
build-plugin  compile the fused operator for the installed DALI
evaluate      top-1/top-5 and ReaL accuracy of a checkpoint
demo          the whole path on generated data, no GPU needed
generate      run your own teacher over an image folder -> a label store, or with --regions a region
              store (torchrun for several GPUs)
train         train a classifier with ReLabel targets (the recipe pipelines/train.py; torchrun for DDP)
shard         pack an image folder and its store into tar shards for clusters (webdataset)

The benchmarks are not a subcommand: they live in benchmarks/ and run from the repository root
(python -m benchmarks.throughput, benchmarks.operator, benchmarks.store_read; benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_convert(args) -> int:
    from .convert import convert_release
    from .convert_fkd import convert_fkd

    class_names = None
    if args.class_names:
        with open(args.class_names) as f:
            class_names = [line.strip() for line in f if line.strip()]
    common = dict(num_classes=args.num_classes, class_names=class_names, allow_missing=args.allow_missing,
                  workers=args.workers, restart=args.restart, progress=not args.quiet)
    if args.fkd:
        report = convert_fkd(args.fkd, args.images, args.out, fkd_label_type=args.fkd_label_type,
                             regions=args.regions, **common)
    else:
        report = convert_release(args.maps, args.images, args.out, release_format=args.format, **common)
    print(report.summary())
    return 0


def _cmd_info(args) -> int:
    from ..store import open_store, summarize_store

    level = "full" if args.verify else "header" if args.fast else "sample"
    summary = summarize_store(open_store(args.store, verify=level))
    if args.verify:
        summary["checksum"] = "verified (every block and every value)"
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(key) for key in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _cmd_verify(args) -> int:
    from ..store import open_store

    store = open_store(args.store, verify=args.level)
    print(f"{store.path}: {store.kind}, {len(store)} rows, format version {store.header.format_version}: "
          f"verified ({args.level})")
    return 0


def _cmd_show(args) -> int:
    from .show import show_store_row
    from ..store import LabelStore

    store = LabelStore(args.store, verify="header")
    out = show_store_row(store, args.index, args.image_root, args.out, layout=args.layout, both_layouts=args.both)
    print(f"wrote {out}")
    return 0


def _cmd_build_plugin(args) -> int:
    from ..ops.plugin import describe_build, rebuild

    manifest = rebuild(force=args.force, with_cuda=False if args.cpu_only else None)
    print(json.dumps(manifest, indent=2))
    print(describe_build(manifest, cpu_only=args.cpu_only))
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(classes=args.classes, train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, image_size=args.image_size,
                            student_epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                            teacher_per_class=args.teacher_per_class,
                            batch_size=args.batch_size, device=args.device, seed=args.seed)
    run_demo(args.out, settings)
    return 0


def _cmd_evaluate(args) -> int:
    from ..training.evaluation import evaluate_checkpoint, format_results

    result = evaluate_checkpoint(args.checkpoint, args.val, real=args.real, model_name=args.model,
                                 batch_size=args.batch_size, device=args.device,
                                 classes_from_store=args.classes_from_store, imagenetv2=args.imagenetv2)
    if result.get("rank", 0) == 0:
        print(format_results(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {args.json}")
    return 0


def _cmd_generate(args) -> int:
    from ..config import DataConfig
    from .generate import run_generate

    changes = {name: value for name, value in (("py_num_workers", args.workers), ("num_threads", args.threads))
               if value is not None}
    config = DataConfig().replace(**changes)
    region_flags = [flag for flag, value in (("--region-scale", args.region_scale), ("--region-seed", args.region_seed),
                                             ("--crop-batch", args.crop_batch),
                                             ("--interpolation", args.interpolation)) if value is not None]
    if args.regions is None and region_flags:
        raise ValueError(f"{', '.join(region_flags)} only apply with --regions R (region labels)")
    if args.regions is not None and args.grid is not None:
        raise ValueError("--grid is for label maps; --regions R writes a region store (no grid)")
    options = {name: value for name, value in (("scale", args.region_scale), ("seed", args.region_seed),
                                               ("crop_batch", args.crop_batch),
                                               ("interpolation", args.interpolation)) if value is not None}
    result = run_generate(args.images, args.out, args.model, args.weights, size=args.size,
                          grid=15 if args.grid is None else args.grid, k=args.k,
                          batch_size=args.batch_size, device=args.device,
                          amp=args.amp, class_names_file=args.class_names, teacher_name=args.teacher_name,
                          config=config, restart=args.restart, progress=not args.quiet, regions=args.regions,
                          region_options=options)
    if result.get("rank", 0) == 0:
        shape = (f"{result['regions']} crops per image" if "regions" in result
                 else f"grid {result['grid'][0]}x{result['grid'][1]}")
        print(f"wrote {result.get('rows')} rows to {result['out']} ({result.get('kind')}, teacher "
              f"{result['teacher']}, {result['size']} px, {shape}, k={result['k']})")
    return 0


def _parse_bytes(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64k"`` or a number of bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 500MB)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def _cmd_shard(args) -> int:
    import shutil
    import tempfile

    from .. import remote
    from ..shards import INDEX_NAME, ShardSet, write_shards

    upload = remote.is_remote(args.out)
    if args.staging and not upload:
        raise ValueError("--staging is for --out s3://...: local shards are written into --out directly")
    staging = args.staging or (tempfile.mkdtemp(prefix="dali-relabel-shards-") if upload else None)
    shards = write_shards(args.images, args.store, staging or args.out, shard_bytes=args.shard_size, seed=args.seed,
                          workers=args.workers, progress=not args.quiet)
    if upload:  # the shards first, index.json last: a reader never finds an index without its shards
        remote.upload_directory(staging, args.out, last=(INDEX_NAME,), progress=not args.quiet)
        shards = ShardSet.load(args.out)  # lists the uploaded objects and checks every size
        if not args.staging:
            shutil.rmtree(staging, ignore_errors=True)
    total = sum(s["bytes"] for s in shards.shards)
    where = shards.directory.rstrip("/")
    print(f"wrote {shards.num_samples} samples in {len(shards.shards)} shards ({total / 1e9:.2f} GB) to "
          f"{where}; train with --shards '{where}/shard-{{000000..{len(shards.shards) - 1:06d}}}.tar'")
    return 0


def _demo_defaults():
    from .demo import DemoSettings

    return DemoSettings()


def build_parser() -> argparse.ArgumentParser:
    from ..config import LAYOUTS
    from .release_formats import FORMATS

    parser = argparse.ArgumentParser(prog="dali-relabel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert released labels into one store: .pt maps of ReLabel or Token "
                                       "Labeling (--maps, --format) or "
                                       "FKD's .tar soft labels (--fkd)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--maps", help="release root of .pt maps: <wnid>/<stem>.pt (writes a label-map store)")
    source.add_argument("--fkd", help="FKD soft-label folder: <class>/<stem>.tar, FKD's <softlabel_path>/train "
                                      "(writes a region store)")
    p.add_argument("--images", required=True, help="ImageFolder root of the same images")
    p.add_argument("--out", required=True, help="store to write (.h5)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--class-names", help="file with one class name per line, in class-id order")
    p.add_argument("--fkd-label-type", default="marginal_smoothing_k5",
                   help="with --fkd: what the files hold (FKD's --label_type: marginal_smoothing_k5, "
                        "marginal_smoothing_k10, marginal_renorm, hard, smoothing); the files do not say")
    p.add_argument("--regions", type=int, default=None,
                   help="with --fkd: crops kept per image, the first R of each file (default: the first file's count)")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip images without a map and ignore maps without an image (counted)")
    p.add_argument("--workers", type=int, default=None, help="map-loading processes (default: all cores)")
    p.add_argument("--format", choices=tuple(FORMATS), default="relabel",
                   help="whose release: ReLabel's (layout WH) or Token Labeling's (LV-ViT; its file names, "
                        "layout HW); docs/store_format.md")
    p.add_argument("--restart", action="store_true", help="discard an interrupted conversion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("info", help="header, counts and sanity statistics of a store (either kind)")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.add_argument("--fast", action="store_true", help="check the header only")
    p.add_argument("--verify", action="store_true",
                   help="recompute every block's checksum and check every value (reads the whole file)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", help="check a store of either kind (label maps or regions) and say which it is")
    p.add_argument("store")
    p.add_argument("--level", choices=["header", "sample", "full"], default="full",
                   help="header: format and datasets; sample: + paths, root hash, one block; full: every block "
                        "and value (default)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("show", help="draw a label map over its image (PNG)")
    p.add_argument("store")
    p.add_argument("--index", type=int, default=0, help="store row")
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", default="label_map.png")
    p.add_argument("--layout", choices=list(LAYOUTS), default=None, help="override the store's layout")
    p.add_argument("--both", action="store_true", help="draw both layouts side by side")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("build-plugin", help="compile the fused operator for the installed DALI")
    p.add_argument("--force", action="store_true", help="rebuild even if a fitting build exists")
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA backend")
    p.set_defaults(func=_cmd_build_plugin)

    p = sub.add_parser("demo", help="ReLabel end to end on generated data (CPU is enough)")
    defaults = _demo_defaults()
    p.add_argument("--out", default="demo_output")
    p.add_argument("--classes", type=int, default=defaults.classes)
    p.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    p.add_argument("--val-per-class", type=int, default=defaults.val_per_class)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--epochs", type=int, default=defaults.student_epochs, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs)
    p.add_argument("--teacher-per-class", type=int, default=defaults.teacher_per_class)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("evaluate", help="top-1/top-5/ReaL accuracy of a checkpoint on an image folder")
    p.add_argument("--checkpoint", required=True, help="torch.save'd {'model': state_dict, 'args': {...}}")
    p.add_argument("--val", required=True, help="ImageFolder root of the evaluation images")
    p.add_argument("--real", default=None, help="ReaL labels (real.json)")
    p.add_argument("--model", default=None, help="torchvision model name (default: the checkpoint's "
                                                 "args['model'], else resnet50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--classes-from-store", default=None,
                   help="label store whose class names give the label order (the training store)")
    p.add_argument("--imagenetv2", action="store_true", help="folders are class indices 0..999 (ImageNetV2)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("generate", help="run a teacher over an image folder and write its label maps (or, "
                                        "with --regions, its region labels)")
    p.add_argument("--images", required=True, help="ImageFolder root: <class>/<image>")
    p.add_argument("--out", required=True, help="store to write (.h5)")
    p.add_argument("--model", required=True,
                   help="torchvision classification model name (resnet50, efficientnet_b7, convnext_base, "
                        "...), a built-in model (small_resnet, medium_resnet, tiny_cnn: the demo's), or "
                        "timm:NAME if timm is installed")
    p.add_argument("--weights", required=True,
                   help="local state dict file (or a checkpoint with a 'model' state dict); nothing is downloaded")
    p.add_argument("--class-names", default=None,
                   help="file with the teacher's class names, one per line in class-id order (default: the "
                        "sorted folders)")
    p.add_argument("--size", type=int, default=224,
                   help="teacher input side: full images resized to SIZE x SIZE (the paper: 475)")
    p.add_argument("--grid", type=int, default=None, help="side of the stored map (default 15)")
    p.add_argument("--k", type=int, default=5, help="logits kept per cell (with --regions: classes kept per crop)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default 64; with --regions R: 256 // R, at least 1)")
    p.add_argument("--regions", type=int, default=None, metavar="R",
                   help="write a region store instead (FKD's soft labels): R keyed random-resized crops per "
                        "image, each resized to SIZE x SIZE, with the teacher's top-k probabilities")
    p.add_argument("--region-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --regions: area range of the crops, fractions of the image (default FKD's 0.08 0.936)")
    p.add_argument("--region-seed", type=int, default=None,
                   help="with --regions: seed of the crops' keys (default 0)")
    p.add_argument("--crop-batch", type=int, default=None,
                   help="with --regions: crops per teacher forward pass (default 256)")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear", "lanczos", "nearest"], default=None,
                   help="with --regions: resize of the crops (default bicubic, as FKD)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--amp", action="store_true", help="float16 autocast on the GPU")
    p.add_argument("--teacher-name", default=None, help="stored as the teacher attribute (default: --model)")
    p.add_argument("--workers", type=int, default=None,
                   help="DALI processes running the batch source (DataConfig.py_num_workers; default 0: this process)")
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (DataConfig.num_threads)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    sub.add_parser("train", help="train a classifier with ReLabel targets (pipelines/train.py; "
                                 "`dali-relabel train --help` lists its flags)", add_help=False)

    p = sub.add_parser("shard", help="pack an image folder and its label store into tar shards (webdataset)")
    p.add_argument("--images", required=True, help="ImageFolder root the store describes")
    p.add_argument("--store", default=None, help="the label store (without one: images and labels only, e.g. "
                                                 "for validation)")
    p.add_argument("--out", required=True, help="directory for the shards, their DALI index files and index.json, "
                                                "or an s3:// prefix they are uploaded to (AWS_* variables)")
    p.add_argument("--staging", default=None, help="with --out s3://: local directory the shards are written to "
                                                   "before the upload, kept (a rerun resumes); default: a "
                                                   "temporary one, removed after the upload")
    p.add_argument("--shard-size", type=_parse_bytes, default=_parse_bytes("1GB"), help="target shard size (1GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rows' order over the shards")
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_shard)

    return parser


def _train_parser():
    from ..pipelines.train import get_args_parser

    return get_args_parser(prog="dali-relabel train")


# What an interrupted run leaves behind, per subcommand ({out}: its --out).
_INTERRUPTED = {
    "convert": "{out}.partial keeps the rows written so far; rerun the same command to resume",
    "generate": "{out}.partial (or its .part files) keeps the rows written so far; rerun the same command "
                "to resume",
    "shard": "finished shards are kept; rerun the same command to write the rest",
    "train": "the checkpoints written so far stay in --output-dir; rerun with --resume auto to go on",
}


def run_command(command: str, job, args) -> int:
    """Run one subcommand's ``job(args)``: an error meant for the user (``DaliRelabelError``, an
    ``OSError`` such as a missing file, a ``ValueError``/``IndexError`` naming a bad setting or row)
    prints ``dali-relabel <command>: <message>`` and returns 2; Ctrl-C says what was kept and returns
    130. ``DALI_RELABEL_TRACEBACK=1`` lets the error through with its traceback."""
    from ..errors import DaliRelabelError

    try:
        return job(args)
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(command, "")
        print("\ninterrupted" + (": " + hint.format(out=getattr(args, "out", "")) if hint else ""), file=sys.stderr)
        return 130
    except (DaliRelabelError, OSError, ValueError, IndexError) as error:
        if os.environ.get("DALI_RELABEL_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"dali-relabel {command}: {error}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from ..pipelines.train import main as train_main

    train_main(args)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the training recipe's own parser (pipelines/train.py), built only here
        return run_command("train", _train, _train_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    return run_command(args.func.__name__[len("_cmd_"):].replace("_", "-"), args.func, args)


if __name__ == "__main__":
    sys.exit(main())
