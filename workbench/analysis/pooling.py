"""Paper Fig. 6: RoI Pooling vs RoI Align vs PrRoI Pooling on one bin of a small feature map.

Conventions (those of :mod:`workbench.ops.prroi_pool` and of ``torchvision.ops`` with
``aligned=False``): the sample ``feature_map[i, j]`` sits at the point ``(x = j, y = i)``, and the
map is made continuous by bilinear interpolation (paper Eq. 2),
``f(x, y) = sum_ij d[i, j] max(0, 1 - |x - j|) max(0, 1 - |y - i|)``.

* RoI Pooling (``torchvision.ops.roi_pool``) rounds the bin's corners to whole cells (half away
  from zero, C++ ``round``) and takes the max over the cells ``round(x0)..round(x1)`` x
  ``round(y0)..round(y1)``: a shift of the box below half a cell changes nothing, then jumps.
* RoI Align (``torchvision.ops.roi_align``) averages ``f`` at ``s x s`` points (``s =
  sampling_ratio``; the paper's N = 4 is ``s = 2``) at the centres of an ``s x s`` grid over the
  bin (bins narrower than one cell are widened to one, as torchvision does with ``aligned=False``).
* PrRoI Pooling (:func:`workbench.ops.prroi_pool`) is the exact mean of ``f`` over the bin (Eq. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from matplotlib import patheffects
from matplotlib.patches import Rectangle

from workbench.ops import prroi_pool

from ._plotting import new_figure

BinBox = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in feature-map cells (spatial scale 1), ``x0 < x1``, ``y0 < y1``."""


@dataclass(frozen=True)
class PoolingComparison:
    """The three pooled values of one bin, and what each operator looked at."""

    feature_map: np.ndarray  # (H, W) float64; feature_map[i, j] is f at (x = j, y = i)
    bin: BinBox  # (x0, y0, x1, y1), feature-map cells
    roi_pool: float  # torchvision.ops.roi_pool: max over the quantized cells
    roi_align: float  # torchvision.ops.roi_align (aligned=False): mean of f at the sample points
    prroi_pool: float  # workbench.ops.prroi_pool: integral of f over the bin / bin area
    quantized_rows: tuple[int, int]  # first and last (inclusive) row RoI Pooling maxes over
    quantized_cols: tuple[int, int]  # first and last (inclusive) column
    max_cell: tuple[int, int]  # (i, j) of the maximum RoI Pooling returns (first one on ties)
    sample_points: np.ndarray  # (N, 2) float64 (x, y) of RoI Align's samples
    sample_values: np.ndarray  # (N,) f at the sample points


