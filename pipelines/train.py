"""Train an image classifier with ReLabel soft targets (or the original single labels).

Thin, torchvision-reference style: ``get_args_parser``, ``train_one_epoch``, ``evaluate``, ``main``.

    python pipelines/train.py --data /data/imagenet/train --store imagenet_relabel.h5 \\
        --val /data/imagenet/val --model resnet50 --epochs 100 --batch-size 256 --amp bf16
    torchrun --nproc_per_node=8 pipelines/train.py ...        # DDP, one process per GPU

Distributed settings come from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
NCCL on GPUs, gloo on CPU; data is sharded by global rank. Every run writes ``args.json`` and
``metrics.jsonl`` into ``--output-dir``; checkpoints hold model, optimizer, schedule, scaler, epoch,
args and the loader's ``state_dict()`` (the data position, with the batch size, world size and seed
it means), and ``--resume`` continues from one (``--resume auto``: the latest in the output
directory), including in the middle of an epoch, through ``loader.load_state_dict`` (which refuses
other data settings rather than skip or repeat samples). Checkpoints hold only tensors and plain
values and are loaded with ``weights_only=True``: a planted file cannot run code. They are published
durably (fsync, rename, fsync of the directory).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from dali_relabel.config import DataConfig
from dali_relabel.distributed import init_from_env, rank_and_world
from dali_relabel.loader import ReLabelLoader, ValidationLoader
from dali_relabel.losses import SoftTargetCrossEntropy
from dali_relabel.models import create_model, load_problem
from dali_relabel.outputs import durable_replace

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ReLabel training with DALI", add_help=add_help)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="training ImageFolder root")
    data.add_argument("--store", help="label-map store (needed for --targets relabel)")
    data.add_argument("--val", help="validation ImageFolder root (evaluated after every epoch)")
    data.add_argument("--real", help="real.json with ReaL labels of the validation images")
    data.add_argument("--targets", choices=["relabel", "original"], default="relabel")
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--val-resize", type=int, default=256)
    data.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0))
    data.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    data.add_argument("--layout", choices=["HW", "WH"], default=None, help="override the store's layout")
    data.add_argument("--temperature", type=float, default=1.0)
    data.add_argument("--workers", type=int, default=1, help="processes running the batch source")
    data.add_argument("--threads", type=int, default=4, help="DALI CPU threads")
    data.add_argument("--hw-decoder-load", type=float, default=0.65)
    data.add_argument("--flip-probability", type=float, default=0.5)
    mix = parser.add_argument_group("cutmix")
    mix.add_argument("--cutmix-prob", type=float, default=0.0)
    mix.add_argument("--cutmix-alpha", type=float, default=1.0)
    mix.add_argument("--cutmix-mode", choices=["authors", "localized"], default="authors")
    mix.add_argument("--cutmix-off-epochs", type=int, default=0,
                     help="no CutMix (nor Mixup) in the last N epochs")
    mix.add_argument("--mixup-alpha", type=float, default=0.0,
                     help="Mixup on soft targets for pairs CutMix leaves alone (0: off)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--model", default="resnet50")
    opt.add_argument("--epochs", type=int, default=100)
    opt.add_argument("--batch-size", type=int, default=256, help="per process")
    opt.add_argument("--lr", type=float, default=0.1, help="for a global batch of 256; scaled linearly")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--warmup-epochs", type=float, default=5.0)
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--amp", choices=list(AMP_DTYPES), default="none")
    opt.add_argument("--channels-last", action="store_true")
    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    run.add_argument("--output-dir", default="runs/relabel")
    run.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto'")
    run.add_argument("--checkpoint-every", type=int, default=0, help="also save every N steps (0: per epoch)")
    run.add_argument("--max-steps-per-epoch", type=int, default=0, help="cut epochs short (smoke tests)")
    run.add_argument("--print-freq", type=int, default=50)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-rows", action="store_true", help="log each step's store rows (tests)")
    return parser


# --------------------------------------------------------------------------------------------------
# set-up

def init_distributed(use_gpu: bool):
    """``(rank, world_size, local_rank)``; joins the process group when launched by torchrun."""
    init_from_env(use_gpu)
    rank, world_size = rank_and_world()
    return rank, world_size, int(os.environ.get("LOCAL_RANK", 0))


def data_config(args) -> DataConfig:
    stop = args.epochs - args.cutmix_off_epochs if args.cutmix_off_epochs else None
    return DataConfig(image_size=args.image_size, val_resize=args.val_resize, scale=tuple(args.scale),
                      ratio=tuple(args.ratio), layout=args.layout, temperature=args.temperature,
                      py_num_workers=args.workers, num_threads=args.threads,
                      hw_decoder_load=args.hw_decoder_load, flip_probability=args.flip_probability, seed=args.seed,
                      output_dtype="float16" if args.amp == "fp16" else "float32",
                      cutmix_probability=args.cutmix_prob, cutmix_alpha=args.cutmix_alpha,
                      cutmix_mode=args.cutmix_mode, cutmix_stop_epoch=stop, mixup_alpha=args.mixup_alpha)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0, then cosine decay to 0; stepped once per iteration."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def find_checkpoint(args) -> Optional[str]:
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth")
        return path if os.path.exists(path) else None
    return args.resume or None


CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "data")


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, loaded with ``weights_only=True`` (tensors and plain Python values
    only, so loading runs no code from the file); anything else is refused with ``SystemExit``."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many ways; weights_only refusals among them
        raise SystemExit(f"--resume {path}: refused: not a checkpoint of tensors and plain values, so it "
                         f"is not loaded (loading it could run code from the file): {load_problem(error)}") \
            from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(f"--resume {path}: not a checkpoint of this script (missing {', '.join(missing)})")
    return checkpoint


def save_checkpoint_file(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically and durably (``<path>.tmp``, fsync, rename, fsync dir)."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    durable_replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0) and prints it."""

    def __init__(self, output_dir: str, rank: int):
        self.path = os.path.join(output_dir, "metrics.jsonl") if rank == 0 else None

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


