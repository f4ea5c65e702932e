"""The training script's output directory: one trainer at a time, a checkpoint saved completely or not
at all (the previous one kept), and a resume that does not fit refused before anything is written."""
import errno
import hashlib
import json
import os

import pytest

from dali_relabel.errors import DaliRelabelError
from test_train import _args, _run_main, _train_module, make_square_set

pytest.importorskip("nvidia.dali")


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-epoch run of ``tiny_cnn`` over 3 classes."""
    root = tmp_path_factory.mktemp("trained")
    image_root, store = make_square_set(str(root))
    out = str(root / "run")
    _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8"))
    return image_root, store, out


def _copy(run, tmp_path):
    import shutil

    image_root, store, out = run
    shutil.copytree(out, tmp_path / "run")
    return image_root, store, str(tmp_path / "run")


def _outputs(out):
    return {name: _digest(os.path.join(out, name)) for name in sorted(os.listdir(out))}


@pytest.mark.slow
def test_resuming_another_model_is_refused_before_anything_is_written(trained_run, tmp_path):
    image_root, store, out = _copy(trained_run, tmp_path)
    before = _outputs(out)
    checkpoint = os.path.join(out, "checkpoint.pth")
    with pytest.raises(DaliRelabelError) as info:
        _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--model", "small_resnet",
                        "--resume", checkpoint))
    message = str(info.value)
    assert checkpoint in message and "tiny_cnn" in message and "small_resnet" in message, message
    assert "3 classes" in message, message
    assert _outputs(out) == before, "the refused run changed the output directory (args.json?)"


@pytest.mark.slow
def test_resuming_with_another_number_of_classes_names_the_differing_tensors(trained_run, tmp_path):
    _, _, out = _copy(trained_run, tmp_path)
    image_root, store = make_square_set(str(tmp_path / "four"), num_classes=4)
    before = _outputs(out)
    with pytest.raises(DaliRelabelError, match=r"tiny_cnn \(3 classes\).*tiny_cnn \(4 classes\)") as info:
        _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--resume", "auto"))
    assert "[3, " in str(info.value) and "[4, " in str(info.value), "the message shows the head's shapes"
    assert _outputs(out) == before


@pytest.mark.slow
def test_the_command_line_prints_the_resume_refusal_without_a_traceback(trained_run, tmp_path, capsys):
    from dali_relabel.tools.cli import main

    image_root, store, out = _copy(trained_run, tmp_path)
    code = main(["train", *_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--model",
                                 "small_resnet", "--resume", "auto")])
    err = capsys.readouterr().err
    assert code == 2 and "dali-relabel train: " in err and "small_resnet" in err
    assert "Traceback" not in err


def _previous_checkpoint(train, path):
    import torch

    train.save_checkpoint_file({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    return _digest(path)


def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error(tmp_path):
    """The real torch.save on a full device (``.tmp`` is /dev/full): before, a raw ``RuntimeError:
    [enforce fail at inline_container.cc:672]`` and the ``.tmp`` left behind."""
    import torch

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    train = _train_module()
    path = str(tmp_path / "checkpoint.pth")
    kept = _previous_checkpoint(train, path)
    os.symlink("/dev/full", path + ".tmp")  # every write there fails with ENOSPC
    with pytest.raises(DaliRelabelError) as info:
        train.save_checkpoint_file({"model": {"w": torch.zeros(100_000)}, "epoch": 2}, path)
    message = str(info.value)
    assert path in message and "no space left on device" in message.lower(), message
    assert "enforce fail" not in message
    assert not os.path.lexists(path + ".tmp"), "the partial file was left behind"
    assert _digest(path) == kept and torch.load(path, weights_only=True)["epoch"] == 1


def test_a_save_that_fails_part_way_removes_its_partial_file(tmp_path, monkeypatch):
    import torch

    train = _train_module()
    path = str(tmp_path / "checkpoint.pth")
    kept = _previous_checkpoint(train, path)

    def full_after_a_few_bytes(state, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_after_a_few_bytes)
    with pytest.raises(DaliRelabelError, match="No space left on device") as info:
        train.save_checkpoint_file({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    assert _digest(path) == kept


def test_a_second_trainer_on_the_same_output_directory_is_refused(tmp_path):
    from dali_relabel.outputs import OutputBusyError

    train = _train_module()
    out = str(tmp_path / "run")
    os.makedirs(out)
    with train.output_lock(out):  # the first trainer (this process stands in for it)
        argv = _args(str(tmp_path / "images"), str(tmp_path / "store.h5"), out, "--epochs", "1")
        with pytest.raises(OutputBusyError) as info:
            _run_main(argv)
        assert os.listdir(out) == ["train.lock"], "the refused trainer wrote into the directory"
    message = str(info.value)
    assert out in message and f"process {os.getpid()}" in message, message


@pytest.mark.slow
def test_the_output_lock_is_let_go_when_a_run_ends(trained_run, tmp_path):
    train = _train_module()
    _, _, out = trained_run
    assert not any(name.endswith(".lock") for name in os.listdir(out))
    with train.output_lock(out):  # taken at once: nobody holds it
        pass
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["model"] == "tiny_cnn"
