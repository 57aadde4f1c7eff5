"""Algorithm 2 on predictors whose optimum and gradients are known in closed form."""

from __future__ import annotations

import pytest
import torch
import torchvision

from workbench.refine import CONVERGED, DEGENERATED, RUNNING, iterative_regression, optimize_boxes


def analytic_iou(target: torch.Tensor):
    """A "predictor" that returns the true IoU with a fixed box: its optimum is ``target``."""

    def score(boxes: torch.Tensor) -> torch.Tensor:
        lt = torch.max(boxes[:, :2], target[:2])
        rb = torch.min(boxes[:, 2:], target[2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        return inter / (area + (target[2:] - target[:2]).prod() - inter)

    return score


def test_moves_boxes_toward_the_optimum_of_an_analytic_iou():
    target = torch.tensor([20.0, 30.0, 80.0, 110.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    boxes = target + torch.randn(64, 4, generator=gen, dtype=torch.float64) * 6
    result = optimize_boxes(analytic_iou(target), boxes, iterations=20, early_stop=1e-6)
    before = torchvision.ops.box_iou(boxes, target[None])[:, 0]
    after = torchvision.ops.box_iou(result.boxes, target[None])[:, 0]
    assert (after >= before - 1e-12).all()
    assert after.mean() > before.mean() + 0.1
    assert after.mean() > 0.9
    # The record: the first row is the input, predicted IoU is the objective at each row.
    assert torch.equal(result.trajectory[0], boxes)
    torch.testing.assert_close(result.predicted[-1], after)


def test_scaled_gradient_step_equals_hand_computed_one():
    # score(b) = a . b has gradient a everywhere. For the box (10, 20, 30, 60), w = 20 and h = 40,
    # so one step of λ = 0.5 adds 0.5 * (20 a0, 40 a1, 20 a2, 40 a3) = (1, -4, 3, 2) for
    # a = (0.1, -0.2, 0.3, 0.1).
    a = torch.tensor([0.1, -0.2, 0.3, 0.1], dtype=torch.float64)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]], dtype=torch.float64)
    result = optimize_boxes(lambda b: b @ a, boxes, iterations=1, step_size=0.5)
    torch.testing.assert_close(result.gradients[0], torch.tensor([[1.0, -4.0, 3.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(result.boxes, torch.tensor([[11.0, 16.0, 33.0, 62.0]], dtype=torch.float64))
    # Predicted score rose by a . step = 0.1 + 0.8 + 0.9 + 0.2 = 2.0.
    torch.testing.assert_close(result.predicted[1] - result.predicted[0], torch.tensor([2.0], dtype=torch.float64))


def test_log_step_scaling_moves_a_fixed_fraction_of_the_box():
    # "log" reading: a step of λ in (x/w, y/h, log w, log h) is λ · w² · ∂score/∂x pixels. Same box
    # and score as above: 0.5 * (400 a0, 1600 a1, 400 a2, 1600 a3) = (20, -160, 60, 80).
    a = torch.tensor([0.1, -0.2, 0.3, 0.1], dtype=torch.float64)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]], dtype=torch.float64)
    result = optimize_boxes(lambda b: b @ a, boxes, iterations=1, step_size=0.5, step_scaling="log")
    torch.testing.assert_close(result.gradients[0], torch.tensor([[20.0, -160.0, 60.0, 80.0]], dtype=torch.float64))
    # Scale invariance: for the true IoU with a ground truth scaled with the box, the step in box
    # widths is the same for a box 10x larger (IoU's gradient in pixels shrinks as 1/w).
    def iou_with(gt):
        from workbench.ops.boxes import matched_iou
        return lambda b: matched_iou(b, gt.expand_as(b))
    small, gt_small = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0, 11.0, 12.0]], dtype=torch.float64)
    steps = [optimize_boxes(iou_with(gt_small * k), small * k, iterations=1, step_size=0.5, step_scaling="log").gradients[0] / k
             for k in (1.0, 10.0)]
    torch.testing.assert_close(steps[0], steps[1])
    with pytest.raises(ValueError, match="step_scaling"):
        optimize_boxes(lambda b: b @ a, boxes, step_scaling="pixels")


def test_early_stop_when_the_score_stops_changing():
    # score = g * x1: the gradient is g on x1, a step adds 0.5 * w * g to x1 and 0.5 * w * g^2 to
    # the score. Box 0 (g = 1e-3, w = 10) gains 5e-6 < Ω1 and stops at step 1; box 1 (g = 0.1)
    # gains 0.05, then more as w grows, and runs all five steps.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    g = torch.tensor([1e-3, 0.1], dtype=torch.float64)
    result = optimize_boxes(lambda b: g * b[:, 2], boxes, iterations=5)
    assert result.stop_reason[0] == CONVERGED and result.stop_step[0] == 1
    assert result.stop_reason[1] == RUNNING and result.stop_step[1] == 5
    # A stopped box never moves again.
    assert (result.trajectory[1:, 0] == result.trajectory[1, 0]).all()
    assert (result.gradients[1:, 0] == 0).all()


