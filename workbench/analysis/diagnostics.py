"""Why a claim holds or fails: how good the IoU predictor is as a ranking, a scale and an objective.

* :func:`calibration`: the slope of the true IoU regressed on the predicted IoU (1: the predictions
  spread like the truth; > 1: squeezed together; < 1: spread too wide).
* :func:`ranking_accuracy`: how often a confidence orders two detections *of the same object* as
  their true IoUs do, the decision IoU-guided NMS makes (the predicted IoU against the score).
* :func:`gradient_alignment`: the cosine between the predictor's gradient w.r.t. the box and the true
  IoU's, the direction Algorithm 2 climbs; :func:`record_gradient_alignment` reads it off a
  refinement record.
* :func:`gain_by_size`: refinement's true-IoU gain per object size; :func:`stop_reasons`: when and
  why Algorithm 2 stopped each box.

Boxes are ``(x0, y0, x1, y1)`` pixels. Each data function has a figure function beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from workbench.ops.boxes import matched_iou
from workbench.refine import STOP_REASONS, box_size_scale
from workbench.trajectories import Trajectories

from ._plotting import color, marker, new_figure, style_axes

# --- calibration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibration`."""

    slope: float  # OLS slope of true IoU on predicted IoU
    intercept: float  # OLS intercept
    spread_ratio: float  # std(predicted) / std(true)
    bins: pd.DataFrame  # per bin of predicted IoU: boxes, mean predicted, mean true


def calibration(true_iou: np.ndarray, predicted_iou: np.ndarray, *, edges: Sequence[float] = tuple(np.linspace(0, 1, 11))) -> Calibration:
    """How the predicted IoU maps to the true IoU: least-squares line and per-bin means.

    Args:
        true_iou, predicted_iou (float[N]): per detection (e.g. the matched rows of
            :func:`workbench.analysis.localization_correlation`).
        edges: bins of the predicted IoU, ``[lo, hi)``, the last one closed.

    Returns:
        :class:`Calibration`; ``nan`` slope for fewer than two boxes or a constant prediction.
    """
    t, p = (np.asarray(v, dtype=np.float64).ravel() for v in (true_iou, predicted_iou))
    if t.shape != p.shape:
        raise ValueError(f"true_iou and predicted_iou must have the same length, got {len(t)} and {len(p)}")
    slope = intercept = spread = float("nan")
    if len(p) >= 2:
        dp, dt = p - p.mean(), t - t.mean()
        if p.max() > p.min():  # a constant prediction has no slope (rounding would give it one)
            slope = float((dp * dt).sum() / (dp * dp).sum())
            intercept = float(t.mean() - slope * p.mean())
        if t.std() > 0:
            spread = float(p.std() / t.std())
    edges = np.asarray(edges, dtype=np.float64)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    rows = [{"predicted IoU": f"[{edges[b]:.1f}, {edges[b + 1]:.1f}{']' if b == len(edges) - 2 else ')'}",
             "boxes": int((index == b).sum()),
             "mean predicted": p[index == b].mean() if (index == b).any() else np.nan,
             "mean true": t[index == b].mean() if (index == b).any() else np.nan} for b in range(len(edges) - 1)]
    return Calibration(slope=slope, intercept=intercept, spread_ratio=spread, bins=pd.DataFrame(rows).set_index("predicted IoU"))


