"""The training script: a short CPU run, resuming, and a two-process DDP (gloo) run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dali_relabel.store import write_store

pytest.importorskip("nvidia.dali")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "pipelines", "train.py")


def make_square_set(root, num_images=24, num_classes=3, size=32):
    """Square noise images (so a whole-image crop is deterministic) and a random store."""
    rng = np.random.default_rng(0)
    image_root = os.path.join(root, "images")
    paths = []
    for i in range(num_images):
        folder = f"c{i % num_classes}"
        os.makedirs(os.path.join(image_root, folder), exist_ok=True)
        path = f"{folder}/{i:03d}.JPEG"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(image_root, path), quality=95)
        paths.append(path)
    paths.sort()
    logits = rng.normal(size=(num_images, 2, 4, 4)).astype(np.float16) * 3
    ids = np.stack([np.stack([rng.permutation(num_classes)[:2] for _ in range(16)], -1).reshape(2, 4, 4)
                    for _ in range(num_images)])
    store = os.path.join(root, "store.h5")
    write_store(store, paths, logits, ids, num_classes, class_names=[f"c{c}" for c in range(num_classes)],
                labels=[int(p[1]) for p in paths])
    return image_root, store


def _args(image_root, store, out, *extra):
    return ["--data", image_root, "--store", store, "--model", "tiny_cnn", "--image-size", "32",
            "--val-resize", "32", "--py-num-workers", "1", "--num-threads", "1", "--device", "cpu",
            "--output-dir", out, "--warmup-epochs", "0", "--print-freq", "1", *extra]


def _train_module():
    sys.path.insert(0, os.path.join(ROOT, "pipelines"))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train


def _run_main(argv):
    train = _train_module()
    return train.main(train.get_args_parser().parse_args(argv))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_short_cpu_run_writes_metrics_checkpoint_and_resumes(tmp_path):
    image_root, store = make_square_set(str(tmp_path))
    out = str(tmp_path / "run")
    result = _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8",
                             "--val", image_root, "--cutmix-probability", "0.5", "--cutmix-mode", "localized"))
    assert result["epoch"] == 0 and result["images"] == 24 and result["images_per_second"] > 0
    assert 0 <= result["val_top1"] <= 100
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["num_classes"] == 3
    import torch

    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "data"} <= set(checkpoint)
    data = checkpoint["data"]  # the loader's own state: the position and the settings it means
    assert (data["epoch"], data["batch"], data["batch_size"], data["world_size"], data["seed"]) == (1, 0, 8, 1, 0)
    # Asking for two epochs with --resume auto trains only the second.
    _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--resume", "auto"))
    epochs = [m["epoch"] for m in _metrics(out) if "train_loss" in m]
    assert epochs == [0, 1]


@pytest.mark.slow
def test_original_targets_train_without_a_store(tmp_path):
    image_root, _ = make_square_set(str(tmp_path))
    out = str(tmp_path / "run")
    argv = _args(image_root, "unused", out, "--epochs", "1", "--batch-size", "8", "--targets", "original")
    argv.remove("--store")
    argv.remove("unused")
    assert _run_main(argv)["images"] == 24


class _Planted:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for any code a planted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant_checkpoint(path, marker):
    import torch

    torch.save({"model": _Planted(marker), "optimizer": {}, "lr_scheduler": {}, "scaler": {}, "epoch": 0,
                "data": {"epoch": 0, "batch": 0}}, path)
    torch.load(path, weights_only=False)  # what --resume used to do: the code runs
    assert os.path.isdir(marker)
    os.rmdir(marker)


@pytest.mark.parametrize("how", ["path", "auto"])
def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, how):
    out = tmp_path / "run"
    out.mkdir()
    planted = out / "checkpoint.pth" if how == "auto" else tmp_path / "planted.pth"
    marker = str(tmp_path / "code_ran")
    _plant_checkpoint(planted, marker)
    argv = _args(str(tmp_path / "no_images"), str(tmp_path / "no_store.h5"), str(out), "--epochs", "1",
                 "--resume", "auto" if how == "auto" else str(planted))
    with pytest.raises(SystemExit, match=r"--resume .*planted|--resume .*checkpoint\.pth") as info:
        _run_main(argv)
    assert "refused" in str(info.value) and "could run code" in str(info.value)
    assert "GLOBAL posix.mkdir" in str(info.value), "the message names what the file wanted to run"
    assert not os.path.exists(marker), "loading the checkpoint ran its code"


def test_checkpoints_are_saved_durably(tmp_path, monkeypatch):
    import torch

    train = _train_module()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b))[1])
    path = str(tmp_path / "checkpoint.pth")
    train.save_checkpoint_file({"model": {"w": torch.zeros(2)}}, path)
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp", path), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.zeros(2))


class _Killed(BaseException):
    """The process dies here (nothing after it runs)."""


@pytest.fixture(scope="module")
def killed_after_the_last_batch(tmp_path_factory):
    """A 2-epoch run (3 batches an epoch, a checkpoint every 3 steps) killed while saving the
    end-of-epoch checkpoint of epoch 0: checkpoint.pth is the one taken after the epoch's last batch."""
    root = tmp_path_factory.mktemp("killed")
    image_root, store = make_square_set(str(root))
    out = str(root / "run")
    import torch

    save = torch.save

    def killed_at_the_end_of_the_epoch(state, path, *args, **kwargs):
        if isinstance(state, dict) and state.get("epoch_finished"):
            raise _Killed()
        return save(state, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(torch, "save", killed_at_the_end_of_the_epoch)
        with pytest.raises(_Killed):
            _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8",
                            "--checkpoint-every", "3", "--log-rows"))
    return image_root, store, out


