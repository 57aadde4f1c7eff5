"""Box utilities for boxes in ``(x0, y0, x1, y1)`` format, continuous coordinates, in pixels."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_boxes, check_same_device


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x1 - x0) * (y1 - y0)`` of each box.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite.

    Returns:
        Tensor[N]: areas, negative for inverted boxes (as ``torchvision.ops.box_area``); float32
        for float16 and bfloat16 boxes, as torchvision's (a 300 px box's area overflows float16).
    """
    boxes = check_boxes("boxes", boxes)
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    return _area(boxes)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """:func:`box_iou` without input checks, for internal hot paths.

    The arithmetic order (areas, intersection, ``inter / (a1 + a2 - inter)``) is the one
    ``torchvision.ops.nms`` uses, so thresholding it reproduces torchvision's decisions bit for bit.
    float16 and bfloat16 are computed in float32 (as torchvision does) and the IoU cast back: a
    300 px box has an area of 90000, past float16's largest value 65504.
    """
    low = (torch.float16, torch.bfloat16)
    if boxes1.dtype in low or boxes2.dtype in low:
        dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
        compute = torch.promote_types(dtype, torch.float32)
        return pairwise_iou(boxes1.to(compute), boxes2.to(compute)).to(dtype)
    area1 = _area(boxes1)
    area2 = _area(boxes2)
    # One (N, M) plane per coordinate: on CPU, broadcasting contiguous columns is ten times faster
    # than broadcasting interleaved (N, 1, 2) and (1, M, 2) corner pairs. Same arithmetic.
    x0a, y0a, x1a, y1a = boxes1.t().contiguous()[:, :, None]
    x0b, y0b, x1b, y1b = boxes2.t().contiguous()[:, None, :]
    w = (torch.min(x1a, x1b) - torch.max(x0a, x0b)).clamp(min=0)
    h = (torch.min(y1a, y1b) - torch.max(y0a, y0b)).clamp(min=0)
    inter = w * h
    return inter / (area1[:, None] + area2[None, :] - inter)


def matched_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box with the box at the same index (the diagonal of :func:`box_iou`).

    Args:
        boxes1 (Tensor[..., 4]): ``(x0, y0, x1, y1)``.
        boxes2 (Tensor[..., 4]): ``(x0, y0, x1, y1)``, broadcastable with ``boxes1``.

    Returns:
        Tensor[...]: IoU, by the same formula as :func:`box_iou`. No input checks: an internal helper.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1 + area2 - inter)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1 (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point.
        boxes2 (Tensor[M, 4]): ``(x0, y0, x1, y1)``, same device as ``boxes1``.

    Returns:
        Tensor[N, M]: IoU in the promoted dtype of the inputs (float16 and bfloat16 computed
        in float32, so large boxes do not overflow). Two zero-area boxes give
        ``nan`` (0 / 0), as in torchvision; an inverted box has a negative area and its IoU
        is not meaningful, but is defined by the same formula.
    """
    boxes1 = check_boxes("boxes1", boxes1)
    boxes2 = check_boxes("boxes2", boxes2)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    return pairwise_iou(boxes1, boxes2)
