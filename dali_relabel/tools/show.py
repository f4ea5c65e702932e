"""Draw an image with its ReLabel label map over it, as in the ReLabel paper's figures.

A label map is ``logits [k, H, W]`` and ``class_ids [k, H, W]``: the top-k classes of every grid
cell and their teacher logits (see ``docs/store_format.md``). The picture shows, per cell, the top-1
class as a colour (one colour per class) whose opacity follows that class's probability, the cell
grid, a short class name in each cell (when cells are large enough), and a side panel listing the
classes that carry the most probability mass over the whole map.

The store's ``layout`` says which way the map lies on the image:

* ``"HW"``: map axis 1 runs along the image height, so cell ``(i, j)`` covers image row band ``i``
  and column band ``j``;
* ``"WH"`` (the ReLabel authors' convention): map axis 1 runs along the image width, so cell
  ``(i, j)`` covers image column band ``i`` and row band ``j``; the map is transposed before drawing.

``render_label_map(..., both_layouts=True)`` draws both readings side by side, so one can see which
convention fits the image. Drawing uses matplotlib's Agg canvas directly (no pyplot, no display).
"""
from __future__ import annotations

import colorsys
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import LAYOUTS
from ..errors import DaliRelabelError

MAX_LABELLED_GRID = 20   # no per-cell text on grids larger than this (cells too small to read)
MIN_CELL_FONT_PT = 4.5   # nor when the text would have to be smaller than this
CELL_LABEL_CHARS = 10    # per-cell class names are cut to this many characters
LEGEND_LABEL_CHARS = 30  # side-panel class names are cut to this many characters
MAX_ALPHA = 0.45         # overlay opacity of a cell whose top-1 probability is 1
SAVE_DPI = 120

# Well separated colours first (matplotlib's tab10, then strong extras); classes beyond the
# palette get golden-ratio hues.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#ffd700", "#00ff7f", "#000080", "#ff1493", "#808000", "#00bfff",
    "#8b0000", "#7fffd4", "#ff00ff", "#4b0082",
]


NO_CLASS = -1


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'HW' or 'WH', got {layout!r}")
    return layout


def _check_map(logits, class_ids) -> Tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float32)
    class_ids = np.asarray(class_ids)
    if logits.ndim != 3 or logits.shape != class_ids.shape:
        raise ValueError(f"expected logits and class_ids of the same shape [k, H, W], got "
                         f"{logits.shape} and {class_ids.shape}")
    if logits.shape[0] < 1:
        raise ValueError("a label map needs k >= 1 labels per cell")
    return logits, class_ids.astype(np.int64)


def _cell_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (the k labels of each cell), in float32."""
    shifted = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=0, keepdims=True)


def cell_grid(class_ids, logits, layout: str = "HW") -> Tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its probability of every cell, in image orientation.

    Args:
        class_ids: ``[k, a, b]`` class of each stored logit.
        logits: ``[k, a, b]`` the cells' top-k logits.
        layout: ``"HW"`` (map axis 1 along the image height) or ``"WH"`` (map axis 1 along the image
            width; the result is transposed).

    Returns:
        ``(top_class, top_prob)``, both ``[gh, gw]`` with ``gh`` cells along the image height and
        ``gw`` along its width: ``top_class`` (int64) is the class with the largest logit of the
        cell, ``top_prob`` (float32) its softmax probability over **that cell's k logits only**;
        the classes outside the stored top-k are ignored, so the value overstates the teacher's
        full-softmax probability. Cells whose k logits are all equal get class ``NO_CLASS`` (-1)
        and probability 0.
    """
    _check_layout(layout)
    logits, class_ids = _check_map(logits, class_ids)
    best = logits.argmax(axis=0)  # [a, b]
    top_class = np.take_along_axis(class_ids, best[None], axis=0)[0]
    top_prob = _cell_softmax(logits).max(axis=0).astype(np.float32)
    # A cell whose k logits are all equal names no class (e.g. pure background in an oracle map).
    if logits.shape[0] > 1:
        undecided = logits.max(axis=0) == logits.min(axis=0)
        top_class = np.where(undecided, NO_CLASS, top_class)
        top_prob = np.where(undecided, 0.0, top_prob).astype(np.float32)
    if layout == "WH":
        top_class, top_prob = top_class.T, top_prob.T
    return np.ascontiguousarray(top_class), np.ascontiguousarray(top_prob)


