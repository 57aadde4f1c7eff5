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
# Here: Fig. 4 and Table 2 on `reproduce`'s runs, first on the `shapes` lab, where boxes are exact, then
# on `neon-trees`, real tree crowns with hand-drawn boxes; the lab's refinement record replayed box by
# box; last, what changes between the two and why. Nothing is retrained.

# %% tags=["parameters"]
import os

DATASETS = ("shapes", "neon-trees")  # presets of `reproduce --config`: the lab first, then real data (`make run` makes both)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) for both, the stand-in record
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import ap_per_iteration, ap_table, localization_correlation, markdown_table, monotonicity, plot_ap_per_iteration
from workbench.analysis import paper_numbers as paper
from workbench.analysis.claims import paper_claims
from workbench.analysis.experiments import refinement_runs, select, table2_rows
from workbench.analysis.label_noise import describe_label_noise, label_noise_table
from workbench.analysis.narrative import describe_refinement
from workbench.analysis.refinement import refinement_record, refinement_summary
from workbench.inference import box_rerun, detect, example_image, plot_detections, trained_models
from workbench.results import dataset_results, figure_saver, run_label
from workbench.widgets import RefinementStepper

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02; a missing one is made, and the command that makes it
# is printed). In fast mode one tiny `shapes` run stands in for both datasets: its numbers mean nothing
# about the paper. The pipeline refines the 100 highest-scored boxes after NMS with Algorithm 2
# (`nms+refine/<t>`: after t steps) and, for comparison, applies the detector's own box regressor to
# them again and again (`nms+regress/<t>`).

# %%
LAB, REAL = DATASETS
runs = dataset_results(DATASETS, fast=FAST)
save = figure_saver(FIGURES)
refinements = {name: refinement_runs(r.output) for name, r in runs.items()}
{run_label(name, FAST): {method: f"iterations 0..{len(sets) - 1}" for method, sets in refinements[name].items()} for name in DATASETS}

# %% [markdown]
# ## 1 · The lab: `shapes`, where boxes are exact
#
# The ground truth is where the generator drew each object, so a step that raises the true IoU moved
# the box closer to the object, by however little: refinement's gains are measurable here down to a
# fraction of a pixel.
#
# ### Fig. 4: AP per iteration, regression vs optimization
#
# Iteration 0 is NMS's output for both. AP (averaged over IoU 0.5:0.95) and AP90, where localization
# counts most. Each panel spans at least one AP point, so a curve that barely moves looks flat.

# %%
per_iteration = {LAB: ap_per_iteration(refinements[LAB], runs[LAB].coco_gt)}
save(plot_ap_per_iteration(per_iteration[LAB], metrics=("AP", "AP90")), "05_fig4_ap_per_iteration_lab")

# %% [markdown]
# Per method: is AP non-decreasing over the iterations, where does it peak, how much is lost after the
# peak.

# %%
mono = {LAB: monotonicity(per_iteration[LAB])}
mono[LAB]

# %% [markdown]
# ### Table 2: refinement after NMS
#
# Ours after the last step `T` next to the paper's FPN rows.

# %%
table2 = {LAB: ap_table(select(runs[LAB].output.sets, table2_rows(runs[LAB].output.sets)), runs[LAB].coco_gt)}
display(Markdown(markdown_table(table2[LAB], paper.TABLE2_REFINEMENT)))

# %% [markdown]
# ### The record
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
trajectories = {LAB: refinement_record(runs[LAB].output, stand_in=FAST)}
print(f"{len(trajectories[LAB])} boxes, T = {trajectories[LAB].boxes.shape[1] - 1} steps, "
      f"predictor: {trajectories[LAB].meta.get('predictor', 'IoU-Net')}")

# %% [markdown]
# ### Step through it
#
# Press **play** or drag **step**. Left: the ground truth (green), the box at this step (orange), its
# outline at every step (dotted blue) and, as white arrows, the step the next iteration applies to
# each edge, `λ · scale(∇, b)` in pixels. Right: predicted and true IoU per step; an ✕ marks an early
# stop. The line above the figure says why the box stopped (Ω1, Ω2 or T) once it has.
#
# **order → largest IoU loss first** puts the boxes that refinement made *worse* one click away: there the predicted IoU climbs while the true IoU
# falls, i.e. the predictor's optimum is not the object.
#
# The second row holds Algorithm 2's settings, starting at those the record was made with: the step size
# **λ**, the **step** reading (`λ·w·∇`, Algorithm 2 as written, or `λ·w²·∇`, a step in log-scaled
# coordinates; see `workbench/refine.py`), **Ω1**, **Ω2** and **T**. Change one and the box shown is refined
# again from the same start, with the trained IoU-Net on its image's features (`box_rerun`; for the
# stand-in record, its stand-in predictor); the line above the figure says which settings you are looking at.

