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
# # 05 · Refinement as optimization (Algorithm 2, Fig. 4, Table 2), one box at a time
#
# **What the paper claims** (Sec. 2.2, 3.3, 4.2, Algorithm 2).
#
# * Iterating a box *regressor* on its own output is not a refinement: the input distribution drifts
#   away from what the regressor was trained on, and AP first rises, then falls (Fig. 4, non-monotonic).
# * Refinement can instead be an *optimization*: treat the IoU-Net's predicted IoU as an objective and
#   climb its gradient w.r.t. the box's four coordinates, which Precise RoI Pooling makes continuous
#   (notebook 01). Each step is `b ← b + λ · scale(∇IoU, b)`, the gradient on `x` scaled by the box width
#   and on `y` by its height (λ = 0.5). Each box stops on its own: when the predicted IoU no longer
#   changes (`|Δ| < Ω1 = 0.001`), when it drops (`Δ < Ω2 = −0.01`), or after `T = 5` steps.
# * Because the objective is an estimate of localization quality, AP should improve monotonically with
#   the iterations (Fig. 4), and most at high IoU: Table 2, FPN AP 36.4 → 38.0, AP90 9.8 → 14.6.
#
# Here: Fig. 4 and Table 2 on `reproduce`'s run, then its refinement record replayed box by box.
# Nothing is retrained.

# %% tags=["parameters"]
import os

DATASET = "neon-trees"  # preset of `python -m workbench reproduce --config <DATASET>` (make run: neon-trees)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT), the stand-in record
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import ap_per_iteration, ap_table, markdown_table, monotonicity, plot_ap_per_iteration
from workbench.analysis import paper_numbers as paper
from workbench.analysis.claims import paper_claims
from workbench.analysis.experiments import refinement_runs, select, table2_rows
from workbench.analysis.narrative import describe_refinement
from workbench.analysis.refinement import refinement_record, refinement_summary
from workbench.results import figure_saver, pipeline_results
from workbench.widgets import RefinementStepper

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02); in fast mode a tiny `shapes` run whose numbers mean
# nothing about the paper. The pipeline refines the 100 highest-scored boxes after NMS with Algorithm 2
# (`nms+refine/<t>`: after t steps) and, for comparison, applies the detector's own box regressor to
# them again and again (`nms+regress/<t>`).

# %%
results = pipeline_results(DATASET, fast=FAST)
save = figure_saver(FIGURES)
s, gt = results.output.sets, results.coco_gt
runs = refinement_runs(results.output)
print({method: f"iterations 0..{len(sets) - 1}" for method, sets in runs.items()})

# %% [markdown]
# ## Fig. 4: AP per iteration, regression vs optimization
#
# Iteration 0 is NMS's output for both. AP (averaged over IoU 0.5:0.95) and AP90, where localization
# counts most.

# %%
per_iteration = ap_per_iteration(runs, gt)
save(plot_ap_per_iteration(per_iteration, metrics=("AP", "AP90")), "05_fig4_ap_per_iteration")

# %% [markdown]
# Per method: is AP non-decreasing over the iterations, where does it peak, how much is lost after the
# peak.

# %%
mono = monotonicity(per_iteration)
mono

# %% [markdown]
# ## Table 2: refinement after NMS
#
# Ours after the last step `T` next to the paper's FPN rows.

# %%
table2 = ap_table(select(s, table2_rows(s)), gt)
display(Markdown(markdown_table(table2, paper.TABLE2_REFINEMENT)))

# %% [markdown]
# ## The record
#
# Every box refined after IoU-guided NMS, step by step: boxes, predicted and true IoU, the applied
# steps and why each box stopped (`output.trajectories`; `reports/<dataset>/trajectories.npz` on disk).
#
# In fast mode (and if a run refined no box) `refinement_record` shows a small stand-in record instead
# (`demo_trajectories`): jittered ground truth of a few `shapes` images refined by Algorithm 2 with the
# paper's settings, but **its "predicted IoU" is not an IoU-Net**: it is the exact IoU with a slightly
# misplaced copy of the ground truth, confidently wrong by a little as a trained predictor is. The tiny
# fast-mode IoU-Net, trained for a few iterations, is nearly flat: its line below shows its boxes moving
# by a fraction of a pixel and stopping after one step.

# %%
trajectories = refinement_record(results.output, stand_in=FAST)
print(f"{len(trajectories)} boxes, T = {trajectories.boxes.shape[1] - 1} steps, "
      f"predictor: {trajectories.meta.get('predictor', 'IoU-Net')}")

# %% [markdown]
# ## Step through it
#
# Press **play** or drag **step**. Left: the ground truth (green), the box at this step (orange), its
# outline at every step (dotted blue) and, as white arrows, the step the next iteration applies to
# each edge, `λ · scale(∇, b)` in pixels. Right: predicted and true IoU per step; an ✕ marks an early
# stop. The line above the figure says why the box stopped (Ω1, Ω2 or T) once it has.
#
# **order → largest IoU loss first** puts the boxes that refinement made *worse* one click away: there the predicted IoU climbs while the true IoU
# falls, i.e. the predictor's optimum is not the object.

# %%
stepper = RefinementStepper(trajectories)
stepper

# %% [markdown]
# ## What the data here shows
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = paper_claims(results.output, results.coco_gt)
display(Markdown(describe_refinement(per_iteration, mono, table2, trajectories, verdicts)))

# %%
refinement_summary(trajectories)

# %% [markdown]
# Read the table by stop reason; "misled" counts boxes whose predicted IoU rose while their true IoU
# fell. Neither stopping rule can notice those, since Ω1 and Ω2 only look at the predictor: refinement is
# only as good as the agreement between predicted and true IoU (notebook 03's Fig. 2), and the
# loss-first order of the stepper shows where the trained IoU-Net leads it astray.
