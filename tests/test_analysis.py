"""Tests of ``workbench.analysis`` on hand-built ground truth and detections with hand-computed answers.

The main fixture (boxes as ``[x, y, w, h]``; every IoU below is exact in float64):

    image 1: GT 1 cat 1 [0, 0, 10, 10]   GT 2 cat 1 [20, 0, 10, 10]   GT 3 cat 2 [0, 0, 10, 10]
             GT 4 cat 1 [40, 0, 10, 10] crowd
    image 2: GT 5 cat 1 [0, 0, 20, 10]
    image 3: GT 6 cat 2 [0, 0, 10, 10]   (no detection at all)

    det  image cat  bbox             score  iou_pred   IoU with best GT (why)
    d0   1     1    [0, 0, 10, 10]   0.90   0.95       1.0   GT 1 (identical)
    d1   1     1    [0, 0, 10, 8]    0.95   0.70       0.8   GT 1 (80 / 100)
    d2   1     1    [0, 0, 10, 5]    0.60   0.55       0.5   GT 1 (50 / 100)
    d3   1     1    [20, 0, 10, 7]   0.80   0.75       0.7   GT 2 (70 / 100)
    d4   1     1    [40, 0, 10, 10]  0.70   0.20       0.0   -1   (only the crowd region overlaps)
    d5   1     2    [0, 0, 10, 6]    0.50   0.60       0.6   GT 3 (GT 1 also 0.6 but is cat 1)
    d6   1     1    [5, 0, 10, 10]   0.30   0.30       1/3   GT 1 (50 / 150)
    d7   2     1    [0, 0, 18, 10]   0.40   0.85       0.9   GT 5 (180 / 200)
    d8   2     1    [0, 0, 19, 10]   0.35   0.90       0.95  GT 5 (190 / 200)
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from workbench.analysis import (
    AP_METRICS,
    IOU_BIN_EDGES,
    RECALL_IOU_THRESHOLDS,
    ap_per_iteration,
    ap_table,
    best_iou_per_ground_truth,
    coco_ap,
    compare_pooling,
    detections_frame,
    evaluate_bbox,
    example_feature_map,
    interpolate_feature_map,
    iou_bin_index,
    iou_bin_labels,
    is_monotonic,
    localization_correlation,
    markdown_table,
    match_to_ground_truth,
    monotonicity,
    pearson,
    plot_ap_per_iteration,
    plot_localization_correlation,
    plot_pooling,
    plot_positives_per_iou_bin,
    plot_recall_vs_iou,
    positive_detections,
    positives_per_iou_bin,
    precision_ap,
    recall_vs_iou,
    timing_table,
    top_scored_per_image,
)
from workbench.analysis import paper_numbers
from workbench.analysis.iterations import y_limits
from workbench.data.coco import coco_from_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================= fixtures
def make_coco(images: list[int], anns: list[tuple[int, int, int, list[float], int]]):
    """In-memory COCO from ``(id, image_id, category_id, bbox xywh, iscrowd)`` tuples."""
    return coco_from_dict({
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in images],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": a, "image_id": im, "category_id": c, "bbox": b, "area": float(b[2] * b[3]), "iscrowd": crowd}
            for a, im, c, b, crowd in anns
        ],
    })


@pytest.fixture
def gt():
    return make_coco(
        [1, 2, 3],
        [
            (1, 1, 1, [0, 0, 10, 10], 0),
            (2, 1, 1, [20, 0, 10, 10], 0),
            (3, 1, 2, [0, 0, 10, 10], 0),
            (4, 1, 1, [40, 0, 10, 10], 1),
            (5, 2, 1, [0, 0, 20, 10], 0),
            (6, 3, 2, [0, 0, 10, 10], 0),
        ],
    )


def det(image_id, category_id, bbox, score, iou_pred=None):
    d = {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}
    if iou_pred is not None:
        d["iou_pred"] = iou_pred
    return d


@pytest.fixture
def dets():
    return [
        det(1, 1, [0, 0, 10, 10], 0.90, 0.95),
        det(1, 1, [0, 0, 10, 8], 0.95, 0.70),
        det(1, 1, [0, 0, 10, 5], 0.60, 0.55),
        det(1, 1, [20, 0, 10, 7], 0.80, 0.75),
        det(1, 1, [40, 0, 10, 10], 0.70, 0.20),
        det(1, 2, [0, 0, 10, 6], 0.50, 0.60),
        det(1, 1, [5, 0, 10, 10], 0.30, 0.30),
        det(2, 1, [0, 0, 18, 10], 0.40, 0.85),
        det(2, 1, [0, 0, 19, 10], 0.35, 0.90),
    ]


EXPECTED_IOU = [1.0, 0.8, 0.5, 0.7, 0.0, 0.6, 1 / 3, 0.9, 0.95]
EXPECTED_GT = [1, 1, 1, 2, -1, 3, 1, 5, 5]


def single_gt_coco():
    """One object, GT [0, 0, 100, 100]; a detection [0, 0, 100, h] then has IoU h / 100 exactly."""
    return make_coco([1], [(1, 1, 1, [0, 0, 100, 100], 0)])


def saved_png(fig: Figure, tmp_path, name: str) -> bytes:
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=60)
    return path.read_bytes()


def assert_labelled(ax) -> None:
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


# ============================================================================= matching
def test_match_to_ground_truth_iou_and_ids(gt, dets):
    m = match_to_ground_truth(dets, gt)
    np.testing.assert_allclose(m["iou"].to_numpy(), EXPECTED_IOU, rtol=0, atol=1e-12)
    assert m["gt_id"].tolist() == EXPECTED_GT
    assert m["gt_id"].dtype == np.int64
    # Fields are carried along, rows stay in input order.
    assert m["iou_pred"].tolist() == [d["iou_pred"] for d in dets]
    assert list(m.index) == list(range(len(dets)))


def test_match_ties_pick_first_object_and_zero_area_is_no_overlap():
    coco = make_coco([1], [(10, 1, 1, [0, 0, 10, 10], 0), (11, 1, 1, [0, 0, 10, 10], 0), (12, 1, 1, [50, 50, 0, 0], 0)])
    m = match_to_ground_truth([det(1, 1, [0, 0, 10, 10], 0.5), det(1, 1, [50, 50, 0, 0], 0.5)], coco)
    assert m["gt_id"].tolist() == [10, -1]  # 0/0 IoU of two empty boxes is no overlap, not nan
    assert m["iou"].tolist() == [1.0, 0.0]


def test_match_accepts_dataframe_and_empty(gt, dets):
    m = match_to_ground_truth(pd.DataFrame(dets), gt)
    assert m["gt_id"].tolist() == EXPECTED_GT
    empty = match_to_ground_truth([], gt)
    assert len(empty) == 0 and {"iou", "gt_id"} <= set(empty.columns)


def test_detections_validation(gt):
    with pytest.raises(ValueError, match="missing \\['score'\\]"):
        detections_frame([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="four numbers"):
        detections_frame([det(1, 1, [0, 0, 1], 0.5)])
    with pytest.raises(ValueError, match="not in the ground truth"):
        match_to_ground_truth([det(99, 1, [0, 0, 1, 1], 0.5)], gt)
    with pytest.raises(ValueError, match="max_dets_per_image"):
        top_scored_per_image(detections_frame([det(1, 1, [0, 0, 1, 1], 0.5)]), 0)


def test_top_scored_per_image_keeps_order_and_breaks_ties_stably(dets):
    frame = detections_frame(dets + [det(2, 1, [0, 0, 1, 1], 0.40)])  # ties d7's score, comes later
    kept = top_scored_per_image(frame, 2)
    # image 1: d1 (0.95), d0 (0.90); image 2: d7 and row 9 (both 0.40) beat d8 (0.35). Original order kept.
    assert list(kept.index) == [0, 1, 7, 9]
    # One per image: the tie goes to the earlier row, d7.
    assert list(top_scored_per_image(frame, 1).index) == [1, 7]
    assert top_scored_per_image(frame, None) is frame


def test_best_iou_per_ground_truth(gt, dets):
    best = best_iou_per_ground_truth(dets, gt)
    # Crowd GT 4 is absent; GT 6 has no detection in image 3.
    assert list(best.index) == [1, 2, 3, 5, 6]
    np.testing.assert_allclose(best["best_iou"].to_numpy(), [1.0, 0.7, 0.6, 0.95, 0.0], atol=1e-12)
    capped = best_iou_per_ground_truth(dets, gt, max_dets_per_image=1)  # d1 in image 1, d7 in image 2
    np.testing.assert_allclose(capped["best_iou"].to_numpy(), [0.8, 0.0, 0.0, 0.9, 0.0], atol=1e-12)


# ============================================================================= positives (Fig. 3)
def test_iou_bin_index_edges():
    iou = np.array([0.49, 0.5, 0.599, 0.6, 0.8999, 0.9, 1.0, 1.01])
    assert iou_bin_index(iou).tolist() == [-1, 0, 0, 1, 3, 4, 4, -1]
    assert iou_bin_labels() == ["[0.5, 0.6)", "[0.6, 0.7)", "[0.7, 0.8)", "[0.8, 0.9)", "[0.9, 1]"]
    with pytest.raises(ValueError, match="increasing"):
        iou_bin_labels((0.5, 0.5, 1.0))


def test_positive_detections_only_highest_scored_counts(gt, dets):
    pos = positive_detections(dets, gt)
    # GT 1: d1 (0.95) beats d0 (0.90, IoU 1.0) and d2; GT 2: d3; GT 3: d5; GT 5: d7 (0.40) beats d8 (0.35).
    # d4 (IoU 0) and d6 (IoU 1/3) are below 0.5 and never positive.
    assert list(pos.index) == [1, 3, 5, 7]
    assert pos["gt_id"].tolist() == [1, 2, 3, 5]


def test_positives_per_iou_bin(gt, dets):
    counts = positives_per_iou_bin(
        {
            "No-NMS": dets,  # IoUs of the positives 0.8, 0.7, 0.6, 0.9
            "NMS": [dets[0], dets[3], dets[8]],  # 1.0, 0.7, 0.95
            "pair": [dets[0], dets[1]],  # one object: only d1 (higher score, IoU 0.8) counts, not d0 (1.0)
            "edge": [dets[2]],  # IoU exactly 0.5 is in the first bin
        },
        gt,
    )
    assert list(counts.index) == iou_bin_labels(IOU_BIN_EDGES)
    assert counts["No-NMS"].tolist() == [0, 1, 1, 1, 1]
    assert counts["NMS"].tolist() == [0, 0, 1, 0, 2]
    assert counts["pair"].tolist() == [0, 0, 0, 1, 0]
    assert counts["edge"].tolist() == [1, 0, 0, 0, 0]
    assert counts.dtypes.eq(np.int64).all()


def test_plot_positives_per_iou_bin(gt, dets, tmp_path):
    counts = positives_per_iou_bin({"No-NMS": dets, "NMS": [dets[0], dets[3], dets[8]], "IoU-NMS": dets[:4]}, gt)
    fig = plot_positives_per_iou_bin(counts)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.containers) == 3
    for container, name in zip(ax.containers, counts.columns):
        assert [p.get_height() for p in container] == counts[name].tolist()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["No-NMS", "NMS", "IoU-NMS"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(counts.index)
    colors = {tuple(c.patches[0].get_facecolor()) for c in ax.containers}
    assert len(colors) == 3
    assert_labelled(ax)
    assert saved_png(fig, tmp_path, "positives").startswith(PNG_MAGIC)


# ============================================================================= recall (Fig. 7)
def test_recall_thresholds_are_exact():
    assert RECALL_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_recall_vs_iou(gt, dets):
    recall = recall_vs_iou({"all": dets, "cap2": dets, "cap1": dets}, gt)
    # 5 non-crowd objects, best IoUs 1.0, 0.7, 0.6, 0.95, 0.0; IoU >= t is inclusive.
    np.testing.assert_allclose(recall["all"], [0.8, 0.8, 0.8, 0.6, 0.6, 0.4, 0.4, 0.4, 0.4, 0.4])
    # Top 2 per image: d1, d0 in image 1 (GT 1 -> 1.0; GT 2, 3 lost), d7, d8 in image 2 (GT 5 -> 0.95).
    capped2 = recall_vs_iou({"x": dets}, gt, max_dets_per_image=2)["x"]
    np.testing.assert_allclose(capped2, [0.4] * 10)
    # Top 1 per image: d1 (GT 1 -> 0.8), d7 (GT 5 -> 0.9).
    capped1 = recall_vs_iou({"x": dets}, gt, max_dets_per_image=1)["x"]
    np.testing.assert_allclose(capped1, [0.4] * 7 + [0.2, 0.2, 0.0])
    assert list(recall.index) == list(RECALL_IOU_THRESHOLDS)


def test_plot_recall_vs_iou(gt, dets, tmp_path):
    recall = recall_vs_iou({"No-NMS": dets, "NMS": [dets[0], dets[3]]}, gt)
    fig = plot_recall_vs_iou(recall)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 2
    for line, name in zip(ax.lines, recall.columns):
        np.testing.assert_allclose(line.get_ydata(), recall[name])
        np.testing.assert_allclose(line.get_xdata(), RECALL_IOU_THRESHOLDS)
    assert ax.lines[0].get_color() != ax.lines[1].get_color()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["No-NMS", "NMS"]
    assert_labelled(ax)
    assert saved_png(fig, tmp_path, "recall").startswith(PNG_MAGIC)


# ============================================================================= correlation (Fig. 2)
def test_pearson_by_hand():
    # dx = (-1, 0, 1), dy = (-1, 1, 0): sum dx dy = 1, sum dx^2 = sum dy^2 = 2 -> r = 1 / 2.
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)
    assert pearson([1, 2, 3], [2, 4, 6]) == 1.0
    assert pearson([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    assert math.isnan(pearson([1], [2]))
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2], [1, 2, 3])


@pytest.fixture
def correlation_set():
    """IoUs with GT [0, 0, 100, 100]: 0.6, 0.8, 1.0 kept; 0.5 (not > 0.5) and 0.33 dropped with wild values."""
    return [
        det(1, 1, [0, 0, 100, 60], 0.9, 0.55),
        det(1, 1, [0, 0, 100, 80], 0.5, 0.65),
        det(1, 1, [0, 0, 100, 100], 0.7, 0.90),
        det(1, 1, [0, 0, 100, 50], 0.0, 1.00),
        det(1, 1, [0, 0, 100, 33], 1.0, 0.00),
    ]


def test_localization_correlation_by_hand(correlation_set):
    result = localization_correlation(correlation_set, single_gt_coco())
    assert list(result.matched.index) == [0, 1, 2]
    # x = IoU = (0.6, 0.8, 1.0): dx = (-0.2, 0, 0.2), sum dx^2 = 0.08.
    # score (0.9, 0.5, 0.7): dy = (0.2, -0.2, 0), sum dy^2 = 0.08, sum dx dy = -0.04 -> r = -0.04 / 0.08 = -0.5.
    assert result.r_score == pytest.approx(-0.5, abs=1e-12)
    # iou_pred (0.55, 0.65, 0.90): mean 0.7, dy = (-0.15, -0.05, 0.2), sum dy^2 = 0.065,
    # sum dx dy = 0.03 + 0 + 0.04 = 0.07 -> r = 0.07 / sqrt(0.08 * 0.065) = 0.07 / sqrt(0.0052) = 0.9707...
    assert result.r_iou_pred == pytest.approx(0.07 / math.sqrt(0.0052), abs=1e-12)


def test_localization_correlation_without_iou_pred(correlation_set):
    plain = [{k: v for k, v in d.items() if k != "iou_pred"} for d in correlation_set]
    result = localization_correlation(plain, single_gt_coco())
    assert result.r_score == pytest.approx(-0.5, abs=1e-12)
    assert math.isnan(result.r_iou_pred)


def test_plot_localization_correlation(correlation_set, tmp_path):
    result = localization_correlation(correlation_set, single_gt_coco())
    fig = plot_localization_correlation(result)
    assert len(fig.axes) == 2
    for ax, y in zip(fig.axes, ([0.9, 0.5, 0.7], [0.55, 0.65, 0.90])):
        (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        np.testing.assert_allclose(points.get_offsets(), np.column_stack([[0.6, 0.8, 1.0], y]), atol=1e-12)
        assert_labelled(ax)
    assert "r = -0.500" in fig.axes[0].get_title()
    assert "r = 0.971" in fig.axes[1].get_title()
    assert saved_png(fig, tmp_path, "correlation").startswith(PNG_MAGIC)
    # Subsampling draws fewer points but says so, and keeps the coefficients of all points.
    small = plot_localization_correlation(result, max_points=2)
    assert len(small.axes[0].collections[0].get_offsets()) == 2
    assert "showing 2 of 3" in small.axes[0].get_xlabel()
    assert "r = -0.500" in small.axes[0].get_title()


# ============================================================================= COCO AP (Tables 1-3)
def test_coco_ap_matches_cocoeval_stats(gt, dets):
    evaluator = evaluate_bbox(gt, dets)
    ap = coco_ap(gt, dets)
    assert list(ap) == list(AP_METRICS)
    assert ap["AP"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert ap["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
    assert precision_ap(evaluator, 0.75) == pytest.approx(evaluator.stats[2], abs=1e-12)
    assert 0 < ap["AP90"] < ap["AP50"] < 1  # not a degenerate fixture


@pytest.mark.parametrize("threshold", [0.6, 0.7, 0.8, 0.9])
def test_ap_at_threshold_equals_single_threshold_cocoeval(gt, dets, threshold):
    # Independent route: a COCOeval run that only knows this threshold; its AP@[all] is AP@t.
    single = evaluate_bbox(gt, dets, iou_thresholds=[threshold])
    assert coco_ap(gt, dets)[f"AP{round(threshold * 100)}"] == pytest.approx(single.stats[0], abs=1e-12)


def test_coco_ap_by_hand():
    coco = single_gt_coco()
    # IoU 0.72 matches at 0.50, 0.55, 0.60, 0.65, 0.70 (precision 1 at every recall) and not above:
    # AP = 5 / 10 of the thresholds.
    ap = coco_ap(coco, [det(1, 1, [0, 0, 100, 72], 0.9)])
    assert ap == pytest.approx({"AP": 0.5, "AP50": 1.0, "AP60": 1.0, "AP70": 1.0, "AP80": 0.0, "AP90": 0.0}, abs=1e-12)
    assert coco_ap(coco, [det(1, 1, [0, 0, 100, 100], 0.9)]) == pytest.approx(dict.fromkeys(AP_METRICS, 1.0))
    assert coco_ap(coco, []) == pytest.approx(dict.fromkeys(AP_METRICS, 0.0))


def test_coco_ap_leaves_detections_untouched(gt, dets):
    before = copy.deepcopy(dets)
    coco_ap(gt, dets)
    assert dets == before  # pycocotools' loadRes writes id/area/segmentation into the dicts it gets


def test_precision_ap_rejects_unevaluated_threshold(gt, dets):
    with pytest.raises(ValueError, match="not evaluated"):
        precision_ap(evaluate_bbox(gt, dets, iou_thresholds=[0.5]), 0.6)


def test_ap_table(gt, dets):
    table = ap_table({"all": dets, "half": dets[::2]}, gt)
    assert list(table.index) == ["all", "half"] and list(table.columns) == list(AP_METRICS)
    assert table.loc["half"].to_dict() == pytest.approx(coco_ap(gt, dets[::2]))


# ============================================================================= report and paper numbers
def test_markdown_table_next_to_paper():
    ours = pd.DataFrame({"AP": [0.373, 0.5], "AP90": [0.133, float("nan")]}, index=["FPN + IoU-NMS", "mine"])
    text = markdown_table(ours, paper_numbers.TABLE1_NMS)
    lines = text.strip().splitlines()
    assert lines[0] == "| Method | Source | AP | AP90 |"
    assert lines[2:] == [
        "| FPN + IoU-NMS | ours | 37.3 | 13.3 |",
        "| FPN + IoU-NMS | paper | 37.3 | 13.3 |",
        "| mine | ours | 50.0 | – |",
    ]


def test_paper_numbers_are_consistent():
    tables = (paper_numbers.TABLE1_NMS, paper_numbers.TABLE2_REFINEMENT, paper_numbers.TABLE3_JOINT)
    for table in tables:
        for name, row in table.items():
            assert list(row) == list(AP_METRICS), name
            # AP at a stricter IoU threshold cannot be higher: catches a transposed transcription.
            strict = [row[k] for k in ("AP50", "AP60", "AP70", "AP80", "AP90")]
            assert strict == sorted(strict, reverse=True), name
            assert strict[-1] < row["AP"] < strict[0], name
    # The baselines repeat across tables (Sec. 4 uses the same detectors).
    for detector in ("FPN", "Cascade R-CNN", "Mask-RCNN"):
        assert paper_numbers.TABLE1_NMS[detector] == paper_numbers.TABLE2_REFINEMENT[detector]
    assert paper_numbers.TABLE3_JOINT["ResNet-50 FPN"] == paper_numbers.TABLE1_NMS["FPN"]
    assert paper_numbers.TABLE1_NMS["FPN + IoU-NMS"]["AP90"] == 13.3  # Sec. 4.1's headline column
    assert paper_numbers.TABLE4_SECONDS_PER_IMAGE["IoU-Net"] == 0.305


# ============================================================================= timing (Table 4)
def test_timing_table():
    table = timing_table({"backbone": 0.2, "rpn": 0.05, "refine": 0.05})
    assert list(table.index) == ["backbone", "rpn", "refine", "total"]
    assert table.loc["total", "seconds_per_image"] == pytest.approx(0.3)
    assert table.loc["rpn", "ms_per_image"] == pytest.approx(50.0)
    assert table["share"].tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        timing_table({"rpn": -1.0})
    with pytest.raises(ValueError, match="'total'"):
        timing_table({"total": 1.0})


# ============================================================================= iterations (Fig. 4)
def test_is_monotonic():
    assert is_monotonic([0.3, 0.5, 0.5, 0.7])
    assert not is_monotonic([0.3, 0.7, 0.6])
    assert is_monotonic([0.3, 0.7, 0.6], tol=0.1 + 1e-12)
    assert is_monotonic([3, 2, 2], increasing=False) and not is_monotonic([3, 2, 2])
    assert is_monotonic([0.4])


@pytest.fixture
def iteration_runs():
    # Box [0, 0, 100, h] against GT [0, 0, 100, 100]: IoU = h / 100, AP = (thresholds <= IoU) / 10.
    box = lambda h: [det(1, 1, [0, 0, 100, h], 0.9)]  # noqa: E731
    return {
        "Regression": [box(62), box(83), box(77)],  # AP 0.3, 0.7, 0.6: up, then down
        "Optimization": [box(62), box(83), box(96)],  # AP 0.3, 0.7, 1.0
    }


def test_ap_per_iteration_and_monotonicity(iteration_runs):
    table = ap_per_iteration(iteration_runs, single_gt_coco())
    assert list(table.columns) == ["method", "iteration", *AP_METRICS]
    assert table["iteration"].tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_allclose(table["AP"], [0.3, 0.7, 0.6, 0.3, 0.7, 1.0], atol=1e-12)
    np.testing.assert_allclose(table["AP80"], [0.0, 1.0, 0.0, 0.0, 1.0, 1.0], atol=1e-12)
    summary = monotonicity(table)
    assert summary.loc["Regression", "monotonic"] == False  # noqa: E712 (numpy bool)
    assert summary.loc["Optimization", "monotonic"] == True  # noqa: E712
    assert summary.loc["Regression", "best_iteration"] == 1
    assert summary.loc["Regression", "drop_after_best"] == pytest.approx(0.1)
    assert summary.loc["Optimization", "drop_after_best"] == 0.0


def test_plot_ap_per_iteration(iteration_runs, tmp_path):
    table = ap_per_iteration(iteration_runs, single_gt_coco())
    fig = plot_ap_per_iteration(table, metrics=("AP", "AP90"))
    assert len(fig.axes) == 2
    for ax, metric in zip(fig.axes, ("AP", "AP90")):
        assert len(ax.lines) == 2
        for line, method in zip(ax.lines, ("Regression", "Optimization")):
            np.testing.assert_allclose(line.get_ydata(), table.loc[table["method"] == method, metric] * 100)
        assert metric in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Regression", "Optimization"]
        assert_labelled(ax)
    assert saved_png(fig, tmp_path, "iterations").startswith(PNG_MAGIC)


def test_y_limits_keep_a_minimum_span():
    # AP90 between 0.008 and 0.016 %: widened to one point around the data, clipped at 0, padded 5 %.
    np.testing.assert_allclose(y_limits([0.008, 0.016, 0.012], 1.0), (-0.05, 1.05))
    np.testing.assert_allclose(y_limits([40.0, 40.2], 1.0), (39.55, 40.65))  # centred: 39.6 .. 40.6
    np.testing.assert_allclose(y_limits([10.0, 30.0], 1.0), (9.0, 31.0))  # wide data: its own range
    np.testing.assert_allclose(y_limits([0.0, 0.0], 1.0), (-0.05, 1.05))


def test_plot_ap_per_iteration_flat_panel_is_flat():
    # Both methods stay at zero AP90: the panel spans at least one AP point, not a zigzag of rounding.
    table = pd.DataFrame({"method": ["R", "R", "O", "O"], "iteration": [0, 1, 0, 1],
                          "AP": [0.30, 0.31, 0.30, 0.32], "AP90": [0.0, 1e-4, 0.0, 0.0]})
    fig = plot_ap_per_iteration(table, metrics=("AP", "AP90"))
    ap, ap90 = fig.axes
    lo, hi = ap90.get_ylim()
    assert hi - lo >= 1.0 and lo <= 0.0 <= 0.01 <= hi
    lo, hi = ap.get_ylim()
    assert lo <= 30.0 and hi >= 32.0 and hi - lo < 3.0  # a real 2-point change keeps its own scale


# ============================================================================= pooling (Fig. 6)
def test_compare_pooling_by_hand():
    d = np.zeros((3, 3))
    d[1, 1] = 1.0  # f(x, y) = tri(x - 1) tri(y - 1)
    result = compare_pooling(d, (0.0, 0.0, 1.5, 1.5))
    # PrRoI: per axis int_0^1.5 tri(x - 1) dx = int_-1^0.5 tri = 0.5 + (0.5 - 0.125) = 0.875, / 1.5 = 7/12.
    assert result.prroi_pool == pytest.approx((7 / 12) ** 2, abs=1e-12)
    # RoI Align, 2 x 2 samples at 0.375 and 1.125 per axis: tri = 0.375 and 0.875, mean 0.625 per axis.
    assert result.roi_align == pytest.approx(0.625**2, abs=1e-12)
    np.testing.assert_allclose(result.sample_points, [[0.375, 0.375], [1.125, 0.375], [0.375, 1.125], [1.125, 1.125]])
    # RoI Pooling: round(0) .. round(1.5) = cells 0..2 on each axis, whose max is d[1, 1].
    assert result.roi_pool == 1.0
    assert result.quantized_rows == (0, 2) and result.quantized_cols == (0, 2) and result.max_cell == (1, 1)


def test_compare_pooling_rounds_half_away_from_zero_like_torchvision():
    d = np.zeros((4, 4))
    d[3, 3] = 5.0
    result = compare_pooling(d, (0.5, 0.5, 2.5, 2.5))
    # C++ round(2.5) = 3 reaches cell (3, 3); Python's round(2.5) = 2 would not.
    assert result.quantized_rows == (1, 3) and result.quantized_cols == (1, 3)
    assert result.roi_pool == 5.0 and result.max_cell == (3, 3)


def _exact_bin_mean(d, x0, y0, x1, y1):
    """Mean of f over the bin: f is bilinear on each unit cell, so the midpoint rule on the cell pieces is exact."""
    cuts = lambda lo, hi: [lo, *[float(k) for k in range(math.floor(lo) + 1, math.ceil(hi))], hi]  # noqa: E731
    xc, yc = cuts(x0, x1), cuts(y0, y1)
    total = sum(
        (b - a) * (e - c) * interpolate_feature_map(d, [(c + e) / 2], [(a + b) / 2])[0, 0]
        for a, b in zip(yc[:-1], yc[1:])
        for c, e in zip(xc[:-1], xc[1:])
    )
    return total / ((x1 - x0) * (y1 - y0))


@pytest.mark.parametrize("seed", range(6))
def test_compare_pooling_geometry_matches_the_operators(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(5, 7))
    # Bins at least a cell wide (torchvision widens narrower ones, which could push samples off the map),
    # inside [0, 6] x [0, 4]; odd seeds put the corners on a half-cell grid to hit the rounding ties.
    def span(hi):
        if seed % 2:
            lo = rng.choice(np.arange(0, hi - 1 + 1e-9, 0.5))
            return lo, rng.choice(np.arange(lo + 1, hi + 1e-9, 0.5))
        lo = rng.uniform(0, hi - 1)
        return lo, rng.uniform(lo + 1, hi)

    (x0, x1), (y0, y1) = span(6.0), span(4.0)
    result = compare_pooling(d, (x0, y0, x1, y1), sampling_ratio=int(rng.integers(1, 4)))
    (r0, r1), (c0, c1) = result.quantized_rows, result.quantized_cols
    assert result.roi_pool == d[r0 : r1 + 1, c0 : c1 + 1].max() == d[result.max_cell]
    assert result.roi_align == pytest.approx(result.sample_values.mean(), abs=1e-12)
    assert result.prroi_pool == pytest.approx(_exact_bin_mean(d, x0, y0, x1, y1), abs=1e-12)


def test_interpolate_feature_map():
    d = np.array([[1.0, 3.0], [5.0, 7.0]])
    np.testing.assert_allclose(interpolate_feature_map(d, [0, 1], [0, 1]), d)
    assert interpolate_feature_map(d, [0.5], [0.5])[0, 0] == pytest.approx(4.0)
    assert interpolate_feature_map(d, [-0.5], [0.0])[0, 0] == pytest.approx(0.5)  # fades to 0 past the border
    assert interpolate_feature_map(d, [0.25, 0.5, 0.75], [0.0]).shape == (1, 3)


def test_compare_pooling_validation():
    with pytest.raises(ValueError, match="leave"):
        compare_pooling(np.ones((3, 3)), (1.5, 1.5, 3.5, 3.5))
    with pytest.raises(ValueError, match="2-D"):
        compare_pooling(np.ones((1, 3, 3)), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x0 < x1"):
        compare_pooling(np.ones((3, 3)), (1, 0, 1, 1))
    assert compare_pooling(torch.ones(3, 3), (0.2, 0.2, 1.8, 1.8)).prroi_pool == pytest.approx(1.0)


def test_plot_pooling(tmp_path):
    result = compare_pooling(*example_feature_map())
    # The example is chosen so that the three operators visibly disagree.
    assert result.roi_pool > result.roi_align + 0.1 and abs(result.roi_align - result.prroi_pool) > 0.01
    fig = plot_pooling(result)
    assert len(fig.axes) == 4  # three panels and the colour bar
    panels = fig.axes[:3]
    for ax, value in zip(panels, (result.roi_pool, result.roi_align, result.prroi_pool)):
        assert f"{value:.4f}" in ax.get_title()
        assert sum(isinstance(im, AxesImage) for im in ax.images) == 1
        assert ax.get_legend() is not None
        assert_labelled(ax)
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["bin", "quantized cells", "max cell"]
    (samples,) = [c for c in panels[1].collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(samples.get_offsets(), result.sample_points)
    assert saved_png(fig, tmp_path, "pooling").startswith(PNG_MAGIC)


def test_pooling_values_come_from_library_operators():
    d, bin_box = example_feature_map()
    result = compare_pooling(d, bin_box)
    f = torch.from_numpy(d)[None, None]
    rois = torch.tensor([[0.0, *bin_box]], dtype=torch.float64)
    assert result.roi_align == float(torchvision.ops.roi_align(f, rois, 1, 1.0, 2, aligned=False))
    assert result.roi_pool == float(torchvision.ops.roi_pool(f, rois, 1, 1.0))
