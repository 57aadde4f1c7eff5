"""Paper Fig. 3: how many accurately localized boxes survive a duplicate-removal step.

A detection is *positive* when it overlaps its matched ground truth with IoU >= 0.5 and, among the
detections matched to the same object, has the highest score (paper Sec. 2.1: "for multiple
detections matched with the same ground-truth, only the one with the highest score is considered
positive"). Positives are counted per IoU bin ``[0.5, 0.6), ..., [0.9, 1.0]``. Comparing the counts
before NMS (No-NMS, the upper bound on the total), after NMS and after IoU-guided NMS shows how many
well-localized boxes a score-ranked NMS throws away.

Detections below the lowest bin edge are never positive and do not compete for an object: an
object whose top-scored detection has IoU 0.4 still counts its best-scored detection with IoU >= 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from ._plotting import color, new_figure, style_axes
from .matching import Detections, match_to_ground_truth

IOU_BIN_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Edges of the IoU bins of Fig. 3; bins are ``[lo, hi)`` except the last, ``[0.9, 1.0]``."""


def _check_edges(edges: Sequence[float]) -> np.ndarray:
    arr = np.asarray(edges, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2 or not np.all(np.diff(arr) > 0) or arr[0] <= 0:
        raise ValueError(f"edges must be at least two strictly increasing values > 0, got {list(edges)}")
    return arr


def iou_bin_labels(edges: Sequence[float] = IOU_BIN_EDGES) -> list[str]:
    """``"[0.5, 0.6)"``, ..., ``"[0.9, 1]"``: half-open bins, the last one closed."""
    arr = _check_edges(edges)
    labels = [f"[{lo:g}, {hi:g})" for lo, hi in zip(arr[:-1], arr[1:])]
    labels[-1] = labels[-1][:-1] + "]"
    return labels


def iou_bin_index(iou: np.ndarray, edges: Sequence[float] = IOU_BIN_EDGES) -> np.ndarray:
    """Bin of each IoU: ``i`` for ``edges[i] <= iou < edges[i+1]``, the last bin closed; ``-1`` outside."""
    arr = _check_edges(edges)
    iou = np.asarray(iou, dtype=np.float64)
    index = np.searchsorted(arr, iou, side="right") - 1
    index[iou == arr[-1]] = len(arr) - 2  # IoU = 1.0 belongs to the last bin
    index[(index < 0) | (index > len(arr) - 2)] = -1
    return index


def positive_detections(detections: Detections, coco_gt: COCO, *, min_iou: float = IOU_BIN_EDGES[0]) -> pd.DataFrame:
    """The positives of a detection set: per object, its highest-scored detection with IoU >= ``min_iou``.

    Args:
        detections: COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``).
        coco_gt: the ground truth.
        min_iou: lowest IoU with the matched object for a detection to be positive (> 0).

    Returns:
        The rows of :func:`match_to_ground_truth` that are positive (at most one per ``gt_id``),
        in input order. Equal scores keep the earlier detection.
    """
    if not 0 < min_iou <= 1:
        raise ValueError(f"min_iou must lie in (0, 1], got {min_iou}")
    matched = match_to_ground_truth(detections, coco_gt)
    eligible = matched[matched["iou"] >= min_iou]
    ranked = eligible.sort_values("score", ascending=False, kind="stable")
    return ranked.drop_duplicates("gt_id", keep="first").sort_index()


def positives_per_iou_bin(
    detection_sets: Mapping[str, Detections], coco_gt: COCO, *, edges: Sequence[float] = IOU_BIN_EDGES
) -> pd.DataFrame:
    """Number of positive boxes per IoU bin for each detection set (paper Fig. 3).

    Args:
        detection_sets: name (e.g. ``"No-NMS"``, ``"NMS"``, ``"IoU-guided NMS"``) -> COCO results.
        coco_gt: the ground truth.
        edges: bin edges; the lowest is the positive threshold.

    Returns:
        DataFrame of int64 counts, index = bin labels (``"[0.5, 0.6)"``, ...), one column per set.
    """
    labels = iou_bin_labels(edges)
    counts = {}
    for name, detections in detection_sets.items():
        positives = positive_detections(detections, coco_gt, min_iou=float(edges[0]))
        index = iou_bin_index(positives["iou"].to_numpy(), edges)
        counts[name] = np.bincount(index[index >= 0], minlength=len(labels)).astype(np.int64)
    return pd.DataFrame(counts, index=pd.Index(labels, name="IoU with matched ground truth"))


def plot_positives_per_iou_bin(counts: pd.DataFrame, *, title: str | None = "Positive boxes after duplicate removal") -> Figure:
    """Grouped bars: one group per IoU bin, one bar per detection set (paper Fig. 3).

    Args:
        counts: the output of :func:`positives_per_iou_bin`.

    Returns:
        A Figure with one axes; ``ax.containers[k]`` holds the bars of column ``k``.
    """
    fig, axes = new_figure(panel_size=(7.0, 4.0))
    ax = axes[0, 0]
    n_sets = max(len(counts.columns), 1)
    width = 0.8 / n_sets
    x = np.arange(len(counts.index))
    for k, name in enumerate(counts.columns):
        bars = ax.bar(x + (k - (n_sets - 1) / 2) * width, counts[name].to_numpy(), width, label=str(name), color=color(k))
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, [str(label) for label in counts.index])
    style_axes(ax, xlabel="IoU with matched ground truth", ylabel="Number of positive boxes", title=title)
    ax.grid(False, axis="x")
    ax.legend(title="Detections")
    return fig
