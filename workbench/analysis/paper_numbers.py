"""Numbers reported in Jiang et al., "Acquisition of Localization Confidence for Accurate Object Detection" (ECCV 2018).

Transcribed from the paper (``shared/paper/iou-net-eccv2018.txt``); all models are evaluated on
MS-COCO *minival*. AP values are percentages as printed (our analyses return fractions: multiply
by 100 to compare, which :func:`workbench.analysis.report.markdown_table` does). Row keys are
``"<detector> + <post-processing>"`` and each dict's keys are the columns of
:data:`workbench.analysis.cocoeval.AP_METRICS`.

The text extraction of Tables 1-3 lost the positions of the check marks; rows are assigned by their
order in the printed table (baseline first), which the cross-table repeats confirm: the first row of
each detector in Table 1 equals its baseline row in Table 2, and FPN's equals Table 3's ResNet-50 FPN.
"""

from __future__ import annotations


def _ap(ap: float, ap50: float, ap60: float, ap70: float, ap80: float, ap90: float) -> dict[str, float]:
    return {"AP": ap, "AP50": ap50, "AP60": ap60, "AP70": ap70, "AP80": ap80, "AP90": ap90}


# Table 1: IoU-guided NMS vs NMS vs Soft-NMS, standalone IoU-Net on top of each detector (Sec. 4.1).
TABLE1_NMS: dict[str, dict[str, float]] = {
    "FPN": _ap(36.4, 58.0, 53.1, 44.9, 31.2, 9.8),  # Table 1, FPN row 1 (plain NMS)
    "FPN + Soft-NMS": _ap(36.8, 57.5, 53.1, 45.7, 32.3, 10.3),  # Table 1, FPN row 2
    "FPN + IoU-NMS": _ap(37.3, 56.0, 52.2, 45.6, 33.9, 13.3),  # Table 1, FPN row 3
    "Cascade R-CNN": _ap(40.6, 59.3, 55.2, 49.1, 38.7, 16.7),  # Table 1, Cascade R-CNN row 1
    "Cascade R-CNN + Soft-NMS": _ap(40.9, 58.2, 54.7, 49.4, 39.9, 17.8),  # Table 1, Cascade R-CNN row 2
    "Cascade R-CNN + IoU-NMS": _ap(40.7, 58.0, 54.7, 49.2, 38.8, 18.9),  # Table 1, Cascade R-CNN row 3
    "Mask-RCNN": _ap(37.5, 58.6, 53.9, 46.3, 33.2, 10.9),  # Table 1, Mask-RCNN row 1
    "Mask-RCNN + Soft-NMS": _ap(37.9, 58.2, 53.9, 47.1, 34.4, 11.5),  # Table 1, Mask-RCNN row 2
    "Mask-RCNN + IoU-NMS": _ap(38.1, 56.4, 52.7, 46.7, 35.1, 14.6),  # Table 1, Mask-RCNN row 3
}

# Table 2: optimization-based refinement (Algorithm 2) after each detector (Sec. 4.2).
TABLE2_REFINEMENT: dict[str, dict[str, float]] = {
    "FPN": _ap(36.4, 58.0, 53.1, 44.9, 31.2, 9.8),  # Table 2, FPN row 1
    "FPN + Refinement": _ap(38.0, 57.7, 53.1, 46.1, 34.3, 14.6),  # Table 2, FPN row 2
    "Cascade R-CNN": _ap(40.6, 59.3, 55.2, 49.1, 38.7, 16.7),  # Table 2, Cascade R-CNN row 1
    "Cascade R-CNN + Refinement": _ap(41.4, 59.3, 55.3, 49.6, 39.4, 19.5),  # Table 2, Cascade R-CNN row 2
    "Mask-RCNN": _ap(37.5, 58.6, 53.9, 46.3, 33.2, 10.9),  # Table 2, Mask-RCNN row 1
    "Mask-RCNN + Refinement": _ap(39.2, 57.9, 53.6, 47.4, 36.5, 16.4),  # Table 2, Mask-RCNN row 2
}

# Table 3: jointly trained IoU-Net (Sec. 4.3).
TABLE3_JOINT: dict[str, dict[str, float]] = {
    "ResNet-50 FPN": _ap(36.4, 58.0, 53.1, 44.9, 31.2, 9.8),  # Table 3, ResNet-50 row 1
    "ResNet-50 IoU-Net": _ap(37.0, 58.3, 53.8, 45.7, 31.9, 10.7),  # Table 3, ResNet-50 row 2
    "ResNet-50 IoU-Net + IoU-NMS": _ap(37.6, 56.2, 52.4, 46.0, 34.1, 14.0),  # Table 3, ResNet-50 row 3
    "ResNet-50 IoU-Net + IoU-NMS + Refine": _ap(38.1, 56.3, 52.4, 46.3, 35.1, 15.5),  # Table 3, ResNet-50 row 4
    "ResNet-101 FPN": _ap(38.5, 60.3, 55.5, 47.6, 33.8, 11.3),  # Table 3, ResNet-101 row 1
    "ResNet-101 IoU-Net": _ap(38.9, 60.2, 55.5, 47.8, 34.6, 12.0),  # Table 3, ResNet-101 row 2
    "ResNet-101 IoU-Net + IoU-NMS": _ap(40.0, 59.0, 55.1, 48.6, 37.0, 15.5),  # Table 3, ResNet-101 row 3
    "ResNet-101 IoU-Net + IoU-NMS + Refine": _ap(40.6, 59.0, 55.2, 49.0, 38.0, 17.1),  # Table 3, ResNet-101 row 4
}

# Table 4: inference speed, seconds per image, one TITAN X, ResNet50-FPN backbone, 1200x800 input.
TABLE4_SECONDS_PER_IMAGE: dict[str, float] = {
    "FPN": 0.255,  # Table 4, column FPN
    "Mask-RCNN": 0.267,  # Table 4, column Mask-RCNN
    "Cascade R-CNN": 0.384,  # Table 4, column Cascade R-CNN
    "IoU-Net": 0.305,  # Table 4, column IoU-Net
}

# Fig. 2 caption: Pearson r of true IoU (> 0.5) with (a) classification confidence, (b) predicted IoU.
FIG2_PEARSON: dict[str, float] = {"classification": 0.217, "iou_pred": 0.617}

# Sec. 4.1 text on Fig. 7: recall (fraction) at matching IoU 0.9, ResNet50-FPN raw detections.
FIG7_RECALL_AT_09: dict[str, float] = {"No-NMS": 0.397, "NMS": 0.187, "IoU-NMS": 0.289}

# Sec. 3.4, inference settings of the optimization-based refinement (Algorithm 2).
REFINEMENT_SETTINGS: dict[str, float] = {
    "step_size": 0.5,  # lambda
    "early_stop": 0.001,  # Omega_1
    "degeneration_tolerance": -0.01,  # Omega_2
    "iterations": 5,  # T
    "boxes_refined": 100,  # highest-scored boxes after IoU-guided NMS
}
