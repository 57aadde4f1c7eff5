"""COCO box AP as in the paper's Tables 1-3, read from pycocotools' own ``COCOeval``.

Nothing of the evaluation is re-implemented: matching, ignore rules and the 101-point interpolated
precision all come from ``COCOeval.evaluate()`` / ``accumulate()``. What this module adds is reading
AP at single IoU thresholds other than the 0.5 and 0.75 that ``summarize()`` prints (the paper
reports AP50, AP60, AP70, AP80, AP90), with exactly ``summarize()``'s rule: the mean of the valid
(``> -1``) entries of ``eval["precision"]`` over recall points and categories, area ``all``,
``maxDets = 100``.

All APs are fractions in ``[0, 1]`` (as ``COCOeval.stats``); the paper prints percentages.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from workbench.data.coco import coco_from_dict

from .matching import Detections, detections_frame

AP_METRICS: dict[str, float | None] = {"AP": None, "AP50": 0.5, "AP60": 0.6, "AP70": 0.7, "AP80": 0.8, "AP90": 0.9}
"""Column name -> IoU threshold (``None``: AP averaged over 0.50:0.05:0.95), the columns of Tables 1-3."""


def _results(detections: Detections) -> list[dict]:
    """Plain COCO result dicts with Python scalars; fresh dicts, since ``loadRes`` writes into them."""
    frame = detections_frame(detections)
    return [
        {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for i, c, b, s in zip(frame["image_id"], frame["category_id"], frame["bbox"], frame["score"])
    ]


def bbox_evaluator(coco_gt: COCO, detections: Detections) -> COCOeval:
    """A ``COCOeval`` (``iouType="bbox"``) of the detections with default parameters, not yet evaluated.

    Args:
        coco_gt: ground truth (annotations need ``area`` and ``iscrowd``, as COCOeval requires).
        detections: COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``); may be empty.
    """
    results = _results(detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list (it inspects results[0])
            coco_dt = coco_from_dict({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []})
        return COCOeval(coco_gt, coco_dt, iouType="bbox")


def evaluate_bbox(coco_gt: COCO, detections: Detections, *, iou_thresholds: Sequence[float] | None = None) -> COCOeval:
    """Run ``COCOeval`` (``iouType="bbox"``) on the detections, silently.

    Args:
        coco_gt: ground truth (annotations need ``area`` and ``iscrowd``, as COCOeval requires).
        detections: COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``); may be empty.
        iou_thresholds: replaces ``params.iouThrs`` (default: COCO's 0.50:0.05:0.95).

    Returns:
        The evaluator after ``evaluate()``, ``accumulate()`` and ``summarize()``: ``eval["precision"]``
        has shape ``(T, R=101, K, A=4, M=3)`` and ``stats`` holds the 12 summary numbers.
    """
    evaluator = bbox_evaluator(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def threshold_index(iou_thresholds: Sequence[float], iou_threshold: float) -> np.ndarray:
    """Positions (a 1-element int array) of ``iou_threshold`` in ``iou_thresholds``, compared to 1e-9.

    Raises:
        ValueError: the threshold is not among them.
    """
    t = np.flatnonzero(np.abs(np.asarray(iou_thresholds) - iou_threshold) < 1e-9)
    if len(t) == 0:
        raise ValueError(f"IoU threshold {iou_threshold} was not evaluated; params.iouThrs = {list(np.round(iou_thresholds, 4))}")
    return t


def precision_ap(evaluator: COCOeval, iou_threshold: float | None = None, *, area: str = "all", max_dets: int = 100) -> float:
    """AP at one IoU threshold (or averaged over all evaluated ones) from ``eval["precision"]``.

    Same rule as ``COCOeval.summarize()``: mean over the entries ``> -1`` (``-1`` marks categories
    without ground truth) of ``precision[t, :, :, area, max_dets]``.

    Args:
        evaluator: an accumulated ``COCOeval`` (e.g. from :func:`evaluate_bbox`).
        iou_threshold: one of ``evaluator.params.iouThrs`` (compared to 1e-9, since 0.6 in
            ``np.linspace(.5, .95, 10)`` is not the float 0.6); ``None``: all thresholds.
        area: an ``params.areaRngLbl`` label. max_dets: one of ``params.maxDets``.

    Returns:
        float in ``[0, 1]``; ``nan`` when no entry is valid (``summarize()`` prints -1 there).
    """
    if not hasattr(evaluator, "eval") or not evaluator.eval:
        raise ValueError("evaluator has not been accumulated; call evaluate() and accumulate() first")
    params = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index(area), list(params.maxDets).index(max_dets)]  # (T, R, K)
    if iou_threshold is not None:
        precision = precision[threshold_index(params.iouThrs, iou_threshold)]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else float("nan")


def coco_ap(coco_gt: COCO, detections: Detections) -> dict[str, float]:
    """COCO AP@[.5:.95] and AP50, AP60, AP70, AP80, AP90 of the detections (fractions in ``[0, 1]``).

    One ``COCOeval`` run; ``AP`` equals ``stats[0]`` and ``AP50`` equals ``stats[1]``.
    """
    evaluator = evaluate_bbox(coco_gt, detections)
    return {name: precision_ap(evaluator, iou) for name, iou in AP_METRICS.items()}


def ap_table(rows: Mapping[str, Detections], coco_gt: COCO) -> pd.DataFrame:
    """:func:`coco_ap` for several detection sets: index = row name (``"Method"``), columns = :data:`AP_METRICS`."""
    table = pd.DataFrame.from_dict({name: coco_ap(coco_gt, detections) for name, detections in rows.items()}, orient="index")
    table = table.reindex(columns=list(AP_METRICS))
    table.index.name = "Method"
    return table
