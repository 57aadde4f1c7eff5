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
# # 06 · Joint training and speed (Table 3, Table 4)
#
# **What the paper claims** (Sec. 3.4, 4.3, 4.4).
#
# * The IoU predictor can be trained *jointly* with the detector: one backbone, the IoU head in parallel
#   with the R-CNN head on the same PrRoI-pooled features, its training boxes still jittered ground
#   truth (Sec. 3.1), its smooth-L1 loss added to the detector's.
# * Joint training alone helps the detector, "learning more discriminative features": ResNet-50 FPN
#   AP 36.4 → 37.0 with plain NMS; IoU-guided NMS (37.6) and refinement (38.1) add to it (Table 3).
# * It is cheap: on a Titan X, 0.255 s per image for FPN and 0.305 s for IoU-Net with IoU-NMS and
#   refinement, about 1.2× (Table 4).
#
# Here: Table 3 from `reproduce`'s jointly trained model, and Table 4 from the pipeline's per-stage
# wall-clock times, next to the paper's numbers.

# %% tags=["parameters"]
import os

DATASET = "shapes"  # preset of `reproduce --config`: "shapes" (the lab, exact boxes) or "neon-trees" (real data)
FAST = os.environ.get("WORKBENCH_FAST", "0") == "1"  # CI: a tiny shapes run (trained under $WORKBENCH_ROOT) instead

# %%
from IPython.display import Markdown, display

from workbench.analysis import ap_table, markdown_table, mean_seconds, speed_comparison, timing_table
from workbench.analysis import paper_numbers as paper
from workbench.analysis.claims import paper_claims
from workbench.analysis.experiments import select, table3_paper_names, table3_rows
from workbench.analysis.narrative import describe_joint_and_speed
from workbench.analysis.training_log import training_log
from workbench.config import get_config
from workbench.results import pipeline_results

# %% [markdown]
# ## The pipeline's results
#
# Loaded from `reproduce`'s cache (see notebook 02); in fast mode a tiny `shapes` run whose numbers mean
# nothing about the paper. Besides the detector and the standalone IoU-Net of notebooks 02-05,
# `reproduce` trains a joint model (`runs/<dataset>-joint-*`) unless run with `--no-joint`, as `make run`
# does by default; `joint=True` loads the run with it (`make run RUN_SHAPES= RUN_NEON=` makes both), and
# trains it here if it is missing, after printing the command that would.

# %%
results = pipeline_results(DATASET, fast=FAST, joint=True)
s, gt = results.output.sets, results.coco_gt
joint = "joint" in results.run_dirs and "joint/nms" in s
print("joint model:", results.run_dirs.get("joint", "none"))

# %% [markdown]
# ## Table 3: the jointly trained model
#
# Our rows name the backbone the joint run used (its `config.json`: MobileNetV2-FPN for neon-trees and
# shapes); each is followed by the paper's ResNet-50 row it stands for. *FPN* is the detector alone with
# NMS; *IoU-Net* the joint model with NMS, then with IoU-guided NMS, then with refinement too.

# %%
backbone = get_config(str(results.run_dirs["joint"] / "config.json")).model.backbone if joint else None
table3 = ap_table(select(s, table3_rows(backbone)), gt) if joint else None
display(Markdown(markdown_table(table3, paper.TABLE3_JOINT, paper_names=table3_paper_names(backbone))
                 if joint else "*no joint model in this run*"))

# %% [markdown]
# The joint model's losses: the detector's four and the IoU head's `loss_iou` (last logging window).

# %%
training_log(results.run_dirs["joint"]).iloc[-1:] if joint else None

# %% [markdown]
# ## Table 4: time per image
#
# Mean wall-clock seconds per image of each pipeline stage (`output.seconds`), measured on the machine
# that ran the pipeline (`reproduce`; this one unless the cache was copied from elsewhere). A stage that the paper does not have (the standalone IoU-Net's own
# backbone, Soft-NMS, iterative regression) is listed for completeness.

# %%
timing_table(mean_seconds(results.output)).round(4)

# %% [markdown]
# Table 4's two columns from those stages (`speed_comparison`): FPN = detector + NMS; IoU-Net = the joint
# model's single pass + IoU-guided NMS + refinement.

# %%
speed = speed_comparison(results.output)
speed.round(3)

# %% [markdown]
# ## What the data here shows
#
# Every verdict comes from `paper_claims`: our method against its baseline on the same validation
# images, with a 95% interval for the difference from resampling the images (paired bootstrap). A
# claim holds only when the interval excludes zero on the paper's side.

# %%
verdicts = paper_claims(results.output, results.coco_gt)
display(Markdown(describe_joint_and_speed(table3, speed, "the machine that ran the pipeline", verdicts)))

# %% [markdown]
# The intervals say how large an AP difference this validation set can resolve: a few tenths rarely
# exclude zero on a few hundred images. The ratio of Table 4 compares like with like
# on one machine; the `share` column of the stage table says which stage the overhead comes from.

# %% [markdown]
# ## Exercises
#
# 1. From `table3`, how much AP does IoU-guided NMS add to the joint model, and how much does refinement add
#    on top? Which of the two does `verdicts` say this validation set can resolve?
# 2. Using the stage table (`timing_table(mean_seconds(results.output))`), which single stage would you
#    have to make twice as fast to bring the IoU-Net column of `speed` within 10% of the FPN column?
# 3. Compare the last logging window of the joint run's `loss_iou` with the standalone IoU run's
#    (`training_log(results.run_dirs["iou"])`). Does sharing the backbone cost the IoU head anything?
# 4. Run the notebook on `neon-trees`. Does the ratio of Table 4 change with the number of boxes per image,
#    and which stage explains the change?
