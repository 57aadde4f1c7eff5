"""The CPU side of the NMS family: the greedy reference loop, and the fast paths the public functions run.

The reference, :func:`greedy_nms`, is the definition: select the alive box with the highest
ranking key (ties go to the lower index), keep it, and let a *rule* decide the fate of the boxes
still alive from their IoU with the selected one. It runs one Python iteration per kept box, so
it stays as the tests' oracle and the fast paths must return exactly what it returns:

* :func:`suppress` (hard NMS, optionally rescored as IoU-guided NMS) keeps what
  ``torchvision.ops.nms`` keeps: its compiled loop is the same greedy algorithm with the same
  arithmetic (see :func:`suppress`). The box that removed each other box, and with it the
  IoU-guided score, then follows in one vectorized pass (:func:`first_suppressor`).
* :func:`soft` selects many boxes per step: see :func:`soft`.

Every function here takes tensors already in the compute dtype (float32 or float64) and returns
``(keep, new_scores, suppressors)``: ``suppressors[i]`` is -1 for a kept box, the index of the
kept box whose selection removed box ``i``, or -2 for a box removed before any selection (Soft-NMS
scores below ``score_threshold`` from the start).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from torch import Tensor

from .boxes import pairwise_iou

# A rule sees the selected box, the indices of the boxes still alive besides it (ascending) and
# their IoU with it; it returns which of them stay alive and the selected box's output score.
_Rule = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]

KEPT, UNSUPPRESSED = -1, -2

# Elements of one block of the kept x suppressed IoU matrix in :func:`first_suppressor`.
_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def greedy_nms(boxes: Tensor, rank: Tensor, rule: _Rule, alive: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The greedy skeleton shared by every NMS variant.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``.
        rank (Tensor[N]): ranking key; ``rule`` may change it in place (Soft-NMS decays it).
        rule: decides, after each selection, which alive boxes survive and the selected box's score.
        alive (Tensor[M] int64, optional): ascending indices of the candidate boxes; all by default.

    Returns:
        (Tensor[K] int64, Tensor[K], Tensor[N] int64): selected indices in selection order, their
        output scores, and the suppressor of every box.
    """
    n = boxes.shape[0]
    if alive is None:
        alive = torch.arange(n, device=boxes.device)
    suppressors = torch.full((n,), UNSUPPRESSED, dtype=torch.int64, device=boxes.device)
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
        suppressors[top] = KEPT
        suppressors.index_fill_(0, rest.masked_select(~survive), top)
        alive = rest.masked_select(survive)
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device), rank.new_empty(0), suppressors
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device), torch.stack(kept_scores), suppressors


def suppression_rule(scores: Tensor, iou_threshold: float, rescore: bool) -> _Rule:
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


def soft_rule(current: Tensor, iou_threshold: float, sigma: float, score_threshold: float, gaussian: bool) -> _Rule:
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


def reference_suppress(boxes: Tensor, rank: Tensor, scores: Tensor, iou_threshold: float, rescore: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Hard NMS ranked by ``rank`` by the reference loop."""
    return greedy_nms(boxes, rank, suppression_rule(scores, iou_threshold, rescore))


def reference_soft(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
                   gaussian: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS by the reference loop; decays ``current`` in place."""
    # Boxes that start below the threshold are pruned before the first selection, so every
    # returned score is >= score_threshold.
    alive = torch.nonzero(current.double() >= score_threshold).flatten()
    rule = soft_rule(current, iou_threshold, sigma, score_threshold, gaussian)
    return greedy_nms(boxes, current, rule, alive)


# --------------------------------------------------------------------------------------------
# Fast paths
# --------------------------------------------------------------------------------------------


def strictly_above(dtype: torch.dtype, threshold: float) -> float:
    """The largest ``dtype`` value ``t <= threshold``: for ``x`` of that dtype, ``x > t`` iff ``x > threshold``.

    Lets a float32 tensor be compared in float32 exactly as if it were compared in float64
    (which is how torchvision compares its float IoU with the double threshold).
    """
    t = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(t) > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


def first_suppressor(boxes: Tensor, keep: Tensor, iou_threshold: float) -> Tensor:
    """The suppressors of hard NMS, from its keep list alone.

    A box that greedy NMS did not keep stays alive until the first selected box whose IoU with it
    exceeds the threshold removes it, and every box selected before that one overlapped it at
    most by the threshold. So its suppressor is the first kept box, in selection order, that
    overlaps it by more than ``iou_threshold``: one vectorized pass over the kept x dropped IoUs.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``.
        keep (Tensor[K] int64): the kept indices in selection order.

    Returns:
        Tensor[N] int64: -1 for kept boxes, else the index of the box that removed it.
    """
    n = boxes.shape[0]
    suppressors = torch.full((n,), KEPT, dtype=torch.int64, device=boxes.device)
    dropped_mask = torch.ones(n, dtype=torch.bool, device=boxes.device)
    dropped_mask[keep] = False
    dropped = dropped_mask.nonzero().flatten()
    if not dropped.numel():
        return suppressors
    bound = strictly_above(boxes.dtype, iou_threshold)
    kept_boxes = boxes.index_select(0, keep)
    step = max(1, _BLOCK_ELEMENTS // max(1, keep.numel()))
    for block in torch.split(dropped, step):
        over = pairwise_iou(kept_boxes, boxes.index_select(0, block)) > bound  # (K, B)
        # argmax returns the first maximum: the first kept box above the threshold.
        suppressors[block] = keep[over.to(torch.uint8).argmax(0)]
    return suppressors


def suppress(boxes: Tensor, rank: Tensor, scores: Tensor, iou_threshold: float, rescore: bool,
             with_suppressors: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Hard NMS ranked by ``rank``; with ``rescore``, IoU-guided NMS's cluster maximum of ``scores``.

    ``torchvision.ops.nms`` on CPU is the reference loop compiled: a stable descending sort of the
    key (ties to the lower index; -0.0 and 0.0 tie), the same IoU arithmetic in the boxes' dtype
    (``inter / (area_i + area_j - inter)`` with areas from the raw corners, so inverted boxes get
    the same negative areas), compared as ``IoU > threshold`` against the double threshold (NaN,
    from two zero-area boxes, suppresses nothing). The tests check the two against each other.
    """
    keep = torch.ops.torchvision.nms(boxes, rank, iou_threshold)
    if not (rescore or with_suppressors):
        return keep, scores.index_select(0, keep), None
    suppressors = first_suppressor(boxes, keep, iou_threshold)
    if rescore:
        dropped = (suppressors >= 0).nonzero().flatten()
        best = scores.clone().scatter_reduce_(0, suppressors[dropped], scores[dropped], "amax")
        new_scores = best.index_select(0, keep)
    else:
        new_scores = scores.index_select(0, keep)
    return keep, new_scores, suppressors if with_suppressors else None


def soft(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
         gaussian: bool) -> tuple[Tensor, Tensor, Tensor]:
    return reference_soft(boxes, current, iou_threshold, sigma, score_threshold, gaussian)