def class_mass(class_ids, logits) -> Tuple[np.ndarray, np.ndarray]:
    """Classes of a map ordered by total probability mass.

    Every cell's k logits are turned into probabilities (softmax over the cell's k labels) and summed
    per class over all cells. Returns ``(classes, mass)``, most massive first, where ``mass`` is the
    fraction of the map's total (it sums to 1 over the returned classes).
    """
    logits, class_ids = _check_map(logits, class_ids)
    probs = _cell_softmax(logits)
    classes, inverse = np.unique(class_ids.ravel(), return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=probs.ravel().astype(np.float64),
                       minlength=len(classes))
    mass /= max(1, logits.shape[1] * logits.shape[2])
    order = np.argsort(-mass, kind="stable")
    return classes[order], mass[order]


def _class_colour(rank: int, class_id: int) -> Tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    if rank < len(_PALETTE):
        return to_rgb(_PALETTE[rank])
    hue = (class_id * 0.61803398875) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85, 0.9)


def _assign_colours(classes_by_mass: np.ndarray, wanted: Sequence[int]) -> Dict[int, tuple]:
    """One colour per class in ``wanted``; the palette goes to the most massive classes first."""
    wanted = set(int(c) for c in wanted)
    colours = {}
    for c in classes_by_mass:
        c = int(c)
        if c in wanted:
            colours[c] = _class_colour(len(colours), c)
    for c in sorted(wanted - set(colours)):
        colours[c] = _class_colour(len(_PALETTE) + len(colours), c)
    return colours


def _name(class_names: Optional[Sequence[str]], class_id: int) -> str:
    if class_names is not None and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return str(class_id)


def _short(name: str, limit: int) -> str:
    """First comma-separated part of a name (ImageNet style 'tench, Tinca tinca'), cut to ``limit``."""
    name = name.split(",")[0].strip() or name.strip()
    return name if len(name) <= limit else name[:limit - 1] + "\u2026"


def _two_lines(name: str, limit: int) -> List[str]:
    """``name`` on at most two lines, broken at the space that best balances them, each cut to
    ``limit`` characters; a name without spaces stays on one line."""
    words = name.split()
    if len(words) < 2:
        return [_short(name, limit)]
    best = min(range(1, len(words)),
               key=lambda n: max(len(" ".join(words[:n])), len(" ".join(words[n:]))))
    return [_short(" ".join(words[:best]), limit), _short(" ".join(words[best:]), limit)]


def _fit_cell_labels(names: Dict[int, str], cell_w_pt: float, cell_h_pt: float):
    """Per-cell texts and the font size that fits them into a cell.

    Tries each name on one line (first comma-separated part, cut to ``CELL_LABEL_CHARS``) and broken
    into two lines at a space; keeps whichever allows the larger font. Returns ``(texts, font_pt)``.
    """
    def font_for(lines_of):
        longest = max(len(line) for lines in lines_of.values() for line in lines)
        rows = max(len(lines) for lines in lines_of.values())
        # DejaVu Sans averages about 0.6 em per character; lines are about 1.15 em apart.
        by_width = 0.9 * cell_w_pt / (0.6 * max(1, longest))
        by_height = 0.8 * cell_h_pt / (1.15 * rows)
        return min(10.0, by_width, by_height)

    first_parts = {c: (n.split(",")[0].strip() or n.strip()) for c, n in names.items()}
    one = {c: [_short(n, CELL_LABEL_CHARS)] for c, n in first_parts.items()}
    two = {c: _two_lines(n, CELL_LABEL_CHARS) for c, n in first_parts.items()}
    font_one, font_two = font_for(one), font_for(two)
    shown_one = sum(len("".join(v).rstrip("\u2026")) for v in one.values())
    shown_two = sum(len("".join(v).rstrip("\u2026")) for v in two.values())
    # Two lines if that allows a larger font, or about the same font and less of the names cut.
    if font_two > font_one + 0.25 or (font_two >= font_one - 0.25 and shown_two > shown_one):
        chosen, font = two, font_two
    else:
        chosen, font = one, font_one
    return {c: "\n".join(lines) for c, lines in chosen.items()}, font


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def _panel_title(panel_layout: str, store_layout: str, both: bool) -> str:
    if panel_layout == "HW":
        text = "layout HW: map axis 1 = image rows"
    else:
        text = "layout WH (transposed): map axis 1 = image columns"
    if both and panel_layout == store_layout:
        text += "\n[the store's layout]"
    elif both:
        text += "\n[alternative reading]"
    return text


