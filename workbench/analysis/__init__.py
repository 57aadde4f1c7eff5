"""Analyses of the paper's figures and tables, each a data function plus a figure function.

Input detections are COCO results (``bbox`` ``[x, y, w, h]`` pixels, ``score``, optional
``iou_pred``) produced elsewhere (NMS, refinement); ground truth is a ``pycocotools`` ``COCO``.
Data functions return DataFrames or small dataclasses; figure functions return a
:class:`matplotlib.figure.Figure` built without pyplot.

==================  ==========================================================================
module              paper
==================  ==========================================================================
``matching``        the IoU of each detection with its best same-category ground truth
``correlation``     Fig. 2: Pearson r of true IoU with classification score / predicted IoU
``positives``       Fig. 3: positive boxes per IoU bin after No-NMS / NMS / IoU-guided NMS
``recall``          Fig. 7: recall vs matching IoU threshold
``cocoeval``        Tables 1-3: COCO AP, AP50 ... AP90 from pycocotools' precision array
``iterations``      Fig. 4: AP per refinement iteration, monotonicity
``pooling``         Fig. 6: RoI Pooling vs RoI Align vs PrRoI Pooling on one bin
``timing``          Table 4: per-stage seconds per image, FPN vs IoU-Net
``report``          Markdown tables with the paper's numbers (``paper_numbers``) alongside
``experiments``     which pipeline detection sets each figure and table compares, row names
``narrative``       the sentences that judge each claim (report.md and notebooks alike)
==================  ==========================================================================

What the notebooks add (import them from their modules; not re-exported here, so that
``import workbench.analysis`` stays light):

=====================  =======================================================================
module                 paper
=====================  =======================================================================
``pooling_gradient``   Eq. 4: the gradient w.r.t. a bin's edges (autograd, Eq. 4, finite
                       differences); Fig. 6 in motion (one edge slid)
``iou_prediction``     Sec. 3.1: jittered training boxes; predicted vs true IoU, error per bin
``training_log``       a run's ``log.jsonl``: losses and learning rate; its measured speed and
                       what a longer run would cost (``train_longer``)
``suppression``        Algorithm 1 and NMS box by box: who suppressed whom; Fig. 1a's gallery
``refinement``         Algorithm 2 box by box: summaries of a refinement record, a stand-in record,
                       its settings (``record_knobs``) and the stand-in's re-run for other settings
=====================  =======================================================================
"""

from .cocoeval import AP_METRICS, ap_table, coco_ap, evaluate_bbox, precision_ap
from .correlation import LocalizationCorrelation, localization_correlation, pearson, plot_localization_correlation
from .iterations import ap_per_iteration, is_monotonic, monotonicity, plot_ap_per_iteration
from .matching import best_iou_per_ground_truth, detections_frame, match_to_ground_truth, top_scored_per_image
from .pooling import PoolingComparison, compare_pooling, example_feature_map, interpolate_feature_map, plot_pooling
from .positives import IOU_BIN_EDGES, iou_bin_index, iou_bin_labels, plot_positives_per_iou_bin, positive_detections, positives_per_iou_bin
from .recall import RECALL_IOU_THRESHOLDS, plot_recall_vs_iou, recall_at, recall_vs_iou
from .report import markdown_table
from .timing import mean_seconds, speed_comparison, timing_table

__all__ = [
    "AP_METRICS",
    "IOU_BIN_EDGES",
    "RECALL_IOU_THRESHOLDS",
    "LocalizationCorrelation",
    "PoolingComparison",
    "ap_per_iteration",
    "ap_table",
    "best_iou_per_ground_truth",
    "coco_ap",
    "compare_pooling",
    "detections_frame",
    "evaluate_bbox",
    "example_feature_map",
    "interpolate_feature_map",
    "iou_bin_index",
    "iou_bin_labels",
    "is_monotonic",
    "localization_correlation",
    "markdown_table",
    "match_to_ground_truth",
    "mean_seconds",
    "monotonicity",
    "pearson",
    "plot_ap_per_iteration",
    "plot_localization_correlation",
    "plot_pooling",
    "plot_positives_per_iou_bin",
    "plot_recall_vs_iou",
    "positive_detections",
    "positives_per_iou_bin",
    "precision_ap",
    "recall_at",
    "recall_vs_iou",
    "speed_comparison",
    "timing_table",
    "top_scored_per_image",
]
