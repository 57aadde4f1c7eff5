"""Why a mechanism measurable on the lab can vanish on real data: object size against the IoU scale.

IoU is relative: for a square of side ``s`` shifted by ``d`` pixels along one axis, IoU = (s - d) / (s + d).
On 40-px tree crowns IoU 0.9 therefore allows only about 2 px of error, about what a hand-drawn label
is off by, so AP90 and the IoU targets the predictor learns from mostly measure the labels. On the
``shapes`` lab the boxes are exact, so the same numbers measure the method. This module puts the two
side by side from each run's own ground truth and detections; it judges no claim (that is
:mod:`workbench.analysis.claims`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from .correlation import LocalizationCorrelation
from .diagnostics import calibration


def object_sizes(coco_gt: COCO) -> np.ndarray:
    """``sqrt(w * h)`` in pixels of every ground-truth box of ``coco_gt`` (float64[N])."""
    wh = np.array([ann["bbox"][2:4] for ann in coco_gt.dataset.get("annotations", [])], dtype=np.float64).reshape(-1, 2)
    return np.sqrt(wh[:, 0] * wh[:, 1])


def _shift_column(iou: float) -> str:
    return f"shift at IoU {iou:g} (px)"


def shift_tolerance(size: float | np.ndarray, iou: float = 0.9) -> np.ndarray:
    """The largest shift in pixels, along one axis, of a ``size``-px square that keeps IoU >= ``iou`` with itself.

    ``(s - d) / (s + d) >= t``  <=>  ``d <= s (1 - t) / (1 + t)``.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    return np.asarray(size, dtype=np.float64) * (1.0 - iou) / (1.0 + iou)


def label_noise_table(runs: Mapping[str, tuple[COCO, LocalizationCorrelation]], *, iou: float = 0.9) -> pd.DataFrame:
    """One row per dataset: how large its objects are against the IoU scale, and how well each confidence tracks IoU.

    Args:
        runs: dataset name -> (its validation ground truth, :func:`~workbench.analysis.localization_correlation`
            of its raw detections).
        iou: the matching IoU whose pixel tolerance is reported (paper's hardest: 0.9).

    Returns:
        DataFrame indexed by dataset: ``objects``, ``median size (px)``, ``shift at IoU <iou> (px)`` (of the
        median object, :func:`shift_tolerance`), ``r score``, ``r predicted IoU`` and ``calibration slope``
        (true IoU per unit of predicted IoU over the matched detections, :func:`~workbench.analysis.diagnostics.calibration`).
    """
    rows = {}
    for name, (coco_gt, corr) in runs.items():
        sizes = object_sizes(coco_gt)
        median = float(np.median(sizes)) if sizes.size else float("nan")
        matched = corr.matched
        slope = (calibration(matched["iou"], matched["iou_pred"]).slope
                 if "iou_pred" in matched and matched["iou_pred"].notna().all() else float("nan"))
        rows[name] = {"objects": int(sizes.size), "median size (px)": median, _shift_column(iou): shift_tolerance(median, iou),
                      "r score": corr.r_score, "r predicted IoU": corr.r_iou_pred, "calibration slope": slope}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "dataset"
    return table


def describe_label_noise(table: pd.DataFrame, lab: str, real: str, *, iou: float = 0.9) -> str:
    """Markdown: what the real dataset's object sizes and measured correlations say next to the lab's.

    ``table`` is :func:`label_noise_table`'s (same ``iou``); ``lab`` and ``real`` are two of its rows. Only numbers from the
    table, and no verdict (those are :func:`workbench.analysis.claims.verdict_text`'s).
    """
    shift = _shift_column(iou)
    a, b = table.loc[lab], table.loc[real]
    return "\n".join([
        f"* **Object size**: the median object is {a['median size (px)']:.0f} px across on *{lab}* and "
        f"{b['median size (px)']:.0f} px on *{real}*; a box of that size stays above IoU {iou:g} only if it is off "
        f"by at most {a[shift]:.1f} px and {b[shift]:.1f} px respectively. The lab's boxes are exact, so there that margin "
        "measures the detector alone; real boxes are drawn by hand, and a label off by as much moves a box across the "
        f"{iou:g} line, so there the ground truth itself decides which boxes count as well placed.",
        f"* **Fig. 2**: Pearson r with the true IoU, classification score vs predicted IoU: {a['r score']:.3f} vs "
        f"{a['r predicted IoU']:.3f} on *{lab}*, {b['r score']:.3f} vs {b['r predicted IoU']:.3f} on *{real}*.",
        f"* **Calibration**: true IoU rises {a['calibration slope']:.2f} per unit of predicted IoU on *{lab}*, "
        f"{b['calibration slope']:.2f} on *{real}* (1 would be a calibrated predictor; near 0, the prediction says little "
        "about which box is better placed).",
    ])
