"""Diagnostics on analytic predictors whose answers are known without the code under test: the true IoU
as predictor (slope 1, ranking accuracy 1, cosine 1), its negation, affine squeezes, hand-built
refinement records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from matplotlib.figure import Figure

from workbench.analysis import diagnostics as D
from workbench.analysis.refinement import refinement_summary
from workbench.refine import CONVERGED, DEGENERATED, RUNNING, STOP_REASONS, optimize_boxes
from workbench.trajectories import Trajectories

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def saved_png(fig: Figure, tmp_path, name: str) -> bytes:
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    return path.read_bytes()


# ============================================================================= calibration
def test_calibration_of_the_true_iou_is_the_identity():
    t = np.random.default_rng(0).uniform(0.5, 1.0, 500)
    cal = D.calibration(t, t)
    assert (cal.slope, cal.intercept, cal.spread_ratio) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12), pytest.approx(1.0))
    filled = cal.bins[cal.bins["boxes"] > 0]
    np.testing.assert_allclose(filled["mean true"], filled["mean predicted"])
    assert cal.bins["boxes"].sum() == 500


def test_calibration_of_a_squeezed_predictor():
    # predicted = 0.6 + 0.25 true: true = (predicted - 0.6) / 0.25, so slope 4, intercept -2.4, spread 0.25.
    t = np.random.default_rng(1).uniform(0.5, 1.0, 300)
    cal = D.calibration(t, 0.6 + 0.25 * t)
    assert (cal.slope, cal.intercept, cal.spread_ratio) == (pytest.approx(4.0), pytest.approx(-2.4), pytest.approx(0.25))
    filled = cal.bins[cal.bins["boxes"] > 0]
    assert filled.index.tolist() == ["[0.7, 0.8)", "[0.8, 0.9)"] and filled["boxes"].sum() == 300  # predictions in 0.725 .. 0.85
    np.testing.assert_allclose(filled["mean true"], (filled["mean predicted"] - 0.6) / 0.25)
    assert np.isnan(D.calibration(t, np.full_like(t, 0.8)).slope)  # a constant prediction has no slope


def test_calibration_length_mismatch_is_named():
    with pytest.raises(ValueError, match="same length"):
        D.calibration([0.5, 0.6], [0.5])


def test_plot_calibration(tmp_path):
    t = np.random.default_rng(2).uniform(0.5, 1.0, 50)
    fig = D.plot_calibration(D.calibration(t, 0.5 + 0.5 * t))
    assert "slope 2.00" in fig.axes[0].get_title() and saved_png(fig, tmp_path, "cal").startswith(PNG_MAGIC)


# ============================================================================= ranking
def ranked_frame() -> pd.DataFrame:
    # Object 1: three detections (true IoU 0.875, 0.75, 0.625); object 2: two (0.9375, 0.5625); one unmatched
    # box. Binary fractions, so every gap is exact.
    iou = np.array([0.875, 0.75, 0.625, 0.9375, 0.5625, 0.0])
    return pd.DataFrame({"gt_id": [1, 1, 1, 2, 2, -1], "iou": iou, "iou_pred": iou, "score": [0.7, 0.9, 0.8, 0.4, 0.4, 0.99],
                         "negated": -iou})


def test_ranking_accuracy_by_hand():
    table = D.ranking_accuracy(ranked_frame(), ("iou_pred", "score", "negated"))
    # Pairs: (0.875, 0.75) gap 0.125, (0.875, 0.625) gap 0.25, (0.75, 0.625) gap 0.125, (0.9375, 0.5625) gap 0.375.
    assert table.loc["all pairs", "pairs"] == 4
    assert table.loc["all pairs", "iou_pred"] == 1.0 and table.loc["all pairs", "negated"] == 0.0
    # Score: wrong on the first two pairs, right on the third, tied on the fourth: (0 + 0 + 1 + 0.5) / 4.
    assert table.loc["all pairs", "score"] == pytest.approx(1.5 / 4)
    assert table["pairs"].drop("all pairs").tolist() == [0, 0, 2, 2]  # gap bins [0, .05) [.05, .1) [.1, .2) [.2, 1]
    assert table.loc["[0.1, 0.2)", "score"] == pytest.approx(0.5)


def test_ranking_accuracy_needs_the_columns():
    with pytest.raises(ValueError, match="iou_pred"):
        D.ranking_accuracy(ranked_frame().drop(columns="iou_pred"))


def test_plot_ranking_accuracy(tmp_path):
    fig = D.plot_ranking_accuracy(D.ranking_accuracy(ranked_frame()))
    assert len(fig.axes[0].get_lines()) == 3  # two confidences and chance
    assert saved_png(fig, tmp_path, "rank").startswith(PNG_MAGIC)


# ============================================================================= gradient alignment
def test_true_iou_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0, 50, (20, 2))
    gt = np.concatenate([gt, gt + rng.uniform(10, 40, (20, 2))], axis=1)
    boxes = gt + rng.normal(0, 3, gt.shape)

    def iou(b):  # torchvision's IoU, an independent formula
        return torchvision.ops.box_iou(torch.tensor(b[None]), torch.tensor(g[None])).item()

    grad = D.true_iou_gradient(boxes, gt)
    for k, (b, g) in enumerate(zip(boxes, gt)):
        fd = [(iou(b + e) - iou(b - e)) / 2e-6 for e in np.eye(4) * 1e-6]
        np.testing.assert_allclose(grad[k], fd, atol=1e-6)


def test_gradient_alignment_of_analytic_predictors():
    gt = np.array([[10.0, 10, 50, 40], [0, 0, 20, 20], [0, 0, 10, 10]])
    boxes = np.array([[12.0, 8, 47, 45], [3, -2, 25, 18], [30, 30, 40, 40]])  # the last one misses its object
    exact = D.true_iou_gradient(boxes, gt)
    np.testing.assert_allclose(D.gradient_alignment(exact, boxes, gt)[:2], [1.0, 1.0])
    np.testing.assert_allclose(D.gradient_alignment(-3 * exact, boxes, gt)[:2], [-1.0, -1.0])
    assert np.isnan(D.gradient_alignment(exact, boxes, gt)[2])  # no overlap: the true IoU is flat
    perpendicular = np.stack([exact[:, 1], -exact[:, 0], exact[:, 3], -exact[:, 2]], axis=1)  # dot product 0
    np.testing.assert_allclose(D.gradient_alignment(perpendicular, boxes, gt)[:2], [0.0, 0.0], atol=1e-12)


def exact_record(reading: str, *, steps: int = 3) -> Trajectories:
    """Algorithm 2 with the exact IoU as its predictor, recorded as the pipeline records it."""
    rng = np.random.default_rng(4)
    gt = torch.tensor(np.concatenate([xy := rng.uniform(20, 60, (12, 2)), xy + rng.uniform(8, 120, (12, 2))], axis=1))
    start = gt + torch.tensor(rng.normal(0, 4, (12, 4)))
    from workbench.ops.boxes import matched_iou
    result = optimize_boxes(lambda b: matched_iou(b, gt), start, steps, 0.5, step_scaling=reading)
    traj = result.trajectory.transpose(0, 1).numpy()  # (B, T + 1, 4)
    return Trajectories(
        image_id=np.arange(12), category_id=np.ones(12, dtype=np.int64), score=np.linspace(0.9, 0.5, 12), gt_box=gt.numpy(),
        boxes=traj, predicted_iou=result.predicted.T.numpy(), true_iou=matched_iou(torch.tensor(traj), gt[:, None]).numpy(),
        gradient=result.gradients.transpose(0, 1).numpy(), stop_step=result.stop_step.numpy(), stop_reason=result.stop_reason.numpy(),
        meta={"settings": {"refine_step_scaling": reading}})


@pytest.mark.parametrize("reading", ["width", "log"])
def test_record_alignment_of_the_exact_predictor_is_one(reading):
    table = D.record_gradient_alignment(exact_record(reading))
    assert len(table) == 12
    np.testing.assert_allclose(table["cosine"], 1.0, atol=1e-9)


def test_plot_gradient_alignment(tmp_path):
    fig = D.plot_gradient_alignment(D.record_gradient_alignment(exact_record("width")))
    assert "median 1.00 (12 boxes)" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert saved_png(fig, tmp_path, "align").startswith(PNG_MAGIC)


# ============================================================================= refinement records
def hand_record() -> Trajectories:
    """Three boxes, two steps: a small object gained 0.1, a medium one lost 0.05, a large one gained 0.2;
    one box without ground truth. Stops: T, Ω1 after step 1, Ω2 after step 2, Ω1 after step 1."""
    gt = np.array([[0, 0, 20, 20], [0, 0, 50, 40], [0, 0, 200, 100], [np.nan] * 4])
    boxes = np.zeros((4, 3, 4))
    boxes[:, :, 2:] = 10
    boxes[0, 2] = [1, 0, 13, 10]  # largest edge move 3 px
    true = np.array([[0.5, 0.55, 0.6], [0.8, 0.75, 0.75], [0.6, 0.8, 0.8], [0.0, 0.0, 0.0]])
    return Trajectories(
        image_id=np.array([1, 1, 2, 2]), category_id=np.ones(4, dtype=np.int64), score=np.array([0.9, 0.8, 0.7, 0.6]),
        gt_box=gt, boxes=boxes, predicted_iou=np.array([[0.5, 0.6, 0.7], [0.7, 0.8, 0.8], [0.6, 0.7, 0.7], [0.3, 0.3, 0.3]]),
        true_iou=true, gradient=np.zeros((4, 2, 4)), stop_step=np.array([2, 1, 2, 1]),
        stop_reason=np.array([RUNNING, CONVERGED, DEGENERATED, CONVERGED]))


def test_gain_by_size_by_hand():
    table = D.gain_by_size(hand_record())
    assert table["boxes"].tolist() == [1, 1, 0, 1]  # sqrt areas 20, 44.7, 141.4: bins [0,32) [32,64) [64,128) [128,inf)
    assert table["mean gain"].iloc[[0, 1, 3]].tolist() == pytest.approx([0.1, -0.05, 0.2])
    assert table["gained"].tolist() == [1, 0, 0, 1] and table["lost"].tolist() == [0, 1, 0, 0]
    assert table["median move (px)"].iloc[0] == pytest.approx(3.0)


def test_refinement_summary_counts_gains_and_losses_the_right_way_round():
    table = refinement_summary(hand_record())
    all_boxes = table.loc["all boxes"]
    assert (all_boxes["gained IoU"], all_boxes["lost IoU"], all_boxes["boxes"]) == (2, 1, 4)
    assert table.loc[STOP_REASONS[DEGENERATED], "gained IoU"] == 1 and table.loc[STOP_REASONS[CONVERGED], "lost IoU"] == 1


def test_stop_reasons_by_hand(tmp_path):
    table = D.stop_reasons(hand_record())
    assert table.index.tolist() == [1, 2] and list(table.columns) == list(STOP_REASONS.values())
    assert table.loc[1, STOP_REASONS[CONVERGED]] == 2 and table.loc[2, STOP_REASONS[RUNNING]] == 1
    assert table.loc[2, STOP_REASONS[DEGENERATED]] == 1 and table.to_numpy().sum() == 4
    assert saved_png(D.plot_stop_reasons(table), tmp_path, "stops").startswith(PNG_MAGIC)
    assert saved_png(D.plot_gain_by_size(D.gain_by_size(hand_record())), tmp_path, "gain").startswith(PNG_MAGIC)


def test_stop_reasons_of_a_real_refinement_match_its_record():
    record = exact_record("width", steps=4)
    table = D.stop_reasons(record)
    for reason_code, label in STOP_REASONS.items():
        for step in table.index:
            assert table.loc[step, label] == int(((record.stop_reason == reason_code) & (record.stop_step == step)).sum())
