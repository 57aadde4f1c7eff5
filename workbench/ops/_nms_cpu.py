"""The CPU side of the NMS family: the greedy reference loop, and the fast paths the public functions run.

The reference, :func:`greedy_nms`, is the definition: select the alive box with the highest
ranking key (ties go to the lower index), keep it, and let a *rule* decide the fate of the boxes
still alive from their IoU with the selected one. It runs one Python iteration per kept box, so
it stays as the tests' oracle and the fast paths must return exactly what it returns:

* :func:`suppress` (hard NMS, optionally rescored as IoU-guided NMS) resolves the greedy
  choices in a few vectorized rounds over the sparse graph of pairs above the threshold, which
  also gives the box that removed each other box and with it the IoU-guided score; it returns
  what ``torchvision.ops.nms``, the same loop compiled, keeps.
* :func:`soft` selects many boxes per step: see :func:`soft`.

Every function here takes tensors already in the compute dtype (float32 or float64) and returns
``(keep, new_scores, suppressors)``: ``suppressors[i]`` is -1 for a kept box, the index of the
kept box whose selection removed box ``i``, or -2 for a box removed before any selection (Soft-NMS
scores below ``score_threshold`` from the start).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from torch import Tensor

from ._box_pairs import argsort_ints, intersecting_pairs
from .boxes import pairwise_iou

# A rule sees the selected box, the indices of the boxes still alive besides it (ascending) and
# their IoU with it; it returns which of them stay alive and the selected box's output score.
_Rule = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]

KEPT, UNSUPPRESSED = -1, -2
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

# States of :func:`_resolve` (KEPT as above).
UNDECIDED, DROPPED = 0, 1

# Hard NMS leaves the keep list to torchvision's loop when the candidate pairs exceed this many per
# box: the pairs' cost grows with them, the loop's with kept x boxes (few kept when all overlap).
_MAX_CANDIDATES_PER_BOX = 32
# Rounds of :func:`_resolve` before the boxes still undecided go to torchvision's loop.
_MAX_ROUNDS = 16

# Boxes examined per step of :func:`soft`: the best-scored alive boxes, among which it runs the greedy loop.
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


@np.errstate(over="ignore")  # beyond the dtype's range: inf (strictly_above steps back to its largest value)
def _in_dtype(dtype: torch.dtype, threshold: float) -> np.floating:
    return _NUMPY_DTYPES[dtype](threshold)


def strictly_above(dtype: torch.dtype, threshold: float) -> float:
    """The largest ``dtype`` value ``t <= threshold``: for ``x`` of that dtype, ``x > t`` iff ``x > threshold``.

    Lets a float32 tensor be compared in float32 exactly as if it were compared in float64
    (which is how torchvision compares its float IoU with the double threshold).
    """
    t = _in_dtype(dtype, threshold)
    return float(np.nextafter(t, -np.inf) if float(t) > threshold else t)


def _resolve(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Greedy hard NMS over its suppression graph, many boxes per round: the state of every box after
    :data:`_MAX_ROUNDS` rounds (:data:`KEPT`, :data:`DROPPED` or :data:`UNDECIDED`).

    Greedy NMS keeps a box iff none of the boxes ranked before it that overlap it beyond the
    threshold (edges ``src -> dst`` from the better-ranked box of each pair) was kept. So a round keeps
    every undecided box whose in-edges all come from dropped boxes, drops every box an edge from
    them reaches, and forgets the edges of decided boxes. The best-ranked undecided box is
    always kept, so each round decides at least one box; on detections a handful of rounds
    decide all.
    """
    state = np.full(n, UNDECIDED, dtype=np.int8)
    for _ in range(_MAX_ROUNDS):
        blocked = np.zeros(n, dtype=bool)
        blocked[dst] = True
        state[~blocked & (state == UNDECIDED)] = KEPT
        state[dst[state[src] == KEPT]] = DROPPED
        live = (state[src] == UNDECIDED) & (state[dst] == UNDECIDED)
        src, dst = src[live], dst[live]
        if not src.size:
            # The boxes still undecided now have no in-edges left: the next round keeps them all.
            state[state == UNDECIDED] = KEPT
            break
    return state


