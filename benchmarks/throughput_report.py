"""Markdown table and PNG chart of a throughput result (:mod:`benchmarks.throughput`)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from .report import fmt, header_lines, pyplot, save_figure, warning_lines

COLOURS = {"plain": "#999999", "example": "#c7a252", "relabel": "#76b900", "authors": "#1f77b4",
           "reader": "#999999", "source": "#76b900", "plain-shards": "#999999", "shards": "#76b900",
           "relabel-k1": "#76b900", "relabel-k2": "#4f8a00", "relabel-k4": "#2c5200"}
RATIOS = (("relabel_over_plain", "relabel / plain (same decode path)"),
          ("relabel_over_example", "relabel / example graph"),
          ("relabel_over_authors", "relabel / authors' approach"),
          ("shards_over_plain_shards", "shards / plain on shards"),
          ("shards_graph_over_plain_shards_graph", "shard graph / plain shard graph (steady state)"))


def _group(run: dict, key: Optional[str]) -> dict:
    """The loaders of a run (``key`` None) or its ``"feed"`` / ``"shards"`` round."""
    return run if key is None else (run.get(key) or {})


def _names(result: dict, key: Optional[str]) -> List[str]:
    names: List[str] = []
    for run in result["runs"].values():
        names += [n for n in _group(run, key).get("contenders", {}) if n not in names]
    return names


def _cell(group: dict, name: str) -> str:
    entry = group.get("contenders", {}).get(name)
    if not entry:
        return "-"
    return f"{fmt(entry['median'], 0)} ({fmt(entry['min'], 0)}-{fmt(entry['max'], 0)})"


def _cpu_cell(group: dict, name: str) -> str:
    entry = group.get("contenders", {}).get(name, {}).get("cpu_ms_per_sample")
    return "-" if not entry else f"{entry['median']:.2f}"


def _cpu_us_cell(group: dict, name: str) -> str:
    entry = group.get("contenders", {}).get(name, {}).get("cpu_ms_per_sample")
    return "-" if not entry else f"{1e3 * entry['median']:.0f}"


def _table(result: dict, key: Optional[str], unit: str, cell=_cell, what: str = "median (min-max)") -> List[str]:
    batches = list(result["runs"])
    lines = [f"| contender ({unit}, {what}) | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for name in _names(result, key):
        groups = [_group(run, key) for run in result["runs"].values()]
        label = next(g["contenders"][name]["label"] for g in groups if name in g.get("contenders", {}))
        lines.append(f"| {label} | " + " | ".join(cell(g, name) for g in groups) + " |")
    return lines


def markdown(result: dict) -> str:
    a, d, runs = result["arguments"], result.get("data", {}), result["runs"]
    batches = list(runs)
    lines = header_lines(result, f"Throughput, {result['device']}")
    lines += [f"Settings: crop {a.get('image_size')}, DALI threads {a.get('threads')}, source workers "
              f"{a.get('workers')}, DataLoader workers {a.get('dataloader_workers')}, {a.get('repeats')} "
              f"alternating repeats; {d.get('num_images')} JPEGs (mean {d.get('mean_jpeg_bytes', 0) / 1000:.0f} KB, "
              f"about {d.get('mean_image_hw', [0, 0])[1]:.0f}x{d.get('mean_image_hw', [0, 0])[0]:.0f}), "
              f"{d.get('num_classes')} classes; feed only with {a.get('feed_threads')} DALI threads.", ""]
    if a.get("augment") or a.get("reprob"):
        lines += [f"Augmentation in every DALI contender: policy `{a.get('augment')}`, random erasing "
                  f"{a.get('reprob')} (dali-relabel: keyed draws, targets pooled through each sample's affine; "
                  "plain: the same graph on DALI's random operators, hard labels).", ""]
    if any(run.get("contenders") for run in runs.values()):
        lines += ["## Training loaders", ""] + _table(result, None, "images/s") + [""]
        lines += _table(result, None, "CPU ms per image", _cpu_cell, "median; all processes of the run") + [""]
    if any(run.get("shards") for run in runs.values()):
        lines += ["## Tar shards (the same images, `dali-relabel shard`)", ""] + _table(result, "shards", "images/s")
        lines += [""] + _table(result, "shards", "CPU ms per image", _cpu_cell, "median; all processes of the run")
        lines += [""]
        for b, run in runs.items():
            cost = (run.get("shards") or {}).get("epoch_end")
            if cost:
                lines.append(f"- B={b}: an epoch's end costs the shard loader {cost['seconds_per_epoch']:.2f} s "
                             f"(epochs of {cost['epoch_images_here']} images here); on ImageNet epochs of "
                             f"{cost['imagenet_rank_epoch_images']:,} images per rank that leaves shards / "
                             f"plain on shards at {cost['projected_shards_over_plain_shards_imagenet']:.3f}")
        lines += [""]
    if any(run.get("contenders") or run.get("shards") for run in runs.values()):
        lines += ["| ratio: of medians (of paired repeats) [of CPU time per image] | "
                  + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
        keys = [k for k, _ in RATIOS] + sorted({k for run in runs.values() for k in run["ratios"]
                                                if k.startswith("relabel_w")})
        labels = dict(RATIOS)
        for key in keys:
            cells = []
            for b in batches:
                value, paired = runs[b]["ratios"].get(key), runs[b].get("paired_ratios", {}).get(key)
                cpu = runs[b].get("cpu_time_ratios", {}).get(key)
                cells.append(fmt(value, 2) + (f" ({paired['median']:.2f})" if paired else "")
                             + (f" [{cpu:.2f}]" if cpu else ""))
            if any(runs[b]["ratios"].get(key) is not None for b in batches):
                text = labels.get(key, key.replace("_over_", " / ").replace("_w", " w"))
                lines.append(f"| {text} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(run.get("crops") for run in runs.values()):
        lines += ["## Several crops per decoded image (`DataConfig.crops_per_image`)", "",
                  "Every batch holds B crops: plain DALI decodes one window per crop; dali-relabel with k "
                  "crops per decode decodes B / k whole images and cuts k crops (each with its own window, "
                  "flip and soft target) from each.", ""]
        lines += _table(result, "crops", "crops/s") + [""]
        lines += _table(result, "crops", "CPU ms per crop", _cpu_cell, "median; all processes of the run") + [""]
        keys = sorted({k for run in runs.values() for k in (run.get("crops") or {}).get("ratios", {})},
                      key=lambda k: (not k.endswith("_over_plain"), k))
        if keys:
            lines += ["| ratio of crops/s: of medians (of paired repeats) [of CPU time per crop] | "
                      + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
            for key in keys:
                cells = []
                for b in batches:
                    crops = runs[b].get("crops") or {}
                    value, paired = crops.get("ratios", {}).get(key), crops.get("paired_ratios", {}).get(key)
                    cpu = crops.get("cpu_time_ratios", {}).get(key)
                    cells.append(fmt(value, 2) + (f" ({paired['median']:.2f})" if paired else "")
                                 + (f" [{cpu:.2f}]" if cpu else ""))
                mine, _, other = key.partition("_over_")
                text = (f"{_per_decode(mine)} / "
                        + ("plain, one crop per decode" if other == "plain" else _per_decode(other)))
                lines.append(f"| {text} | " + " | ".join(cells) + " |")
            lines.append("")
    if any(run.get("feed") for run in runs.values()):
        lines += [f"## Feed only (no decoding, {a.get('feed_threads')} DALI threads)", ""]
        lines += _table(result, "feed", "samples/s") + [""]
        lines += _table(result, "feed", "CPU µs per sample", _cpu_us_cell, "median; all processes of the run") + [""]
    workers = result.get("py_num_workers", {}).get("by_batch_size") or {}
    if workers:
        lines += ["## Source workers (`DataConfig.py_num_workers`)", "",
                  "| batch | group | median by workers | fastest | fastest / default |", "|---|---|---|---:|---:|"]
        for batch, row in workers.items():
            for group, entry in row.items():
                medians = ", ".join(f"{w}: {fmt(v, 0)}" for w, v in sorted(entry["median_by_workers"].items()))
                lines.append(f"| {batch} | {group} | {medians} | {entry['fastest']} | "
                             f"{entry['fastest_over_default']:.2f} |")
        lines.append("")
    targets = result.get("targets") or {}
    if targets:
        lines += ["## Targets", ""]
        for key, entry in targets.items():
            values = ", ".join(f"B={b}: {fmt(v, 2 if v < 100 else 0)}" for b, v in entry["by_batch_size"].items())
            what = {"relabel_over_plain": "relabel / plain >=", "shards_over_plain_shards": "shards / plain on shards >=",
                    "relabel_over_plain_small_epochs": "relabel / plain on small epochs (<= 4 batches) >=",
                    "crops_k4_over_plain": "crops/s of relabel with 4 crops per decode / plain (one per decode) >="
                    }.get(key, "our feed (samples/s) >=")
            lines.append(f"- {what} {fmt(entry['threshold'], 2 if entry['threshold'] < 100 else 0)} at every "
                         f"batch size: **{'met' if entry['met'] else 'MISSED'}** ({values})"
                         + (f"; paired ratios: {'met' if entry['met_paired'] else 'missed'} ("
                            + ", ".join(f"B={b}: {v:.2f}" for b, v in entry["paired_by_batch_size"].items()) + ")"
                            if "met_paired" in entry else "")
                         + (f"; CPU time per image: {'met' if entry['met_cpu_time'] else 'missed'} ("
                            + ", ".join(f"B={b}: {v:.2f}" for b, v in entry["cpu_time_by_batch_size"].items()) + ")"
                            if "met_cpu_time" in entry else ""))
        lines.append("")
    lines += warning_lines(result)
    return "\n".join(lines) + "\n"


def _per_decode(name: str) -> str:
    """``relabel_k4`` -> "relabel, 4 crops per decode"."""
    crops = name[len("relabel_k"):]
    return f"relabel, {crops} crop{'' if crops == '1' else 's'} per decode"


def _grouped_bars(ax, result: dict, key: Optional[str], ylabel: str) -> None:
    names = _names(result, key)
    batches = list(result["runs"])
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(names)
    x = np.arange(len(batches))
    for i, name in enumerate(names):
        groups = [_group(run, key) for run in result["runs"].values()]
        entries = [g.get("contenders", {}).get(name) for g in groups]
        med = [e["median"] if e else 0.0 for e in entries]
        err = [[e["median"] - e["min"] if e else 0 for e in entries], [e["max"] - e["median"] if e else 0 for e in entries]]
        base = name.split("-w")[0]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, med, width, yerr=err, capsize=3, label=name,
                      color=COLOURS.get(base, "#555555"), alpha=0.55 if "-w" in name else 1.0)
        for bar, value in zip(bars, med):
            if value > 0:
                ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value / 2), ha="center",
                            va="center", rotation=90, fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(x)
    ax.set_xticklabels([f"B={b}" for b in batches])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot(result: dict, path: str) -> None:
    """Loaders, ratios, feed and (when measured) tar shards and several crops per decode per batch
    size, a panel each."""
    plt = pyplot()
    runs = list(result["runs"].values())
    if not any(run.get("contenders") or run.get("feed") or run.get("shards") for run in runs):
        fig, (bars, ratios) = plt.subplots(1, 2, figsize=(12, 4.8))  # the crops round alone
        _grouped_bars(bars, result, "crops", "crops/s (median, bars: min-max)")
        bars.set_title(f"several crops per decode ({result['device']})")
        _crops_ratios(ratios, result)
        save_figure(fig, path)
        return
    extra = [(key, title, unit) for key, title, unit in (("shards", "tar shards", "images/s"),
                                                         ("crops", "crops per decode", "crops/s"))
             if any(run.get(key) for run in runs)]
    panels = 3 + len(extra)
    fig, axes = plt.subplots(1, panels, figsize=(16 + 5 * len(extra), 4.8))
    left, middle, right = axes[:3]
    _grouped_bars(left, result, None, "images/s (median, bars: min-max)")
    left.set_title(f"training loaders ({result['device']})")
    for ax, (key, title, unit) in zip(axes[3:], extra):
        _grouped_bars(ax, result, key, f"{unit} (median, bars: min-max)")
        ax.set_title(f"{title} ({result['device']})")
    batches = list(result["runs"])
    keys = [(k, t) for k, t in RATIOS if any(k in run["ratios"] for run in result["runs"].values())]
    x = np.arange(len(batches))
    for i, (key, text) in enumerate(keys):
        values = [result["runs"][b]["ratios"].get(key) or 0.0 for b in batches]
        bars = middle.bar(x + (i - (len(keys) - 1) / 2) * 0.8 / max(len(keys), 1), values,
                          0.8 / max(len(keys), 1), label=text)
        for bar, value in zip(bars, values):
            middle.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    target = (result.get("targets") or {}).get("relabel_over_plain", {}).get("threshold", 0.97)
    middle.axhline(target, color="red", linewidth=0.8, linestyle="--", label=f"target {target} x plain")
    middle.set_xticks(x)
    middle.set_xticklabels([f"B={b}" for b in batches])
    middle.set_ylabel("ratio of medians")
    middle.set_title("dali-relabel relative to ...")
    if keys:
        middle.legend(fontsize=7)
    _grouped_bars(right, result, "feed", "samples/s (median, bars: min-max)")
    feed_target = (result.get("targets") or {}).get("feed_source_samples_per_s", {}).get("threshold")
    if feed_target:
        right.axhline(feed_target, color="red", linewidth=0.8, linestyle="--")
    right.set_title(f"feed only, no decoding ({result['arguments'].get('feed_threads')} DALI threads)")
    save_figure(fig, path)


def _crops_ratios(ax, result: dict) -> None:
    """crops/s of dali-relabel with k crops per decode over plain's, per batch size, with the target."""
    batches = list(result["runs"])
    keys = sorted({k for run in result["runs"].values() for k in (run.get("crops") or {}).get("ratios", {})
                   if k.endswith("_over_plain")}, key=lambda k: int(k[len("relabel_k"):].split("_")[0]))
    x = np.arange(len(batches))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        values = [((result["runs"][b].get("crops") or {}).get("ratios", {}).get(key) or 0.0) for b in batches]
        bars = ax.bar(x + (i - (len(keys) - 1) / 2) * width, values, width, label=_per_decode(key.split("_over_")[0]))
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    target = (result.get("targets") or {}).get("crops_k4_over_plain", {}).get("threshold")
    if target:
        ax.axhline(target, color="red", linewidth=0.8, linestyle="--", label=f"target at k = 4: {target} x plain")
    ax.set_xticks(x)
    ax.set_xticklabels([f"B={b}" for b in batches])
    ax.set_ylabel("crops/s / plain's (one crop per decode)")
    ax.set_title("dali-relabel with k crops per decode relative to plain")
    if keys:
        ax.legend(fontsize=7)
