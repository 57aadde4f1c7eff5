"""Greedy non-maximum suppression: standard NMS, Soft-NMS (Bodla et al. 2017) and IoU-guided NMS
(IoU-Net, Algorithm 1), each with a class-aware ``batched_*`` form.

All three are one greedy loop, :func:`_greedy_nms`: select the alive box with the highest
ranking key (ties go to the lower index), keep it, and let a *rule* decide the fate of the boxes
still alive from their IoU with the selected one. Only the key and the rule differ:

* :func:`nms`: key = score; drop every box with IoU > ``iou_threshold``.
* :func:`soft_nms`: key = current score; decay the scores by IoU, drop those that fall below
  ``score_threshold``.
* :func:`iou_guided_nms`: key = localization confidence (predicted IoU); drop every box with
  IoU > ``iou_threshold``, and the kept box takes the highest score among itself and the boxes it
  dropped.

CPU tensors run that loop in PyTorch: it is the reference. CUDA tensors run the kernels in
``kernels/nms.cu``, which repeat its arithmetic operation for operation and its tie-breaking:
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

from . import _cuda
from ._checks import (
    check_boxes,
    check_finite,
    check_same_device,
    check_scores,
    check_shape,
    check_tensor,
    check_threshold,
)
from .boxes import pairwise_iou

__all__ = ["nms", "soft_nms", "iou_guided_nms", "batched_nms", "batched_soft_nms", "batched_iou_guided_nms"]

# A rule sees the selected box, the indices of the boxes still alive besides it (ascending) and
# their IoU with it; it returns which of them stay alive and the selected box's output score.
_Rule = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]

_SOFT_METHODS = ("linear", "gaussian")

# CUDA launch geometry; the values the kernels rely on are spelled out in kernels/nms.cu.
_WORD_BITS = 64  # boxes per mask word, and the mask kernel's block size (NMS_WORD_BITS)
_BLOCK_THREADS = 256  # the one block of the scan and Soft-NMS kernels: a multiple of 32, <= 1024
# A block gets 48 KiB of shared memory without opting in, on every GPU; the scan's bitset (one bit
# per box) must leave room for its static per-warp slots (at most 32 doubles).
_MAX_BITSET_BYTES = 47 * 1024
_MAX_CUDA_BOXES = _MAX_BITSET_BYTES * 8


# --------------------------------------------------------------------------------------------
# The reference path
# --------------------------------------------------------------------------------------------


def _greedy_nms(boxes: Tensor, rank: Tensor, rule: _Rule, alive: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The greedy skeleton shared by every NMS variant.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``.
        rank (Tensor[N]): ranking key; ``rule`` may change it in place (Soft-NMS decays it).
        rule: decides, after each selection, which alive boxes survive and the selected box's score.
        alive (Tensor[M] int64, optional): ascending indices of the candidate boxes; all by default.

    Returns:
        (Tensor[K] int64, Tensor[K]): selected indices in selection order, and their output scores.
    """
    if alive is None:
        alive = torch.arange(boxes.shape[0], device=boxes.device)
    keep: list[int] = []
    kept_scores: list[Tensor] = []
    # index_select / masked_select rather than ``x[index]``: advanced indexing of a 2-D tensor
    # goes multi-threaded and stalls for milliseconds per call on a busy CPU.
    while alive.numel():
        # argmax returns the first maximum and ``alive`` is ascending, so ties go to the lower index.
        pos = int(rank.index_select(0, alive).argmax())
        top = int(alive[pos])
        rest = torch.cat((alive[:pos], alive[pos + 1 :]))
        iou = pairwise_iou(boxes[top : top + 1], boxes.index_select(0, rest))[0]
        survive, score = rule(top, rest, iou)
        keep.append(top)
        kept_scores.append(score)
        alive = rest.masked_select(survive)
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), rank.new_empty(0)
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device), torch.stack(kept_scores)