def _draw_panel(ax, image, top_class, top_prob, colours, class_names, panel_size_in, title):
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection

    height, width = image.shape[:2]
    gh, gw = top_class.shape
    ax.imshow(image, extent=(0, width, height, 0), interpolation="bilinear")
    overlay = np.zeros((gh, gw, 4), dtype=np.float32)
    for c, rgb in colours.items():
        overlay[top_class == c, :3] = rgb
    overlay[..., 3] = MAX_ALPHA * np.clip(top_prob, 0.0, 1.0)
    ax.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")

    ys = np.linspace(0, height, gh + 1)
    xs = np.linspace(0, width, gw + 1)
    segments = [[(0, y), (width, y)] for y in ys] + [[(x, 0), (x, height)] for x in xs]
    line_width = 0.8 if max(gh, gw) <= MAX_LABELLED_GRID else 0.4
    ax.add_collection(LineCollection(segments, colors="white", linewidths=line_width, alpha=0.7))
    # Darker lines where neighbouring cells have different top-1 classes: the regions' outlines.
    cell_h, cell_w = height / gh, width / gw
    edges = [[(j * cell_w, (i + 1) * cell_h), ((j + 1) * cell_w, (i + 1) * cell_h)]
             for i, j in zip(*np.nonzero(top_class[:-1] != top_class[1:]))]
    edges += [[((j + 1) * cell_w, i * cell_h), ((j + 1) * cell_w, (i + 1) * cell_h)]
              for i, j in zip(*np.nonzero(top_class[:, :-1] != top_class[:, 1:]))]
    if edges:
        ax.add_collection(LineCollection(edges, colors="black", linewidths=2 * line_width + 0.4,
                                         alpha=0.85))

    # Per-cell names, sized to fit the cell; left out when the cells are too small to read.
    if max(gh, gw) <= MAX_LABELLED_GRID:
        names = {int(c): _name(class_names, int(c)) for c in np.unique(top_class) if c != NO_CLASS}
        labels, font_pt = _fit_cell_labels(names, panel_size_in[0] * 72.0 / gw,
                                           panel_size_in[1] * 72.0 / gh)
        if font_pt >= MIN_CELL_FONT_PT:
            stroke = [patheffects.withStroke(linewidth=max(1.5, font_pt / 3.5), foreground="white")]
            for i in range(gh):
                for j in range(gw):
                    if top_class[i, j] == NO_CLASS:
                        continue
                    ax.text((j + 0.5) * width / gw, (i + 0.5) * height / gh,
                            labels[int(top_class[i, j])], ha="center", va="center",
                            fontsize=font_pt, color="black", path_effects=stroke, clip_on=True,
                            linespacing=1.0)

    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


LEGEND_HEADER_IN, LEGEND_ROW_IN, LEGEND_NOTE_IN = 0.4, 0.45, 0.7


def _legend_height_in(rows: int) -> float:
    """Height (inches) the side panel needs for ``rows`` classes."""
    return LEGEND_HEADER_IN + rows * LEGEND_ROW_IN + LEGEND_NOTE_IN