def plot_calibration(cal: Calibration) -> Figure:
    """Mean true IoU per bin of predicted IoU, the fitted line and ``y = x`` (a calibrated predictor)."""
    fig, axes = new_figure(panel_size=(5.0, 4.2))
    ax = axes[0, 0]
    b = cal.bins[cal.bins["boxes"] > 0]
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="calibrated (y = x)")
    ax.scatter(b["mean predicted"], b["mean true"], s=12 + 60 * b["boxes"] / max(b["boxes"].max(), 1), color=color(0),
               label="mean per bin (area ~ boxes)", zorder=3)
    if np.isfinite(cal.slope):
        x = np.array([0.0, 1.0])
        ax.plot(x, cal.intercept + cal.slope * x, color=color(1), label=f"least squares: slope {cal.slope:.2f}")
    style_axes(ax, xlabel="predicted IoU", ylabel="true IoU",
               title=f"calibration: slope {cal.slope:.2f}, spread ratio {cal.spread_ratio:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    return fig


# --- ranking within an object ----------------------------------------------------------------------


def ranking_accuracy(matched: pd.DataFrame, confidences: Sequence[str] = ("iou_pred", "score"), *,
                     gap_edges: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 1.0)) -> pd.DataFrame:
    """How often each confidence orders two detections of the same object as their true IoUs do.

    Every pair of detections matched to the same ground truth (``gt_id >= 0``) with different true
    IoUs counts; a pair the confidence ties counts one half. 0.5 is a coin flip, 1 a perfect ranking.

    Args:
        matched: rows of :func:`workbench.analysis.match_to_ground_truth` (``gt_id``, ``iou``) with the
            confidence columns, e.g. the ``matched`` frame of ``localization_correlation``.
        confidences: columns to rank by.
        gap_edges: bins of the pairs' true-IoU gap ``|iou_a - iou_b|`` (``[lo, hi)``, last closed).

    Returns:
        DataFrame indexed by gap bin plus an ``"all pairs"`` row: ``pairs`` and one accuracy column
        per confidence (``nan`` without pairs).
    """
    missing = [c for c in ("gt_id", "iou", *confidences) if c not in matched.columns]
    if missing:
        raise ValueError(f"matched needs columns {missing} (rows of match_to_ground_truth with the confidences)")
    data = matched[matched["gt_id"] >= 0]
    gaps, correct = [], {c: [] for c in confidences}
    for rows in data.groupby("gt_id", sort=False).indices.values():
        if len(rows) < 2:
            continue
        a, b = np.triu_indices(len(rows), k=1)
        iou = data["iou"].to_numpy(dtype=np.float64)[rows]
        truth = np.sign(iou[a] - iou[b])
        keep = truth != 0
        gaps.append(np.abs(iou[a] - iou[b])[keep])
        for c in confidences:
            conf = data[c].to_numpy(dtype=np.float64)[rows]
            order = np.sign(conf[a] - conf[b])[keep]
            correct[c].append(np.where(order == 0, 0.5, (order == truth[keep]).astype(np.float64)))
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    scores = {c: np.concatenate(v) if v else np.zeros(0) for c, v in correct.items()}
    edges = np.asarray(gap_edges, dtype=np.float64)
    index = np.clip(np.searchsorted(edges, gap, side="right") - 1, 0, len(edges) - 2)
    labels = [f"[{lo:g}, {hi:g}{']' if k == len(edges) - 2 else ')'}" for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    rows = {}
    for k, label in [*enumerate(labels), (None, "all pairs")]:
        sel = np.ones(len(gap), dtype=bool) if k is None else index == k
        rows[label] = {"pairs": int(sel.sum()), **{c: float(s[sel].mean()) if sel.any() else np.nan for c, s in scores.items()}}
    table = pd.DataFrame(rows).T
    table.index.name = "true IoU gap"
    return table.astype({"pairs": int})


def plot_ranking_accuracy(table: pd.DataFrame) -> Figure:
    """Ranking accuracy per true-IoU gap, one line per confidence, chance (0.5) dashed."""
    fig, axes = new_figure(panel_size=(6.0, 4.0))
    ax = axes[0, 0]
    bins = table.drop(index="all pairs")
    x = np.arange(len(bins))
    for k, c in enumerate(c for c in table.columns if c != "pairs"):
        ax.plot(x, bins[c], marker=marker(k), color=color(k), label=f"{c} (all pairs: {table.loc['all pairs', c]:.2f})")
    ax.axhline(0.5, color="0.3", linestyle="--", linewidth=1, label="coin flip")
    ax.set_xticks(x, [f"{label}\n{n} pairs" for label, n in zip(bins.index, bins["pairs"])])
    style_axes(ax, xlabel="true IoU gap between two detections of one object", ylabel="pairs ordered correctly",
               title="which of two duplicates is better localized?")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig


# --- gradient alignment ----------------------------------------------------------------------------


def true_iou_gradient(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``∂ IoU(box, gt) / ∂ box`` (float64[N, 4]) by autograd through the project's IoU formula."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4).requires_grad_(True)
    g = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64)).reshape(-1, 4)
    (grad,) = torch.autograd.grad(matched_iou(b, g).sum(), b)
    return grad.numpy()


def _cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (u * v).sum(axis=1) / norm, np.nan)


