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
# # 03 · Classification confidence vs localization confidence
#
# **What the paper claims** (Sec. 2.1, Fig. 1a, Fig. 2).
#
# * A detector's classification score says *what* a box is, not *how well* it is placed: over
#   detections with IoU > 0.5 before NMS, Pearson r between the score and the true IoU is only 0.217
#   on COCO (Fig. 2a), because training calls every box with IoU > `Ω_train` simply "positive".
# * IoU-Net's predicted IoU, the *localization confidence*, tracks the true IoU much better: r = 0.617
#   (Fig. 2b).
# * NMS ranks duplicates by the score, so the misalignment costs localization: when two boxes cover one
#   object, NMS may keep the more confident but worse-placed one and suppress the better one (Fig. 1a).
#
# Here: Fig. 2 and the Fig. 1a gallery on `reproduce`'s raw detections, first on the `shapes` lab, where
# boxes are exact, then on `neon-trees`, real tree crowns with hand-drawn boxes; last, what changes
# between the two and why.

# %% tags=["parameters"]
import os

DATASETS = ("shapes", "neon-trees")  # presets of `reproduce --config`: the lab first, then real data (`make run` makes both)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) stands in for both
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import localization_correlation, plot_localization_correlation
from workbench.analysis.claims import paper_claims
from workbench.analysis.label_noise import describe_label_noise, label_noise_table
from workbench.analysis.narrative import describe_confidence
from workbench.analysis.suppression import plot_suppressed_better_boxes, suppressed_better_boxes
from workbench.results import coco_images, dataset_results, figure_saver, run_label

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02; a missing one is made, and the command that makes it
# is printed). In fast mode one tiny `shapes` run stands in for both datasets: its numbers mean nothing
# about the paper. `raw` holds each run's detections before NMS, with the IoU-Net's `iou_pred`.

# %%
LAB, REAL = DATASETS
runs = dataset_results(DATASETS, fast=FAST)
save = figure_saver(FIGURES)
{run_label(name, FAST): f"{len(r.output.sets['raw'])} raw detections on {len(r.output.image_ids)} validation images" for name, r in runs.items()}

# %% [markdown]
# ## 1 · The lab: `shapes`, where boxes are exact
#
# The generator draws every object and writes down its box, so the ground truth has no error: a
# detection's IoU measures its placement and nothing else. If the predicted IoU tracks localization
# better than the classification score does, it shows here.
#
# ### Fig. 2: which confidence tracks the IoU?
#
# Every raw detection is matched to its best same-class object (`match_to_ground_truth`); those with
# IoU > 0.5 are plotted. (a) classification score against IoU; (b) predicted IoU against IoU, with the
# line of a perfect predictor.

# %%
corr = {LAB: localization_correlation(runs[LAB].output.sets["raw"], runs[LAB].coco_gt)}
save(plot_localization_correlation(corr[LAB]), "03_fig2_confidence_vs_iou_lab")

# %% [markdown]
# ### Fig. 1a: the better box NMS suppresses
#
# `suppressed_better_boxes` runs NMS (Ω_nms = 0.5, the pipeline's) image by image on the raw detections
# and asks, for every box NMS suppressed, which kept box suppressed it (the first kept box of its class,
# by score, overlapping it by more than Ω_nms). It keeps the pairs where both boxes match the same object
# and the suppressed one is better placed and a detection in its own right (IoU >= 0.5; the kept one
# need not be), and sorts them by how much IoU NMS gave away.
#
# Green: ground truth. Orange: the box NMS keeps. Blue, dashed: the better box it suppressed. The
# titles give both boxes' predicted IoU: where the suppressed box's is higher, IoU-guided NMS (notebook
# 04) keeps it instead.

# %%
pairs = {LAB: suppressed_better_boxes(runs[LAB].output.sets["raw"], runs[LAB].coco_gt, iou_threshold=0.5, min_iou=0.5, top=6)}
save(plot_suppressed_better_boxes(pairs[LAB], coco_images(runs[LAB])), "03_fig1a_suppressed_better_boxes_lab")

# %%
pairs[LAB][["image_id", "kept_score", "kept_iou", "kept_iou_pred", "better_score", "better_iou", "better_iou_pred", "overlap", "iou_gap"]].round(3)

# %% [markdown]
# ### The verdicts on the lab
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = {LAB: paper_claims(runs[LAB].output, runs[LAB].coco_gt)}
display(Markdown(describe_confidence(corr[LAB], pairs[LAB], num_nms=len(runs[LAB].output.sets["nms"]), verdicts=verdicts[LAB])))

# %% [markdown]
# ## 2 · Real data: `neon-trees`, where boxes are drawn by hand
#
# The same analyses on aerial images of tree crowns. Two things differ from the lab: the boxes were
# drawn by people, so the "true" IoU itself carries their error, and the crowns are a few dozen pixels
# across, so that error is large on the IoU scale. The last section measures both.

# %%
corr[REAL] = localization_correlation(runs[REAL].output.sets["raw"], runs[REAL].coco_gt)
save(plot_localization_correlation(corr[REAL]), "03_fig2_confidence_vs_iou_real")

# %%
pairs[REAL] = suppressed_better_boxes(runs[REAL].output.sets["raw"], runs[REAL].coco_gt, iou_threshold=0.5, min_iou=0.5, top=6)
save(plot_suppressed_better_boxes(pairs[REAL], coco_images(runs[REAL])), "03_fig1a_suppressed_better_boxes_real")

# %%
verdicts[REAL] = paper_claims(runs[REAL].output, runs[REAL].coco_gt)
display(Markdown(describe_confidence(corr[REAL], pairs[REAL], num_nms=len(runs[REAL].output.sets["nms"]), verdicts=verdicts[REAL])))

# %% [markdown]
# ## What the data here shows
#
# The two runs side by side (`label_noise_table`): how large the objects are, how far a box of the
# median size may be off and still reach IoU 0.9, both coefficients of Fig. 2, and the slope of true
# IoU against predicted IoU over the matched detections. The sentences below are computed from this
# table; the verdicts above come from `paper_claims` alone.

# %%
noise = label_noise_table({name: (runs[name].coco_gt, corr[name]) for name in DATASETS})
noise.round(3)

# %%
display(Markdown(describe_label_noise(noise, LAB, REAL)))

# %% [markdown]
# The two coefficients are the paper's Fig. 2 on each dataset; the galleries are its Fig. 1a, chosen by
# the size of the IoU given away rather than by hand. Whether IoU-guided NMS recovers these boxes in
# aggregate is notebook 04's question (Fig. 3, Fig. 7, Table 1).
#
# ## Exercises
#
# 1. In the lab's Fig. 2b, where do the points leave the diagonal most: at low or at high IoU? What would
#    that do to IoU-guided NMS, which only compares the predicted IoU of overlapping boxes?
# 2. Use `shift_tolerance` (`workbench.analysis.label_noise`) to find how large a crown must be before a
#    2-px labelling error still allows IoU 0.9. How many of the `neon-trees` objects are that large
#    (`object_sizes(runs[REAL].coco_gt)`)?
# 3. Re-run `localization_correlation` with `min_iou=0.7`. Does the gap between the two coefficients grow
#    or shrink on each dataset, and why might a narrower IoU range do that?
# 4. In a Fig. 1a gallery, find a pair where the IoU-Net also prefers the worse box. Looking at the image,
#    what could have misled it?
