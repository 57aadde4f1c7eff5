"""Per-class duplicate removal applied to a detector's raw detections: No-NMS, NMS, Soft-NMS and
IoU-guided NMS (the paper's Table 1 and Figs. 3 and 7 compare exactly these four)."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.nms import batched_iou_guided_nms, batched_nms, batched_soft_nms

METHODS = ("none", "nms", "soft-nms", "iou-nms")


def suppress(
    detections: dict[str, Tensor],
    method: str,
    iou_threshold: float = 0.5,
    max_detections: int | None = 100,
    soft_method: str = "linear",
    soft_sigma: float = 0.5,
    soft_iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
    *,
    return_suppressors: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Remove duplicates from one image's detections, class by class.

    Args:
        detections: ``boxes`` (Tensor[M, 4], ``(x0, y0, x1, y1)``), ``scores`` (Tensor[M],
            classification confidence), ``labels`` (Tensor[M] int64) and, for ``"iou-nms"``,
            ``ious`` (Tensor[M], the predicted IoU). Any other per-detection tensor (``rois``,
            ...) is carried along.
        method: ``"none"`` (keep every box), ``"nms"``, ``"soft-nms"`` or ``"iou-nms"``
            (Algorithm 1: rank by predicted IoU, each kept box takes its cluster's best score).
        iou_threshold: suppression threshold of NMS and IoU-guided NMS.
        max_detections: keep the highest-scored boxes after suppression (COCO evaluates 100);
            ``None`` keeps all.
        soft_method, soft_sigma, soft_iou_threshold, score_threshold: Soft-NMS parameters
            (Bodla et al.: linear decay above ``soft_iou_threshold`` or Gaussian with ``sigma``;
            boxes whose score decays below ``score_threshold`` are dropped).
        return_suppressors: also return, per input detection, who removed it (the ops'
            ``return_suppressors``, :func:`workbench.ops.nms`): -1 if it survived suppression (the
            ``max_detections`` cap aside), else the input index of the kept box whose selection removed
            it; -2 for a box Soft-NMS dropped with no suppressor (below ``score_threshold`` from the start).

    Returns:
        The same keys, the kept detections sorted by (new) score, descending; ``scores`` holds the
        scores after suppression (decayed for Soft-NMS, cluster maxima for IoU-guided NMS). With
        ``return_suppressors``: ``(kept, suppressors)``, ``suppressors`` Tensor[M] int64.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    extra: list[Tensor] = []  # [suppressors] when asked for
    if method == "none":
        keep = scores.argsort(descending=True, stable=True)
        new_scores = scores[keep]
        if return_suppressors:
            extra = [torch.full((len(scores),), -1, dtype=torch.int64, device=scores.device)]
    elif method == "nms":
        result = batched_nms(boxes, scores, labels, iou_threshold, return_suppressors=return_suppressors)
        keep, *extra = result if return_suppressors else (result,)
        new_scores = scores[keep]
    elif method == "soft-nms":
        keep, new_scores, *extra = batched_soft_nms(boxes, scores, labels, soft_iou_threshold, soft_sigma, score_threshold,
                                                    soft_method, return_suppressors=return_suppressors)
    else:
        if "ious" not in detections:
            raise ValueError("detections must hold 'ious' (predicted IoU per box) for method 'iou-nms'")
        keep, new_scores, *extra = batched_iou_guided_nms(boxes, scores, detections["ious"], labels, iou_threshold,
                                                          return_suppressors=return_suppressors)
    if max_detections is not None:
        keep, new_scores = keep[:max_detections], new_scores[:max_detections]
    kept = {key: value[keep] for key, value in detections.items()}
    kept["scores"] = new_scores
    return (kept, *extra) if return_suppressors else kept