# --------------------------------------------------------------------------------------------------
# the loop

def train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, device, epoch: int, args,
                    log: MetricsLog, save_checkpoint=None) -> dict:
    """One pass over ``loader``; returns the epoch's mean loss and images/s (over all ranks)."""
    model.train()
    amp_dtype = AMP_DTYPES[args.amp]
    total_loss = torch.zeros((), device=device)
    seen, steps, start = 0, 0, time.perf_counter()
    rows_log = open(os.path.join(args.output_dir, f"rows_rank{args.rank}.jsonl"), "a") if args.log_rows else None
    from tqdm import tqdm

    bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=args.rank != 0 or not sys.stderr.isatty())
    for step, batch in enumerate(bar):
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.detach() * len(images)
        seen += len(images)
        steps += 1
        if rows_log is not None:
            rows_log.write(json.dumps({"epoch": epoch, "step": step, "rows": batch[-1].tolist(),
                                       "loss": float(loss.detach())}) + "\n")
        if args.print_freq and step % args.print_freq == 0:
            log.write({"epoch": epoch, "step": step, "loss": float(reduce_mean(loss.detach())),
                       "lr": scheduler.get_last_lr()[0]})
        if save_checkpoint and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(epoch, loader.state_dict())
        if args.max_steps_per_epoch and steps >= args.max_steps_per_epoch:
            break
    bar.close()
    if rows_log is not None:
        rows_log.close()
    seconds = time.perf_counter() - start
    summed = torch.tensor([float(total_loss), seen, seconds], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(summed)
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"train_loss": float(summed[0] / max(1.0, float(summed[1]))),
            "images": int(summed[1]), "images_per_second": float(summed[1] / (summed[2] / world))}


def evaluate(model, args, data_cfg: DataConfig, class_names, device_kind: str) -> dict:
    """Top-1/top-5 (and ReaL with ``--real``) on ``--val``."""
    from dali_relabel.evaluation import evaluate as run_evaluation
    from dali_relabel.evaluation import load_real_labels

    loader = ValidationLoader(args.val, batch_size=args.batch_size, config=data_cfg, device=device_kind,
                              classes=class_names, return_rows=bool(args.real))
    real = load_real_labels(args.real) if args.real else None
    result = run_evaluation(model, loader, real_labels=real, amp_dtype=AMP_DTYPES[args.amp],
                            channels_last=args.channels_last)
    return {f"val_{key}": value for key, value in result.items() if key in ("top1", "top5", "real")}


def main(args) -> dict:
    from dali_relabel.devices import resolve_device

    device_kind = resolve_device(args.device)
    args.rank, world_size, local_rank = init_distributed(device_kind == "gpu")
    device = torch.device(f"cuda:{local_rank}" if device_kind == "gpu" else "cpu")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.targets == "relabel" and not args.store:
        raise SystemExit("--targets relabel needs --store (or use --targets original)")

    checkpoint_path = find_checkpoint(args)
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None

    data_cfg = data_config(args)
    store = args.store if args.targets == "relabel" else None
    loader = ReLabelLoader(args.data, store, args.batch_size, config=data_cfg, device=device_kind,
                           return_rows=args.log_rows)
    start_epoch = 0
    if checkpoint:
        data_state = dict(checkpoint["data"])
        if "rank" in data_state:  # rank 0 saved it; every rank stands at the same batch
            data_state["rank"] = loader.state_dict().get("rank", data_state["rank"])
        try:
            loader.load_state_dict(data_state)  # normalises "after the last batch" to the next epoch
        except ValueError as error:
            raise SystemExit(f"--resume {checkpoint_path}: {error}") from None
        start_epoch = loader.state_dict()["epoch"]
    num_classes = loader.num_classes
    if args.rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(dict(vars(args), num_classes=num_classes, world_size=world_size), f, indent=2)

    model = create_model(args.model, num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device_kind == "gpu" else None) if world_size > 1 else model
    lr = args.lr * args.batch_size * world_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps_per_epoch = loader.plan.num_batches
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
    criterion = SoftTargetCrossEntropy(args.label_smoothing)
    log = MetricsLog(args.output_dir, args.rank)

    def save_checkpoint(epoch: int, data_state: dict, finished: bool = False):
        if args.rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "epoch_finished": finished, "data": data_state, "args": vars(args),
                 "num_classes": num_classes, "class_names": loader.class_names}
        save_checkpoint_file(state, os.path.join(args.output_dir, "checkpoint.pth"))

    result = {}
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        stats = train_one_epoch(ddp_model, criterion, optimizer, scheduler, scaler, loader, device, epoch,
                                args, log, save_checkpoint)
        # the loader's own state (with its settings), at the next epoch's start even when
        # --max-steps-per-epoch cut this one short
        save_checkpoint(epoch, dict(loader.state_dict(), epoch=epoch + 1, batch=0), finished=True)
        result = {"epoch": epoch, **stats}
        if args.val:
            result.update(evaluate(model, args, data_cfg, loader.class_names, device_kind))
        log.write(result)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args()) is not None else 1)