def gradient_alignment(predicted_gradient: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Cosine (float64[N]) between a predictor's gradient w.r.t. each box and the true IoU's gradient.

    1: the predictor climbs exactly towards its object; 0: sideways; -1: away. ``nan`` where either
    gradient is zero (e.g. a box not overlapping its object).

    Args:
        predicted_gradient (float[N, 4]): ``∂ predicted IoU / ∂ (x0, y0, x1, y1)``.
        boxes, gt_boxes (float[N, 4]): the boxes and their ground truth.
    """
    return _cosine(np.asarray(predicted_gradient, dtype=np.float64).reshape(-1, 4), true_iou_gradient(boxes, gt_boxes))


def record_gradient_alignment(record: Trajectories) -> pd.DataFrame:
    """Gradient alignment at the first step of every refined box with a ground truth.

    The record keeps the step applied, ``λ · scale(b) ⊙ grad`` (:func:`workbench.refine.box_size_scale`
    with the run's ``refine_step_scaling``); dividing by the scale recovers the direction of ``grad``.

    Returns:
        DataFrame, one row per box: ``image_id``, ``true IoU`` before the step and ``cosine``.
    """
    if record.gradient.shape[1] == 0:
        raise ValueError("the record has no refinement step (T = 0): no gradient to compare")
    reading = record.meta.get("settings", {}).get("refine_step_scaling", "width")
    has_gt = np.isfinite(record.gt_box).all(axis=1)
    boxes = record.boxes[has_gt, 0]
    scale = box_size_scale(torch.as_tensor(boxes, dtype=torch.float64), reading).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        grad = np.where(scale > 0, record.gradient[has_gt, 0] / scale, 0.0)
    return pd.DataFrame({"image_id": record.image_id[has_gt], "true IoU": record.true_iou[has_gt, 0],
                         "cosine": gradient_alignment(grad, boxes, record.gt_box[has_gt])})


def plot_gradient_alignment(alignment: pd.DataFrame) -> Figure:
    """Histogram of the cosines, with their median."""
    fig, axes = new_figure(panel_size=(5.5, 3.8))
    ax = axes[0, 0]
    cos = alignment["cosine"].dropna().to_numpy()
    ax.hist(cos, bins=np.linspace(-1, 1, 21), color=color(0))
    if len(cos):
        ax.axvline(np.median(cos), color=color(1), label=f"median {np.median(cos):.2f} ({len(cos)} boxes)")
        ax.legend(fontsize=8, loc="upper left")
    style_axes(ax, xlabel="cosine(predicted IoU gradient, true IoU gradient)", ylabel="boxes",
               title="does the refinement climb towards the object?")
    return fig


# --- refinement by box size, and when it stopped ----------------------------------------------------


def gain_by_size(record: Trajectories, edges: Sequence[float] = (0, 32, 64, 128, np.inf)) -> pd.DataFrame:
    """Refinement's effect per object size, ``sqrt`` of the ground truth's area in pixels.

    Returns:
        DataFrame indexed by size bin (``[lo, hi)`` pixels): ``boxes``, ``mean gain`` and
        ``median gain`` of true IoU (last step minus first), ``gained`` / ``lost`` (boxes whose true
        IoU rose / fell) and ``median move (px)``, the largest edge displacement per box.
    """
    has_gt = np.isfinite(record.gt_box).all(axis=1)
    gt = record.gt_box[has_gt]
    size = np.sqrt((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))
    gain = record.gain[has_gt]
    move = np.abs(record.boxes[has_gt, -1] - record.boxes[has_gt, 0]).max(axis=1)
    edges = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(edges, size, side="right") - 1
    rows = {}
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = index == k
        rows[f"[{lo:g}, {hi:g})"] = {
            "boxes": int(sel.sum()), "mean gain": gain[sel].mean() if sel.any() else np.nan,
            "median gain": np.median(gain[sel]) if sel.any() else np.nan,
            "gained": int((gain[sel] > 0).sum()), "lost": int((gain[sel] < 0).sum()),
            "median move (px)": np.median(move[sel]) if sel.any() else np.nan,
        }
    table = pd.DataFrame(rows).T.astype({"boxes": int, "gained": int, "lost": int})
    table.index.name = "object size (sqrt area, px)"
    return table


def plot_gain_by_size(table: pd.DataFrame) -> Figure:
    """Mean true-IoU gain per size bin (bars, labelled with gained / lost boxes)."""
    fig, axes = new_figure(panel_size=(6.0, 3.8))
    ax = axes[0, 0]
    x = np.arange(len(table))
    bars = ax.bar(x, table["mean gain"].fillna(0.0), color=color(0))
    ax.bar_label(bars, [f"+{g} / -{lo}" for g, lo in zip(table["gained"], table["lost"])], fontsize=7, padding=1)
    ax.axhline(0, color="0.3", linewidth=1)
    ax.set_xticks(x, [f"{label}\n{n} boxes" for label, n in zip(table.index, table["boxes"])])
    style_axes(ax, xlabel="object size, sqrt(area) in pixels (labels: boxes gained / lost)", ylabel="mean true IoU gain",
               title="refinement gain by object size")
    return fig


def stop_reasons(record: Trajectories) -> pd.DataFrame:
    """Boxes per stop step (rows ``1..T``) and stop reason (columns, :data:`workbench.refine.STOP_REASONS`)."""
    steps = record.gradient.shape[1]  # T; every box takes at least one step when T >= 1
    table = pd.DataFrame(0, index=pd.Index(range(1, steps + 1), name="steps taken"), columns=list(STOP_REASONS.values()))
    for step, reason in zip(record.stop_step, record.stop_reason):
        table.loc[int(step), STOP_REASONS[int(reason)]] += 1
    return table


def plot_stop_reasons(table: pd.DataFrame) -> Figure:
    """Stacked bars: boxes per number of steps taken, split by why the box stopped."""
    fig, axes = new_figure(panel_size=(5.5, 3.8))
    ax = axes[0, 0]
    bottom = np.zeros(len(table))
    for k, reason in enumerate(table.columns):
        ax.bar(table.index, table[reason], bottom=bottom, color=color(k), label=reason)
        bottom += table[reason].to_numpy()
    ax.set_xticks(table.index)
    style_axes(ax, xlabel="steps taken", ylabel="boxes", title="when and why Algorithm 2 stopped")
    ax.legend(fontsize=8)
    return fig


# --- the report's section -----------------------------------------------------------------------------


def report_section(matched: pd.DataFrame, record: Trajectories | None) -> tuple[dict[str, Figure], list[str], dict]:
    """The diagnostics of one run for ``report.md``: figures by file name, Markdown lines, headline numbers.

    Args:
        matched: detections before NMS with ``gt_id``, ``iou``, ``iou_pred`` and ``score`` (the
            ``matched`` frame of :func:`workbench.analysis.localization_correlation`).
        record: the refinement record (``None``: the refinement parts are left out).
    """
    has_pred = matched[matched["iou_pred"].notna()] if "iou_pred" in matched else matched.iloc[:0].assign(iou_pred=[])
    cal = calibration(has_pred["iou"], has_pred["iou_pred"].astype(np.float64))
    ranking = ranking_accuracy(has_pred)
    figures = {"diag_calibration": plot_calibration(cal), "diag_ranking": plot_ranking_accuracy(ranking)}
    numbers = {"calibration_slope": cal.slope, "spread_ratio": cal.spread_ratio,
               "ranking_accuracy": {c: float(ranking.loc["all pairs", c]) for c in ("iou_pred", "score")}}
    lines = ["## Diagnostics: why the claims come out as they do", "",
             "![](diag_calibration.png) ![](diag_ranking.png)", "",
             f"**Calibration** (same detections as Fig. 2): regressing the true IoU on the predicted IoU gives slope "
             f"{cal.slope:.2f} (1 for predictions that spread like the truth; above 1 when squeezed together), and the "
             f"predictions spread {cal.spread_ratio:.2f} times as widely as the true IoUs.", "",
             f"**Ranking within an object**: of {ranking.loc['all pairs', 'pairs']} pairs of detections of the same object, the "
             f"predicted IoU orders {ranking.loc['all pairs', 'iou_pred']:.2f} correctly, the classification score "
             f"{ranking.loc['all pairs', 'score']:.2f} (0.5 is a coin flip); IoU-guided NMS makes exactly this choice.", "",
             ranking.to_markdown(floatfmt=".3f"), ""]
    if record is not None and len(record) and record.gradient.shape[1]:
        alignment = record_gradient_alignment(record)
        by_size, stops = gain_by_size(record), stop_reasons(record)
        figures |= {"diag_gradient_alignment": plot_gradient_alignment(alignment), "diag_gain_by_size": plot_gain_by_size(by_size),
                    "diag_stop_reasons": plot_stop_reasons(stops)}
        cosine = alignment["cosine"].dropna()
        numbers["gradient_cosine_median"] = float(cosine.median()) if len(cosine) else float("nan")
        lines += ["![](diag_gradient_alignment.png) ![](diag_gain_by_size.png) ![](diag_stop_reasons.png)", "",
                  f"**Gradient alignment**: at the first refinement step the predictor's box gradient points within a median "
                  f"cosine of {numbers['gradient_cosine_median']:.2f} of the true IoU's gradient ({len(cosine)} boxes; 1 is "
                  "exactly towards the object).", "", "**Refinement gain by object size**:", "", by_size.to_markdown(floatfmt=".4f"), "",
                  "**Stop reasons** (boxes per steps taken):", "", stops.to_markdown(), ""]
    return figures, lines, numbers
