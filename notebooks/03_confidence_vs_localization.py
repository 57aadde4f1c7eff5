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
# Here: Fig. 2 on the raw detections of `reproduce`'s run, and a gallery of the cases where NMS
# suppressed the better-localized of two duplicates, worst first.

# %% tags=["parameters"]
import os

DATASET = "neon-trees"  # preset of `python -m workbench reproduce --config <DATASET>` (make run: neon-trees)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) instead
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import localization_correlation, plot_localization_correlation
from workbench.analysis.claims import paper_claims
from workbench.analysis.narrative import describe_confidence
from workbench.analysis.suppression import plot_suppressed_better_boxes, suppressed_better_boxes
from workbench.results import coco_images, figure_saver, pipeline_results

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02); in fast mode a tiny `shapes` run whose numbers mean
# nothing about the paper.

# %%
results = pipeline_results(DATASET, fast=FAST)
save = figure_saver(FIGURES)
images = coco_images(results)
raw = results.output.sets["raw"]  # detections before NMS, with the IoU-Net's iou_pred
print(f"{len(raw)} raw detections on {len(results.output.image_ids)} validation images")

# %% [markdown]
# ## Fig. 2: which confidence tracks the IoU?
#
# Every raw detection is matched to its best same-class object (`match_to_ground_truth`); those with
# IoU > 0.5 are plotted. (a) classification score against IoU; (b) predicted IoU against IoU, with the
# line of a perfect predictor.

# %%
corr = localization_correlation(raw, results.coco_gt)
save(plot_localization_correlation(corr), "03_fig2_confidence_vs_iou")

# %% [markdown]
# ## Fig. 1a: the better box NMS suppresses
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
pairs = suppressed_better_boxes(raw, results.coco_gt, iou_threshold=0.5, min_iou=0.5, top=6)
save(plot_suppressed_better_boxes(pairs, images), "03_fig1a_suppressed_better_boxes")

# %%
pairs[["image_id", "kept_score", "kept_iou", "kept_iou_pred", "better_score", "better_iou", "better_iou_pred", "overlap", "iou_gap"]].round(3)

# %% [markdown]
# ## What the data here shows
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = paper_claims(results.output, results.coco_gt)
display(Markdown(describe_confidence(corr, pairs, num_nms=len(results.output.sets["nms"]), verdicts=verdicts)))

# %% [markdown]
# The two coefficients are the paper's Fig. 2 on this data; the gallery is its Fig. 1a, chosen by
# the size of the IoU given away rather than by hand. Whether IoU-guided NMS recovers these boxes in
# aggregate is notebook 04's question (Fig. 3, Fig. 7, Table 1).
