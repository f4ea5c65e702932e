"""Train an image classifier with ReLabel soft targets (or the original single labels).

Thin, torchvision-reference style: ``get_args_parser``, ``train_one_epoch``, ``evaluate``, ``main``.

    python pipelines/train.py --data /data/imagenet/train --store imagenet_relabel.h5 \\
        --val /data/imagenet/val --model resnet50 --epochs 100 --batch-size 256 --amp bf16
    torchrun --nproc_per_node=8 pipelines/train.py ...        # DDP, one process per GPU
    dali-relabel train ...                                     # the same script, installed
    python pipelines/train.py --shards 'shards/shard-{000000..000127}.tar' --val-shards val_shards ...
    python pipelines/train.py --data /data/imagenet/train --store imagenet_fkd.h5 --crops-per-image 4 ...

``--store`` takes either kind of store, told apart by its format: label maps (ReLabel targets pooled
over each crop) or a region store (FKD's stored crops, cut as stored, their stored soft labels as
targets; :mod:`dali_relabel.regions`).

The data flags are :class:`~dali_relabel.config.DataConfig`'s fields (``--image-size``,
``--cutmix-probability``, ``--label-smoothing``, ...: ``--help`` lists them with their defaults); the
Python entry point :func:`train` takes a ``DataConfig`` and the other flags as keywords.

Distributed settings come from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
NCCL on GPUs, gloo on CPU; data is sharded by global rank. Every run writes ``args.json`` and
``metrics.jsonl`` into ``--output-dir``; checkpoints hold model, optimizer, schedule, scaler, epoch,
args and the data position: every rank's ``loader.state_dict()`` merged into the global one
(:func:`~dali_relabel.loader_state.merge_states`: the epoch, how much of its global order all ranks
read, shard loaders' rows and DALI checkpoints, and the settings that define the data). ``--resume``
continues from one (``--resume auto``: the latest in the output directory), also in the middle of an
epoch and on another number of ranks or batch size: the rest of the epoch is read, each sample once
(the schedule's progress is carried over in epochs). Inside an epoch, other data settings (store,
image size, layout, targets, augmentation, seed) are refused, naming them;
``--resume-restart-epoch`` starts the saved epoch again instead. Checkpoints hold only tensors and
plain values and are loaded with ``weights_only=True``: a planted file cannot run code. They are
published durably (fsync, rename, fsync of the directory). A save that fails (a full disk) removes its partial
file, keeps the previous checkpoint and says why (:class:`CheckpointError`). A checkpoint whose model
does not fit the run's is refused before anything is written. One trainer writes an output directory
at a time: a second one is refused, naming the first (``train.lock`` in the directory,
:class:`~dali_relabel.outputs.OutputLock`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
import time
from typing import Optional

from dali_relabel import config as data_settings
from dali_relabel.distributed import init_from_env, rank_and_world
from dali_relabel.errors import DaliRelabelError

# torch and the loaders are imported where they are used: building the parser stays light.
AMP_DTYPES = ("none", "bf16", "fp16")


def get_args_parser(add_help: bool = True, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="ReLabel training with DALI", add_help=add_help)
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training ImageFolder root (or --shards)")
    data.add_argument("--store", help="store of --data (needed for --targets relabel): label maps, or a region "
                                      "store (FKD's stored crops and their soft labels); its kind picks the targets")
    data.add_argument("--shards", help="tar shards instead of --data/--store: their directory, index.json, "
                                       "or a pattern DIR/shard-{000000..000127}.tar (dali-relabel shard)")
    data.add_argument("--val", help="validation ImageFolder root (evaluated after every epoch)")
    data.add_argument("--val-shards", help="validation tar shards instead of --val")
    data.add_argument("--skip-bad-shards", action="store_true",
                      help="leave a damaged (missing, truncated) shard of --shards/--val-shards out of the pass, "
                           "with a warning, instead of stopping (skip_bad_shards of the shard loaders)")
    data.add_argument("--real", help="real.json with ReaL labels of the validation images")
    data.add_argument("--targets", choices=["relabel", "original"], default="relabel")
    data_settings.add_arguments(parser)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--model", default="resnet50")
    opt.add_argument("--epochs", type=int, default=100)
    opt.add_argument("--batch-size", type=int, default=256, help="per process")
    opt.add_argument("--lr", type=float, default=0.1, help="for a global batch of 256; scaled linearly")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--warmup-epochs", type=float, default=5.0)
    opt.add_argument("--amp", choices=AMP_DTYPES, default="none")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda (a process's GPU is its LOCAL_RANK)")
    run.add_argument("--output-dir", default="runs/relabel")
    run.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto'")
    run.add_argument("--resume-restart-epoch", action="store_true",
                     help="start the checkpoint's epoch again from its first batch (needed to change data "
                          "settings inside an epoch)")
    run.add_argument("--stop-after-steps", type=int, default=0,
                     help="end the run after this many steps of this process, with a checkpoint there "
                          "(a time-limited job; tests)")
    run.add_argument("--checkpoint-every", type=int, default=0, help="also save every N steps (0: per epoch)")
    run.add_argument("--max-steps-per-epoch", type=int, default=0, help="cut epochs short (smoke tests)")
    run.add_argument("--print-freq", type=int, default=50)
    run.add_argument("--log-rows", action="store_true", help="log each step's store rows (tests)")
    return parser


# --------------------------------------------------------------------------------------------------
# set-up

def init_distributed(use_gpu: bool):
    """``(rank, world_size, local_rank)``; joins the process group when launched by torchrun."""
    init_from_env(use_gpu)
    rank, world_size = rank_and_world()
    return rank, world_size, int(os.environ.get("LOCAL_RANK", 0))


def data_config(args):
    """The run's :class:`~dali_relabel.config.DataConfig` (its flags are the fields)."""
    return data_settings.from_arguments(args)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0, then cosine decay to 0; stepped once per iteration."""
    import torch

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


class CheckpointError(DaliRelabelError, ValueError):
    """A checkpoint that this run cannot resume (another model), or one that could not be saved."""


def output_lock(output_dir: str):
    """The lock that makes a trainer the only writer of ``output_dir`` (``train.lock`` inside it):
    a context manager; a second trainer gets :class:`~dali_relabel.outputs.OutputBusyError` naming
    the first."""
    from dali_relabel.outputs import OutputLock

    return OutputLock(output_dir, lock_path=os.path.join(output_dir, "train.lock"))


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, loaded with ``weights_only=True`` (tensors and plain Python values
    only, so loading runs no code from the file); anything else is refused with ``SystemExit``."""
    import torch

    from dali_relabel.training.models import load_problem

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


