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
# Here: the same three analyses on `reproduce`'s raw detections after each NMS variant, first on the
# `shapes` lab, where boxes are exact, then on `neon-trees`, real tree crowns with hand-drawn boxes,
# each with an explorer that shows, box by box, what each method keeps and why.

# %% tags=["parameters"]
import os

DATASETS = ("shapes", "neon-trees")  # presets of `reproduce --config`: the lab first, then real data (`make run` makes both)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) stands in for both
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis import (
    ap_table,
    localization_correlation,
    markdown_table,
    plot_positives_per_iou_bin,
    plot_recall_vs_iou,
    positives_per_iou_bin,
    recall_vs_iou,
)
from workbench.analysis import paper_numbers as paper
from workbench.analysis.claims import paper_claims
from workbench.analysis.experiments import FIG3_SETS, FIG7_SETS, TABLE1_ROWS, select
from workbench.analysis.label_noise import describe_label_noise, label_noise_table
from workbench.analysis.narrative import describe_nms
from workbench.results import coco_images, dataset_results, figure_saver, run_label
from workbench.widgets import NMSExplorer

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02; a missing one is made, and the command that makes it
# is printed). In fast mode one tiny `shapes` run stands in for both datasets: its numbers mean nothing
# about the paper. `sets` holds the raw detections and each NMS variant's output, all with the
# pipeline's settings (Ω_nms = 0.5; linear Soft-NMS above IoU 0.3; at most 100 boxes per image).

# %%
LAB, REAL = DATASETS
runs = dataset_results(DATASETS, fast=FAST)
save = figure_saver(FIGURES)
{run_label(name, FAST): {set_name: len(r.output.sets[set_name]) for set_name in ("raw", "nms", "soft-nms", "iou-nms")} for name, r in runs.items()}

# %% [markdown]
# ## 1 · The lab: `shapes`, where boxes are exact
#
# Every box of the ground truth is where the generator drew the object, so a detection's IoU is its
# placement error and nothing else, down to a pixel: the lab can tell whether ranking by predicted IoU
# keeps better-placed boxes.
#
# ### Fig. 3: positives that survive, by IoU
#
# A detection is *positive* when it is the highest-scored detection of its object with IoU >= 0.5.
# The question is how many of the best-localized positives (right-most bins) each NMS keeps. No-NMS
# bounds the total, not each bin: when NMS removes an object's highest-scored box, the next box of that
# object becomes its positive, in its own IoU bin, so a bin can hold more positives after NMS than
# before (the object moved there from another bin).

# %%
positives = {LAB: positives_per_iou_bin(select(runs[LAB].output.sets, FIG3_SETS), runs[LAB].coco_gt)}
save(plot_positives_per_iou_bin(positives[LAB]), "04_fig3_positives_per_iou_lab")

# %%
positives[LAB]

# %% [markdown]
# ### Fig. 7: recall against the matching IoU
#
# The fraction of objects that some detection overlaps by at least the threshold. Suppression can only
# lower recall; the gap to No-NMS at high thresholds is localization thrown away.

# %%
recall = {LAB: recall_vs_iou(select(runs[LAB].output.sets, FIG7_SETS), runs[LAB].coco_gt)}
save(plot_recall_vs_iou(recall[LAB]), "04_fig7_recall_vs_iou_lab")

# %% [markdown]
# ### Table 1: AP of each NMS
#
# COCO AP (pycocotools' `COCOeval`, AP50 ... AP90 read from its precision array); each row of ours is
# followed by the paper's row of the same name (ResNet-50 FPN on COCO minival).

# %%
table1 = {LAB: ap_table(select(runs[LAB].output.sets, TABLE1_ROWS), runs[LAB].coco_gt)}
display(Markdown(markdown_table(table1[LAB], paper.TABLE1_NMS)))

# %% [markdown]
# ### Explore: which boxes survive, and why
#
# Pick an image, a method, the IoU threshold (Ω_nms; for Soft-NMS the overlap above which scores decay
# linearly) and the lowest classification score to show. Green boxes are the ground truth; every box
# drawn carries the number of its row in the table below the figure, orange when it survives, grey
# dotted when suppressed; the table says why (which numbered box suppressed it and by how much they
# overlap, or, for IoU-guided NMS, whose score a kept box took over). Compare NMS and IoU-guided NMS on
# the same image: the orange box of a cluster moves to the one with the highest predicted IoU.

# %%
NMSExplorer(runs[LAB].output.sets["raw"], runs[LAB].coco_gt, coco_images(runs[LAB]), min_score=0.05)

# %% [markdown]
# ### The verdicts on the lab
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = {LAB: paper_claims(runs[LAB].output, runs[LAB].coco_gt)}
display(Markdown(describe_nms(positives[LAB], recall[LAB], table1[LAB], verdicts[LAB])))

# %% [markdown]
# ## 2 · Real data: `neon-trees`, where boxes are drawn by hand
#
# The same analyses on aerial images of tree crowns. IoU-guided NMS can only keep the better box if the
# predicted IoU ranks boxes of one crown correctly, and the crowns' boxes were drawn by people: the last
# section measures how much room that leaves at IoU 0.9.

# %%
positives[REAL] = positives_per_iou_bin(select(runs[REAL].output.sets, FIG3_SETS), runs[REAL].coco_gt)
save(plot_positives_per_iou_bin(positives[REAL]), "04_fig3_positives_per_iou_real")

# %%
recall[REAL] = recall_vs_iou(select(runs[REAL].output.sets, FIG7_SETS), runs[REAL].coco_gt)
save(plot_recall_vs_iou(recall[REAL]), "04_fig7_recall_vs_iou_real")

# %%
table1[REAL] = ap_table(select(runs[REAL].output.sets, TABLE1_ROWS), runs[REAL].coco_gt)
display(Markdown(markdown_table(table1[REAL], paper.TABLE1_NMS)))

# %%
NMSExplorer(runs[REAL].output.sets["raw"], runs[REAL].coco_gt, coco_images(runs[REAL]), min_score=0.05)

# %%
verdicts[REAL] = paper_claims(runs[REAL].output, runs[REAL].coco_gt)
display(Markdown(describe_nms(positives[REAL], recall[REAL], table1[REAL], verdicts[REAL])))

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
# A cluster's best-localized box is kept only if the IoU-Net ranks it first, so IoU-guided NMS is only as
# good as the predictor of notebook 02, and AP90 only as meaningful as the ground truth is exact.
#
# ## Exercises
#
# 1. In the lab's explorer, find an image where NMS and IoU-guided NMS keep different boxes for the same
#    object. Which of the two is closer to the green ground truth, and what did each method rank by?
# 2. Raise Ω_nms to 0.7 in the explorer. Which boxes come back, and why would that raise recall but
#    lower AP?
# 3. In Fig. 3, find a bin where a method has more positives than No-NMS. Which bin lost the objects
#    that moved there, and does the total over all bins still respect the No-NMS bound?
# 4. On `neon-trees`, compare AP50 and AP90 between NMS and IoU-guided NMS in Table 1. Using the shift
#    at IoU 0.9 in the table above, explain why AP90 is the harder number to trust there.
