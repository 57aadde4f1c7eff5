"""Greedy non-maximum suppression: standard NMS, Soft-NMS (Bodla et al. 2017) and IoU-guided NMS
(IoU-Net, Algorithm 1), each with a class-aware ``batched_*`` form.

All three are one greedy loop, :func:`._nms_cpu.greedy_nms`: select the alive box with the highest
ranking key (ties go to the lower index), keep it, and let a *rule* decide the fate of the boxes
still alive from their IoU with the selected one. Only the key and the rule differ:

* :func:`nms`: key = score; drop every box with IoU > ``iou_threshold``.
* :func:`soft_nms`: key = current score; decay the scores by IoU, drop those that fall below
  ``score_threshold``.
* :func:`iou_guided_nms`: key = localization confidence (predicted IoU); drop every box with
  IoU > ``iou_threshold``, and the kept box takes the highest score among itself and the boxes it
  dropped.

That loop, in PyTorch, is the reference; CPU tensors run the fast paths of :mod:`._nms_cpu`,
which the tests hold equal to it (hard NMS resolved in a few vectorized rounds over the sparse
pairs above the threshold, Soft-NMS by selecting many boxes per step). CUDA tensors run the kernels in
``workbench/kernels/nms.cu``, which repeat its arithmetic operation for operation and its tie-breaking:
a parallel bitmask of "i suppresses j" walked by one block (:func:`nms`, :func:`iou_guided_nms`),
and a one-block Soft-NMS loop. float16 and bfloat16 inputs are computed in float32 on both
devices, so the two paths agree for every dtype. The CUDA hard-NMS scan keeps one bit per box in
shared memory, which bounds it to 385,024 boxes per call (per class in the batched forms).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from . import _cuda, _nms_cpu
from ._checks import (
    check_boxes,
    check_finite,
    check_same_device,
    check_scores,
    check_shape,
    check_tensor,
    check_threshold,
)

__all__ = ["nms", "soft_nms", "iou_guided_nms", "batched_nms", "batched_soft_nms", "batched_iou_guided_nms"]

_SOFT_METHODS = ("linear", "gaussian")

# CUDA launch geometry; the values the kernels rely on are spelled out in workbench/kernels/nms.cu.
_WORD_BITS = 64  # boxes per mask word, and the mask kernel's block size (NMS_WORD_BITS)
_BLOCK_THREADS = 256  # the one block of the scan and Soft-NMS kernels: a multiple of 32, <= 1024
# A block gets 48 KiB of shared memory without opting in, on every GPU; the scan's bitset (one bit
# per box) must leave room for its static per-warp slots (at most 32 doubles).
_MAX_BITSET_BYTES = 47 * 1024
_MAX_CUDA_BOXES = _MAX_BITSET_BYTES * 8


# --------------------------------------------------------------------------------------------
# Dispatch: CPU to ._nms_cpu, CUDA to the kernels below
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision IoUs would round thresholds coarsely and the kernels have no half arithmetic.
    return torch.float64 if dtype == torch.float64 else torch.float32


# (keep in selection order, output scores in the scores' dtype, suppressors or None)
_Result = tuple[Tensor, Tensor, Tensor | None]


def _empty_result(boxes: Tensor, scores: Tensor, with_suppressors: bool) -> _Result:
    empty = torch.empty(0, dtype=torch.int64, device=boxes.device)
    return empty, scores.new_empty(0), (empty.clone() if with_suppressors else None)


def _suppress(boxes: Tensor, rank: Tensor, scores: Tensor, iou_threshold: float, rescore: bool,
              with_suppressors: bool = False) -> _Result:
    """Hard NMS ranked by ``rank``; with ``rescore``, IoU-guided NMS's cluster maximum of ``scores``."""
    if boxes.shape[0] == 0:
        return _empty_result(boxes, scores, with_suppressors)
    dtype = _compute_dtype(boxes.dtype)
    boxes, rank, work = boxes.to(dtype), rank.to(dtype), scores.to(dtype)
    if boxes.is_cuda:
        keep, new_scores, suppressors = _suppress_cuda(boxes, rank, work if rescore else None, iou_threshold,
                                                       with_suppressors)
        if new_scores is None:
            new_scores = work[keep]
    else:
        keep, new_scores, suppressors = _nms_cpu.suppress(boxes, rank, work, iou_threshold, rescore, with_suppressors)
    return keep, new_scores.to(scores.dtype), suppressors


