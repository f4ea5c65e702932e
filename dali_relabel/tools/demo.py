"""The demo: ReLabel end to end on a generated multi-object image set; two CPU cores are enough.

1. Generate a training and a validation set of multi-object images with exact masks (the single
   label is the largest object; the validation set's multi-labels are all visible objects), and the
   training set's **oracle** label store (per cell, the classes by visible area).
2. Train a teacher on the single labels of a larger, separate image set (the paper's teacher saw
   far more data than ImageNet, and a teacher no better than the student only adds noise), then make
   **machine** label maps of the training set with it (``dali-relabel generate``: its classifier
   applied at every location of the last feature map).
3. Make **region labels** with the same teacher (``dali-relabel generate --regions``: FKD's stored
   crops, the teacher's top-k for each).
4. Train the same student four ways with the DALI pipeline: original single labels, ReLabel with
   the machine maps, ReLabel with the oracle maps, the region labels; evaluate top-1 (single labels)
   and multi-label (ReaL-style) accuracy on the validation set. Then once more on the region labels
   with ``crops_per_image`` crops per decoded image, for as many crops in all (FKD's recipe: each
   pass counts as that many epochs), to show what several crops per decode do to wall time and
   accuracy.

Everything lands in the output folder: the sets, stores, runs, ``results.json``, ``results.md`` (the
table) and pictures of one image's machine and oracle maps.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    classes: int = 10
    train_per_class: int = 60
    val_per_class: int = 20
    image_size: int = 64
    student: str = "small_resnet"
    student_epochs: int = 12
    teacher: str = "medium_resnet"
    teacher_per_class: int = 180
    teacher_epochs: int = 8
    teacher_size: int = 64
    grid: int = 8
    regions: int = 32  # stored crops per image of the region labels
    crops_per_image: int = 4  # crops per decoded image of the last run (must divide batch_size and student_epochs)
    batch_size: int = 32
    lr: float = 0.4
    device: str = "auto"
    seed: int = 0
    workers: int = 0  # DataConfig.py_num_workers: 0 runs the batch source in this process
    threads: int = 2


def _train(out_dir: str, settings: DemoSettings, train_root: str, val_root: str, real: str, model: str,
           epochs: int, image_size: int, store: str = None, scale=(0.08, 1.0), crops_per_image: int = 1) -> Dict:
    """One training run; with ``crops_per_image`` k a pass holds k crops of every image, so the
    warm-up is 1/k of a pass: the same number of steps as one epoch of one crop."""
    from ..config import DataConfig
    from ..pipelines.train import train

    config = DataConfig(image_size=image_size, val_resize=image_size, scale=tuple(scale),
                        py_num_workers=settings.workers, num_threads=settings.threads, seed=settings.seed,
                        crops_per_image=crops_per_image)
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        os.remove(os.path.join(out_dir, "metrics.jsonl"))
    started = time.time()
    result = train(config, data=train_root, store=store, targets="relabel" if store else "original",
                   val=val_root, real=real, model=model, epochs=epochs, batch_size=settings.batch_size,
                   lr=settings.lr, warmup_epochs=1.0 / crops_per_image, weight_decay=5e-4, device=settings.device,
                   output_dir=out_dir, print_freq=0)
    result["wall_seconds"] = time.time() - started
    return result


def load_trained_model(checkpoint: str, name: str, num_classes: int):
    """The model ``name`` with the weights of a training checkpoint, loaded without running code from
    the file (:func:`~dali_relabel.training.models.load_weights`: ``weights_only=True``)."""
    from ..training.models import create_model, load_weights

    model = create_model(name, num_classes)
    model.load_state_dict(load_weights(checkpoint)[0])
    return model


def run_demo(out_dir: str = "demo_output", settings: DemoSettings = None) -> Dict:
    """Run the demo; returns its results and writes them under ``out_dir``."""
    from .generate import generate_label_maps
    from .generate_regions import generate_region_labels
    from .show import MissingPlotting, show_store_row
    from ..store import LabelStore
    from .synthetic import generate_image_set, write_oracle_store, write_real_labels

    settings = settings or DemoSettings()
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    train_root, val_root = os.path.join(out_dir, "train"), os.path.join(out_dir, "val")
    teacher_root = os.path.join(out_dir, "teacher_train")
    oracle, machine = os.path.join(out_dir, "oracle_store.h5"), os.path.join(out_dir, "machine_store.h5")
    regions = os.path.join(out_dir, "region_store.h5")
    if settings.student_epochs % settings.crops_per_image or settings.batch_size % settings.crops_per_image:
        raise ValueError(f"crops_per_image={settings.crops_per_image} must divide student_epochs="
                         f"{settings.student_epochs} and batch_size={settings.batch_size}")
    real = os.path.join(out_dir, "val_real.json")

    print(f"[1/5] generating {settings.classes * settings.train_per_class} training, "
          f"{settings.classes * settings.val_per_class} validation and "
          f"{settings.classes * settings.teacher_per_class} teacher images with masks", flush=True)
    train_images = generate_image_set(train_root, settings.classes, settings.train_per_class, seed=settings.seed)
    val_images = generate_image_set(val_root, settings.classes, settings.val_per_class, seed=settings.seed + 1)
    generate_image_set(teacher_root, settings.classes, settings.teacher_per_class, seed=settings.seed + 2)
    write_oracle_store(oracle, train_images, settings.classes, grid=settings.grid)
    write_real_labels(real, val_images)

    print(f"[2/5] training the teacher ({settings.teacher}, {settings.teacher_epochs} epochs)", flush=True)
    teacher_run = os.path.join(out_dir, "runs", "teacher")
    teacher_result = _train(teacher_run, settings, teacher_root, val_root, real, settings.teacher,
                            settings.teacher_epochs, settings.teacher_size, scale=(0.35, 1.0))
    teacher = load_trained_model(os.path.join(teacher_run, "checkpoint.pth"), settings.teacher, settings.classes)
    print("[3/5] generating the machine label maps with the teacher", flush=True)
    generate_label_maps(train_root, machine, teacher, size=settings.teacher_size, grid=settings.grid,
                        k=min(5, settings.classes),
                        batch_size=settings.batch_size, device=settings.device,
                        teacher_name=f"demo {settings.teacher}", restart=True)
    print(f"[4/5] generating region labels with the teacher ({settings.regions} crops per image)", flush=True)
    generate_region_labels(train_root, regions, teacher, regions=settings.regions, size=settings.teacher_size,
                           k=min(5, settings.classes), seed=settings.seed, device=settings.device,
                           teacher_name=f"demo {settings.teacher}", restart=True)
    pictures = {}
    try:
        for name, path in (("machine", machine), ("oracle", oracle)):
            pictures[name] = show_store_row(LabelStore(path), 0, train_root,
                                            os.path.join(out_dir, f"label_map_{name}.png"))
    except MissingPlotting as error:
        print(f"no pictures of the maps: {error}", flush=True)

    rows: List[Dict] = []
    k = settings.crops_per_image
    runs = [("original single labels", "original", None, 1), ("ReLabel, machine maps", "relabel_machine", machine, 1),
            ("ReLabel, oracle maps", "relabel_oracle", oracle, 1), ("region labels (FKD)", "regions", regions, 1),
            (f"region labels, {k} crops per decode", f"regions_k{k}", regions, k)]
    for name, folder, store, crops in runs:
        epochs = settings.student_epochs // crops  # as many crops in all
        print(f"[5/5] training the student with {name} ({epochs} passes)", flush=True)
        result = _train(os.path.join(out_dir, "runs", folder), settings, train_root, val_root, real,
                        settings.student, epochs, settings.image_size, store=store, crops_per_image=crops)
        rows.append({"targets": name, "top1": result.get("val_top1"), "real": result.get("val_real"),
                     "train_images_per_second": result["images_per_second"], "crops_per_image": crops,
                     "passes": epochs, "wall_seconds": round(result["wall_seconds"], 1)})
    results = {"settings": asdict(settings), "teacher": {"top1": teacher_result.get("val_top1"),
                                                         "real": teacher_result.get("val_real")},
               "students": rows, "pictures": pictures, "wall_seconds": round(time.time() - started, 1)}
    table = format_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return results


def format_table(results: Dict) -> str:
    """The paper-style table of a demo run (markdown)."""
    s = results["settings"]
    lines = [f"Student {s['student']} at {s['image_size']} px, {s['student_epochs']} epochs, "
             f"{s['classes']} classes, {s['classes'] * s['train_per_class']} training / "
             f"{s['classes'] * s['val_per_class']} validation images; teacher {s['teacher']} trained on "
             f"{s['classes'] * s['teacher_per_class']} other images: top-1 {results['teacher']['top1']:.1f}%, "
             f"ReaL {results['teacher']['real']:.1f}%.", "",
             "| training targets | top-1 (single label) | ReaL-style multi-label | train img/s |",
             "|---|---:|---:|---:|"]
    for row in results["students"]:
        lines.append(f"| {row['targets']} | {row['top1']:.1f} | {row['real']:.1f} | "
                     f"{row['train_images_per_second']:.0f} |")
    one, several = results["students"][-2], results["students"][-1]
    if several.get("crops_per_image", 1) > 1:
        def passes(n):
            return f"{n} pass" + ("" if n == 1 else "es")

        lines += ["", f"{several['crops_per_image']} crops per decoded image ({passes(several['passes'])}, as many "
                      f"crops as {passes(one['passes'])} of one): {several['train_images_per_second']:.0f} "
                      f"against {one['train_images_per_second']:.0f} training crops/s ({several['wall_seconds']:.0f} s "
                      f"against {one['wall_seconds']:.0f} s in all, an evaluation after every pass), top-1 "
                      f"{several['top1']:.1f} against {one['top1']:.1f}."]
    lines.append("")
    lines.append(f"Wall time {results['wall_seconds']:.0f} s.")
    return "\n".join(lines)