def _copy_run(run, tmp_path):
    import shutil

    image_root, store, out = run
    copy = str(tmp_path / "run")
    shutil.copytree(out, copy)
    return image_root, store, copy


@pytest.mark.slow
def test_a_run_killed_after_the_last_batch_resumes_at_the_next_epoch(killed_after_the_last_batch, tmp_path):
    import torch

    from dali_relabel.config import DataConfig
    from dali_relabel.plan import EpochPlan

    image_root, store, out = _copy_run(killed_after_the_last_batch, tmp_path)
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert checkpoint["epoch"] == 0 and not checkpoint["epoch_finished"]
    assert (checkpoint["data"]["epoch"], checkpoint["data"]["batch"]) == (1, 0)
    _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "3",
                    "--log-rows", "--resume", "auto"))
    steps = _read_rows(out, 0)
    assert [(s["epoch"], s["step"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], \
        "epoch 0 was trained again"
    plan = EpochPlan(24, 8, seed=0, last_batch=DataConfig().last_batch)
    expected = plan.rows(1)[0].reshape(3, 8).tolist()
    assert [s["rows"] for s in steps[3:]] == expected, "the resumed epoch read other samples"
    final = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert final["epoch"] == 1 and final["epoch_finished"] and final["data"]["epoch"] == 2


@pytest.mark.slow
def test_resuming_inside_an_epoch_with_other_data_is_refused_unless_the_epoch_restarts(tmp_path):
    """Issue 23, defect 5: another image size, layout or targets kind inside an epoch is refused,
    naming it; --resume-restart-epoch (which the message names) trains the epoch from its start."""
    image_root, store = make_square_set(str(tmp_path))
    out = str(tmp_path / "run")
    _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8", "--stop-after-steps", "1"))
    for flags, named in ((["--image-size", "24"], "data.image_size: saved 32, now 24"),
                         (["--layout", "WH"], "data.layout: saved 'HW', now 'WH'")):
        with pytest.raises(SystemExit, match=rf"--resume .*cannot continue epoch 0 at batch 1 with other data "
                                             rf"settings \({named}\).*--resume-restart-epoch"):
            _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8", "--resume", "auto", *flags))
    result = _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8", "--resume", "auto",
                             "--image-size", "24", "--resume-restart-epoch"))
    assert result["images"] == 24, "the restarted epoch is whole"


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_one_with_another_batch_size(tmp_path):
    """Two gloo processes train 2 steps of batch 4 and stop (a time-limited job); one process with
    batch 6 resumes: over the epoch every image is trained on exactly once."""
    image_root, store = make_square_set(str(tmp_path), num_images=32)
    out = str(tmp_path / "run")
    common = ["--epochs", "1", "--log-rows", "--last-batch", "pad"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
               *_args(image_root, store, out, "--batch-size", "4", "--stop-after-steps", "2", *common)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun keeps its log folder there
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import torch

    data = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["data"]
    assert (data["epoch"], data["batch"], data["position"], data["world_size"]) == (0, 2, 16, 2)
    before = [row for rank in range(2) for step in _read_rows(out, rank) for row in step["rows"]]
    assert len(before) == 16
    result = _run_main(_args(image_root, store, out, "--batch-size", "6", "--resume", "auto", *common))
    after = [step["rows"] for step in _read_rows(out, 0)[2:]]
    assert [len(rows) for rows in after] == [6, 6, 4] and result["images"] == 16
    assert sorted(before + [row for rows in after for row in rows]) == list(range(32))


def _read_rows(out, rank):
    with open(os.path.join(out, f"rows_rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_process_gloo_run_shards_and_matches_a_single_process(tmp_path):
    image_root, store = make_square_set(str(tmp_path), num_images=32)
    deterministic = ["--scale", "1", "1", "--ratio", "1", "1", "--flip-probability", "0", "--epochs", "2",
                     "--log-rows", "--lr", "0.5"]
    ddp_out, single_out = str(tmp_path / "ddp"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun keeps its log folder there
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
               *_args(image_root, store, ddp_out, "--batch-size", "4", *deterministic)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _run_main(_args(image_root, store, single_out, "--batch-size", "8", *deterministic))

    ranks = [_read_rows(ddp_out, r) for r in range(2)]
    single = _read_rows(single_out, 0)
    for epoch in range(2):
        seen = [{row for step in rank if step["epoch"] == epoch for row in step["rows"]} for rank in ranks]
        assert not seen[0] & seen[1], "the ranks' shards overlap"
        assert seen[0] | seen[1] == set(range(32)), "an epoch missed samples"
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 8
    for a, b, s in zip(ranks[0], ranks[1], single):
        assert set(a["rows"]) | set(b["rows"]) == set(s["rows"]), "steps saw different samples"
        assert abs((a["loss"] + b["loss"]) / 2 - s["loss"]) < 1e-4 * max(1.0, abs(s["loss"]))


def test_data_flags_are_the_data_config_fields():
    """Every DataConfig field (but ``extra``) is a flag with the field's own default: none is
    declared twice."""
    import dataclasses

    from dali_relabel.config import DataConfig

    train = _train_module()
    parser = train.get_args_parser()
    defaults = vars(parser.parse_args([]))
    for field in dataclasses.fields(DataConfig):
        if field.name == "extra":
            continue
        assert "--" + field.name.replace("_", "-") in parser._option_string_actions, field.name
        assert defaults[field.name] == field.default, field.name
    assert train.data_config(parser.parse_args([])) == DataConfig()
    changed = train.data_config(parser.parse_args(["--scale", "0.3", "1", "--channels-last", "--cutmix-mode",
                                                   "localized", "--color-jitter", "0.4"]))
    assert changed == DataConfig(scale=(0.3, 1.0), channels_last=True, cutmix_mode="localized", color_jitter=0.4)


@pytest.mark.slow
def test_training_from_shards_resumes_per_rank(tmp_path):
    """--shards instead of --data/--store, --val-shards, and a resume from a mid-epoch checkpoint
    (the shard loader's DALI checkpoint travels in the checkpoint)."""
    from dali_relabel.shards import write_shards

    image_root, store = make_square_set(str(tmp_path))
    write_shards(image_root, store, tmp_path / "shards", shard_bytes=8000, progress=False)
    write_shards(image_root, None, tmp_path / "val", shard_bytes=8000, progress=False)
    out = str(tmp_path / "run")
    argv = _args("", "", out, "--epochs", "1", "--batch-size", "4", "--checkpoint-every", "2",
                 "--max-steps-per-epoch", "3", "--shards", str(tmp_path / "shards"), "--val-shards",
                 str(tmp_path / "val"))
    argv = [a for a in argv if a not in ("--data", "--store", "")]
    result = _run_main(argv)
    assert result["epoch"] == 0 and "val_top1" in result
    import torch

    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert checkpoint["data"]["epoch"] == 1 and "data_ranks" not in checkpoint
    result = _run_main(argv[:argv.index("--epochs") + 1] + ["2"] + argv[argv.index("--epochs") + 2:]
                       + ["--resume", "auto"])
    assert result["epoch"] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_node(port: int, argv, log_path):
    """One node: ``torchrun --nnodes=2 --nproc_per_node=1`` with c10d rendezvous on 127.0.0.1, exactly
    the README's multi-node command (gloo on the CPU), in its own process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=relabel-test",
               TRAIN, *argv]
    log = open(log_path, "ab")
    # A killed node cannot clean up: its torchrun log folders and control files go next to its log.
    scratch = os.path.join(os.path.dirname(str(log_path)), "scratch")
    os.makedirs(scratch, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=scratch, DALI_RELABEL_SHARED_DIR=scratch)
    return subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)


def _process_tree(pid: int) -> list:
    """``pid`` and its descendants (torchrun starts its workers in sessions of their own, so a process
    group is not a node: its rank and the rank's DALI workers are below it)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _signal_all(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_all(nodes, timeout: float):
    import signal
    import time

    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_all(_process_tree(node.pid), signal.SIGKILL)
            node.wait()
    return [node.returncode for node in nodes]


@pytest.mark.slow
def test_two_nodes_split_the_data_and_resume_after_losing_one(tmp_path):
    """Two torchrun launches (one process each) form a 2-node job; one node is killed in the middle of
    the run (its torchrun, its rank and the rank's workers), and both restarted with ``--resume auto``
    continue from the last checkpoint (saved every step) to the end: each rank exactly the batches of
    its own half of every epoch that the checkpoint had not covered yet."""
    import signal
    import time

    import torch

    from dali_relabel.config import DataConfig
    from dali_relabel.plan import EpochPlan

    image_root, store = make_square_set(str(tmp_path), num_images=32)
    out = str(tmp_path / "run")
    epochs, batches = 3, 4  # 32 images, 2 ranks, batch 4
    argv = _args(image_root, store, out, "--batch-size", "4", "--epochs", str(epochs), "--log-rows",
                 "--checkpoint-every", "1")
    logs = [str(tmp_path / f"node{n}.log") for n in range(2)]
    checkpoint = os.path.join(out, "checkpoint.pth")
    port = _free_port()

    def log_tails():
        return "\n".join(open(p, errors="replace").read()[-3000:] for p in logs)

    nodes = [_launch_node(port, argv, logs[n]) for n in range(2)]
    deadline = time.monotonic() + 300
    while not os.path.exists(checkpoint) and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
        time.sleep(0.005)
    # A step takes milliseconds here: freeze both nodes at the first checkpoint, then node 1 dies.
    trees = [_process_tree(node.pid) for node in nodes]
    for tree in trees:
        _signal_all(tree, signal.SIGSTOP)
    _signal_all(trees[1], signal.SIGKILL)
    _signal_all(trees[0], signal.SIGCONT)
    codes = _wait_all(nodes, timeout=120)
    data = torch.load(checkpoint, weights_only=True)["data"]
    killed_at = (data["epoch"], data["batch"])
    assert killed_at < (epochs - 1, 0) and codes[1] == -signal.SIGKILL, \
        f"the run was not killed in the middle (checkpoint at {killed_at}, exit codes {codes}):\n{log_tails()}"
    assert codes[0] != 0, "the surviving node should stop with its peer gone"
    epochs_before = [m["epoch"] for m in _metrics(out) if "train_loss" in m]
    lines_before = [len(_read_rows(out, r)) for r in range(2)]

    nodes = [_launch_node(port, argv + ["--resume", "auto"], logs[n]) for n in range(2)]
    codes = _wait_all(nodes, timeout=300)
    assert codes == [0, 0], log_tails()
    final = torch.load(checkpoint, weights_only=True)
    assert final["epoch"] == epochs - 1 and final["epoch_finished"] and final["data"]["epoch"] == epochs
    epochs_after = [m["epoch"] for m in _metrics(out) if "train_loss" in m][len(epochs_before):]
    assert epochs_after == list(range(killed_at[0], epochs)), "the resumed run did not go on from the checkpoint"
    epoch, batch = killed_at
    plans = [EpochPlan(32, 4, rank, 2, seed=0, last_batch=DataConfig().last_batch) for rank in range(2)]
    expected = [(epoch, b) for b in range(batch, batches)] + \
        [(e, b) for e in range(epoch + 1, epochs) for b in range(batches)]
    resumed = [_read_rows(out, rank)[lines_before[rank]:] for rank in range(2)]
    for rank in range(2):
        assert [(s["epoch"], s["rows"]) for s in resumed[rank]] == \
            [(e, plans[rank].rows(e)[0][b * 4:(b + 1) * 4].tolist()) for e, b in expected], \
            f"rank {rank} did not continue its part of the data at epoch {epoch}, batch {batch}"
    for e in range(epoch + 1, epochs):  # whole epochs after the restart: each node its own half
        seen = [{row for step in resumed[rank] if step["epoch"] == e for row in step["rows"]} for rank in range(2)]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(32)), f"epoch {e}: the nodes' parts"
