"""Paper Fig. 7: recall as the IoU required to count an object as found grows from 0.5 to 0.95.

An object (non-crowd ground truth) is recalled at threshold ``t`` when at least one detection of its
category in its image has IoU >= ``t`` with it; several objects may be recalled by the same
detection (no one-to-one assignment), which is what makes No-NMS an upper bound. By default every
detection counts (``max_dets_per_image=None``), since capping would stop No-NMS from being that
upper bound; pass ``max_dets_per_image=100`` for COCO's budget of the 100 highest-scored per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from ._plotting import color, marker, new_figure, style_axes
from .matching import Detections, best_iou_per_ground_truth

# Rounded so that 0.7 is the float 0.7 (arange would give 0.7000000000000002 and turn IoU >= t false).
RECALL_IOU_THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(0.5, 0.95, 10), 2))
"""0.50, 0.55, ..., 0.95: the x-axis of Fig. 7 (COCO's IoU thresholds)."""


def recall_vs_iou(
    detection_sets: Mapping[str, Detections],
    coco_gt: COCO,
    *,
    thresholds: Sequence[float] = RECALL_IOU_THRESHOLDS,
    max_dets_per_image: int | None = None,
) -> pd.DataFrame:
    """Fraction of non-crowd objects recalled at each IoU threshold, per detection set.

    Args:
        detection_sets: name -> COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``).
        coco_gt: the ground truth; needs at least one non-crowd object.
        thresholds: IoU thresholds, inclusive (IoU >= t counts).
        max_dets_per_image: per image, only the this many highest-scored detections count
            (``None``: all, the default).

    Returns:
        DataFrame of recall in ``[0, 1]``, index = thresholds (named ``"IoU threshold"``), one column per set.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    recall = {}
    for name, detections in detection_sets.items():
        best = best_iou_per_ground_truth(detections, coco_gt, max_dets_per_image=max_dets_per_image)["best_iou"].to_numpy()
        if len(best) == 0:
            raise ValueError("the ground truth has no non-crowd objects: recall is undefined")
        recall[name] = (best[None, :] >= t[:, None]).mean(axis=1)  # (T,)
    return pd.DataFrame(recall, index=pd.Index(t, name="IoU threshold"))


def plot_recall_vs_iou(recall: pd.DataFrame, *, title: str | None = "Recall vs. matching IoU threshold") -> Figure:
    """One line per detection set: recall (y) against IoU threshold (x), as the paper's Fig. 7.

    Args:
        recall: the output of :func:`recall_vs_iou`.

    Returns:
        A Figure with one axes holding one line per column, in column order.
    """
    fig, axes = new_figure(panel_size=(6.0, 4.0))
    ax = axes[0, 0]
    for k, name in enumerate(recall.columns):
        ax.plot(recall.index.to_numpy(), recall[name].to_numpy(), marker=marker(k), color=color(k), label=str(name))
    style_axes(ax, xlabel="IoU threshold for matching a ground truth", ylabel="Recall", title=title)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(recall.index.to_numpy())
    ax.legend(title="Detections")
    return fig


def recall_at(recall: pd.DataFrame, threshold: float) -> pd.Series:
    """The row of a :func:`recall_vs_iou` table at ``threshold`` (e.g. 0.9): recall per detection set."""
    hits = recall.index[np.abs(recall.index - threshold) < 1e-9]
    if not len(hits):
        raise KeyError(f"threshold {threshold} is not a row of the recall table (rows: {list(recall.index)})")
    return recall.loc[hits[0]]
