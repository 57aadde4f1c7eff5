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
# # 04 · IoU-guided NMS (Algorithm 1, Table 1, Fig. 3, Fig. 7)
#
# **What the paper claims** (Sec. 2.1, 3.2, 4.1).
#
# * Plain NMS ranks duplicates by classification score, which barely tracks localization (notebook 03):
#   on COCO it suppresses more than half of the detections with IoU > 0.9 that No-NMS had (Fig. 3).
# * **IoU-guided NMS** (Algorithm 1) ranks by the predicted IoU instead: the best-*localized* box of a
#   cluster eliminates the others (overlap > `Ω_nms`), and takes the highest classification score of
#   the boxes it eliminates ("confidence clustering").
# * It therefore keeps more well-localized positives (Fig. 3), recalls more objects at high matching
#   IoU (Fig. 7: at IoU 0.9, 18.7% after NMS, 28.9% after IoU-NMS, 39.7% without NMS), and improves AP
#   at high IoU thresholds most (Table 1: AP90 9.8 → 13.3 for FPN), at some cost in AP50.
#
# Here: the same three analyses on `reproduce`'s raw detections after each NMS variant, then an
# explorer that shows, box by box, what each method keeps and why.

# %% tags=["parameters"]
import os

DATASET = "neon-trees"  # preset of `python -m workbench reproduce --config <DATASET>` (make run: neon-trees)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) instead
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import (
    ap_table,
    markdown_table,
    plot_positives_per_iou_bin,
    plot_recall_vs_iou,
    positives_per_iou_bin,
    recall_vs_iou,
)
from workbench.analysis import paper_numbers as paper
from workbench.analysis.claims import paper_claims
from workbench.analysis.experiments import FIG3_SETS, FIG7_SETS, TABLE1_ROWS, select
from workbench.analysis.narrative import describe_nms
from workbench.results import coco_images, figure_saver, pipeline_results
from workbench.widgets import NMSExplorer

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02); in fast mode a tiny `shapes` run whose numbers mean
# nothing about the paper. `sets` holds the raw detections and each NMS variant's output, all with the
# pipeline's settings (Ω_nms = 0.5; linear Soft-NMS above IoU 0.3; at most 100 boxes per image).

# %%
results = pipeline_results(DATASET, fast=FAST)
save = figure_saver(FIGURES)
s, gt = results.output.sets, results.coco_gt
print({name: len(s[name]) for name in ("raw", "nms", "soft-nms", "iou-nms")}, "detections")

# %% [markdown]
# ## Fig. 3: positives that survive, by IoU
#
# A detection is *positive* when it is the highest-scored detection of its object with IoU >= 0.5.
# No-NMS is the upper bound. The question is how many of the best-localized positives (right-most bins)
# each NMS keeps.

# %%
positives = positives_per_iou_bin(select(s, FIG3_SETS), gt)
save(plot_positives_per_iou_bin(positives), "04_fig3_positives_per_iou")

# %%
positives

# %% [markdown]
# ## Fig. 7: recall against the matching IoU
#
# The fraction of objects that some detection overlaps by at least the threshold. Suppression can only
# lower recall; the gap to No-NMS at high thresholds is localization thrown away.

# %%
recall = recall_vs_iou(select(s, FIG7_SETS), gt)
save(plot_recall_vs_iou(recall), "04_fig7_recall_vs_iou")

# %% [markdown]
# ## Table 1: AP of each NMS
#
# COCO AP (pycocotools' `COCOeval`, AP50 ... AP90 read from its precision array); each row of ours is
# followed by the paper's row of the same name (ResNet-50 FPN on COCO minival).

# %%
table1 = ap_table(select(s, TABLE1_ROWS), gt)
display(Markdown(markdown_table(table1, paper.TABLE1_NMS)))

# %% [markdown]
# ## Explore: which boxes survive, and why
#
# Pick an image, a method and the IoU threshold (Ω_nms; for Soft-NMS the overlap above which scores
# decay linearly). Orange boxes survive, grey dotted ones are suppressed; hover over the dot at a box's
# top-left corner, or read the table, for why: which box suppressed it and by how much they overlap, or
# (IoU-guided NMS) whose score a kept box took over. Compare NMS and IoU-guided NMS on the same image:
# the orange box of a cluster moves to the one with the highest predicted IoU.

# %%
explorer = NMSExplorer(s["raw"], gt, coco_images(results), min_score=0.05)
explorer

# %% [markdown]
# ## What the data here shows
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = paper_claims(results.output, results.coco_gt)
display(Markdown(describe_nms(positives, recall, table1, verdicts)))

# %% [markdown]
# Each number is computed from the tables above, each verdict from its interval. Where a claim does
# not hold or stays inconclusive, the explorer shows why box by box: a cluster's best-localized box is kept only if
# the IoU-Net ranks it first, so IoU-guided NMS is only as good as the predictor of notebook 02.
