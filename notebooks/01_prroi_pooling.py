# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Precise RoI Pooling: an integral, and its gradient w.r.t. the box
#
# **What the paper claims** (Sec. 3.3, Eq. 2–4, Fig. 6).
#
# * Bilinear interpolation makes the discrete feature map `w[i, j]` a continuous function
#   `f(x, y) = Σ IC(x, y, i, j) · w[i, j]` with `IC = max(0, 1 − |x − i|) · max(0, 1 − |y − j|)` (Eq. 2).
# * PrRoI Pooling averages `f` *exactly* over a bin: the double integral of `f` over the bin divided by
#   its area (Eq. 3). RoI Pooling instead rounds the bin to whole cells and takes a max; RoI Align
#   averages `f` at a fixed number `N` of sample points (N = 4 in Fig. 6).
# * Without quantization, PrRoI Pooling is *continuously differentiable* w.r.t. the bin's coordinates,
#   e.g. `∂PrPool/∂x1 = PrPool / (x2 − x1) − ∫ f(x1, y) dy / area` (Eq. 4). RoI Align is not (footnote §).
#   This gradient is what optimization-based box refinement (notebook 05) climbs.
#
# Conventions here are the library's (`workbench.ops.prroi_pool`, the official implementation's): the
# sample `d[i, j]` sits at the point `(x = j, y = i)`, and a bin is `(x0, y0, x1, y1)` in cells.

# %% tags=["parameters"]
import os

DATASET = "shapes"  # not read here: this notebook works on a small synthetic map (kept so all notebooks share parameters)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: fewer points in the sweep

# %%
# %matplotlib inline
import numpy as np
from IPython.display import Markdown, display
import pandas as pd
import torch

from workbench.analysis import compare_pooling, example_feature_map, interpolate_feature_map, plot_pooling
from workbench.analysis.narrative import describe_pooling
from workbench.analysis.pooling_gradient import gradient_table, midpoint_mean, plot_pooling_sweep, pooling_sweep, sweep_jumps
from workbench.ops import prroi_pool
from workbench.widgets import PoolingExplorer

# %% [markdown]
# ## The continuous feature map (Eq. 2)
#
# A 6 × 8 map with two bumps, and a bin (in cells) over the slope between them, where the three
# poolings disagree.

# %%
d, bin_box = example_feature_map()  # d: (H, W) = (6, 8); bin_box: (x0, y0, x1, y1)
print("bin:", bin_box)
pd.DataFrame(d).round(2)

# %% [markdown]
# Sanity checks of Eq. 2: `f` passes through the samples, and half-way between two samples it is
# their mean.

# %%
f_at_samples = interpolate_feature_map(d, np.arange(8), np.arange(6))  # (6, 8)
print("f(j, i) == d[i, j] everywhere:", np.allclose(f_at_samples, d))
print("f(2.5, 1) =", interpolate_feature_map(d, [2.5], [1.0])[0, 0], " mean of d[1, 2], d[1, 3] =", (d[1, 2] + d[1, 3]) / 2)

# %% [markdown]
# ## One bin, one integral (Eq. 3)
#
# `prroi_pool` takes features `(N, C, H, W)` and RoIs `(K, 5)` = (batch index, x0, y0, x1, y1). With
# `output_size=1` the whole box is one bin. A brute-force check: the mean of `f` at the centres of a
# fine grid of points inside the bin (midpoint rule).

# %%
features = torch.tensor(d)[None, None]  # (1, 1, 6, 8)
rois = torch.tensor([[0.0, *bin_box]], dtype=torch.float64)  # (1, 5)
exact = float(prroi_pool(features, rois, output_size=1, spatial_scale=1.0))
brute = midpoint_mean(d, bin_box, n=400)  # the mean of f at 400 x 400 points
print(f"PrRoI Pooling {exact:.8f}   midpoint rule {brute:.8f}   difference {abs(exact - brute):.1e}")

# %% [markdown]
# ## RoI Pooling vs RoI Align vs PrRoI Pooling (Fig. 6)
#
# The same bin, pooled three ways (values from `torchvision.ops.roi_pool`, `torchvision.ops.roi_align`
# and `workbench.ops.prroi_pool`).