def suppress(boxes: Tensor, rank: Tensor, scores: Tensor, iou_threshold: float, rescore: bool,
             with_suppressors: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Hard NMS ranked by ``rank``; with ``rescore``, IoU-guided NMS's cluster maximum of ``scores``.

    The reference's arithmetic is ``torchvision.ops.nms``'s: a stable descending sort of the key
    (ties to the lower index; -0.0 and 0.0 tie), IoU ``inter / (area_i + area_j - inter)`` in the
    boxes' dtype with areas from the raw corners (inverted boxes get negative areas), compared as
    ``IoU > threshold`` against the double threshold (NaN, from two zero-area boxes, suppresses
    nothing). Only intersecting pairs can exceed a threshold >= 0, so the pairs above it
    (:func:`._box_pairs.intersecting_pairs`) form a sparse graph, resolved in rounds by
    :func:`_resolve`.
    Boxes left undecided after its rounds, and the whole input when the pairs would cost more
    than the loop (many boxes all overlapping), go to ``torchvision.ops.nms``, the same loop
    compiled (the tests check the two against each other).

    A box that greedy NMS did not keep stays alive until the first selected box whose IoU with it
    exceeds the threshold removes it, so its suppressor is its first kept in-neighbour in
    selection order; IoU-guided NMS's score of a kept box is the maximum over it and the boxes
    it removed.
    """
    n = boxes.shape[0]
    need_suppressors = rescore or with_suppressors
    pairs = intersecting_pairs(boxes.detach().numpy(), iou_threshold,
                                None if need_suppressors else _MAX_CANDIDATES_PER_BOX * n + 1024)
    if pairs is None:
        keep = torch.ops.torchvision.nms(boxes, rank, iou_threshold)
        return keep, scores.index_select(0, keep), None
    first, second, iou = pairs
    over = (iou > strictly_above(boxes.dtype, iou_threshold)).nonzero()[0]
    first, second = first[over], second[over]
    # torchvision's order: key descending, ties to the lower index (-0.0 and 0.0 tie).
    key = rank.detach().numpy()
    key_first, key_second = key[first], key[second]
    first_leads = (key_first > key_second) | ((key_first == key_second) & (first < second))
    src, dst = np.where(first_leads, first, second), np.where(first_leads, second, first)
    state = _resolve(n, src, dst)
    undecided = (state == UNDECIDED).nonzero()[0]
    if undecided.size:
        # They interact only among themselves now; ascending indices keep torchvision's tie order.
        subset = torch.from_numpy(undecided)
        kept = torch.ops.torchvision.nms(boxes.index_select(0, subset), rank.index_select(0, subset), iou_threshold)
        state[undecided] = DROPPED
        state[undecided[kept.numpy()]] = KEPT
    kept = (state == KEPT).nonzero()[0]
    keep = torch.from_numpy(kept[(-key[kept]).argsort(kind="stable")])
    if not need_suppressors:
        return keep, scores.index_select(0, keep), None
    # Each dropped box's suppressor: its first kept in-neighbour in selection order.
    position = np.full(n, n)
    position[keep.numpy()] = np.arange(kept.size)
    removes = state[src] == KEPT
    earliest = np.full(n, n)
    np.minimum.at(earliest, dst[removes], position[src[removes]])
    suppressors = np.full(n, KEPT, dtype=np.int64)
    dropped = state == DROPPED
    suppressors[dropped] = keep.numpy()[earliest[dropped]]
    best = scores.detach().numpy()
    if rescore:
        best = best.copy()
        np.maximum.at(best, suppressors[dropped], best[dropped])
    return keep, torch.from_numpy(best).index_select(0, keep), torch.from_numpy(suppressors) if with_suppressors else None


def at_least(dtype: torch.dtype, threshold: float) -> float:
    """The smallest ``dtype`` value ``t >= threshold``: for ``x`` of that dtype, ``x >= t`` iff ``x >= threshold``."""
    t = _in_dtype(dtype, threshold)
    return float(np.nextafter(t, np.inf) if float(t) < threshold else t)


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
    first, second, iou = intersecting_pairs(boxes)
    if gaussian:
        # A NaN IoU (inf - inf from huge boxes) decays nothing in the reference either.
        weight = np.nan_to_num(np.exp(-(iou * iou) / sigma), nan=1.0, copy=False)
    else:
        decays = iou >= at_least(torch.float32 if boxes.dtype == np.float32 else torch.float64, iou_threshold)
        first, second, iou = first[decays], second[decays], iou[decays]
        weight = 1 - iou
    source = np.concatenate((first, second))
    stable = argsort_ints(source, n)
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


def _greedy_among(scores: np.ndarray, index: np.ndarray, owner: np.ndarray, other: np.ndarray, weight: np.ndarray,
                  outside: tuple[float, int], floor: float) -> tuple[list[int], list]:
    """The reference's next Soft-NMS selections among the candidates, while they outrank every other box.

    Args:
        scores, index (K): the candidates' current scores and box indices.
        owner, other, weight (E): the decays among them: selecting candidate ``owner`` multiplies
            the score of candidate ``other`` (-1: not a candidate) by ``weight``.
        outside: the best (score, index) of the other alive boxes, whose scores can only fall.
        floor: a score below it removes its box.

    The greedy loop itself, over a heap of (score descending, index ascending), on the
    candidates alone: their scores are NumPy scalars, so each decay rounds as in the arrays.
    It stops when the best candidate left ranks after ``outside``: the reference selects an
    other box next.

    Returns:
        (positions in ``scores`` of the selected candidates in selection order, their scores then).
    """
    decays: dict[int, list] = {}
    among = np.flatnonzero(other >= 0)
    for source, target, w in zip(owner[among].tolist(), other[among].tolist(), weight[among]):
        decays.setdefault(source, []).append((target, w))
    current = list(scores)
    boxes = index.tolist()
    heap = [(-c, i, p) for p, (c, i) in enumerate(zip(current, boxes))]
    heapq.heapify(heap)
    done = [False] * len(current)  # selected or removed
    order, at_selection = [], []
    limit = (-outside[0], outside[1])
    while heap:
        key, i, p = heapq.heappop(heap)
        if done[p] or -key != current[p]:
            continue  # an entry from before a decay
        if (key, i) > limit:
            break
        done[p] = True
        order.append(p)
        at_selection.append(current[p])
        for target, w in decays.get(p, ()):
            if not done[target]:
                current[target] = current[target] * w
                if current[target] < floor:
                    done[target] = True
                else:
                    heapq.heappush(heap, (-current[target], boxes[target], target))
    return order, at_selection


def soft(boxes: Tensor, current: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
         gaussian: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS, selecting many boxes per step with the reference's selections and arithmetic.

    Each step takes the :data:`_SOFT_CANDIDATES` best-scored alive boxes and runs the greedy loop
    among them alone (:func:`_greedy_among`), for as long as the best candidate left outranks
    every other alive box: scores only fall, so those selections are the reference's next ones,
    in order, at their scores then. Their decays are then applied to every overlapping alive box
    in selection order, as the reference multiplies them, and a box is removed (with its
    suppressor) at the first decay that takes it below ``score_threshold``. Overlaps come from
    :func:`_overlap_graph`, built once; the loop works on NumPy arrays, whose per-call overhead
    is a fraction of a tensor op's.
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
            above = np.flatnonzero(scores > v)
            chosen = np.concatenate((above, np.flatnonzero(scores == v)[: _SOFT_CANDIDATES - above.size]))
            # The best box outside them (equal scores: the lower index, the first maximum).
            scores[chosen] = -np.inf
            best = int(np.argmax(scores))
            outside = (scores[best], int(live[best]))
            candidates = live[chosen]
        else:
            candidates, outside = live, (-np.inf, n)
        rank[candidates] = np.arange(candidates.size)
        entries, owner = _ranges(indptr, candidates)
        other = rank[neighbours[entries]]
        rank[candidates] = -1
        order, at_selection = _greedy_among(s[candidates], candidates, owner, other, weights[entries], outside, floor)
        selected = candidates[order]
        s[selected] = at_selection
        keep.append(selected)
        alive[selected] = False
        suppressors[selected] = KEPT
        # Decays of the selected boxes, in selection order: ufunc.at applies repeated indices one
        # after the other, so a box overlapping several selected boxes gets the reference's product.
        step = np.full(candidates.size, -1)
        step[order] = np.arange(len(order))
        mine = np.flatnonzero(step[owner] >= 0)
        mine = mine[np.argsort(step[owner[mine]], kind="stable")]
        entries, owner = entries[mine], step[owner[mine]]
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
