"""Paper Eq. 4: the gradient of PrRoI Pooling w.r.t. a bin's edges, three ways, and Fig. 6 in motion.

:func:`gradient_table` sets side by side the library's autograd gradient (what Algorithm 2 climbs),
Eq. 4 written out with exact line integrals of ``f`` (Eq. 2) along each edge, and central finite
differences; :func:`pooling_sweep` slides one edge of a bin and pools it three ways (RoI Pooling,
RoI Align, PrRoI Pooling: :func:`workbench.analysis.pooling.compare_pooling`, Fig. 6).

Conventions are those of :mod:`workbench.analysis.pooling`: ``feature_map[i, j]`` sits at
``(x = j, y = i)``; a bin is ``(x0, y0, x1, y1)`` in feature-map cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from workbench.ops import prroi_pool

from ._plotting import color, marker, new_figure, style_axes
from .pooling import compare_pooling, interpolate_feature_map

EDGES = ("x0", "y0", "x1", "y1")  # a bin's edges (cells), a box's corners (pixels)




def _bin_tensor(feature_map: np.ndarray, bin_box) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.as_tensor(np.asarray(feature_map, dtype=np.float64))[None, None]  # (1, 1, H, W)
    box = torch.as_tensor(np.asarray(bin_box, dtype=np.float64)).reshape(4)
    return d, box


def pooled_value_and_gradient(feature_map: np.ndarray, bin_box) -> tuple[float, np.ndarray]:
    """PrRoI Pooling of one bin (``output_size=1``) and its autograd gradient w.r.t. ``(x0, y0, x1, y1)``.

    Returns:
        (float, ndarray[4] float64): the pooled value (Eq. 3) and ``d value / d edge``.
    """
    d, box = _bin_tensor(feature_map, bin_box)
    box.requires_grad_(True)
    rois = torch.cat([box.new_zeros(1), box])[None]  # (1, 5): batch index 0, then the box
    value = prroi_pool(d, rois, 1, 1.0).reshape(())
    (grad,) = torch.autograd.grad(value, box)
    return float(value.detach()), grad.numpy().copy()


def _tri_integral(t: np.ndarray) -> np.ndarray:
    """Antiderivative of ``tri(t) = max(0, 1 - |t|)`` from ``-inf``: 0 below -1, 1/2 at 0, 1 above 1."""
    t = np.clip(t, -1.0, 1.0)
    return np.where(t <= 0, 0.5 * (t + 1) ** 2, 0.5 + t - 0.5 * t * t)


def _line_integrals(d: np.ndarray, at: float, lo: float, hi: float, axis: str) -> float:
    """``int_lo^hi f(at, y) dy`` (``axis="x"``: a vertical edge at ``x = at``) or ``int_lo^hi f(x, at) dx``.

    ``f`` is Eq. 2, so the integral is ``sum_ij d[i, j] tri(at - j) (P(hi - i) - P(lo - i))`` (vertical
    edge) with ``P`` the antiderivative of ``tri``: exact, written here from the formula, independently
    of the library's pooling code.
    """
    rows, cols = np.arange(d.shape[0]), np.arange(d.shape[1])
    if axis == "x":
        across = np.maximum(0.0, 1.0 - np.abs(at - cols))  # (W,) tri(at - j)
        along = _tri_integral(hi - rows) - _tri_integral(lo - rows)  # (H,)
        return float(along @ d @ across)
    across = np.maximum(0.0, 1.0 - np.abs(at - rows))  # (H,) tri(at - i)
    along = _tri_integral(hi - cols) - _tri_integral(lo - cols)  # (W,)
    return float(across @ d @ along)


def eq4_gradient(feature_map: np.ndarray, bin_box) -> np.ndarray:
    """The gradient of PrRoI Pooling w.r.t. ``(x0, y0, x1, y1)`` by the paper's Eq. 4.

    ``d PrPool / d x0 = PrPool / (x1 - x0) - int_{y0}^{y1} f(x0, y) dy / area``; moving an edge
    outwards adds the line integral along it and spreads the bin's area. The other edges follow by
    symmetry (the far edges with opposite signs). The bin must have positive width and height.

    Returns:
        ndarray[4] float64.
    """
    d = np.asarray(feature_map, dtype=np.float64)
    x0, y0, x1, y1 = (float(v) for v in bin_box)
    w, h = x1 - x0, y1 - y0
    if not (w > 0 and h > 0):
        raise ValueError(f"Eq. 4 needs a bin with x0 < x1 and y0 < y1, got {bin_box}")
    value, _ = pooled_value_and_gradient(d, bin_box)
    area = w * h
    return np.array([
        value / w - _line_integrals(d, x0, y0, y1, "x") / area,
        value / h - _line_integrals(d, y0, x0, x1, "y") / area,
        -value / w + _line_integrals(d, x1, y0, y1, "x") / area,
        -value / h + _line_integrals(d, y1, x0, x1, "y") / area,
    ])


def finite_difference_gradient(feature_map: np.ndarray, bin_box, eps: float = 1e-5) -> np.ndarray:
    """Central differences ``(v(edge + eps) - v(edge - eps)) / 2 eps`` of the pooled value, per edge."""
    box = np.asarray(bin_box, dtype=np.float64)
    grad = np.empty(4)
    for k in range(4):
        step = np.zeros(4)
        step[k] = eps
        grad[k] = (pooled_value_and_gradient(feature_map, box + step)[0] - pooled_value_and_gradient(feature_map, box - step)[0]) / (2 * eps)
    return grad


def gradient_table(feature_map: np.ndarray, bin_box, eps: float = 1e-5) -> pd.DataFrame:
    """One row per edge: the library's autograd gradient, Eq. 4 and central finite differences."""
    _, autograd = pooled_value_and_gradient(feature_map, bin_box)
    return pd.DataFrame(
        {
            "autograd (workbench.ops.prroi_pool)": autograd,
            "Eq. 4 (line integrals)": eq4_gradient(feature_map, bin_box),
            f"finite difference (eps={eps:g})": finite_difference_gradient(feature_map, bin_box, eps),
        },
        index=pd.Index([f"d/d{e}" for e in EDGES], name="edge"),
    )


