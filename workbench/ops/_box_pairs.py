"""The pairs of boxes that intersect, from a sweep over horizontal strips: the sparse part of the CPU NMS family.

All in NumPy on the boxes' dtype (float32 or float64), with the IoU arithmetic of
:func:`.boxes.pairwise_iou`, so that comparing these IoUs decides exactly as torchvision and the
reference loop of :mod:`._nms_cpu` do.
"""

from __future__ import annotations

import numpy as np

# Areas from which an intersection that underflows gives an IoU of at most 2^-40 (see :func:`_inner`).
_TINY_AREA = {t: np.finfo(t).tiny * 2.0**40 for t in (np.float32, np.float64)}
_TINY_HEIGHT = float(np.finfo(np.float64).tiny)


def _inner(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, area: np.ndarray, min_iou: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds that a box whose IoU with this one reaches ``min_iou`` must start before, in the boxes' dtype.

    The IoU of two boxes is at most ``w / W``, their intersection's width over either one's
    width (the union is at least either area, the intersection at most ``w`` times either
    height), and their float IoU at most that times ``1 + 10 eps`` (a few roundings without
    cancellation: the union is at least half the sum of the areas); likewise for heights. So the
    other box must start left of ``x1 - min_iou * W`` and above ``y1 - min_iou * H``. The bounds carry a margin far above those roundings and are
    rounded outwards. They are taken only where that holds: an extent not lost in its
    coordinates' rounding, an area clear of underflow (an intersection that underflows gives an
    IoU of at most 2^-40 then) and finite; elsewhere they are the box's own edges.

    Returns:
        (x_upper [N], y_upper [N]): the other box needs ``x0 < x_upper`` and ``y0 < y_upper``.
    """
    corners = np.stack((x0, y0, x1, y1)).astype(np.float64)
    low, high = corners[:2], corners[2:]
    extent = high - low  # float64 extremes: an inf extent has an inf area, so is not safe
    safe = ((extent >= 1e-6 * (np.abs(low) + np.abs(high)))
            & ((area >= _TINY_AREA[area.dtype.type]) & np.isfinite(area)))
    # No IoU exceeds 1 by more than the margin, so a higher threshold narrows as far as 1 does.
    margin = extent * (safe * (min(min_iou, 1.0) * (1 - 1e-4)))
    upper64 = high - margin
    upper = upper64.astype(area.dtype)
    np.nextafter(upper, np.inf, out=upper, where=upper < upper64)
    return upper[0], upper[1]


def argsort_ints(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of integers in ``[0, bound)``: NumPy radix-sorts 16-bit keys, in linear time."""
    return np.argsort(keys.astype(np.uint16) if bound <= 2**16 else keys, kind="stable")


# Huge boxes overflow to inf and inf - inf gives NaN, silently, as in torch's pairwise_iou.
@np.errstate(over="ignore", invalid="ignore")
def intersecting_pairs(boxes: np.ndarray, min_iou: float = 0.0, max_candidates: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every pair of boxes that intersect (positive intersection area) and may have IoU >= ``min_iou``, once each.

    Any other pair has IoU 0 (or 0/0 = NaN), which neither suppresses nor decays. Candidates come
    from a sweep along x within horizontal strips: each box is entered in every strip its
    ``[y0, y_upper]`` spans, and a pair is taken only in the strip of its lower ``y0`` edge, which
    both boxes span. ``x_upper`` and ``y_upper`` are ``x1`` and ``y1``, or for ``min_iou >= 1e-3``
    the bounds of :func:`_inner`, which leave out pairs that cannot reach it (callers compare the
    IoUs themselves). The IoU arithmetic is :func:`.boxes.pairwise_iou`'s, operation for operation.

    Returns:
        (first [E], second [E], iou [E]): box indices and IoU of each pair; None if there would
        be more than ``max_candidates`` candidate pairs.
    """
    n = boxes.shape[0]
    x0, y0, x1, y1 = (np.ascontiguousarray(c) for c in boxes.T)
    area = (x1 - x0) * (y1 - y0)
    # Boxes without a positive width and height intersect nothing.
    valid = ((x1 > x0) & (y1 > y0)).nonzero()[0]
    if not valid.size:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=boxes.dtype)
    by_x = valid[x0[valid].argsort(kind="stable")]
    x_rank = np.empty(n, dtype=np.int64)
    x_rank[by_x] = np.arange(by_x.size)
    x_upper, y_upper = _inner(x0, y0, x1, y1, area, min_iou) if min_iou >= 1e-3 else (x1, y1)
    # A pair's y0 values both lie below the other box's y_upper, so strips need only span [y0, y_upper].
    # Any non-decreasing map of y to strips is correct; halving keeps float64 differences finite,
    # and at most 2^30 strips keep the indices in range for any spread of the boxes.
    low, high = y0.astype(np.float64) * 0.5, y_upper.astype(np.float64) * 0.5
    top = min(float(low.min()), float(high.min()))
    height = max(float((high[valid] - low[valid]).mean()), (max(float(low.max()), float(high.max())) - top) / 2**30,
                 _TINY_HEIGHT)
    first_strip = np.floor((low - top) / height).astype(np.int64)
    last_strip = np.floor((high - top) / height).astype(np.int64)
    spans = last_strip[by_x] - first_strip[by_x] + 1
    # One entry per (box, strip it spans), ordered by strip, then x0 (ties by index).
    box = by_x.repeat(spans)
    strip = first_strip[box] + np.arange(box.size) - (spans.cumsum() - spans).repeat(spans)
    # Entries are in x order already, so a stable sort by strip orders them.
    in_order = argsort_ints(strip, int(strip.max()) + 1)
    box, strip = box[in_order], strip[in_order]
    key = strip * n + x_rank[box]
    # Entries after entry e in its strip whose x0 is below e's bound: searchsorted on the same key.
    x_end = x0[by_x].searchsorted(x_upper)
    ends = key.searchsorted(strip * n + x_end[box])
    counts = np.maximum(ends - np.arange(1, box.size + 1), 0)
    total = int(counts.sum())
    if max_candidates is not None and total > max_candidates:
        return None
    f = np.arange(total) - (counts.cumsum() - counts - np.arange(1, box.size + 1)).repeat(counts)
    # Candidate (e, f) of entries: e's side by np.repeat, f's by gathers at near-sequential entries.
    ex0, ey0, ex1, ey1, e_area, e_upper = (c[box] for c in (x0, y0, x1, y1, area, y_upper))
    home = first_strip[box] == strip
    meet = ((ey0[f] < e_upper.repeat(counts)) & (ey0.repeat(counts) < e_upper[f])
            & (home.repeat(counts) | home[f]))
    meet = meet.nonzero()[0]
    e, f = np.arange(box.size).repeat(counts)[meet], f[meet]
    w = np.minimum(ex1[e], ex1[f]) - np.maximum(ex0[e], ex0[f])
    h = np.minimum(ey1[e], ey1[f]) - np.maximum(ey0[e], ey0[f])
    inter = w * h
    # w, h > 0 here; their product can still underflow to 0 (IoU 0: weight 1).
    hit = inter > 0
    e, f, inter = e[hit], f[hit], inter[hit]
    iou = inter / (e_area[e] + e_area[f] - inter)
    first, second = box[e], box[f]
    return first, second, iou