def interpolate_feature_map(feature_map: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The continuous map ``f`` of paper Eq. 2 on the grid ``y x x``.

    Args:
        feature_map (ndarray[H, W]): samples ``d[i, j]`` at ``(x = j, y = i)``.
        x (ndarray[Nx]), y (ndarray[Ny]): coordinates in cells; outside the map ``f`` fades to 0
            within one cell, as PrRoI Pooling assumes.

    Returns:
        ndarray[Ny, Nx] float64: ``f(x[b], y[a])`` at ``[a, b]``.
    """
    d = np.asarray(feature_map, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # f is separable: f = Ty @ d @ Tx^T with the "tent" weights T[a, i] = max(0, 1 - |y_a - i|).
    ty = np.maximum(0.0, 1.0 - np.abs(y[:, None] - np.arange(d.shape[0])[None, :]))  # (Ny, H)
    tx = np.maximum(0.0, 1.0 - np.abs(x[:, None] - np.arange(d.shape[1])[None, :]))  # (Nx, W)
    return ty @ d @ tx.T


def example_feature_map() -> tuple[np.ndarray, BinBox]:
    """A 6 x 8 map with two bumps and a bin over the slope between them, where the three operators disagree."""
    i, j = np.mgrid[0:6, 0:8].astype(np.float64)
    d = np.exp(-((j - 2.0) ** 2 + (i - 1.4) ** 2) / 2.0) + 0.6 * np.exp(-((j - 5.5) ** 2 + (i - 3.5) ** 2) / 1.5)
    return d, (1.3, 0.8, 4.6, 3.4)


def _round_half_away(v: float) -> int:
    """C++ ``std::round`` (torchvision's roi_pool), not Python's round-half-to-even."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def compare_pooling(feature_map: np.ndarray, bin_box: BinBox, *, sampling_ratio: int = 2) -> PoolingComparison:
    """Pool one bin of a single-channel map with RoI Pooling, RoI Align and PrRoI Pooling.

    Args:
        feature_map (ndarray or Tensor [H, W]): finite values.
        bin_box: ``(x0, y0, x1, y1)`` in cells; RoI Align's sample points must lie in
            ``[0, W - 1] x [0, H - 1]``, where torchvision's bilinear interpolation (which clamps at the
            border) and Eq. 2 (which fades to 0) agree.
        sampling_ratio: RoI Align samples per axis, ``> 0`` (``2`` gives the paper's N = 4 points).

    Returns:
        :class:`PoolingComparison`; the values come from the library operators, the cells and points
        from the conventions in the module docstring (tests check the two agree).
    """
    d = torch.as_tensor(feature_map, dtype=torch.float64).detach().cpu()
    if d.dim() != 2 or not bool(torch.isfinite(d).all()):
        raise ValueError(f"feature_map must be a finite 2-D array [H, W], got shape {tuple(d.shape)}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive int, got {sampling_ratio!r}")
    height, width = d.shape
    x0, y0, x1, y1 = (float(v) for v in bin_box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bin_box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {bin_box}")

    # RoI Align's sample grid (torchvision, aligned=False, one output bin).
    bin_w, bin_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    offsets = (np.arange(sampling_ratio) + 0.5) / sampling_ratio
    ys, xs = np.meshgrid(y0 + offsets * bin_h, x0 + offsets * bin_w, indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (N, 2) (x, y)
    if points.min() < 0 or points[:, 0].max() > width - 1 or points[:, 1].max() > height - 1:
        raise ValueError(f"RoI Align's sample points of bin {bin_box} leave [0, {width - 1}] x [0, {height - 1}]; move the bin inside the map")
    dense = d.numpy()
    values = np.array([interpolate_feature_map(dense, [px], [py])[0, 0] for px, py in points])

    # RoI Pooling's cells (torchvision: corners rounded, both ends inclusive, clipped to the map).
    c0, c1 = max(_round_half_away(x0), 0), min(_round_half_away(x1), width - 1)
    r0, r1 = max(_round_half_away(y0), 0), min(_round_half_away(y1), height - 1)
    block = dense[r0 : r1 + 1, c0 : c1 + 1]
    bi, bj = np.unravel_index(int(np.argmax(block)), block.shape)

    features = d[None, None]  # (1, 1, H, W)
    rois = torch.tensor([[0.0, x0, y0, x1, y1]], dtype=torch.float64)  # (1, 5) batch index, box
    return PoolingComparison(
        feature_map=dense.copy(),
        bin=(x0, y0, x1, y1),
        roi_pool=float(torchvision.ops.roi_pool(features, rois, output_size=1, spatial_scale=1.0)),
        roi_align=float(torchvision.ops.roi_align(features, rois, output_size=1, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=False)),
        prroi_pool=float(prroi_pool(features, rois, 1, 1.0)),
        quantized_rows=(r0, r1),
        quantized_cols=(c0, c1),
        max_cell=(r0 + int(bi), c0 + int(bj)),
        sample_points=points,
        sample_values=values,
    )


def plot_pooling(result: PoolingComparison, *, pixels_per_cell: int = 24, cmap: str = "viridis") -> Figure:
    """Three panels (RoI Pooling, RoI Align, PrRoI Pooling) over the interpolated map, as the paper's Fig. 6.

    Each panel shows ``f`` (Eq. 2) as an image (axes in cells, ``y`` down, integer ticks at the
    samples ``d[i, j]``) with the bin outlined in red; RoI Pooling's panel outlines the quantized cells,
    prints their values and marks the max, RoI Align's marks its sample points, PrRoI's hatches the integrated
    area. Each title prints the pooled value.

    Returns:
        A Figure with four axes: the three panels and a shared colour bar.
    """
    d = result.feature_map
    height, width = d.shape
    x = -0.5 + (np.arange(width * pixels_per_cell) + 0.5) / pixels_per_cell
    y = -0.5 + (np.arange(height * pixels_per_cell) + 0.5) / pixels_per_cell
    surface = interpolate_feature_map(d, x, y)
    x0, y0, x1, y1 = result.bin
    n_cells = (result.quantized_rows[1] - result.quantized_rows[0] + 1) * (result.quantized_cols[1] - result.quantized_cols[0] + 1)
    titles = (
        f"RoI Pooling: max of {n_cells} quantized cells\n= {result.roi_pool:.4f}",
        f"RoI Align: mean of N = {len(result.sample_points)} samples\n= {result.roi_align:.4f}",
        f"PrRoI Pooling: integral / area\n= {result.prroi_pool:.4f}",
    )
    fig, axes = new_figure(3, panel_size=(4.4, 3.9))
    for ax, title in zip(axes[0], titles):
        image = ax.imshow(surface, cmap=cmap, extent=(-0.5, width - 0.5, height - 0.5, -0.5), origin="upper", vmin=min(0.0, d.min()), vmax=d.max())
        ax.set_xticks(range(width))
        ax.set_yticks(range(height))
        ax.set_xlabel("x (feature-map cells)")
        ax.set_ylabel("y (feature-map cells)")
        ax.set_title(title, fontsize=10)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#D55E00", linewidth=2.5, label="bin"))
    ax_pool, ax_align, ax_pr = axes[0]

    # RoI Pooling: the whole cells around the rounded corners; sample (i, j) owns [j-0.5, j+0.5] x [i-0.5, i+0.5].
    (r0, r1), (c0, c1) = result.quantized_rows, result.quantized_cols
    ax_pool.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="white", linestyle="--", linewidth=1.5, label="quantized cells"))
    for j in range(c0 + 1, c1 + 1):
        ax_pool.plot([j - 0.5, j - 0.5], [r0 - 0.5, r1 + 0.5], color="white", linestyle=":", linewidth=0.8)
    for i in range(r0 + 1, r1 + 1):
        ax_pool.plot([c0 - 0.5, c1 + 0.5], [i - 0.5, i - 0.5], color="white", linestyle=":", linewidth=0.8)
    for i in range(r0, r1 + 1):
        for j in range(c0, c1 + 1):
            ax_pool.text(j, i, f"{d[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white",
                         path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])  # readable on light and dark
    mi, mj = result.max_cell
    ax_pool.add_patch(Rectangle((mj - 0.5, mi - 0.5), 1, 1, fill=False, edgecolor="#CC79A7", linewidth=2.5, label="max cell"))

    # RoI Align: the s x s sub-bins and their centres.
    s = int(round(math.sqrt(len(result.sample_points))))
    bin_w, bin_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    for k in range(1, s):
        ax_align.plot([x0 + k * bin_w / s] * 2, [y0, y0 + bin_h], color="white", linestyle=":", linewidth=1)
        ax_align.plot([x0, x0 + bin_w], [y0 + k * bin_h / s] * 2, color="white", linestyle=":", linewidth=1)
    ax_align.scatter(result.sample_points[:, 0], result.sample_points[:, 1], s=40, color="white", edgecolors="black", zorder=3, label="sample points")

    # PrRoI Pooling: everything inside the bin counts, weighted by area.
    ax_pr.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, hatch="///", edgecolor="white", linewidth=0, label="integrated area"))

    for ax in axes[0]:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="feature value f(x, y)")
    fig.suptitle("Pooling one bin: quantize + max vs. sample + mean vs. exact integral (paper Fig. 6)")
    return fig