def check_model_fits(checkpoint: dict, path: str, model, model_name: str, num_classes: int) -> None:
    """Refuse, with :class:`CheckpointError`, a checkpoint whose model state does not fit ``model``
    (another architecture or another number of classes), naming both and the tensors that differ."""
    saved, mine = checkpoint["model"], model.state_dict()
    shapes = [(key, list(saved[key].shape), list(mine[key].shape)) for key in mine
              if key in saved and list(getattr(saved[key], "shape", ())) != list(mine[key].shape)]
    missing = [key for key in mine if key not in saved]
    unexpected = [key for key in saved if key not in mine]
    if not (shapes or missing or unexpected):
        return
    details = []
    if shapes:
        details.append("other shapes: " + ", ".join(f"{key} saved {a}, now {b}" for key, a, b in shapes[:3])
                       + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""))
    if missing:
        details.append(f"{len(missing)} tensors of this model are not in it (such as {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} of its tensors are not in this model (such as {unexpected[0]})")
    saved_model = (checkpoint.get("args") or {}).get("model", "an unknown model")
    raise CheckpointError(f"--resume {path}: the checkpoint was trained with model {saved_model} "
                          f"({checkpoint.get('num_classes', '?')} classes); this run builds {model_name} "
                          f"({num_classes} classes): {'; '.join(details)}. Resume with the checkpoint's model "
                          "and data, or start a new run in another --output-dir")


class _RecordingFile:
    """The file ``torch.save`` writes through, remembering the first ``OSError`` of a write (torch
    turns it into a ``RuntimeError`` that says only "enforce fail")."""

    def __init__(self, file):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self._file.flush()