def _soft(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
          method: str, with_suppressors: bool = False) -> _Result:
    if boxes.shape[0] == 0:
        return _empty_result(boxes, scores, with_suppressors)
    dtype = _compute_dtype(boxes.dtype)
    boxes, current = boxes.to(dtype), scores.to(dtype, copy=True)
    gaussian = method == "gaussian"
    if boxes.is_cuda:
        keep, new_scores, suppressors = _soft_cuda(boxes, current, iou_threshold, sigma, score_threshold, gaussian,
                                                   with_suppressors)
    else:
        keep, new_scores, suppressors = _nms_cpu.soft(boxes, current, iou_threshold, sigma, score_threshold, gaussian)
    return keep, new_scores.to(scores.dtype), suppressors if with_suppressors else None


# --------------------------------------------------------------------------------------------
# The CUDA path: workbench/kernels/nms.cu
# --------------------------------------------------------------------------------------------


def _launch(name: str, dtype: torch.dtype, grid: int, block: int, args: tuple, shared_mem: int = 0) -> None:
    function = f"{name}_{'double' if dtype == torch.float64 else 'float'}"
    _cuda.launch("nms.cu", function, grid, block, args, shared_mem)


def _suppress_cuda(boxes: Tensor, rank: Tensor, scores: Tensor | None, iou_threshold: float,
                   with_suppressors: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Hard NMS by ``workbench/kernels/nms.cu``: (keep, new scores if ``scores`` is given, suppressors if asked).

    ``boxes`` (Tensor[N, 4]), ``rank`` and ``scores`` (Tensor[N]) share one float dtype and device;
    the suppressors (Tensor[N] int64) use input indices, -1 for a kept box.
    """
    n = boxes.shape[0]
    if n > _MAX_CUDA_BOXES:
        raise ValueError(f"boxes must hold at most {_MAX_CUDA_BOXES} boxes for the CUDA NMS kernel, got {n}")
    words = (n + _WORD_BITS - 1) // _WORD_BITS
    # Stable, so equal keys keep index order as on the CPU; + 0.0 makes -0.0 and 0.0 tie there too.
    order = torch.sort(rank + 0.0, descending=True, stable=True).indices
    sorted_boxes = boxes[order].contiguous()
    sorted_scores = scores[order].contiguous() if scores is not None else None
    # Every buffer below is written by the kernels wherever it is read (the mask from each row's
    # diagonal word on, the others up to ``count``), hence new_empty.
    mask = boxes.new_empty((n, words), dtype=torch.int64)  # bit patterns of uint64 words
    positions = boxes.new_empty(n, dtype=torch.int64)
    new_scores = boxes.new_empty(n) if scores is not None else None
    suppressors = boxes.new_empty(n, dtype=torch.int64) if with_suppressors else None
    count = boxes.new_zeros(1, dtype=torch.int64)
    _launch("nms_mask", boxes.dtype, _cuda.blocks_for(words * words, 1), _WORD_BITS,
            (sorted_boxes, np.int64(n), np.float64(iou_threshold), mask))
    # None is a null pointer: no rescoring, no suppressors.
    _launch("nms_scan", boxes.dtype, 1, _BLOCK_THREADS,
            (mask, np.int64(n), sorted_scores, new_scores, suppressors, positions, count), shared_mem=words * 8)
    k = int(count.item())
    if suppressors is not None:
        # The kernel speaks sorted positions; map both the box and its suppressor back to input indices.
        by_input = torch.where(suppressors < 0, suppressors, order[suppressors.clamp(min=0)])
        suppressors = torch.empty_like(by_input).index_copy_(0, order, by_input)
    return order[positions[:k]], (None if new_scores is None else new_scores[:k]), suppressors


def _soft_cuda(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
               gaussian: bool, with_suppressors: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Soft-NMS by ``workbench/kernels/nms.cu``: (keep, scores at selection, suppressors if asked).

    ``current`` (Tensor[N]) is a work copy of the scores, decayed in place; suppressors
    (Tensor[N] int64) are input indices, -1 for a kept box, -2 for one below ``score_threshold``
    from the start.
    """
    n = boxes.shape[0]
    boxes, current = boxes.contiguous(), current.contiguous()
    # The kernel writes alive and suppressors entirely, keep and kept_scores up to ``count``.
    alive = boxes.new_empty(n, dtype=torch.uint8)
    keep = boxes.new_empty(n, dtype=torch.int64)
    kept_scores = boxes.new_empty(n)
    suppressors = boxes.new_empty(n, dtype=torch.int64) if with_suppressors else None
    count = boxes.new_zeros(1, dtype=torch.int64)
    _launch("soft_nms", boxes.dtype, 1, _BLOCK_THREADS,
            (boxes, current, alive, np.int64(n), np.float64(iou_threshold), np.float64(sigma),
             np.float64(score_threshold), np.int32(gaussian), suppressors, keep, kept_scores, count))
    k = int(count.item())
    return keep[:k], kept_scores[:k], suppressors


# --------------------------------------------------------------------------------------------
# Validation and the class-aware wrapper
# --------------------------------------------------------------------------------------------


def _check_common(boxes: object, scores: object, iou_threshold: object) -> tuple[Tensor, Tensor, float]:
    boxes = check_boxes("boxes", boxes)
    scores = check_scores("scores", scores, boxes.shape[0], boxes)
    return boxes, scores, check_threshold("iou_threshold", iou_threshold)


def _check_soft(scores: Tensor, sigma: object, score_threshold: object, method: object) -> tuple[float, float]:
    # A decayed +inf score would be inf * 0 = NaN, so Soft-NMS needs finite scores.
    check_finite("scores", scores)
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and not 0 < sigma < float("inf"):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    sigma = check_threshold("sigma", sigma)
    if method not in _SOFT_METHODS:
        raise ValueError(f"method must be one of {_SOFT_METHODS}, got {method!r}")
    return sigma, check_threshold("score_threshold", score_threshold)


def _check_idxs(idxs: object, boxes: Tensor) -> Tensor:
    idxs = check_tensor("idxs", idxs)
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise TypeError(f"idxs must be an integer tensor, got dtype {idxs.dtype}")
    n = boxes.shape[0]
    check_shape("idxs", idxs, (n,), f"[N] with N = {n} (one per box)")
    check_same_device(boxes=boxes, idxs=idxs)
    return idxs


def _by_score(keep: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder by score descending, equal scores by ascending box index."""
    keep, by_index = keep.sort()
    scores = scores[by_index]
    order = torch.sort(scores + 0.0, descending=True, stable=True).indices
    return keep[order], scores[order]


def _per_class(idxs: Tensor, run: Callable[[Tensor], _Result]) -> _Result:
    """Apply ``run(members)`` to each class separately and merge by :func:`_by_score`.

    One call per class, not the coordinate-offset trick: offsetting boxes of different classes
    apart rounds their coordinates and can change IoUs near the threshold.
    """
    by_class = torch.argsort(idxs, stable=True)
    counts = torch.unique_consecutive(idxs[by_class], return_counts=True)[1]
    keeps, scores, suppressors = [], [], None
    # Stable sort: each class's members stay in ascending index order, so ties within a class
    # still go to the lower original index.
    for members in torch.split(by_class, counts.tolist()):
        keep, score, suppressor = run(members)
        keeps.append(members[keep])
        scores.append(score)
        if suppressor is not None:
            if suppressors is None:
                suppressors = torch.empty_like(idxs, dtype=torch.int64)
            # Class-local suppressor positions back to input indices; the negative codes stay.
            suppressors[members] = torch.where(suppressor >= 0, members[suppressor.clamp(min=0)], suppressor)
    return *_by_score(torch.cat(keeps), torch.cat(scores)), suppressors


def _output(result: _Result, with_scores: bool) -> Tensor | tuple[Tensor, ...]:
    """The public return value: ``keep``, then ``new_scores`` if ``with_scores``, then the suppressors if computed."""
    keep, new_scores, suppressors = result
    out = (keep, new_scores) if with_scores else (keep,)
    out += () if suppressors is None else (suppressors,)
    return out if len(out) > 1 else keep


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, return_suppressors: bool = False
        ) -> Tensor | tuple[Tensor, Tensor]:
    """Non-maximum suppression, identical to :func:`torchvision.ops.nms`.

    Repeatedly keeps the highest-scoring remaining box and discards the remaining boxes whose IoU
    with it is greater than ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite. Zero-size and inverted
            boxes go through the same IoU formula; two zero-area boxes have IoU 0/0 = NaN, which
            suppresses nothing.
        scores (Tensor[N]): scores, same dtype and device as ``boxes``, no NaN.
        iou_threshold (float): discard boxes with IoU > ``iou_threshold``; finite, ``>= 0``.
        return_suppressors (bool): also return ``suppressors`` (Tensor[N] int64): for each input
            box, -1 if it was kept, else the index of the kept box whose selection removed it (the first kept box,
            in selection order, with IoU > ``iou_threshold``).

    Returns:
        Tensor[K] int64: indices of the kept boxes in decreasing order of score. Equal scores are
        ranked by ascending index (a stable sort), as torchvision does. With
        ``return_suppressors``: ``(keep, suppressors)``.

    IoUs are computed in the boxes' dtype (float32 for float16/bfloat16) and compared to the
    threshold in float64.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    return _output(_suppress(boxes, scores, scores, iou_threshold, False, return_suppressors), with_scores=False)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "linear",
    *,
    return_suppressors: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS (Bodla et al., ICCV 2017): decay the scores of overlapping boxes instead of discarding them.

    Repeatedly selects the remaining box with the highest current score (equal scores: the lower
    index), keeps it, and multiplies the score ``s`` of every other remaining box by

    * ``"linear"``: ``1 - iou`` if ``iou >= iou_threshold``, else 1;
    * ``"gaussian"``: ``exp(-iou ** 2 / sigma)`` (``iou_threshold`` is unused).

    Boxes whose score is below ``score_threshold`` (initially, or after a decay) are removed.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite.
        scores (Tensor[N]): scores, same dtype and device as ``boxes``, finite.
        iou_threshold (float): overlap from which the linear decay applies; finite, ``>= 0``.
        sigma (float): width of the gaussian decay; ``> 0``.
        score_threshold (float): boxes scoring below it are dropped; finite, ``>= 0``.
        method (str): ``"linear"`` or ``"gaussian"``.
        return_suppressors (bool): also return ``suppressors`` (Tensor[N] int64): for each input
            box, -1 if it was kept, else the index of the kept box whose selection removed it (the selected box
            whose decay brought its score below ``score_threshold``), or -2 if its score was below
            ``score_threshold`` from the start.

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices in selection order, and ``new_scores[i]``, the
        score of ``keep[i]`` when it was selected (non-increasing, all ``>= score_threshold``),
        in the dtype of ``scores``. With ``return_suppressors``: ``(keep, new_scores, suppressors)``.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    sigma, score_threshold = _check_soft(scores, sigma, score_threshold, method)
    return _output(_soft(boxes, scores, iou_threshold, sigma, score_threshold, method, return_suppressors), True)


def iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, iou_threshold: float, *,
                   return_suppressors: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """IoU-guided NMS (IoU-Net, Algorithm 1): rank by localization confidence, keep the cluster's best score.

    Repeatedly selects the remaining box with the highest ``ious`` (equal values: the lower index),
    discards the remaining boxes whose IoU with it is greater than ``iou_threshold``, and gives it
    the score ``max(scores[selected], scores[discarded])`` over the boxes discarded at this step.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite.
        scores (Tensor[N]): classification confidences, same dtype and device as ``boxes``, no NaN.
        ious (Tensor[N]): localization confidences (predicted IoU with the ground truth), the
            ranking key; same dtype and device as ``boxes``, no NaN.
        iou_threshold (float): discard boxes with IoU > ``iou_threshold``; finite, ``>= 0``.
        return_suppressors (bool): also return ``suppressors`` (Tensor[N] int64): for each input
            box, -1 if it was kept, else the index of the kept box whose selection removed it: the kept box
            whose cluster it joined.

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices in selection order (decreasing ``ious``) and
        their new scores, in the dtype of ``scores``. With ``return_suppressors``:
        ``(keep, new_scores, suppressors)``.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    ious = check_scores("ious", ious, boxes.shape[0], boxes)
    return _output(_suppress(boxes, ious, scores, iou_threshold, True, return_suppressors), with_scores=True)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *,
                return_suppressors: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`nms` within each category; identical to :func:`torchvision.ops.batched_nms`.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite.
        scores (Tensor[N]): scores, same dtype and device as ``boxes``, no NaN.
        idxs (Tensor[N]): integer category of each box; boxes of different categories never
            suppress each other.
        iou_threshold (float): discard boxes with IoU > ``iou_threshold``; finite, ``>= 0``.
        return_suppressors (bool): also return the suppressors, as in :func:`nms`.

    Returns:
        Tensor[K] int64: indices of the kept boxes in decreasing order of score, equal scores by
        ascending index. With ``return_suppressors``: ``(keep, suppressors)``.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    idxs = _check_idxs(idxs, boxes)
    if boxes.shape[0] == 0:
        return _output(_empty_result(boxes, scores, return_suppressors), with_scores=False)
    return _output(_per_class(idxs, lambda m: _suppress(
        boxes.index_select(0, m), scores[m], scores[m], iou_threshold, False, return_suppressors)), with_scores=False)


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "linear",
    *,
    return_suppressors: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """:func:`soft_nms` within each category.

    Args:
        boxes, scores, iou_threshold, sigma, score_threshold, method, return_suppressors: as in
            :func:`soft_nms`.
        idxs (Tensor[N]): integer category of each box; boxes of different categories never
            decay each other.

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices and their new scores, sorted by new score
        descending, equal scores by ascending index (not the per-class selection order).
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    sigma, score_threshold = _check_soft(scores, sigma, score_threshold, method)
    idxs = _check_idxs(idxs, boxes)
    if boxes.shape[0] == 0:
        return _output(_empty_result(boxes, scores, return_suppressors), with_scores=True)
    return _output(_per_class(idxs, lambda m: _soft(
        boxes.index_select(0, m), scores[m], iou_threshold, sigma, score_threshold, method, return_suppressors)), True)


def batched_iou_guided_nms(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, *, return_suppressors: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """:func:`iou_guided_nms` within each category.

    Args:
        boxes, scores, ious, iou_threshold, return_suppressors: as in :func:`iou_guided_nms`.
        idxs (Tensor[N]): integer category of each box; boxes of different categories never
            suppress each other.

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices and their new scores, sorted by new score
        descending, equal scores by ascending index (not by ``ious``).
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    ious = check_scores("ious", ious, boxes.shape[0], boxes)
    idxs = _check_idxs(idxs, boxes)
    if boxes.shape[0] == 0:
        return _output(_empty_result(boxes, scores, return_suppressors), with_scores=True)
    return _output(_per_class(idxs, lambda m: _suppress(
        boxes.index_select(0, m), ious[m], scores[m], iou_threshold, True, return_suppressors)), with_scores=True)
