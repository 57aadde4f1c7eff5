"""Paired bootstrap over validation images: 95% intervals for differences between two detection sets.

The unit resampled is the image, since detections of one image are not independent (they compete
for the same objects). A replicate draws ``I`` images with replacement out of the ``I`` validation
images, the *same* draw for both sets (paired), and recomputes both statistics on it; the interval
is the 2.5th and 97.5th percentile of the replicates' differences.

COCO AP is resampled without re-running ``COCOeval`` per replicate. Its per-image evaluation (which
detection matches which object at each IoU threshold) does not change when an image is duplicated,
so it runs once per set (:func:`per_image_matches`); a replicate only re-weights each image by how
often it was drawn and re-accumulates precision (:func:`precision_array`), vectorized over
replicates. With every weight 1 this equals ``COCOeval.accumulate()``; a resampled set equals
``COCOeval`` run on a ground truth in which each drawn image appears as often as it was drawn.
Statistics that are sums over images (recall, Pearson's moments) are resampled through per-image
sums: a replicate's sum is ``weights @ per_image_sums``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from .cocoeval import AP_METRICS, bbox_evaluator, threshold_index
from .correlation import pearson
from .matching import Detections

REPLICATES = 1000
"""Default number of bootstrap replicates."""

_CHUNK_ELEMENTS = 2_000_000  # replicates x detections per vectorized block: bounds memory to ~100 MB


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections of every image, in the order ``COCOeval.accumulate()`` ranks them.

    Attributes:
        image_index (int64[D]): position in ``PerImageMatches.image_ids`` of each detection's image.
        tp (bool[T, D]): matched to a non-ignored object at IoU threshold ``t``.
        fp (bool[T, D]): unmatched and not ignored at threshold ``t``.
        gt_count (int64[I]): non-ignored objects of this category per image.
    """

    image_index: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gt_count: np.ndarray


@dataclass(frozen=True)
class PerImageMatches:
    """``COCOeval.evaluate()`` of one detection set (area ``all``, at most ``max_dets`` per image), kept per image.

    Attributes:
        image_ids (int64[I]): the evaluated images (sorted, as COCOeval sorts them).
        iou_thresholds (float64[T]): COCO's 0.50:0.05:0.95.
        recall_thresholds (float64[R]): COCO's 101 recall points.
        categories: one entry per category id of the ground truth; ``None`` where no image has an
            object or a detection of it (COCOeval leaves its precision at -1).
    """

    image_ids: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    categories: tuple[CategoryMatches | None, ...]


def per_image_matches(coco_gt: COCO, detections: Detections, *, max_dets: int = 100) -> PerImageMatches:
    """Run ``COCOeval.evaluate()`` once and keep, per category, what ``accumulate()`` reads.

    Args:
        coco_gt: ground truth. detections: COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``).
        max_dets: detections per image kept by score (COCO: 100).

    Returns:
        :class:`PerImageMatches`; the detections of each category are concatenated image by image and
        stably sorted by descending score, exactly as ``accumulate()`` does.
    """
    evaluator = bbox_evaluator(coco_gt, detections)
    params = evaluator.params
    all_area = params.areaRngLbl.index("all")
    params.areaRng, params.areaRngLbl, params.maxDets = [params.areaRng[all_area]], ["all"], [max_dets]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    image_ids = np.asarray(params.imgIds, dtype=np.int64)
    n_images, n_thresholds = len(image_ids), len(params.iouThrs)
    categories = []
    for k in range(len(params.catIds)):
        per_image = evaluator.evalImgs[k * n_images:(k + 1) * n_images]  # one area range: (category, image) order
        present = [(i, e) for i, e in enumerate(per_image) if e is not None]
        if not present:
            categories.append(None)
            continue
        scores = np.concatenate([e["dtScores"][:max_dets] for _, e in present])
        order = np.argsort(-scores, kind="mergesort")  # accumulate()'s ranking, ties in image order
        image_index = np.concatenate([np.full(len(e["dtScores"][:max_dets]), i, dtype=np.int64) for i, e in present])
        matched = np.concatenate([e["dtMatches"][:, :max_dets] for _, e in present], axis=1).reshape(n_thresholds, -1)[:, order]
        ignored = np.concatenate([e["dtIgnore"][:, :max_dets] for _, e in present], axis=1).reshape(n_thresholds, -1)[:, order]
        gt_count = np.zeros(n_images, dtype=np.int64)
        for i, e in present:
            gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        # dtMatches holds the matched object's id (0: none); truthiness is accumulate()'s own test.
        tp = np.logical_and(matched, np.logical_not(ignored))
        fp = np.logical_and(np.logical_not(matched), np.logical_not(ignored))
        categories.append(CategoryMatches(image_index=image_index[order], tp=tp, fp=fp, gt_count=gt_count))
    return PerImageMatches(image_ids=image_ids, iou_thresholds=np.asarray(params.iouThrs, dtype=np.float64),
                           recall_thresholds=np.asarray(params.recThrs, dtype=np.float64), categories=tuple(categories))