def _draw_legend(ax, size_in, classes, mass, top_counts, colours, class_names, n_cells, k):
    """Side panel: swatch, mass share, name and top-1 cell count of ``classes``, laid out in inches."""
    from matplotlib.patches import Rectangle

    width_in, height_in = size_in
    ax.set_axis_off()
    ax.set_xlim(0, width_in)
    ax.set_ylim(0, height_in)  # data units are inches from the panel's bottom-left corner
    ax.text(0.0, height_in, f"top {len(classes)} classes by mass", fontsize=10, fontweight="bold",
            va="top", ha="left")
    y = height_in - LEGEND_HEADER_IN - 0.5 * LEGEND_ROW_IN
    for c, m in zip(classes, mass):
        c = int(c)
        ax.add_patch(Rectangle((0.0, y - 0.13), 0.24, 0.26, facecolor=colours[c],
                               edgecolor="black", linewidth=0.5))
        name = _short(_name(class_names, c), LEGEND_LABEL_CHARS)
        ax.text(0.34, y + 0.01, f"{100.0 * m:4.1f}%  {name}", fontsize=9, va="bottom", ha="left")
        ax.text(0.34, y - 0.01, f"id {c}, top-1 in {top_counts.get(c, 0)}/{n_cells} cells",
                fontsize=7.5, color="0.35", va="top", ha="left")
        y -= LEGEND_ROW_IN
    note = ("mass: softmax over each cell's top-%d\nlogits, summed over cells.\n"
            "colour: top-1 class of the cell;\nopacity: its probability." % k)
    ax.text(0.0, 0.0, note, fontsize=7.5, color="0.3", va="bottom", ha="left")


