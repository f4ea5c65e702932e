"""The demo: the whole ReLabel data path on a generated multi-object image set, CPU is enough.

It generates the image set and its oracle label store, streams it through the DALI training
pipeline with the fused label-pooling operator for a few epochs, and reports throughput and how
often a random crop's soft target disagrees with the image's single label (the reason ReLabel
exists). It writes ``summary.json`` and a picture of one label map into the output folder.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from .config import DataConfig


def run_demo(out_dir: str = "demo_output", num_classes: int = 10, images_per_class: int = 24,
             epochs: int = 2, batch_size: int = 32, device: str = "auto", seed: int = 0) -> dict:
    """Run the demo; returns (and writes) its summary."""
    from tqdm import tqdm

    from .loader import ReLabelLoader
    from .store import LabelStore
    from .synthetic import generate_image_set, write_oracle_store

    os.makedirs(out_dir, exist_ok=True)
    image_root = os.path.join(out_dir, "images")
    store_path = os.path.join(out_dir, "oracle_store.h5")
    started = time.time()
    print(f"generating {num_classes * images_per_class} images with exact masks under {image_root}")
    images = generate_image_set(image_root, num_classes, images_per_class, seed=seed)
    write_oracle_store(store_path, images, num_classes)
    store = LabelStore(store_path)
    print(f"wrote the oracle store {store_path} ({os.path.getsize(store_path) / len(store):.0f} bytes/image)")

    picture = os.path.join(out_dir, "label_map.png")
    try:
        from .show import show_store_row

        show_store_row(store, 0, image_root, picture)
        print(f"drew row 0 with its label map: {picture}")
    except ImportError:
        picture = None

    config = DataConfig(image_size=96, py_num_workers=2, num_threads=2, seed=seed)
    loader = ReLabelLoader(image_root, store, batch_size=batch_size, config=config, device=device,
                           return_labels=True)
    disagree = total = 0
    confidence = []
    timings = []
    for epoch in range(epochs):
        tick, count = time.time(), 0
        for images_batch, targets, labels in tqdm(loader, desc=f"epoch {epoch}", leave=False):
            targets, labels = targets.float().cpu(), labels.cpu()
            disagree += int((targets.argmax(1) != labels).sum())
            total += len(labels)
            confidence.append(targets.max(1).values)
            count += len(labels)
        timings.append(count / (time.time() - tick))
    summary = {
        "device": loader.device, "images": len(store), "classes": num_classes, "epochs": epochs,
        "batch_size": batch_size, "images_per_second_by_epoch": [round(t, 1) for t in timings],
        "crops_whose_soft_target_disagrees_with_single_label": round(disagree / max(total, 1), 3),
        "mean_top_probability_of_soft_targets": round(float(torch.cat(confidence).mean()), 3),
        "label_map_picture": picture, "wall_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary
