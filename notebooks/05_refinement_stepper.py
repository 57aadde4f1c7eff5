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
# # 05 · Refinement, one box at a time (Algorithm 2)
#
# **What the paper claims** (Sec. 3.3, Algorithm 2). Box refinement can be an *optimization*: treat the
# IoU-Net's predicted IoU as an objective and climb its gradient w.r.t. the box's four coordinates,
# which Precise RoI Pooling makes continuous. Each step is `b ← b + λ · scale(∇IoU, b)`, the gradient
# on `x` scaled by the box width and on `y` by its height (λ = 0.5). Each box stops on its own: when
# the predicted IoU no longer changes (`|Δ| < Ω1 = 0.001`), when it drops (`Δ < Ω2 = −0.01`), or after
# `T = 5` steps. Because the objective is a (robust) estimate of localization quality, refinement
# should improve boxes steadily instead of drifting as iterated regression does (Fig. 4).
#
# This notebook replays a saved refinement record, `reports/<dataset>/trajectories.npz`, written by
# `python -m workbench reproduce --config <dataset>`. Nothing is retrained or recomputed.

# %% tags=["parameters"]
import os

DATASET = "shapes"  # replays reports/<DATASET>/trajectories.npz when it exists
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: always the small stand-in record below

# %% [markdown]
# ## The record
#
# When there is no record yet for `DATASET` (or in fast mode) we build a small one here with
# `demo_trajectories`: jittered ground-truth boxes of a few `shapes` validation images, refined by
# Algorithm 2 with the paper's hyper-parameters. **Its "predicted IoU" is a stand-in, not an IoU-Net**:
# the exact IoU with a slightly misplaced copy of the ground truth, confidently wrong by a little as a
# trained predictor is. It exists for this demo and for the tests; everything below reads a real
# record the same way.

# %%
from workbench.notebook_utils import demo_trajectories, project_root, refinement_summary
from workbench.trajectories import Trajectories
from workbench.widgets import RefinementStepper

record_path = project_root() / "reports" / DATASET / "trajectories.npz"
if FAST or not record_path.is_file():
    record_path = demo_trajectories(num_images=8 if FAST else 24)
trajectories = Trajectories.load(record_path)
print(f"{record_path}\n{len(trajectories)} boxes, T = {trajectories.boxes.shape[1] - 1} steps, "
      f"predictor: {trajectories.meta.get('predictor', 'IoU-Net')}")

# %% [markdown]
# ## Step through it
#
# Press **play** or drag **step**. Left: the ground truth (green), the box at this step (orange), its
# outline at every step (dotted blue) and, as white arrows, the step the next iteration applies to
# each edge, `λ · scale(∇, b)` in pixels. Right: predicted and true IoU per step; an ✕ marks an early
# stop. The line above the figure says why the box stopped (Ω1, Ω2 or T) once it has.
#
# **order → largest IoU loss first** puts the boxes that refinement made *worse* one click away:
# there the predicted IoU climbs while the true IoU falls, i.e. the predictor's optimum is not the
# object.

# %%
stepper = RefinementStepper(trajectories)
stepper

# %% [markdown]
# ## What the data here shows

# %%
refinement_summary(trajectories)

# %% [markdown]
# Read the table by stop reason; "misled" counts boxes whose predicted IoU rose while their true IoU
# fell. On the stand-in record most boxes gain true IoU: they climb towards the stand-in's belief,
# which lies near the object. The few that lose it are misled: their predicted IoU goes up while
# their true IoU goes down (order → largest IoU loss first to see them). Neither stopping rule can
# notice, since Ω1 and Ω2 only look at the predictor. Refinement is therefore only as good
# as the agreement between predicted and true IoU (the paper's Fig. 2). On a real record
# (`reports/<dataset>/trajectories.npz`) the same table and the loss-first order show where the
# trained IoU-Net leads refinement astray.
