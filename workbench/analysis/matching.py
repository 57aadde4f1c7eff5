"""Detections against COCO ground truth: the IoU of every detection with its best same-category object.

Every analysis of the paper's Sec. 2 and 4 starts here. Detections are in COCO *results* format:
a list of dicts ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float, ...}``
with ``bbox`` in pixels, ``(x, y)`` the top-left corner; extra fields (e.g. ``iou_pred``, the IoU
predicted by IoU-Net) are carried along. A :class:`pandas.DataFrame` with the same columns is
accepted too. Ground truth is a ``pycocotools.coco.COCO`` index; crowd regions (``iscrowd = 1``) are
not objects and are never matched, as in the paper's COCO evaluation.

The IoU is :func:`workbench.ops.box_iou` on ``(x0, y0, x1, y1)`` boxes, in float64 so that values
such as 0.9 land on the right side of bin edges and thresholds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from workbench.ops import box_iou

Detections = Union[Sequence[Mapping[str, Any]], pd.DataFrame]
"""COCO results (list of dicts) or a DataFrame with the same columns."""

REQUIRED_FIELDS = ("image_id", "category_id", "bbox", "score")


def detections_frame(detections: Detections) -> pd.DataFrame:
    """The detections as a DataFrame, one row per detection, index = position in the input.

    Args:
        detections: COCO results, each with at least ``image_id``, ``category_id``,
            ``bbox`` ``[x, y, w, h]`` (pixels) and ``score``; extra fields become extra columns.

    Returns:
        DataFrame with a ``RangeIndex`` and the input's fields as columns (a copy).

    Raises:
        ValueError: a required field is missing, or a ``bbox`` is not four numbers.
    """
    frame = detections.reset_index(drop=True).copy() if isinstance(detections, pd.DataFrame) else pd.DataFrame(list(detections))
    if frame.empty:
        # An empty list has no columns at all; give it the required ones so downstream code needs no special case.
        return pd.DataFrame({name: pd.Series(dtype=object if name == "bbox" else float) for name in REQUIRED_FIELDS})
    missing = [name for name in REQUIRED_FIELDS if name not in frame.columns]
    if missing:
        raise ValueError(f"detections must have fields {list(REQUIRED_FIELDS)} (COCO results format), missing {missing}")
    lacking = frame[list(REQUIRED_FIELDS)].isna().any(axis=1)
    if lacking.any():
        raise ValueError(f"detection {int(np.flatnonzero(lacking)[0])} lacks one of {list(REQUIRED_FIELDS)}")
    xyxy_from_frame(frame)  # validates the boxes
    return frame


def xyxy_from_frame(frame: pd.DataFrame) -> np.ndarray:
    """``bbox`` ``[x, y, w, h]`` column as an ``(N, 4)`` float64 array ``(x0, y0, x1, y1)``."""
    try:
        xywh = np.asarray(frame["bbox"].tolist(), dtype=np.float64).reshape(len(frame), 4)
    except (ValueError, TypeError) as err:
        raise ValueError(f"every bbox must be four numbers [x, y, w, h]: {err}") from None
    return box_convert(torch.from_numpy(xywh), "xywh", "xyxy").numpy()


def top_scored_per_image(frame: pd.DataFrame, max_dets_per_image: int | None) -> pd.DataFrame:
    """The ``max_dets_per_image`` highest-scored rows of each image (all rows if ``None``).

    Ties in score keep the earlier row (stable sort), so the cut is deterministic. Rows keep their
    original index and order.
    """
    if max_dets_per_image is None:
        return frame
    if isinstance(max_dets_per_image, bool) or not isinstance(max_dets_per_image, (int, np.integer)) or max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be a positive int or None, got {max_dets_per_image!r}")
    ranked = frame.sort_values("score", ascending=False, kind="stable")
    return ranked.groupby("image_id", sort=False).head(int(max_dets_per_image)).sort_index()


@dataclass(frozen=True)
class ImageGroundTruth:
    """The non-crowd objects of one image."""

    ids: np.ndarray  # (M,) int64 annotation ids
    category_ids: np.ndarray  # (M,) int64
    boxes: torch.Tensor  # (M, 4) float64, (x0, y0, x1, y1) pixels


def ground_truth_by_image(coco_gt: COCO) -> dict[int, ImageGroundTruth]:
    """Non-crowd ground truth of every image of ``coco_gt`` (images without objects included, ``M = 0``)."""
    out = {}
    for image_id in coco_gt.getImgIds():
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(len(anns), 4)
        out[image_id] = ImageGroundTruth(
            ids=np.asarray([a["id"] for a in anns], dtype=np.int64),
            category_ids=np.asarray([a["category_id"] for a in anns], dtype=np.int64),
            boxes=box_convert(xywh, "xywh", "xyxy"),
        )
    return out


def same_category_iou_blocks(
    frame: pd.DataFrame, gt_by_image: Mapping[int, ImageGroundTruth]
) -> Iterator[tuple[np.ndarray, ImageGroundTruth, np.ndarray]]:
    """Per image with detections: ``(rows, ground_truth, iou)``.

    ``rows`` (N,) are positions in ``frame``; ``iou`` (N, M) is the IoU of each of those detections
    with each object of ``ground_truth``, and ``-1`` where the categories differ, so a row/column
    maximum only ever picks a same-category pair. One ``box_iou`` call per image (not per image and
    category) keeps the number of calls at the number of images.

    Raises:
        ValueError: a detection's ``image_id`` is not an image of the ground truth.
    """
    unknown = set(frame["image_id"].unique()) - set(gt_by_image)
    if unknown:
        raise ValueError(f"detections refer to images not in the ground truth: {sorted(unknown)[:5]}")
    boxes = torch.from_numpy(xyxy_from_frame(frame))
    categories = frame["category_id"].to_numpy(dtype=np.int64)
    for image_id, rows in frame.groupby("image_id", sort=False).indices.items():
        gt = gt_by_image[image_id]
        if len(gt.ids) == 0:
            yield rows, gt, np.empty((len(rows), 0))
            continue
        # 0 / 0 (two zero-area boxes) gives nan; such a pair does not overlap.
        iou = torch.nan_to_num(box_iou(boxes[rows], gt.boxes), nan=0.0).numpy()
        yield rows, gt, np.where(categories[rows, None] == gt.category_ids[None, :], iou, -1.0)


def match_to_ground_truth(detections: Detections, coco_gt: COCO) -> pd.DataFrame:
    """Each detection's IoU with its best-matching ground truth (same image, same category, non-crowd).

    "Best" is the maximum IoU; among equal IoUs the object listed first in ``coco_gt`` wins. This is
    an independent per-detection match (several detections may match one object), as in the paper's
    Fig. 2 and 3, not COCOeval's greedy one-to-one assignment.

    Args:
        detections: COCO results (see the module docstring).
        coco_gt: the ground truth.

    Returns:
        DataFrame: the detections' fields (index = position in ``detections``) plus
        ``iou`` (float64 in ``[0, 1]``) and ``gt_id`` (int64 annotation id, ``-1`` when no
        same-category object overlaps the detection, in which case ``iou`` is 0).
    """
    frame = detections_frame(detections)
    iou = np.zeros(len(frame))
    gt_id = np.full(len(frame), -1, dtype=np.int64)
    for rows, gt, block in same_category_iou_blocks(frame, ground_truth_by_image(coco_gt)):
        if block.shape[1] == 0:
            continue
        best = block.argmax(axis=1)  # first maximum: earliest object on ties
        best_iou = block[np.arange(len(rows)), best]
        hit = best_iou > 0
        iou[rows[hit]] = best_iou[hit]
        gt_id[rows[hit]] = gt.ids[best[hit]]
    return frame.assign(iou=iou, gt_id=gt_id)


def best_iou_per_ground_truth(detections: Detections, coco_gt: COCO, *, max_dets_per_image: int | None = None) -> pd.DataFrame:
    """Each non-crowd object's highest IoU with any same-category detection in its image.

    Args:
        detections: COCO results.
        coco_gt: the ground truth.
        max_dets_per_image: keep only this many highest-scored detections per image first
            (``None``: all).

    Returns:
        DataFrame indexed by ``gt_id`` with ``image_id``, ``category_id`` and ``best_iou``
        (float64, 0 for an object no detection overlaps), one row per non-crowd object of
        ``coco_gt``.
    """
    frame = top_scored_per_image(detections_frame(detections), max_dets_per_image)
    gt_by_image = ground_truth_by_image(coco_gt)
    best = {}
    for _, gt, block in same_category_iou_blocks(frame.reset_index(drop=True), gt_by_image):
        if block.shape[1]:
            best.update(zip(gt.ids.tolist(), block.max(axis=0).clip(min=0.0).tolist()))
    rows = [
        (int(gid), image_id, int(cat), best.get(int(gid), 0.0))
        for image_id, gt in gt_by_image.items()
        for gid, cat in zip(gt.ids, gt.category_ids)
    ]
    table = pd.DataFrame(rows, columns=["gt_id", "image_id", "category_id", "best_iou"])
    return table.astype({"gt_id": np.int64, "best_iou": np.float64}).set_index("gt_id")
