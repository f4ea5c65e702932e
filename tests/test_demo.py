"""The demo runs end to end (tiny settings) and reports a complete table."""
import json
import os

import pytest

pytest.importorskip("nvidia.dali")


@pytest.mark.slow
def test_demo_runs_end_to_end_on_cpu(tmp_path):
    from dali_relabel.tools.demo import DemoSettings, run_demo

    settings = DemoSettings(classes=3, train_per_class=8, val_per_class=4, image_size=32, student_epochs=2,
                            teacher_epochs=1, teacher_per_class=8, teacher_size=32, grid=4, regions=3,
                            crops_per_image=2, batch_size=8, device="cpu", threads=1)
    results = run_demo(str(tmp_path), settings)
    assert [row["targets"] for row in results["students"]] == [
        "original single labels", "ReLabel, machine maps", "ReLabel, oracle maps", "region labels (FKD)",
        "region labels, 2 crops per decode"]
    assert [row["passes"] for row in results["students"]] == [2, 2, 2, 2, 1]
    for row in results["students"]:
        assert 0 <= row["top1"] <= 100 and 0 <= row["real"] <= 100 and row["train_images_per_second"] > 0
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["settings"]["classes"] == 3
    table = (tmp_path / "results.md").read_text()
    assert "| ReLabel, oracle maps |" in table and "| region labels (FKD) |" in table
    assert "2 crops per decoded image (1 pass, as many crops as 2 passes of one)" in table
    for name in ("machine", "oracle"):
        with open(tmp_path / f"label_map_{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from dali_relabel.store import LabelStore

    machine = LabelStore(os.path.join(tmp_path, "machine_store.h5"))
    assert machine.header.source == "generate" and len(machine) == 24 and machine.header.grid_h == 4
    from dali_relabel.store import RegionStore

    regions = RegionStore(os.path.join(tmp_path, "region_store.h5"))
    assert len(regions) == 24 and regions.regions == 3


def test_the_demo_loads_its_teacher_without_running_code_from_the_file(tmp_path):
    import torch

    from dali_relabel.tools.demo import load_trained_model
    from dali_relabel.training.models import WeightsError, create_model

    class Planted:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "code_ran"),))

    torch.manual_seed(0)
    teacher = create_model("small_resnet", 3)
    good = tmp_path / "checkpoint.pth"
    torch.save({"model": teacher.state_dict(), "args": {"model": "small_resnet"}, "epoch": 0,
                "data": {"epoch": 1, "batch": 0, "batch_size": 8}}, good)
    loaded = load_trained_model(str(good), "small_resnet", 3)
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    planted = tmp_path / "planted.pth"
    torch.save({"model": teacher.state_dict(), "args": Planted()}, planted)
    with pytest.raises(WeightsError, match=r"cannot be loaded as a weights-only checkpoint \(.*GLOBAL posix\.mkdir"):
        load_trained_model(str(planted), "small_resnet", 3)
    assert not os.path.exists(tmp_path / "code_ran")