class MissingPlotting(DaliRelabelError, ImportError):
    """Pictures need matplotlib, an optional dependency."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotting` saying how to install matplotlib, if it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingPlotting("drawing label maps needs matplotlib: pip install 'dali-relabel[plot]' "
                              "(or pip install matplotlib)") from None


def render_label_map(image, logits, class_ids, class_names=None, layout: str = "HW",
                     out_path=None, title: Optional[str] = None, top: int = 5,
                     both_layouts: bool = False):
    """Draw ``image`` with its label map over it; return the matplotlib ``Figure``.

    Args:
        image: ``H x W x 3`` uint8 array (grey ``H x W`` and RGBA are accepted too).
        logits: ``[k, a, b]`` top-k logits of every cell (float16 or float32).
        class_ids: ``[k, a, b]`` the class of each logit.
        class_names: names in class-id order (ids without a name are shown as numbers).
        layout: ``"HW"`` or ``"WH"``, how the map lies on the image (see the module docstring).
        out_path: if given, the figure is saved there as PNG (parent folders are created).
        title: a title over the whole figure.
        top: how many classes the side panel lists, by total softmax mass; ``0`` drops the panel.
        both_layouts: draw two panels side by side, the map read as ``"HW"`` and as ``"WH"``, so one
            can see which convention fits the image; ``layout`` then only marks the store's one.

    Each cell gets the colour of its top-1 class with an opacity proportional to that class's
    probability (softmax over the cell's k logits), the cell grid, and, for grids up to 20 cells a
    side and cells large enough for legible text, the class name cut to 10 characters.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_layout(layout)
    image = _as_rgb(image)
    logits, class_ids = _check_map(logits, class_ids)
    k = logits.shape[0]
    panel_layouts = list(LAYOUTS) if both_layouts else [layout]
    grids = {pl: cell_grid(class_ids, logits, pl) for pl in panel_layouts}

    classes, mass = class_mass(class_ids, logits)
    top = max(0, int(top))
    legend_classes, legend_mass = classes[:top], mass[:top]
    top1_map = grids[panel_layouts[0]][0]
    ids, counts = np.unique(top1_map, return_counts=True)
    top_counts = {int(c): int(n) for c, n in zip(ids, counts)}
    colours = _assign_colours(classes, list(top_counts) + [int(c) for c in legend_classes])

    # Panel size grows with the grid so that per-cell names stay legible.
    height, width = image.shape[:2]
    grid_side = max(logits.shape[1], logits.shape[2])
    side_in = float(np.clip(0.5 * grid_side + 1.0, 5.0, 9.0))
    scale = side_in / max(height, width)
    panel_w_in, panel_h_in = width * scale, height * scale
    legend_w_in = 3.0 if top > 0 else 0.0
    n_panels = len(panel_layouts)
    gap_in, margin_in = 0.3, 0.2
    titles = {pl: _panel_title(pl, layout, both_layouts) for pl in panel_layouts}
    # Room above the panels: the figure title's lines, then the panel titles' lines (in inches).
    title_in = 0.2 * (title.count("\n") + 1) + 0.1 if title else 0.0
    panel_title_in = 0.19 * max(t.count("\n") + 1 for t in titles.values()) + 0.1
    fig_w = margin_in + n_panels * panel_w_in + (n_panels - 1) * gap_in + gap_in + legend_w_in
    # The panels (with their titles) and the side panel share the body; the taller sets its height.
    legend_h_in = _legend_height_in(len(legend_classes)) if top > 0 else 0.0
    body_in = max(panel_h_in + panel_title_in, legend_h_in)
    fig_h = margin_in + body_in + title_in + 0.1
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)

    panel_bottom = (margin_in + body_in - panel_title_in - panel_h_in) / fig_h
    for p, pl in enumerate(panel_layouts):
        ax = fig.add_axes([(margin_in + p * (panel_w_in + gap_in)) / fig_w, panel_bottom,
                           panel_w_in / fig_w, panel_h_in / fig_h])
        top_class, top_prob = grids[pl]
        _draw_panel(ax, image, top_class, top_prob, colours, class_names, (panel_w_in, panel_h_in),
                    titles[pl])
    if top > 0:
        legend_left = margin_in + n_panels * (panel_w_in + gap_in)
        legend_size = (legend_w_in - 0.1, body_in - 0.1)
        lax = fig.add_axes([legend_left / fig_w, margin_in / fig_h,
                            legend_size[0] / fig_w, legend_size[1] / fig_h])
        _draw_legend(lax, legend_size, legend_classes, legend_mass, top_counts, colours,
                     class_names, top1_map.size, k)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.1 / fig_h, va="top")

    if out_path is not None:
        out_path = os.fspath(out_path)
        parent = os.path.dirname(out_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(out_path, dpi=SAVE_DPI, format="png")
    return fig


def show_store_row(store, index: int, image_root, out_path, layout: Optional[str] = None,
                   both_layouts: bool = False, top: int = 5) -> str:
    """Render row ``index`` of a label store over its image and save it as PNG; return ``out_path``.

    Args:
        store: a :class:`~dali_relabel.store.LabelStore` (or the path of one, opened and closed here).
        index: the row.
        image_root: folder the store's relative image paths start from.
        out_path: the PNG to write.
        layout: ``"HW"`` or ``"WH"``; ``None`` uses the store's layout.
        both_layouts: draw the map read both ways side by side.
        top: how many classes the side panel lists.

    Raises:
        IndexError: ``index`` is not a row of the store.
        FileNotFoundError: the row's image is not under ``image_root``.
    """
    from PIL import Image

    from ..store import LabelStore

    if isinstance(store, (str, os.PathLike)):
        with LabelStore(store) as opened:
            return show_store_row(opened, index, image_root, out_path, layout, both_layouts, top)

    n = len(store)
    if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < n:
        raise IndexError(f"row {index} is outside the store's {n} rows (0 .. {n - 1})")
    index = int(index)
    layout = _check_layout(layout if layout is not None else store.layout)
    store.paths.check_confined(f"{store.path}: stored image paths")  # never read outside image_root
    relpath = store.paths[index]
    image_path = os.path.join(os.fspath(image_root), *relpath.split("/"))
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image of row {index} not found: {image_path} "
                                f"(store path {relpath!r} under image root {os.fspath(image_root)!r})")
    label_map = store.read(index)
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))

    title = (f"{relpath}  (row {index}; image {image.shape[1]} wide x {image.shape[0]} high; "
             f"stored map {label_map.logits.shape[1]}x{label_map.logits.shape[2]}, "
             f"layout {store.layout})")
    labels = getattr(store, "labels", None)
    if labels is not None and int(labels[index]) >= 0:
        title += f"\nhard label: {_name(store.class_names, int(labels[index]))}"
    fig = render_label_map(image, label_map.logits, label_map.class_ids, store.class_names,
                           layout=layout, out_path=out_path, title=title, top=top,
                           both_layouts=both_layouts)
    fig.clear()
    return out_path