def _category_precision(cat: CategoryMatches, weights: np.ndarray, recall_thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision of one category for a block of replicates.

    Only the ranks of true positives are visited: recall rises only there, and a false positive's
    precision never exceeds that of the true positive before it, so neither the first rank reaching
    a recall threshold nor the best precision at or after it ever falls on another rank (recall 0
    included: its rank is the first, whose best-later precision is the best over all ranks). A
    detection drawn ``c`` times counts ``c`` times at its rank; the ``c - 1`` ranks COCOeval would
    insert are dominated in the same way, and an undrawn detection is a rank that adds nothing.

    Args:
        weights (int64[B, I]): how often each image was drawn in each replicate.

    Returns:
        ``precision`` (float64[B, T, R]) and ``valid`` (bool[B]): False where the replicate has no
        non-ignored object of the category (``accumulate()`` skips it, leaving -1).
    """
    n_rep, n_rec = len(weights), len(recall_thresholds)
    gt = (weights @ cat.gt_count).astype(np.float64)  # (B,)
    w = weights[:, cat.image_index].astype(np.float64)  # (B, D) weight of each ranked detection
    precision = np.zeros((n_rep, len(cat.tp), n_rec))
    rows = np.arange(n_rep)[:, None]
    counted, counted_cum = None, None
    for t in range(len(cat.tp)):
        at = np.flatnonzero(cat.tp[t])  # ranks of the true positives
        if len(at) == 0:
            continue  # recall never rises: precision 0 at every recall point
        scored = cat.tp[t] | cat.fp[t]  # not ignored; the same at most thresholds, so its cumsum is reused
        if counted is None or not np.array_equal(scored, counted):
            counted, counted_cum = scored, np.cumsum(w * scored, axis=1)
        tp = np.cumsum(w[:, at], axis=1)  # (B, P) true positives up to each TP rank
        with np.errstate(divide="ignore", invalid="ignore"):
            rc = tp / gt[:, None]
        pr = tp / (counted_cum[:, at] + np.spacing(1))
        envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # best precision at any later rank
        # searchsorted(rc, recall_thresholds, "left") per row, exactly: the first rank with rc >= r is
        # the number of ranks with rc < r, i.e. with fewer than r's position + 1 thresholds <= rc.
        passed = np.searchsorted(recall_thresholds, rc, side="right")  # (B, P) thresholds <= rc
        counts = np.bincount((passed + rows * (n_rec + 1)).ravel(), minlength=n_rep * (n_rec + 1))
        first = np.cumsum(counts.reshape(n_rep, n_rec + 1), axis=1)[:, :n_rec]  # (B, R)
        padded = np.concatenate([envelope, np.zeros((n_rep, 1))], axis=1)  # beyond the last rank: 0
        precision[:, t] = np.take_along_axis(padded, first, axis=1)
    return precision, gt > 0


def _blocks(n_rep: int, n_dets: int) -> list[slice]:
    size = max(1, _CHUNK_ELEMENTS // max(n_dets, 1))
    return [slice(s, min(s + size, n_rep)) for s in range(0, n_rep, size)]


def precision_array(matches: PerImageMatches, weights: np.ndarray | None = None) -> np.ndarray:
    """``COCOeval.accumulate()``'s precision (area ``all``) for each replicate.

    Args:
        weights (int[B, I]): per replicate, how often each image of ``matches.image_ids`` was drawn
            (``None``: one replicate of every image once, the plain evaluation).

    Returns:
        float64[B, T, R, K]: ``eval["precision"][:, :, :, area_all, max_dets]`` of each replicate,
        -1 for a category without a non-ignored object in the replicate.
    """
    weights = _check_weights(matches, weights)
    out = -np.ones((len(weights), len(matches.iou_thresholds), len(matches.recall_thresholds), len(matches.categories)))
    for k, cat in enumerate(matches.categories):
        if cat is None:
            continue
        for block in _blocks(len(weights), len(cat.image_index)):
            precision, valid = _category_precision(cat, weights[block], matches.recall_thresholds)
            out[block, :, :, k] = np.where(valid[:, None, None], precision, -1.0)
    return out


def ap_replicates(matches: PerImageMatches, weights: np.ndarray | None = None, metrics: tuple[str, ...] = tuple(AP_METRICS)) -> dict[str, np.ndarray]:
    """COCO AP (fractions) of each replicate: the mean of the valid precision entries, as ``summarize()``.

    Same numbers as averaging :func:`precision_array`, without holding its ``(B, T, R, K)`` array.

    Args:
        weights (int[B, I]): image multiplicities per replicate (``None``: every image once).
        metrics: names of :data:`workbench.analysis.cocoeval.AP_METRICS`.

    Returns:
        metric -> float64[B]; ``nan`` where no category is valid.
    """
    weights = _check_weights(matches, weights)
    n_rep, n_cat = len(weights), len(matches.categories)
    mean_over_recall = np.zeros((n_rep, len(matches.iou_thresholds), n_cat))  # (B, T, K)
    valid = np.zeros((n_rep, n_cat), dtype=bool)
    for k, cat in enumerate(matches.categories):
        if cat is None:
            continue
        for block in _blocks(n_rep, len(cat.image_index)):
            precision, valid[block, k] = _category_precision(cat, weights[block], matches.recall_thresholds)
            mean_over_recall[block, :, k] = precision.mean(axis=2)
    out = {}
    for metric in metrics:
        if metric not in AP_METRICS:
            raise ValueError(f"metric must be one of {list(AP_METRICS)}, got {metric!r}")
        iou = AP_METRICS[metric]
        chosen = slice(None) if iou is None else threshold_index(matches.iou_thresholds, iou)
        per_category = mean_over_recall[:, chosen, :].mean(axis=1)  # (B, K); every t of a valid category is set
        n_valid = valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[metric] = np.where(n_valid > 0, (per_category * valid).sum(axis=1) / n_valid, np.nan)
    return out


def _check_weights(matches: PerImageMatches, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.ones((1, len(matches.image_ids)), dtype=np.int64)
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[1] != len(matches.image_ids) or not np.issubdtype(weights.dtype, np.integer) or (weights < 0).any():
        raise ValueError(f"weights must be non-negative integers of shape (replicates, {len(matches.image_ids)} images), "
                         f"got {weights.dtype} {weights.shape}")
    return weights.astype(np.int64)


def resample_indices(n_images: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """int64[B, I]: the images drawn (with replacement) by each replicate, as positions in ``0..I-1``."""
    if n_images < 1 or replicates < 1:
        raise ValueError(f"need at least one image and one replicate, got n_images={n_images}, replicates={replicates}")
    return np.random.default_rng(seed).integers(0, n_images, size=(replicates, n_images))


def resample_weights(n_images: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """int64[B, I]: how often each image is drawn by each replicate of :func:`resample_indices`."""
    draws = resample_indices(n_images, replicates, seed)
    flat = draws + n_images * np.arange(replicates)[:, None]
    return np.bincount(flat.ravel(), minlength=replicates * n_images).reshape(replicates, n_images)


@dataclass(frozen=True)
class Difference:
    """A statistic of our set, of the baseline, their difference and its bootstrap interval.

    ``delta = ours - baseline`` on the full validation set; ``ci95`` are the 2.5th and 97.5th
    percentiles of the replicates' differences (``nan`` when fewer than half the replicates define
    the statistic); ``replicates`` (float64[B]) are those differences.
    """

    ours: float
    baseline: float
    delta: float
    ci95: tuple[float, float]
    replicates: np.ndarray


def difference(ours: float, baseline: float, replicate_deltas: np.ndarray) -> Difference:
    """:class:`Difference` from full-set values and per-replicate differences (percentile interval)."""
    deltas = np.asarray(replicate_deltas, dtype=np.float64)
    finite = deltas[np.isfinite(deltas)]
    if len(finite) * 2 < len(deltas) or len(finite) == 0:
        ci = (float("nan"), float("nan"))
    else:
        lo, hi = np.percentile(finite, [2.5, 97.5])
        ci = (float(lo), float(hi))
    return Difference(ours=float(ours), baseline=float(baseline), delta=float(ours) - float(baseline), ci95=ci, replicates=deltas)


def ap_difference(ours: PerImageMatches, baseline: PerImageMatches, metric: str, weights: np.ndarray) -> Difference:
    """Paired bootstrap of ``AP(ours) - AP(baseline)`` for one metric of :data:`AP_METRICS` (fractions).

    Args:
        ours, baseline: per-image evaluations of two detection sets on the same images.
        weights (int[B, I]): image multiplicities per replicate, e.g. :func:`resample_weights`.
    """
    if not np.array_equal(ours.image_ids, baseline.image_ids):
        raise ValueError("both detection sets must be evaluated on the same images (same ground truth)")
    full_ours, full_base = ap_replicates(ours, None, (metric,))[metric][0], ap_replicates(baseline, None, (metric,))[metric][0]
    rep = ap_replicates(ours, weights, (metric,))[metric] - ap_replicates(baseline, weights, (metric,))[metric]
    return difference(full_ours, full_base, rep)


def image_sums(values: np.ndarray, image_ids: np.ndarray, all_image_ids: np.ndarray) -> np.ndarray:
    """Per-image sums of per-item values, the input of every sum-decomposable statistic.

    Args:
        values (float[N, F]): ``F`` quantities per item (detection, object).
        image_ids (int[N]): each item's image id; all must be in ``all_image_ids``.
        all_image_ids (int[I]): the resampled images, in the order of the weights' columns.

    Returns:
        float64[I, F]; a replicate's sums are ``weights @ image_sums(...)``.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    position = pd.Index(all_image_ids).get_indexer(np.asarray(image_ids))
    if (position < 0).any():
        raise ValueError(f"items refer to images outside the resampled set: {sorted(set(np.asarray(image_ids)[position < 0]))[:5]}")
    out = np.zeros((len(all_image_ids), values.shape[1]))
    np.add.at(out, position, values)
    return out