def _suppression_rule(scores: Tensor, iou_threshold: float, rescore: bool) -> _Rule:
    """Hard suppression (IoU > threshold); with ``rescore`` the kept box takes the max score of its cluster."""

    def rule(top: int, rest: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        # In float64, as torchvision compares its float IoU to the double threshold: comparing in
        # float32 would round the threshold first and flip IoUs that land between the two values.
        # A 0/0 IoU (two zero-area boxes) is NaN and suppresses nothing.
        suppressed = iou.double() > iou_threshold
        score = scores[top]
        if rescore:
            score = torch.cat((scores[top : top + 1], scores.index_select(0, rest.masked_select(suppressed)))).max()
        return ~suppressed, score

    return rule


def _soft_rule(current: Tensor, iou_threshold: float, sigma: float, score_threshold: float, gaussian: bool) -> _Rule:
    """Soft-NMS decay of ``current`` (modified in place), then pruning below ``score_threshold``."""

    def rule(top: int, rest: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        if gaussian:
            # A 0/0 IoU carries no overlap, so it must not decay (NaN would poison the score).
            weight = torch.exp(-(iou * iou) / sigma).nan_to_num(nan=1.0)
        else:
            weight = torch.where(iou.double() >= iou_threshold, 1 - iou, torch.ones_like(iou))
        decayed = current.index_select(0, rest) * weight
        current.index_copy_(0, rest, decayed)
        # The selected box is no longer alive, so its entry of ``current`` is final.
        return decayed.double() >= score_threshold, current[top].clone()

    return rule


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision IoUs would round thresholds coarsely and the kernels have no half arithmetic.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _suppress(boxes: Tensor, rank: Tensor, scores: Tensor, iou_threshold: float, rescore: bool) -> tuple[Tensor, Tensor]:
    """Hard NMS ranked by ``rank``: (keep in selection order, output scores in ``scores.dtype``)."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)
    dtype = _compute_dtype(boxes.dtype)
    boxes, rank, work = boxes.to(dtype), rank.to(dtype), scores.to(dtype)
    if boxes.is_cuda:
        keep, new_scores, _ = _suppress_cuda(boxes, rank, work if rescore else None, iou_threshold)
        if new_scores is None:
            new_scores = work[keep]
    else:
        keep, new_scores = _greedy_nms(boxes, rank, _suppression_rule(work, iou_threshold, rescore))
    return keep, new_scores.to(scores.dtype)


def _soft(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
          method: str) -> tuple[Tensor, Tensor]:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)
    dtype = _compute_dtype(boxes.dtype)
    boxes, current = boxes.to(dtype), scores.to(dtype, copy=True)
    gaussian = method == "gaussian"
    if boxes.is_cuda:
        keep, new_scores, _ = _soft_cuda(boxes, current, iou_threshold, sigma, score_threshold, gaussian)
    else:
        # Boxes that start below the threshold are pruned before the first selection, so every
        # returned score is >= score_threshold.
        alive = torch.nonzero(current.double() >= score_threshold).flatten()
        rule = _soft_rule(current, iou_threshold, sigma, score_threshold, gaussian)
        keep, new_scores = _greedy_nms(boxes, current, rule, alive)
    return keep, new_scores.to(scores.dtype)


# --------------------------------------------------------------------------------------------
# The CUDA path: kernels/nms.cu
# --------------------------------------------------------------------------------------------


def _kernel(name: str, dtype: torch.dtype, device: int):
    return _cuda.get_kernel("nms.cu", f"{name}_{'double' if dtype == torch.float64 else 'float'}", device)


def _suppress_cuda(boxes: Tensor, rank: Tensor, scores: Tensor | None, iou_threshold: float,
                   with_suppressors: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Hard NMS by ``kernels/nms.cu``: (keep, new scores if ``scores`` is given, suppressors if asked).

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
    with _cuda.on_device_of(boxes) as device:
        _kernel("nms_mask", boxes.dtype, device)(
            (_cuda.blocks_for(words * words, 1),), (_WORD_BITS,),
            (_cuda.as_cupy(sorted_boxes), np.int64(n), np.float64(iou_threshold), _cuda.as_cupy(mask)),
        )
        # None is passed as a null pointer: no rescoring, no suppressors.
        optional = [None if t is None else _cuda.as_cupy(t) for t in (sorted_scores, new_scores, suppressors)]
        _kernel("nms_scan", boxes.dtype, device)(
            (1,), (_BLOCK_THREADS,),
            (_cuda.as_cupy(mask), np.int64(n), *optional, _cuda.as_cupy(positions), _cuda.as_cupy(count)),
            shared_mem=words * 8,
        )
    k = int(count.item())
    if suppressors is not None:
        # The kernel speaks sorted positions; map both the box and its suppressor back to input indices.
        by_input = torch.where(suppressors < 0, suppressors, order[suppressors.clamp(min=0)])
        suppressors = torch.empty_like(by_input).index_copy_(0, order, by_input)
    return order[positions[:k]], (None if new_scores is None else new_scores[:k]), suppressors


def _soft_cuda(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
               gaussian: bool, with_suppressors: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Soft-NMS by ``kernels/nms.cu``: (keep, scores at selection, suppressors if asked).

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
    with _cuda.on_device_of(boxes) as device:
        _kernel("soft_nms", boxes.dtype, device)(
            (1,), (_BLOCK_THREADS,),
            (_cuda.as_cupy(boxes), _cuda.as_cupy(current), _cuda.as_cupy(alive), np.int64(n),
             np.float64(iou_threshold), np.float64(sigma), np.float64(score_threshold), np.int32(gaussian),
             None if suppressors is None else _cuda.as_cupy(suppressors),
             _cuda.as_cupy(keep), _cuda.as_cupy(kept_scores), _cuda.as_cupy(count)),
        )
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
    sigma = check_threshold("sigma", sigma)
    if sigma == 0.0:
        raise ValueError("sigma must be a finite number > 0, got 0.0")
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


def _per_class(idxs: Tensor, run: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Apply ``run(members) -> (keep, scores)`` to each class separately and merge by :func:`_by_score`.

    One call per class, not the coordinate-offset trick: offsetting boxes of different classes
    apart rounds their coordinates and can change IoUs near the threshold.
    """
    by_class = torch.argsort(idxs, stable=True)
    counts = torch.unique_consecutive(idxs[by_class], return_counts=True)[1]
    keeps, scores = [], []
    # Stable sort: each class's members stay in ascending index order, so ties within a class
    # still go to the lower original index.
    for members in torch.split(by_class, counts.tolist()):
        keep, score = run(members)
        keeps.append(members[keep])
        scores.append(score)
    return _by_score(torch.cat(keeps), torch.cat(scores))


def _empty_like(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64, device=boxes.device), scores.new_empty(0)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression, identical to :func:`torchvision.ops.nms`.

    Repeatedly keeps the highest-scoring remaining box and discards the remaining boxes whose IoU
    with it is greater than ``iou_threshold``.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite. Zero-size and inverted
            boxes go through the same IoU formula; two zero-area boxes have IoU 0/0 = NaN, which
            suppresses nothing.
        scores (Tensor[N]): scores, same dtype and device as ``boxes``, no NaN.
        iou_threshold (float): discard boxes with IoU > ``iou_threshold``; finite, ``>= 0``.

    Returns:
        Tensor[K] int64: indices of the kept boxes in decreasing order of score. Equal scores are
        ranked by ascending index (a stable sort), as torchvision does.

    IoUs are computed in the boxes' dtype (float32 for float16/bfloat16) and compared to the
    threshold in float64.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    return _suppress(boxes, scores, scores, iou_threshold, rescore=False)[0]


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "linear",
) -> tuple[Tensor, Tensor]:
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

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices in selection order, and ``new_scores[i]``, the
        score of ``keep[i]`` when it was selected (non-increasing, all ``>= score_threshold``),
        in the dtype of ``scores``.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    sigma, score_threshold = _check_soft(scores, sigma, score_threshold, method)
    return _soft(boxes, scores, iou_threshold, sigma, score_threshold, method)


def iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
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

    Returns:
        (Tensor[K] int64, Tensor[K]): kept indices in selection order (decreasing ``ious``) and
        their new scores, in the dtype of ``scores``.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    ious = check_scores("ious", ious, boxes.shape[0], boxes)
    return _suppress(boxes, ious, scores, iou_threshold, rescore=True)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """:func:`nms` within each category; identical to :func:`torchvision.ops.batched_nms`.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``, floating point, finite.
        scores (Tensor[N]): scores, same dtype and device as ``boxes``, no NaN.
        idxs (Tensor[N]): integer category of each box; boxes of different categories never
            suppress each other.
        iou_threshold (float): discard boxes with IoU > ``iou_threshold``; finite, ``>= 0``.

    Returns:
        Tensor[K] int64: indices of the kept boxes in decreasing order of score, equal scores by
        ascending index.
    """
    boxes, scores, iou_threshold = _check_common(boxes, scores, iou_threshold)
    idxs = _check_idxs(idxs, boxes)
    if boxes.shape[0] == 0:
        return _empty_like(boxes, scores)[0]
    return _per_class(idxs, lambda m: _suppress(boxes.index_select(0, m), scores[m], scores[m], iou_threshold, rescore=False))[0]


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "linear",
) -> tuple[Tensor, Tensor]:
    """:func:`soft_nms` within each category.

    Args:
        boxes, scores, iou_threshold, sigma, score_threshold, method: as in :func:`soft_nms`.
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
        return _empty_like(boxes, scores)
    return _per_class(idxs, lambda m: _soft(boxes.index_select(0, m), scores[m], iou_threshold, sigma, score_threshold, method))


def batched_iou_guided_nms(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """:func:`iou_guided_nms` within each category.

    Args:
        boxes, scores, ious, iou_threshold: as in :func:`iou_guided_nms`.
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
        return _empty_like(boxes, scores)
    return _per_class(idxs, lambda m: _suppress(boxes.index_select(0, m), ious[m], scores[m], iou_threshold, rescore=True))