# --- Fig. 6 in motion: slide one edge ------------------------------------------------------------------


def pooling_sweep(feature_map: np.ndarray, bin_box, edge: str = "x0", offsets=np.linspace(-0.8, 0.8, 161)) -> pd.DataFrame:
    """The three pooled values (RoI Pooling, RoI Align, PrRoI Pooling) while one edge of the bin moves.

    Args:
        edge: ``"x0"``, ``"y0"``, ``"x1"`` or ``"y1"``.
        offsets: shifts of that edge in cells (RoI Align's samples must stay on the map, see
            :func:`workbench.analysis.compare_pooling`).

    Returns:
        DataFrame indexed by the edge's position, one column per operator.
    """
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    k = EDGES.index(edge)
    rows = []
    for offset in np.asarray(offsets, dtype=np.float64):
        box = list(bin_box)
        box[k] = float(box[k]) + float(offset)
        r = compare_pooling(feature_map, tuple(box))
        rows.append({edge: box[k], "RoI Pooling": r.roi_pool, "RoI Align": r.roi_align, "PrRoI Pooling": r.prroi_pool})
    return pd.DataFrame(rows).set_index(edge)


def sweep_slopes(sweep: pd.DataFrame) -> pd.DataFrame:
    """Finite-difference slopes of a :func:`pooling_sweep`, indexed by the midpoints between positions."""
    x = sweep.index.to_numpy()
    slopes = np.diff(sweep.to_numpy(), axis=0) / np.diff(x)[:, None]
    return pd.DataFrame(slopes, columns=sweep.columns, index=pd.Index(0.5 * (x[1:] + x[:-1]), name=sweep.index.name))


def sweep_jumps(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per operator of a :func:`pooling_sweep`: the largest change of the value, and of its slope, between
    neighbouring positions (a step shows in the first, a kink in the second)."""
    return pd.DataFrame({"largest jump of the value": sweep.diff().abs().max(),
                         "largest jump of the slope": sweep_slopes(sweep).diff().abs().max()})


def midpoint_mean(feature_map: np.ndarray, bin_box, n: int = 400) -> float:
    """The mean of ``f`` (Eq. 2) over the bin by the midpoint rule on ``n x n`` points: a brute-force Eq. 3."""
    x0, y0, x1, y1 = (float(v) for v in bin_box)
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    return float(interpolate_feature_map(feature_map, xs, ys).mean())


def plot_pooling_sweep(sweep: pd.DataFrame) -> Figure:
    """Pooled value (left) and its slope by finite differences (right) against the moving edge."""
    fig, axes = new_figure(2, panel_size=(5.2, 3.6))
    edge = sweep.index.name
    slopes = sweep_slopes(sweep)
    for i, name in enumerate(sweep.columns):
        kw = dict(color=color(i), marker=marker(i), markevery=max(1, len(sweep) // 12), label=name)
        axes[0, 0].plot(sweep.index, sweep[name], **kw)
        axes[0, 1].plot(slopes.index, slopes[name], **kw)
    style_axes(axes[0, 0], xlabel=f"{edge} (feature-map cells)", ylabel="pooled value", title="value of the bin")
    smooth = slopes.drop(columns=["RoI Pooling"], errors="ignore").to_numpy()
    if smooth.size:  # RoI Pooling's slope is 0 with spikes at its jumps: let those leave the axes
        lo, hi = float(smooth.min()), float(smooth.max())
        pad = 0.25 * max(hi - lo, 1e-6)
        axes[0, 1].set_ylim(min(lo, 0.0) - pad, max(hi, 0.0) + pad)
    style_axes(axes[0, 1], xlabel=f"{edge} (feature-map cells)", ylabel=f"d value / d {edge}",
               title="its slope (finite differences)\nRoI Pooling: 0, with spikes off the axes at its jumps")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Moving the bin's {edge} edge: steps (RoI Pooling), kinks (RoI Align), smooth (PrRoI Pooling)")
    return fig