def test_degeneration_stops_the_box_at_the_step_that_drops_the_score():
    # score = -(x1 - 5)^2 / 100 at x1 = 10: score -0.25, gradient -0.1 on x1, w = 10. With
    # λ = 20 the step is 20 * 10 * (-0.1) = -20, so x1 = -10 < x0 = 0: an inverted box, which the
    # step widens to MIN_BOX_SIZE = 1 about its centre -5: x = [-5.5, -4.5], score
    # -(-4.5 - 5)^2 / 100 = -0.9025, a drop of 0.6525 < Ω2. The box must stop at step 1
    # (DEGENERATED), the (valid) step itself kept.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)

    def score(b):
        return -((b[:, 2] - 5) ** 2) / 100

    result = optimize_boxes(score, boxes, iterations=5, step_size=20)
    assert result.stop_reason[0] == DEGENERATED and result.stop_step[0] == 1
    assert result.boxes[0].tolist() == pytest.approx([-5.5, 0.0, -4.5, 10.0])
    assert result.predicted[1, 0].item() == pytest.approx(-0.9025)
    assert (result.trajectory[1:] == result.trajectory[1]).all()
    # Never a step that lowers the score by more than |Ω2| with the box still running afterwards.
    drops = result.predicted[1:] - result.predicted[:-1]
    for t in range(drops.shape[0]):
        bad = drops[t] < -0.01
        assert (result.stop_step[bad] == t + 1).all()


def test_runs_all_iterations_when_neither_condition_holds():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    result = optimize_boxes(lambda b: b[:, 2] / 10, boxes, iterations=3, step_size=0.5)
    # Each step adds 0.5 * w * 0.1 = 0.5 * w / 10 to x1, so w grows by 5% a step and the score with it.
    assert result.stop_reason[0] == RUNNING and result.stop_step[0] == 3
    expected = 10 * 1.05 ** torch.arange(4, dtype=torch.float64)
    torch.testing.assert_close(result.trajectory[:, 0, 2], expected)


def test_iterative_regression_applies_the_regressor_repeatedly():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    steps = iterative_regression(lambda b: b * 2, boxes, 3)
    assert [s[0, 2].item() for s in steps] == [4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"iterations": -1}, "iterations"), ({"step_size": 0.0}, "step_size"), ({"early_stop": -1e-3}, "early_stop"),
     ({"degeneration": 0.01}, "degeneration")],
)
def test_bad_hyper_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize_boxes(lambda b: b.sum(1), torch.zeros(1, 4), **kwargs)


def test_bad_boxes_and_score_shape_are_named():
    with pytest.raises(ValueError, match="boxes"):
        optimize_boxes(lambda b: b.sum(1), torch.tensor([[0.0, 0, float("nan"), 1]]))
    with pytest.raises(ValueError, match="score_fn"):
        optimize_boxes(lambda b: b.sum(), torch.zeros(2, 4))


class _PerBoxTargets:
    """True IoU of each box with its own target box, with ``select``: optimize_boxes then scores only
    the boxes still running. Records the number of boxes of every call."""

    def __init__(self, targets: torch.Tensor, calls: list[int]) -> None:
        self.targets, self.calls = targets, calls

    def __call__(self, boxes: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(boxes))
        return torch.stack([analytic_iou(t)(b[None])[0] for t, b in zip(self.targets, boxes)])

    def select(self, index: torch.Tensor) -> _PerBoxTargets:
        return _PerBoxTargets(self.targets[index], self.calls)


def test_a_scorer_with_select_scores_only_running_boxes_and_refines_the_same():
    gen = torch.Generator().manual_seed(3)
    targets = torch.tensor([20.0, 30.0, 80.0, 110.0], dtype=torch.float64) + torch.randn(12, 4, generator=gen,
                                                                                        dtype=torch.float64) * 3
    # Boxes 0-3 start on their target (Ω1 stops them at step 1), the others some pixels off.
    boxes = targets + torch.randn(12, 4, generator=gen, dtype=torch.float64) * 4 * (torch.arange(12) >= 4)[:, None]
    calls: list[int] = []
    subset = optimize_boxes(_PerBoxTargets(targets, calls), boxes, iterations=6, step_size=0.5, early_stop=1e-3)
    scorer = _PerBoxTargets(targets, [])
    whole = optimize_boxes(lambda b: scorer(b), boxes, iterations=6, step_size=0.5, early_stop=1e-3)  # no select
    for name in ("boxes", "scores", "trajectory", "predicted", "gradients", "stop_step", "stop_reason"):
        assert torch.equal(getattr(subset, name), getattr(whole, name)), name
    # Every call after a box stopped scored the running boxes only.
    running = [int((subset.stop_step >= step).sum()) for step in range(7)]
    assert calls == [n for n in running if n], (calls, running)
    assert (subset.stop_step[:4] == 1).all() and calls[-1] < 12
