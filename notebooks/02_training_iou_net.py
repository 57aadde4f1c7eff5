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
# # 02 · Training IoU-Net: jittered boxes, the loss, and how well it predicts
#
# **What the paper claims** (Sec. 3.1, 3.4, Fig. 2b).
#
# * The IoU predictor is *not* trained on the detector's proposals. Every ground-truth box is jittered
#   by random transforms; candidates with IoU below `Ω_train = 0.5` are dropped, and the training boxes
#   are sampled **uniformly in IoU** from what is left. The paper says this "empirically brings better
#   performance and robustness": the predictor sees every level of localization quality equally often,
#   whatever detector later feeds it.
# * Each box is pooled from the FPN features with PrRoI Pooling (notebook 01) and a two-layer head
#   predicts its IoU per class; the target is the IoU mapped onto `[-1, 1]`, the loss smooth-L1.
# * Because training is independent of the detector, the predicted IoU should transfer to *held-out*
#   detections: it should track their true IoU (Fig. 2b: Pearson r = 0.617 on COCO).
#
# Here: the jittered boxes and their IoU histogram, the IoU run's training curve, and predicted vs
# true IoU on the raw detections of the validation images, all from what
# `python -m workbench reproduce --config <DATASET> --no-joint` trained and ran (`make run` runs it for
# `shapes`, the lab with exact boxes, then for `neon-trees`, real crowns with hand-drawn boxes).

# %% tags=["parameters"]
import os

DATASET = "shapes"  # preset of `reproduce --config`: "shapes" (the lab, exact boxes) or "neon-trees" (real data); make run makes both
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) instead
FIGURES = ""  # a folder to save the figures in (PNG), or "" for none

# %%
# %matplotlib inline
from IPython.display import Markdown, display

from workbench.analysis.iou_prediction import (
    iou_prediction_error,
    jittered_training_boxes,
    plot_jittered_boxes,
    plot_predicted_vs_true,
    predicted_vs_true_iou,
)
from workbench.analysis.narrative import describe_iou_training
from workbench.analysis.training_log import plot_training_log, train_longer, training_log
from workbench.models import JitterConfig
from workbench.results import coco_images, figure_saver, pipeline_results

# %% [markdown]
# ## The pipeline's results
#
# `pipeline_results` loads what `reproduce` cached (the same options, run folders and cache as the
# command line); only what is missing is trained or run. In fast mode it is a tiny `shapes` run: its
# numbers show that everything runs, not what the paper claims.

# %%
results = pipeline_results(DATASET, fast=FAST)
save = figure_saver(FIGURES)
images = coco_images(results)
print(f"{len(results.output.image_ids)} validation images; IoU run: {results.run_dirs['iou']}")

# %% [markdown]
# ## Training boxes: jittered ground truth, uniform in IoU (Sec. 3.1)
#
# `jittered_training_boxes` calls `workbench.models.jitter_boxes` with the models' own settings
# (`JitterConfig`: 16 boxes per object, IoU >= 0.5, ten equal-count bins) on the ground truth of a few
# validation images: the same draw the training loop makes on each training batch. Left: the boxes of a
# few objects, coloured by their IoU with the object (green). Right: the IoU histogram is flat, by
# construction.

# %%
config = JitterConfig()
jittered = jittered_training_boxes(results.coco_gt, results.output.image_ids[:4], config=config)
first = int(jittered["image_id"].iloc[0])
save(plot_jittered_boxes(jittered, images(first), image_id=first, num_bins=config.num_bins), "02_jittered_boxes")

# %% [markdown]
# ## The training curve
#
# The IoU run's `log.jsonl`: the smooth-L1 loss of the IoU head (`loss_iou`), averaged over each logging
# window, and the learning rate (the paper's schedule squeezed into the run: warm-up over the first
# 1/16, ×0.1 at 3/4). The backbone is the detector's, frozen.

# %%
log = training_log(results.run_dirs["iou"])
save(plot_training_log(log, title="standalone IoU-Net (frozen detector backbone)"), "02_training_curve")

# %% [markdown]
# ### Training longer
#
# The presets train briefly, so that `make run` fits in minutes on two CPU cores; the paper trains
# 160k iterations of 16 images. To train every model longer and run the pipeline on the new models
# (new run folders; the current ones are kept), from the repository root:
#
# ```bash
# python -m workbench reproduce --config shapes --no-joint --iterations 1200
# ```
#
# `--iterations` sets every model's length and rescales its schedule (warm-up over the first 1/16, ×0.1
# at 3/4); `--set KEY=VALUE` changes any other config key, e.g. `--set batch_size=8` or
# `--set optim.lr=0.005` (`python -m workbench train --config shapes --model iou --dry-run` prints them
# all). The notebooks keep reading the preset's runs; to read the longer one, pass the same options:
# `pipeline_results(options=ReproduceOptions(preset="shapes", joint=False, iterations={"detector": 1200, "iou": 1200}))`
# (`from workbench.reproduce import ReproduceOptions`).
#
# What that would cost on this machine, at the speed each run's own `log.jsonl` measured (median
# seconds per iteration over its logging windows, `train_longer`); nothing is trained here:

# %%
LONGER = 1200  # iterations per model to estimate
print(f"python -m workbench reproduce --config {DATASET} --no-joint --iterations {LONGER}")
train_longer(results.run_dirs, LONGER).round(2)

# %% [markdown]
# ## Predicted vs true IoU on held-out boxes
#
# The raw detections of the validation images (before NMS) carry the IoU-Net's prediction `iou_pred`;
# `match_to_ground_truth` gives each its true IoU with the best same-class object. Left: prediction
# against truth, with the mean per tenth of true IoU; a perfect predictor lies on the dashed line.
# Below 0.5 (shaded) the IoU-Net saw no training box. Right: the true IoUs the detector's boxes have,
# next to the flat distribution it was trained on.

# %%
matched = predicted_vs_true_iou(results.output.sets["raw"], results.coco_gt)
save(plot_predicted_vs_true(matched, jittered["iou"].to_numpy(), min_iou=config.min_iou), "02_predicted_vs_true")

# %% [markdown]
# Error per range of true IoU: `bias` is the mean of predicted − true (positive: over-confident).

# %%
iou_prediction_error(matched)

# %% [markdown]
# ## What the data here shows

# %%
display(Markdown(describe_iou_training(jittered, log, matched, min_iou=config.min_iou)))

# %% [markdown]
# Read the error table with the histogram: the predictor is only asked to be right where it was
# trained (IoU >= 0.5); for the detections below that (counted above) its prediction is an
# extrapolation, yet IoU-guided NMS ranks those boxes by it too. Notebook 03 asks whether, among the
# well-localized boxes, it ranks them better than the classification score does.

# %% [markdown]
# ## Exercises
#
# 1. Draw the training boxes again with `JitterConfig(min_iou=0.3)` (`jittered_training_boxes`). How does
#    the histogram of their IoUs change, and which rows of `iou_prediction_error` would you expect a model
#    trained on them to improve?
# 2. Re-bin the error table with `iou_prediction_error(matched, edges=(0.5, 0.75, 0.9, 1.0))`. In which
#    range is the predictor most over-confident, and how many boxes does that range hold?
# 3. Compare `matched` for two classes (`matched.groupby("category_id")`): is the mean |error| the same?
#    On `neon-trees`, with one class, compare small and large boxes instead.
# 4. From `log`, at what fraction of the iterations does `loss_iou` stop falling? Is that before or after
#    the learning rate drops at 3/4?
# 5. With the estimate above, how many iterations could each model train in one hour here? Which model
#    would you give the extra time to, judging by its training curve?
