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

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from torch import Tensor

from .boxes import pairwise_iou

# A rule sees the selected box, the indices of the boxes still alive besides it (ascending) and
# their IoU with it; it returns which of them stay alive and the selected box's output score.
_Rule = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]

KEPT, UNSUPPRESSED = -1, -2

# Boxes examined per step of :func:`soft`; the step selects the longest non-overlapping prefix of them.
_SOFT_CANDIDATES = 64


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
    overlaps it by more than ``iou_threshold``: one vectorized pass over the intersecting pairs
    (:func:`_intersecting_pairs`), a fraction of all kept x dropped pairs.

    Args:
        boxes (Tensor[N, 4]): ``(x0, y0, x1, y1)``.
        keep (Tensor[K] int64): the kept indices in selection order.

    Returns:
        Tensor[N] int64: -1 for kept boxes, else the index of the box that removed it.
    """
    b, kept = boxes.numpy(), keep.numpy()
    n = b.shape[0]
    # Position in selection order of each kept box; n for the others.
    position = np.full(n, n, dtype=np.int64)
    position[kept] = np.arange(kept.size)
    first, second, iou = _intersecting_pairs(b)
    over = iou > strictly_above(boxes.dtype, iou_threshold)
    first, second = first[over], second[over]
    remover, removed = np.concatenate((first, second)), np.concatenate((second, first))
    candidate = (position[remover] < n) & (position[removed] == n)
    earliest = np.full(n, n, dtype=np.int64)
    np.minimum.at(earliest, removed[candidate], position[remover[candidate]])
    suppressors = np.full(n, KEPT, dtype=np.int64)
    dropped = position == n
    suppressors[dropped] = kept[earliest[dropped]]
    return torch.from_numpy(suppressors)


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
        by, best = suppressors.numpy(), scores.numpy().copy()
        dropped = np.flatnonzero(by >= 0)
        np.maximum.at(best, by[dropped], best[dropped])
        new_scores = torch.from_numpy(best).index_select(0, keep)
    else:
        new_scores = scores.index_select(0, keep)
    return keep, new_scores, suppressors if with_suppressors else None


def at_least(dtype: torch.dtype, threshold: float) -> float:
    """The smallest ``dtype`` value ``t >= threshold``: for ``x`` of that dtype, ``x >= t`` iff ``x >= threshold``."""
    t = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(t) < threshold:
        t = torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype))
    return float(t)


def _intersecting_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of boxes that intersect (positive intersection area), once each, with its IoU.

    Any other pair has IoU 0 (or 0/0 = NaN), which neither suppresses nor decays. Candidates come
    from a sweep along x within horizontal strips as tall as the mean box: each box is entered in
    every strip it spans, and a pair is taken only in the strip of its lower ``y0`` edge, which
    both boxes span. The IoU arithmetic is :func:`pairwise_iou`'s, operation for operation.

    Returns:
        (first [E], second [E], iou [E]): box indices and IoU of each pair.
    """
    n = boxes.shape[0]
    x0, y0, x1, y1 = (np.ascontiguousarray(c) for c in boxes.T)
    with np.errstate(over="ignore"):  # huge boxes overflow to inf, silently, as in torch's pairwise_iou
        area = (x1 - x0) * (y1 - y0)
    # Boxes without a positive width and height intersect nothing.
    valid = np.flatnonzero((x1 > x0) & (y1 > y0))
    if not valid.size:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=boxes.dtype)
    by_x = valid[np.argsort(x0[valid], kind="stable")]
    x_rank = np.empty(n, dtype=np.int64)
    x_rank[by_x] = np.arange(by_x.size)
    top = float(y0[valid].min())
    height = float(np.mean(y1[valid] - y0[valid], dtype=np.float64))
    first_strip = np.floor((y0.astype(np.float64) - top) / height).astype(np.int64)
    last_strip = np.floor((y1.astype(np.float64) - top) / height).astype(np.int64)
    spans = last_strip[by_x] - first_strip[by_x] + 1
    # One entry per (box, strip it spans), ordered by strip, then x0 (ties by index).
    box = np.repeat(by_x, spans)
    strip = first_strip[box] + np.arange(box.size) - np.repeat(np.cumsum(spans) - spans, spans)
    key = strip * n + x_rank[box]
    in_order = np.argsort(key, kind="stable")
    box, strip, key = box[in_order], strip[in_order], key[in_order]
    # Entries after entry e in its strip whose x0 < x1 of e's box: searchsorted on the same key.
    ends = np.searchsorted(key, strip * n + np.searchsorted(x0[by_x], x1[box], side="left"), side="left")
    counts = np.maximum(ends - np.arange(1, box.size + 1), 0)
    e = np.repeat(np.arange(box.size), counts)
    f = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts - np.arange(1, box.size + 1), counts)
    first, second = box[e], box[f]
    meet = ((y0[second] < y1[first]) & (y0[first] < y1[second])
            & (np.maximum(first_strip[first], first_strip[second]) == strip[e]))
    first, second = first[meet], second[meet]
    w = np.minimum(x1[first], x1[second]) - np.maximum(x0[first], x0[second])
    h = np.minimum(y1[first], y1[second]) - np.maximum(y0[first], y0[second])
    inter = w * h
    # w, h > 0 here; their product can still underflow to 0 (IoU 0: weight 1).
    hit = inter > 0
    first, second, inter = first[hit], second[hit], inter[hit]
    iou = inter / (area[first] + area[second] - inter)
    return first, second, iou