def save_checkpoint_file(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically and durably (``<path>.tmp``, fsync, rename, fsync dir).

    A save that fails (a full disk, an I/O error) removes ``<path>.tmp``, leaves the previous file at
    ``path`` as it was and raises :class:`CheckpointError` naming the path and the cause."""
    import torch

    from dali_relabel.outputs import durable_replace

    tmp = path + ".tmp"
    target = None
    try:
        with open(tmp, "wb") as f:
            target = _RecordingFile(f)
            torch.save(state, target)
        durable_replace(tmp, path)
    except (OSError, RuntimeError) as error:
        cause = target.error if target is not None and target.error is not None else error
        partial = os.path.lexists(tmp)
        if partial:
            os.unlink(tmp)
        reason = cause.strerror or str(cause) if isinstance(cause, OSError) else str(cause)
        hint = "; free space there or choose another --output-dir" if getattr(cause, "errno", None) in (
            errno.ENOSPC, errno.EDQUOT) else ""
        kept = ("the partial file was removed and the previous checkpoint (if any) is unchanged" if partial
                else "the previous checkpoint (if any) is unchanged")
        raise CheckpointError(f"cannot save the checkpoint {path}: {reason} ({kept}){hint}") from error


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


def reduce_mean(values):
    import torch.distributed as dist

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
    import torch
    import torch.distributed as dist

    model.train()
    amp_dtype = _amp_dtype(args.amp)
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
        args.steps_done = getattr(args, "steps_done", 0) + 1
        stop = bool(args.stop_after_steps) and args.steps_done >= args.stop_after_steps
        if save_checkpoint and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or stop):
            save_checkpoint(epoch)
        if stop:
            bar.close()
            if rows_log is not None:
                rows_log.close()
            raise StopTraining(f"stopped after {args.steps_done} steps (--stop-after-steps)")
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


class StopTraining(Exception):
    """``--stop-after-steps`` reached (its checkpoint is saved)."""


def _amp_dtype(name: str):
    import torch

    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def validation_loader(args, data_cfg, class_names, device: str):
    """``--val`` (an image tree) or ``--val-shards``; ``None`` without either."""
    if args.val_shards:
        from dali_relabel.shard_loader import ShardValidationLoader

        return ShardValidationLoader(args.val_shards, batch_size=args.batch_size, config=data_cfg, device=device,
                                     return_rows=bool(args.real), skip_bad_shards=args.skip_bad_shards)
    if args.val:
        from dali_relabel.loader import ValidationLoader

        return ValidationLoader(args.val, batch_size=args.batch_size, config=data_cfg, device=device,
                                classes=class_names, return_rows=bool(args.real))
    return None


def evaluate(model, args, loader) -> dict:
    """Top-1/top-5 (and ReaL with ``--real``) over ``loader``."""
    from dali_relabel.training.evaluation import evaluate as run_evaluation
    from dali_relabel.training.metrics import load_real_labels

    real = load_real_labels(args.real) if args.real else None
    result = run_evaluation(model, loader, real_labels=real, amp_dtype=_amp_dtype(args.amp),
                            channels_last=args.channels_last)
    return {f"val_{key}": value for key, value in result.items() if key in ("top1", "top5", "real")}


def training_loader(args, data_cfg, device: str):
    """``--shards``, or ``--data`` with ``--store`` (``--targets original``: the tree's hard labels)."""
    if args.shards:
        if args.targets != "relabel":
            raise SystemExit("--targets original reads the image tree: use --data instead of --shards")
        from dali_relabel.shard_loader import ShardReLabelLoader

        return ShardReLabelLoader(args.shards, args.batch_size, config=data_cfg, device=device,
                                  return_rows=args.log_rows, skip_bad_shards=args.skip_bad_shards)
    if not args.data:
        raise SystemExit("give the training data: --data (an image tree, with --store) or --shards")
    if args.targets == "relabel" and not args.store:
        raise SystemExit("--targets relabel needs --store (or use --targets original)")
    from dali_relabel.loader import ReLabelLoader

    return ReLabelLoader(args.data, args.store if args.targets == "relabel" else None, args.batch_size,
                         config=data_cfg, device=device, return_rows=args.log_rows)


def gather_data_states(loader, world_size: int) -> list:
    """Every rank's ``loader.state_dict()`` (rank order), for :func:`merge_states` (a collective call)."""
    state = loader.state_dict()
    if world_size == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def checkpoint_data_state(checkpoint: dict) -> dict:
    """The global data position of a checkpoint (an older one kept each rank's state apart)."""
    from dali_relabel.loader_state import merge_states

    if checkpoint.get("data_ranks"):
        return merge_states(checkpoint["data_ranks"])
    return dict(checkpoint["data"])


def resume_schedule(scheduler, checkpoint: dict, steps_per_epoch: int) -> None:
    """Carry the schedule's progress over in epochs when the checkpoint's epochs had another number
    of steps (another world size or batch size)."""
    saved = checkpoint.get("steps_per_epoch")
    if saved and saved != steps_per_epoch:
        scheduler.last_epoch = int(round(scheduler.last_epoch * steps_per_epoch / saved))


def main(args) -> dict:
    """Train as ``args`` (this parser's) say; returns the last epoch's metrics."""
    from dali_relabel.devices import resolve_device

    device_kind = resolve_device(args.device)
    args.rank, world_size, local_rank = init_distributed(device_kind == "gpu")
    os.makedirs(args.output_dir, exist_ok=True)
    # One trainer per output directory (rank 0 writes it): a second is refused before it writes.
    with output_lock(args.output_dir) if args.rank == 0 else contextlib.nullcontext():
        return _run(args, device_kind, world_size, local_rank)


def _run(args, device_kind: str, world_size: int, local_rank: int) -> dict:
    """:func:`main` once it holds the output directory."""
    import torch
    import torch.distributed as dist

    from dali_relabel.training.losses import SoftTargetCrossEntropy
    from dali_relabel.training.models import create_model

    device = torch.device(f"cuda:{local_rank}" if device_kind == "gpu" else "cpu")
    torch.manual_seed(args.seed)

    checkpoint_path = find_checkpoint(args)
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None

    data_cfg = data_config(args)
    loader = training_loader(args, data_cfg, "gpu" if device_kind == "gpu" else "cpu")
    start_epoch = 0
    if checkpoint:
        try:  # the global position: any number of ranks continues it ("after the last batch": the next epoch)
            loader.load_state_dict(checkpoint_data_state(checkpoint), restart_epoch=args.resume_restart_epoch)
        except ValueError as error:
            raise SystemExit(f"--resume {checkpoint_path}: {error}") from None
        start_epoch = loader.state_dict()["epoch"]
    num_classes = loader.num_classes
    model = create_model(args.model, num_classes).to(device)
    if checkpoint:
        check_model_fits(checkpoint, checkpoint_path, model, args.model, num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device_kind == "gpu" else None) if world_size > 1 else model
    lr = args.lr * args.batch_size * world_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps_per_epoch = loader.batches_per_epoch
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    scheduler = cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            resume_schedule(scheduler, checkpoint, steps_per_epoch)
        except (KeyError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"--resume {checkpoint_path}: its training state does not fit this run: "
                                  f"{error}") from None
    if args.rank == 0:  # written once the resume is known to fit: a refused run leaves it as it was
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(dict(vars(args), num_classes=num_classes, world_size=world_size), f, indent=2)
    criterion = SoftTargetCrossEntropy()  # smoothing, if any, is in the targets (--label-smoothing)
    log = MetricsLog(args.output_dir, args.rank)
    val_loader = validation_loader(args, data_cfg, loader.class_names, "gpu" if device_kind == "gpu" else "cpu")

    def save_checkpoint(epoch: int, data_state: dict, finished: bool = False):
        if args.rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "epoch_finished": finished, "data": data_state, "steps_per_epoch": steps_per_epoch,
                 "args": vars(args), "num_classes": num_classes, "class_names": list(loader.class_names)}
        save_checkpoint_file(state, os.path.join(args.output_dir, "checkpoint.pth"))

    def save_position(epoch: int, next_epoch: Optional[int] = None):
        """Checkpoint the global data position (a collective call: every rank makes it); with
        ``next_epoch``, the start of that epoch."""
        from dali_relabel.loader_state import epoch_start_state, merge_states

        state = merge_states(gather_data_states(loader, world_size))
        if next_epoch is not None:
            state = epoch_start_state(state, next_epoch)
        save_checkpoint(epoch, state, finished=next_epoch is not None)

    result = {}
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps a resumed position inside this epoch
        try:
            stats = train_one_epoch(ddp_model, criterion, optimizer, scheduler, scaler, loader, device, epoch,
                                    args, log, save_position)
        except StopTraining as stopped:
            result = {"epoch": epoch, "stopped": str(stopped)}
            break
        # the position at the next epoch's start, even when --max-steps-per-epoch cut this short
        save_position(epoch, epoch + 1)
        result = {"epoch": epoch, **stats}
        if val_loader is not None:
            result.update(evaluate(model, args, val_loader))
        log.write(result)
    for used in (loader, val_loader):  # their pipelines, threads and workers end now
        if used is not None:
            used.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def train(config=None, **options) -> dict:
    """Train from Python: the recipe's defaults, ``options`` named as the flags' destinations
    (``data=``, ``store=``, ``val=``, ``model=``, ``epochs=``, ``batch_size=``, ``output_dir=``...) and the
    data settings as a :class:`~dali_relabel.config.DataConfig`. Returns the last epoch's metrics."""
    args = get_args_parser().parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    vars(args).update(options)
    if config is not None:
        vars(args).update({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"})
    return main(args)


if __name__ == "__main__":
    from dali_relabel.tools.cli import run_command  # errors meant for the user: the message, no traceback

    sys.exit(run_command("train", lambda args: 0 if main(args) is not None else 1, get_args_parser().parse_args()))