def _pearson_from_sums(s: np.ndarray) -> np.ndarray:
    """Pearson r from sums ``[n, x, y, xx, yy, xy]`` (..., 6) of centred data; ``nan`` where undefined."""
    n, x, y, xx, yy, xy = np.moveaxis(s, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = xy - x * y / n
        r = cov / np.sqrt((xx - x * x / n) * (yy - y * y / n))
    return np.where(n >= 2, np.clip(r, -1.0, 1.0), np.nan)


def pearson_difference(truth: np.ndarray, ours: np.ndarray, baseline: np.ndarray, image_ids: np.ndarray,
                       all_image_ids: np.ndarray, weights: np.ndarray) -> Difference:
    """Paired bootstrap of ``r(truth, ours) - r(truth, baseline)`` over images (e.g. predicted IoU vs score).

    Args:
        truth, ours, baseline (float[N]): per item (detection) the true IoU and the two predictors.
        image_ids (int[N]): each item's image. all_image_ids (int[I]): the weights' columns.
        weights (int[B, I]): image multiplicities per replicate.

    Returns:
        :class:`Difference`; ``ours`` and ``baseline`` are the full-set coefficients
        (:func:`workbench.analysis.correlation.pearson`).
    """
    truth, ours, baseline = (np.asarray(v, dtype=np.float64).ravel() for v in (truth, ours, baseline))
    if not len(truth) == len(ours) == len(baseline) == len(image_ids):
        raise ValueError(f"truth, ours, baseline and image_ids must have one entry per item, got lengths "
                         f"{len(truth)}, {len(ours)}, {len(baseline)}, {len(image_ids)}")

    def replicate_r(pred: np.ndarray) -> np.ndarray:
        # Centred by the full-set means: the moment formula is shift-invariant and keeps its precision.
        x, y = truth - truth.mean(), pred - pred.mean()
        sums = image_sums(np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=1), image_ids, all_image_ids)
        return _pearson_from_sums(weights @ sums)

    if len(truth) == 0:
        return difference(np.nan, np.nan, np.full(len(weights), np.nan))
    return difference(pearson(truth, ours), pearson(truth, baseline), replicate_r(ours) - replicate_r(baseline))


def ratio_difference(ours: np.ndarray, baseline: np.ndarray, weights: np.ndarray, denominator: np.ndarray | None = None) -> Difference:
    """Paired bootstrap of ``sum(ours) / sum(den) - sum(baseline) / sum(den)``; plain sums without ``denominator``.

    Args:
        ours, baseline, denominator (float[I]): per-image sums (:func:`image_sums`), e.g. objects
            recalled by our set, by the baseline, and objects (recall); or positives per image (counts).
        weights (int[B, I]): image multiplicities per replicate.
    """
    den = np.ones_like(np.asarray(ours, dtype=np.float64)) if denominator is None else denominator
    sums = np.stack([ours, baseline, den], axis=1).astype(np.float64)  # (I, 3)
    full, rep = sums.sum(axis=0), weights @ sums
    if denominator is None:
        return difference(full[0], full[1], rep[:, 0] - rep[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return difference(full[0] / full[2], full[1] / full[2], (rep[:, 0] - rep[:, 1]) / rep[:, 2])
