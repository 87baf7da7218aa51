"""Node labels that overlap neither each other nor the nodes (Figure 7's graphs).

Greedy placement in display coordinates, as map labelling does it: each label tries a ring
of positions around its node (right, left, above, below, the diagonals; then the same
further out) and takes the first, in that order of preference, whose text box overlaps no
label placed so far, no node and stays inside the axes; when none is free it takes the one
with the least overlap. Crowded nodes (most neighbours within a label's width) are placed
first, while there is still room around them. The boxes come from the renderer, so they are
exact for the figure's size and fonts; draw with the axes' position and limits fixed
(no constrained layout) or the boxes move after placement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.text import Text
from matplotlib.transforms import Bbox

# (dx, dy) directions in units of the offset, with the text alignment that puts the label
# on that side of the node
_DIRECTIONS = (((1, 0), "left", "center"), ((-1, 0), "right", "center"), ((0, 1), "center", "bottom"),
               ((0, -1), "center", "top"), ((1, 1), "left", "bottom"), ((-1, 1), "right", "bottom"),
               ((1, -1), "left", "top"), ((-1, -1), "right", "top"))


def _renderer(ax: Axes):
    fig = ax.figure
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def boxes_overlap(a: Bbox, b: Bbox, pad: float = 0.0) -> bool:
    """Whether two display boxes overlap by more than ``pad`` pixels in both directions."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > pad) and (min(a.y1, b.y1) - max(a.y0, b.y0) > pad)


def place_labels(ax: Axes, pos: Mapping[str, Sequence[float]], labels: Mapping[str, str], *,
                 node_radius_pt: float, fontsize: float = 7.5, text_kw: Mapping | None = None,
                 rings: int = 4) -> dict[str, Text]:
    """Add one text per node of ``pos`` (name -> (x, y) data coordinates) to ``ax`` at a
    free place next to its node. -> name -> Text. ``labels``: name -> text shown;
    ``node_radius_pt``: the drawn nodes' radius in points (kept clear of labels)."""
    renderer = _renderer(ax)
    px_per_pt = ax.figure.dpi / 72.0
    r_px = node_radius_pt * px_per_pt
    gap = 2.0 * px_per_pt  # clear space kept around labels and nodes
    names = list(pos)
    xy = ax.transData.transform(np.array([pos[n] for n in names], dtype=float))  # (n, 2) pixels
    node_boxes = [Bbox.from_extents(x - r_px, y - r_px, x + r_px, y + r_px) for x, y in xy]
    frame = ax.get_window_extent(renderer)
    texts = {n: ax.text(*pos[n], labels[n], fontsize=fontsize, zorder=5, **(text_kw or {})) for n in names}
    widths = {n: texts[n].get_window_extent(renderer).width for n in names}
    # the crowded first: neighbours within a label's width
    crowd = {n: int((np.hypot(*(xy - xy[i]).T) < widths[n]).sum()) for i, n in enumerate(names)}
    placed: list[Bbox] = []
    for i in sorted(range(len(names)), key=lambda i: -crowd[names[i]]):
        text = texts[names[i]]
        best = None
        for ring in range(1, rings + 1):
            offset = r_px * (0.4 + 0.9 * ring)
            for (dx, dy), ha, va in _DIRECTIONS:
                norm = np.hypot(dx, dy)
                target = xy[i] + offset * np.array([dx, dy]) / norm
                text.set_position(ax.transData.inverted().transform(target))
                text.set_ha(ha)
                text.set_va(va)
                box = text.get_window_extent(renderer)
                padded = box.padded(gap)
                cost = sum(_overlap(padded, b) for b in placed)
                cost += sum(_overlap(padded, b) for j, b in enumerate(node_boxes) if j != i)
                outside = box.width * box.height - _overlap(box, frame)
                cost += 2.0 * outside
                if best is None or cost < best[0]:
                    best = (cost, text.get_position(), ha, va, box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, xy_best, ha, va, box = best
        text.set_position(xy_best)
        text.set_ha(ha)
        text.set_va(va)
        placed.append(box)
    return texts


def overlapping_labels(texts: Mapping[str, Text], pad: float = 0.0) -> list[tuple[str, str]]:
    """Pairs of labels whose drawn boxes overlap (by more than ``pad`` pixels)."""
    if not texts:
        return []
    renderer = _renderer(next(iter(texts.values())).axes)
    boxes = {n: t.get_window_extent(renderer) for n, t in texts.items()}
    names = list(boxes)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes_overlap(boxes[a], boxes[b], pad)]
