"""Paper Fig. 2: is a detection's confidence a good ranking of how well it is localized?

For detections whose IoU with the matched ground truth exceeds 0.5, the Pearson correlation of that
IoU with (a) the classification score and (b) the IoU predicted by IoU-Net (``iou_pred`` field). The
paper finds 0.217 and 0.617: the classification score barely ranks localization, which is why
score-ranked NMS can keep the worse of two duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from ._plotting import color, new_figure, style_axes
from .matching import Detections, match_to_ground_truth


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation coefficient ``cov(x, y) / (std(x) std(y))`` of two 1-D samples.

    Computed as ``sum(dx dy) / sqrt(sum(dx^2) sum(dy^2))`` with ``dx = x - mean(x)``, in float64.

    Returns:
        float in ``[-1, 1]``; ``nan`` for fewer than two pairs or a constant sample (undefined).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denom == 0:
        return float("nan")
    # Clip the last-ulp overshoot so perfectly correlated data reads exactly +-1.
    return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


@dataclass(frozen=True)
class LocalizationCorrelation:
    """Result of :func:`localization_correlation`."""

    matched: pd.DataFrame  # rows of match_to_ground_truth with iou > min_iou
    min_iou: float  # IoU threshold (exclusive) that selected the rows
    r_score: float  # Pearson(iou, score)
    r_iou_pred: float  # Pearson(iou, iou_pred) over rows having iou_pred; nan without the field


def localization_correlation(detections: Detections, coco_gt: COCO, *, min_iou: float = 0.5) -> LocalizationCorrelation:
    """Pearson correlation of true IoU with the classification score and with the predicted IoU.

    Args:
        detections: COCO results; ``iou_pred`` (IoU-Net's estimate, in ``[0, 1]``) is optional.
        coco_gt: the ground truth.
        min_iou: keep detections with IoU strictly greater than this (paper: 0.5).

    Returns:
        :class:`LocalizationCorrelation`.
    """
    matched = match_to_ground_truth(detections, coco_gt)
    kept = matched[matched["iou"] > min_iou]
    r_pred = float("nan")
    if "iou_pred" in kept.columns:
        has = kept["iou_pred"].notna()  # the field may be present on some detections only
        r_pred = pearson(kept.loc[has, "iou"], kept.loc[has, "iou_pred"].astype(np.float64))
    return LocalizationCorrelation(matched=kept, min_iou=float(min_iou), r_score=pearson(kept["iou"], kept["score"]), r_iou_pred=r_pred)


def plot_localization_correlation(result: LocalizationCorrelation, *, max_points: int = 20_000, seed: int = 0) -> Figure:
    """Two scatter panels as the paper's Fig. 2: IoU vs classification score, IoU vs predicted IoU.

    Args:
        result: the output of :func:`localization_correlation`.
        max_points: draw at most this many points per panel (a fixed random subset, ``seed``), so a
            COCO-sized set stays drawable; the coefficients always use every point.

    Returns:
        A Figure with two axes, each holding one scatter collection; the titles state Pearson's r.
        Panel (b) also draws the line ``y = x`` (a perfect IoU predictor), or a note when the
        detections carry no ``iou_pred``.
    """
    data = result.matched
    if len(data) > max_points:
        data = data.iloc[np.sort(np.random.default_rng(seed).choice(len(data), max_points, replace=False))]
    fig, axes = new_figure(2, panel_size=(4.8, 4.2))
    ax_a, ax_b = axes[0]
    note = f" (showing {len(data)} of {len(result.matched)})" if len(data) < len(result.matched) else ""
    xlabel = f"IoU with matched ground truth (> {result.min_iou:g}){note}"

    ax_a.scatter(data["iou"], data["score"], s=6, alpha=0.35, linewidths=0, color=color(0), rasterized=True)
    style_axes(ax_a, xlabel=xlabel, ylabel="Classification confidence", title=f"(a) Classification: Pearson r = {result.r_score:.3f}")

    has_pred = "iou_pred" in data.columns
    x_b, y_b = (data["iou"], data["iou_pred"]) if has_pred else ([], [])  # nan iou_pred is not drawn
    ax_b.scatter(x_b, y_b, s=6, alpha=0.35, linewidths=0, color=color(1), rasterized=True)
    ax_b.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect prediction (y = x)")
    style_axes(ax_b, xlabel=xlabel, ylabel="Predicted IoU (localization confidence)", title=f"(b) Localization: Pearson r = {result.r_iou_pred:.3f}")
    ax_b.legend(loc="lower right", fontsize=8)
    if not has_pred:
        ax_b.text(0.5, 0.5, "no 'iou_pred' field in the detections", transform=ax_b.transAxes, ha="center", va="center")
    for ax in (ax_a, ax_b):
        ax.set_xlim(result.min_iou, 1.0)
        ax.set_ylim(0.0, 1.0)
    return fig
