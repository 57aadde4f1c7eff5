"""Paper Fig. 4: AP after each refinement iteration, regression-based vs optimization-based.

Iterating a box regressor can make AP go up, then down (non-monotonic, paper Sec. 2.2); gradient
ascent on IoU-Net's predicted IoU with early stopping (Algorithm 2) is meant to improve it
monotonically. The detection sets per iteration come from the refinement code; this module only
evaluates (:func:`workbench.analysis.cocoeval.coco_ap`) and describes the curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from ._plotting import color, marker, new_figure, style_axes
from .cocoeval import AP_METRICS, coco_ap
from .matching import Detections


def ap_per_iteration(runs: Mapping[str, Sequence[Detections]], coco_gt: COCO) -> pd.DataFrame:
    """COCO AP of every iteration of every refinement method.

    Args:
        runs: method name (e.g. ``"Regression"``, ``"Optimization"``) -> detection sets for
            iteration 0 (the input boxes), 1, ..., T, each COCO results.
        coco_gt: the ground truth.

    Returns:
        Long DataFrame, one row per (method, iteration): columns ``method``, ``iteration`` (int)
        and :data:`AP_METRICS` (fractions in ``[0, 1]``).
    """
    rows = [
        {"method": method, "iteration": iteration, **coco_ap(coco_gt, detections)}
        for method, sets in runs.items()
        for iteration, detections in enumerate(sets)
    ]
    return pd.DataFrame(rows, columns=["method", "iteration", *AP_METRICS])


def is_monotonic(values: Sequence[float], *, increasing: bool = True, tol: float = 0.0) -> bool:
    """Whether a curve never goes down (``increasing``) or never up, allowing steps of at most ``tol`` the wrong way.

    ``tol`` absorbs evaluation noise, e.g. ``tol=0.001`` ignores AP wiggles below 0.1 point.
    A curve with fewer than two values is monotonic.
    """
    steps = np.diff(np.asarray(values, dtype=np.float64))
    return bool(np.all(steps >= -tol) if increasing else np.all(steps <= tol))


def monotonicity(table: pd.DataFrame, metric: str = "AP", *, tol: float = 0.0) -> pd.DataFrame:
    """Per method: is ``metric`` non-decreasing over the iterations, where does it peak, how much is lost after.

    Args:
        table: the output of :func:`ap_per_iteration`.
        metric: a column of ``table``.
        tol: allowed drop per step (see :func:`is_monotonic`).

    Returns:
        DataFrame indexed by method: ``monotonic`` (bool), ``best_iteration`` (first iteration
        reaching the maximum), ``best``, ``final`` and ``drop_after_best`` (``best - final`` >= 0).
    """
    out = {}
    for method, group in table.sort_values("iteration", kind="stable").groupby("method", sort=False):
        values = group[metric].to_numpy()
        best = int(np.argmax(values))
        out[method] = {
            "monotonic": is_monotonic(values, tol=tol),
            "best_iteration": int(group["iteration"].iloc[best]),
            "best": float(values[best]),
            "final": float(values[-1]),
            "drop_after_best": float(values[best] - values[-1]),
        }
    result = pd.DataFrame.from_dict(out, orient="index")
    result.index.name = "method"
    return result


def y_limits(values: Sequence[float], min_span: float) -> tuple[float, float]:
    """A y-range for AP values: the data's range, widened to at least ``min_span`` and kept at or above 0.

    Autoscaling stretches any range to the full panel, so AP90 moving between 0.008 and 0.016 % would
    look like a zigzag; widening the range to ``min_span`` (centred on the data, shifted up where it
    would go below 0, since AP cannot) keeps a flat curve flat. 5 % of the span pads each side.
    """
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if lo < 0:
            lo, hi = 0.0, min_span
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def plot_ap_per_iteration(table: pd.DataFrame, metrics: Sequence[str] = ("AP",), *, percent: bool = True,
                          min_span: float = 1.0) -> Figure:
    """One panel per metric, one line per method: AP against iteration (paper Fig. 4).

    Args:
        table: the output of :func:`ap_per_iteration`.
        metrics: columns to plot, e.g. ``("AP", "AP90")``: high-IoU AP shows refinement best.
        percent: plot AP x 100, as the paper.
        min_span: the least y-range of a panel, in AP points (1.0 = one point, i.e. 0.01 as a fraction),
            so that differences far below a point are not drawn as big swings (:func:`y_limits`).

    Returns:
        A Figure with ``len(metrics)`` axes, each with one line per method (in order of appearance).
    """
    fig, axes = new_figure(len(metrics), panel_size=(5.0, 3.8))
    scale = 100.0 if percent else 1.0
    methods = list(dict.fromkeys(table["method"]))
    for ax, metric in zip(axes[0], metrics):
        for k, method in enumerate(methods):
            group = table[table["method"] == method].sort_values("iteration")
            ax.plot(group["iteration"], group[metric] * scale, marker=marker(k), color=color(k), label=str(method))
        ax.set_ylim(*y_limits(table[metric].to_numpy() * scale, min_span * scale / 100.0))
        style_axes(ax, xlabel="Iteration", ylabel=f"{metric}{' (%)' if percent else ''}", title=f"{metric} vs. refinement iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(title="Refinement")
    return fig