# %%
comparison = compare_pooling(d, bin_box)
plot_pooling(comparison)

# %% [markdown]
# ## Moving one edge
#
# Slide the bin's left edge `x0` across three cells (from 0.5 to 3.5) and pool at every position. RoI Pooling sees only the
# rounded edge, so its value is flat and then jumps: its derivative w.r.t. the box is zero almost
# everywhere. RoI Align moves its sample points with the edge, so its value is continuous but its slope
# jumps whenever a sample point crosses a grid line. PrRoI Pooling's slope is continuous.

# %%
sweep = pooling_sweep(d, bin_box, "x0", np.linspace(-0.8, 2.2, 61 if FAST else 241))  # offsets of x0 from 1.3
plot_pooling_sweep(sweep)

# %% [markdown]
# ## The gradient w.r.t. an edge (Eq. 4)
#
# Three ways to the same four numbers: autograd through the library's `prroi_pool` (what refinement
# uses), Eq. 4 written out with exact line integrals of `f` along each edge, and central finite
# differences of the pooled value.

# %%
table = gradient_table(d, bin_box)
table

# %% [markdown]
# A second bin whose left edge lies exactly on a grid line (`x0 = 2`), where `f`'s slope changes:
# the three still agree, because the integral smooths the kink away.

# %%
on_grid = gradient_table(d, (2.0, 1.0, 4.0, 3.5))
on_grid

# %% [markdown]
# ## Try it
#
# Move the bin's edges with the sliders. The arrows show `∂PrPool/∂edge`: the direction in which moving
# that edge raises the pooled value, longer for a steeper slope. Watch the value and the arrows change
# smoothly, including when an edge crosses a grid line.

# %%
explorer = PoolingExplorer(d, bin_box)
explorer

# %% [markdown]
# ## What the data here shows

# %%
display(Markdown(describe_pooling(comparison, brute, sweep, {"bin": table, "on-grid bin": on_grid})))

# %%
sweep_jumps(sweep).round(4)

# %% [markdown]
# * PrRoI Pooling is the exact mean of the interpolated map over the bin: a brute-force integral
#   agrees to its own accuracy (~1e-7 with 400 × 400 points). RoI Pooling returns the max over whole
#   cells, a value of the bump next to the bin rather than of the bin; RoI Align lands near the
#   integral here because `f` is smooth, but it only ever looks at 4 points.
# * As the edge slides over three cells, RoI Pooling takes only a couple of values: flat, then a jump
#   (no gradient to follow). RoI Align is continuous but its slope jumps each time a sample point
#   crosses a grid line. PrRoI Pooling's slope changes only a little between neighbouring positions
#   (and less with finer steps): it is continuously differentiable, as the paper says.
# * Eq. 4, autograd through `prroi_pool` and finite differences give the same gradient: Eq. 4 and
#   autograd to rounding error, central differences to ~1e-11 inside cells and ~1e-6 with an edge on a
#   grid line (there the pooled value is only once differentiable, so central differences lose their
#   second-order accuracy). This is the gradient Algorithm 2 climbs in notebook 05.

# %% [markdown]
# ## Exercises
#
# 1. Sweep the top edge instead (`pooling_sweep(d, bin_box, "y0", ...)`). How many distinct values does
#    RoI Pooling take now, and does `sweep_jumps` find RoI Align's slope jumps at the grid lines of `y`?
# 2. Shrink the bin to less than one cell, e.g. `(2.2, 1.2, 2.8, 1.8)`, and call `compare_pooling`. Which
#    of the three methods still differ, and why does RoI Align come closer to PrRoI Pooling?
# 3. How many midpoint-rule points (`midpoint_mean(d, bin_box, n=...)`) does it take to match `prroi_pool`
#    to 1e-4? To 1e-8? What does that say about the cost of a brute-force Eq. 3?
# 4. Call `gradient_table` with a bin whose right edge lies on a grid line, e.g. `(1.3, 1.0, 5.0, 3.5)`.
#    Which edge's finite difference disagrees most with Eq. 4, and does a smaller `eps` help?