# %%
models = {LAB: trained_models(LAB, fast=FAST)}
stepper = RefinementStepper(trajectories[LAB], rerun=box_rerun(trajectories[LAB], models[LAB]))
stepper

# %% [markdown]
# ### The verdicts on the lab
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = {LAB: paper_claims(runs[LAB].output, runs[LAB].coco_gt)}
display(Markdown(describe_refinement(per_iteration[LAB], mono[LAB], table2[LAB], trajectories[LAB], verdicts[LAB])))

# %%
refinement_summary(trajectories[LAB])

# %% [markdown]
# Read the table by stop reason; "misled" counts boxes whose predicted IoU rose while their true IoU
# fell. Neither stopping rule can notice those, since Ω1 and Ω2 only look at the predictor.
#
# ### The trained models on an image of your own
#
# `detect` runs what the pipeline runs on one image: the detector, the IoU-Net's predicted IoU of every
# raw detection, IoU-guided NMS (`method="nms"`: plain NMS) and Algorithm 2 with the pipeline's settings,
# and returns one row per kept box (`x0, y0, x1, y1` in pixels, class, score, predicted IoU, the refined
# box). `IMAGE` is the first validation image of the lab; put the path of any RGB image there (PNG, JPEG,
# ...) or an `(H, W, 3)` uint8 array. The lab's models know only the lab's shapes, so expect shapes. The
# models are `make run`'s (`trained_models` says so and trains them first if they are missing; in fast
# mode, the tiny run's).

# %%
IMAGE = example_image(models[LAB])  # e.g. IMAGE = "my_picture.png"
found = detect(IMAGE, models=models[LAB])
found.head(10).round(3)

# %%
save(plot_detections(IMAGE, found, top=10), "05_detect_your_image")

# %% [markdown]
# ## 2 · Real data: `neon-trees`, where boxes are drawn by hand
#
# The same analyses on aerial images of tree crowns. Refinement climbs the predicted IoU, so it can only
# move a box towards the object as far as the predictor learned where the object is, from boxes drawn
# by people; the last section measures how much room that leaves.

# %%
per_iteration[REAL] = ap_per_iteration(refinements[REAL], runs[REAL].coco_gt)
save(plot_ap_per_iteration(per_iteration[REAL], metrics=("AP", "AP90")), "05_fig4_ap_per_iteration_real")

# %%
mono[REAL] = monotonicity(per_iteration[REAL])
mono[REAL]

# %%
table2[REAL] = ap_table(select(runs[REAL].output.sets, table2_rows(runs[REAL].output.sets)), runs[REAL].coco_gt)
display(Markdown(markdown_table(table2[REAL], paper.TABLE2_REFINEMENT)))

# %%
trajectories[REAL] = refinement_record(runs[REAL].output, stand_in=FAST)
refinement_summary(trajectories[REAL])

# %%
verdicts[REAL] = paper_claims(runs[REAL].output, runs[REAL].coco_gt)
display(Markdown(describe_refinement(per_iteration[REAL], mono[REAL], table2[REAL], trajectories[REAL], verdicts[REAL])))

# %% [markdown]
# ## What the data here shows
#
# Each number above is computed from its table, each verdict from its interval. Why the two datasets
# differ, from the runs themselves (`label_noise_table`: object size against the IoU scale, and how well
# each confidence tracks the true IoU of the raw detections):

# %%
noise = label_noise_table({name: (runs[name].coco_gt, localization_correlation(runs[name].output.sets["raw"], runs[name].coco_gt)) for name in DATASETS})
display(Markdown(describe_label_noise(noise, LAB, REAL)))

# %% [markdown]
# Refinement is only as good as the agreement between predicted and true IoU (notebook 03's Fig. 2): a
# flat calibration slope means the predictor's gradient points at what it learned from the labels, not
# at the object, and the loss-first order of the stepper shows where it leads boxes astray.
#
# ## Exercises
#
# 1. In the stepper, pick a box whose true IoU fell. Do its arrows point towards the ground truth at
#    step 0? What does that say about the predictor's gradient near this box?
# 2. Fig. 4's regression curve: at which iteration does it peak on each dataset, and what does the
#    paper say causes the drop after (Sec. 2.2)?
# 3. `refinement_summary` splits boxes by stop reason. Which reason dominates? In the stepper, set `T` to
#    10 on a box that ran every iteration: does its true IoU keep rising? Then set Ω1 to 0 and compare.
# 4. In the stepper, switch the step reading between `λ·w·∇` and `λ·w²·∇` on a large and on a small box,
#    keeping λ. Which reading moves the large box further, and why (see `box_size_scale`)?
# 5. On `neon-trees`, how many pixels may a box of the median size be off at IoU 0.9 (table above)? If
#    labels are off by about as much, what AP90 gain could refinement show even if it were perfect?