def _overlap_graph(boxes: np.ndarray, iou_threshold: float, sigma: float, gaussian: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of boxes whose Soft-NMS weight may differ from 1, as a symmetric CSR graph.

    A pair that does not intersect has IoU 0 (or NaN), whose weight is exactly 1 under both
    decays, so only intersecting pairs (for the linear decay, only IoU >= ``iou_threshold``) are
    edges, with the reference's weights.

    Returns:
        (indptr [N + 1], neighbours [E], weights [E]).
    """
    n = boxes.shape[0]
    first, second, iou = _intersecting_pairs(boxes)
    if gaussian:
        weight = np.exp(-(iou * iou) / sigma)
    else:
        decays = iou >= at_least(torch.float32 if boxes.dtype == np.float32 else torch.float64, iou_threshold)
        first, second, iou = first[decays], second[decays], iou[decays]
        weight = 1 - iou
    source = np.concatenate((first, second))
    stable = np.argsort(source)  # the order within a row does not matter
    indptr = np.concatenate(([0], np.cumsum(np.bincount(source, minlength=n))))
    return indptr, np.concatenate((second, first))[stable], np.concatenate((weight, weight))[stable]


def _ranges(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR entries of ``rows``, in row order: (entry indices, position in ``rows`` of each)."""
    starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(rows.size), counts)
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum()), owner


def _record_removals(targets: np.ndarray, start: np.ndarray, weights: np.ndarray, by: np.ndarray, floor: float,
                     suppressors: np.ndarray, alive: np.ndarray) -> None:
    """Mark the boxes that fell below ``floor`` in one step as removed, each by the first decay that did it.

    Args are per decay, in the order they were applied: the decayed box, its score before the
    step, the weight and the selected box that applied it.
    """
    current = dict(zip(targets.tolist(), start.tolist()))
    dtype = start.dtype.type
    for target, weight, suppressor in zip(targets.tolist(), weights.tolist(), by.tolist()):
        if alive[target]:
            # Replayed in the arrays' dtype, so each product rounds as it did in the step.
            current[target] = float(dtype(current[target]) * dtype(weight))
            if current[target] < floor:
                alive[target] = False
                suppressors[target] = suppressor


def soft(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
         gaussian: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS, selecting many boxes per step with the reference's selections and arithmetic.

    Sort the alive boxes by (current score descending, index ascending): the first, ``c1``, is
    the next selection. So is the second, ``c2``, unless it overlaps ``c1`` (then ``c1`` decays
    it): selections only lower the scores of their overlapping boxes, so ``c2`` still ranks first
    among the rest. The longest prefix of candidates in which no box overlaps an earlier one is
    therefore the reference's next selections, in order, at their current scores. Their decays
    are then applied to each overlapping box in selection order, as the reference multiplies
    them, and a box is removed (with its suppressor) at the first that takes it below
    ``score_threshold``. Overlaps come from :func:`_overlap_graph`, built once; the loop works
    on NumPy arrays, whose per-call overhead is a fraction of a tensor op's.
    """
    b, s = boxes.numpy(), current.numpy().copy()
    n = b.shape[0]
    floor = at_least(current.dtype, score_threshold)
    indptr, neighbours, weights = _overlap_graph(b, iou_threshold, sigma, gaussian)
    suppressors = np.full(n, UNSUPPRESSED, dtype=np.int64)
    alive = s >= floor
    rank = np.full(n, -1, dtype=np.int64)
    keep: list[np.ndarray] = []
    live = np.flatnonzero(alive)
    while live.size:
        scores = s[live]
        if live.size > _SOFT_CANDIDATES:
            # The top candidates exactly: every score above the smallest of the partition's
            # top, then ties at that score by ascending index (``live`` is ascending).
            v = scores[np.argpartition(-scores, _SOFT_CANDIDATES - 1)[:_SOFT_CANDIDATES]].min()
            above = live[scores > v]
            candidates = np.concatenate((above, live[scores == v][: _SOFT_CANDIDATES - above.size]))
        else:
            candidates = live
        candidates = candidates[np.lexsort((candidates, -s[candidates]))]
        rank[candidates] = np.arange(candidates.size)
        entries, owner = _ranges(indptr, candidates)
        other = rank[neighbours[entries]]
        conflict = (other >= 0) & (other < owner)
        length = int(owner[conflict].min()) if conflict.any() else candidates.size
        rank[candidates] = -1
        selected = candidates[:length]
        keep.append(selected)
        alive[selected] = False
        suppressors[selected] = KEPT
        # Decays of the selected boxes, in selection order: ufunc.at applies repeated indices one
        # after the other, so a box overlapping several selected boxes gets the reference's product.
        mine = owner < length
        entries, owner = entries[mine], owner[mine]
        targets = neighbours[entries]
        live_target = alive[targets]
        entries, owner, targets = entries[live_target], owner[live_target], targets[live_target]
        before = s[targets]
        np.multiply.at(s, targets, weights[entries])
        dropped = s[targets] < floor
        if dropped.any():
            _record_removals(targets[dropped], before[dropped], weights[entries[dropped]],
                             selected[owner[dropped]], floor, suppressors, alive)
        live = np.flatnonzero(alive)
    kept = np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)
    return (torch.from_numpy(kept), current.new_tensor(s[kept]) if kept.size else current.new_empty(0),
            torch.from_numpy(suppressors))
