"""The notebook widgets driven in-process, as the browser would drive them: set a control, read the figure.

The refinement stepper is checked against a refinement record (the demo record, and a hand-built one
whose orders are known by construction); the pooling explorer against ``prroi_pool`` called directly.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.analysis import example_feature_map
from workbench.notebook_utils import demo_trajectories
from workbench.ops import prroi_pool
from workbench.trajectories import Trajectories
from workbench.widgets import CocoImages, PoolingExplorer, RefinementStepper


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Trajectories:
    return Trajectories.load(demo_trajectories(tmp_path_factory.mktemp("cache"), num_images=8))


def trace(fig, name_prefix: str):
    """The one trace whose name starts with ``name_prefix``."""
    found = [t for t in fig.data if (t.name or "").startswith(name_prefix)]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


def outline(box) -> tuple[list[float], list[float]]:
    x0, y0, x1, y1 = box
    return [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]


def readout_number(text: str, label: str) -> float:
    match = re.search(rf"{label}\s*(?:<b>)?\s*([-+]?\d+\.\d+)", text)
    assert match, f"no {label!r} in {text!r}"
    return float(match.group(1))


def hand_record(gains: list[float], stop_reason: list[int] | None = None) -> Trajectories:
    """``B`` boxes, ``T = 2``, true IoU going from 0.5 to ``0.5 + gain``; box ``k`` sits at ``10 k``."""
    b, t = len(gains), 2
    boxes = np.stack([np.linspace([10.0 * k, 0, 10.0 * k + 8, 8], [10.0 * k + 1, 0, 10.0 * k + 9, 8], t + 1) for k in range(b)])
    true_iou = np.stack([np.linspace(0.5, 0.5 + g, t + 1) for g in gains])
    return Trajectories(
        image_id=np.arange(b, dtype=np.int64), category_id=np.ones(b, dtype=np.int64), score=np.ones(b),
        gt_box=boxes[:, -1], boxes=boxes, predicted_iou=true_iou + 0.1, true_iou=true_iou,
        gradient=np.diff(boxes, axis=1), stop_step=np.full(b, t), stop_reason=np.asarray(stop_reason or [0] * b),
    )


# --- the refinement stepper ---------------------------------------------------------------------------


def test_moving_the_slider_draws_the_recorded_box_and_readout(record):
    stepper = RefinementStepper(record)
    b = stepper.box
    num_steps = record.boxes.shape[1] - 1
    for step in [3, 1, num_steps, 0]:
        stepper.slider.value = step
        drawn = trace(stepper.figure, "box at step")
        assert drawn.name == f"box at step {step}"
        np.testing.assert_allclose(drawn.x, outline(record.boxes[b, step])[0])
        np.testing.assert_allclose(drawn.y, outline(record.boxes[b, step])[1])
        text = stepper.readout.value
        assert f"step {step} of {num_steps}" in text
        assert readout_number(text, "predicted IoU") == pytest.approx(record.predicted_iou[b, step], abs=5e-4)
        assert readout_number(text, "true IoU") == pytest.approx(record.true_iou[b, step], abs=5e-4)
        # The current-step line on the IoU plot follows.
        assert stepper.figure.layout.shapes[0].x0 == step


def test_arrows_are_the_recorded_step_from_each_edge(record):
    stepper = RefinementStepper(record)
    b, step = stepper.box, 1
    stepper.show_step(step)
    x0, y0, x1, y1 = record.boxes[b, step]
    g = record.gradient[b, step]
    arrows = trace(stepper.figure, "next step")
    tips = [(x, y) for x, y, s in zip(arrows.x, arrows.y, arrows.marker.size) if s]
    expected = [(x0 + g[0], (y0 + y1) / 2), ((x0 + x1) / 2, y0 + g[1]), (x1 + g[2], (y0 + y1) / 2), ((x0 + x1) / 2, y1 + g[3])]
    np.testing.assert_allclose(tips, [e for e, gk in zip(expected, g) if abs(gk) > 1e-9])
    # The tip of each arrow is where that edge is one step later.
    np.testing.assert_allclose(record.boxes[b, step] + g, record.boxes[b, step + 1], atol=1e-9)
    stepper.show_step(record.boxes.shape[1] - 1)  # after the last step there is no next step
    assert len(trace(stepper.figure, "next step").x) == 0


def test_ground_truth_trajectory_and_iou_curves_are_the_record(record):
    stepper = RefinementStepper(record)
    stepper.show_box(5)
    assert stepper.box == 5
    gt = trace(stepper.figure, "ground truth")
    np.testing.assert_allclose(gt.x, outline(record.gt_box[5])[0])
    np.testing.assert_allclose(gt.y, outline(record.gt_box[5])[1])
    np.testing.assert_allclose(trace(stepper.figure, "predicted IoU").y, record.predicted_iou[5])
    np.testing.assert_allclose(trace(stepper.figure, "true IoU").y, record.true_iou[5])
    path = trace(stepper.figure, "box at every step")
    corners = np.array([v for v in path.x if v is not None])
    assert len(corners) == 5 * record.boxes.shape[1]
    assert f"record #5," in stepper.box_label.value
    titles = [a.text for a in stepper.figure.layout.annotations]
    assert titles[0].startswith(f"image {record.image_id[5]}, ") and titles[0].endswith("box #5")
    assert "IoU per step" in titles


def test_image_is_the_file_the_sidecar_names(record):
    stepper = RefinementStepper(record)
    stepper.show_box(0)
    source = stepper.figure.data[0].source
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
    images = CocoImages(record.meta["ann_file"], record.meta["img_dir"])
    info = images.coco.loadImgs([int(record.image_id[0])])[0]
    with Image.open(images.img_dir / info["file_name"]) as im:
        np.testing.assert_array_equal(pixels, np.asarray(im.convert("RGB")))
    # Zoomed on the box: every step and the ground truth in view, nothing outside the image.
    (x_lo, x_hi), (y_hi, y_lo) = stepper.figure.layout.xaxis.range, stepper.figure.layout.yaxis.range
    boxes = np.concatenate([record.boxes[0], record.gt_box[:1]])
    assert 0 <= x_lo < boxes[:, 0].min() and boxes[:, 2].max() < x_hi <= info["width"]
    assert 0 <= y_lo < boxes[:, 1].min() and boxes[:, 3].max() < y_hi <= info["height"]
    whole = RefinementStepper(record, zoom=False)
    assert whole.figure.layout.xaxis.range == (0, info["width"]) and whole.figure.layout.yaxis.range == (info["height"], 0)


def test_next_and_previous_walk_the_record_in_order_and_wrap():
    stepper = RefinementStepper(hand_record([0.1, -0.2, 0.05]))
    assert stepper.box == 0
    stepper.next_box()
    assert stepper.box == 1
    np.testing.assert_allclose(trace(stepper.figure, "box at step").x, outline(stepper.trajectories.boxes[1, 0])[0])
    stepper.next_box()
    stepper.next_box()
    assert stepper.box == 0  # wrapped
    stepper.previous_box()
    assert stepper.box == 2
    stepper.previous_button.click()  # the buttons call the same methods
    assert stepper.box == 1
    stepper.next_button.click()
    assert stepper.box == 2


def test_changing_box_restarts_at_step_zero():
    stepper = RefinementStepper(hand_record([0.1, -0.2, 0.05]))
    stepper.slider.value = 2
    stepper.next_box()
    assert stepper.slider.value == 0 and stepper.step == 0
    assert trace(stepper.figure, "box at step").name == "box at step 0"


@pytest.mark.parametrize(
    ("order", "expected"),
    [("gain", [0, 2, 3, 1]), ("loss", [1, 3, 2, 0]), ("record", [0, 1, 2, 3])],
)
def test_orders_of_a_hand_built_record(order, expected):
    # gains 0.1, -0.2, 0.05, 0.0: by construction, best first 0, 2, 3, 1; worst first 1, 3, 2, 0.
    stepper = RefinementStepper(hand_record([0.1, -0.2, 0.05, 0.0]))
    stepper.set_order(order)
    seen = [stepper.box]
    for _ in range(3):
        stepper.next_box()
        seen.append(stepper.box)
    assert seen == expected


def test_order_dropdown_and_gain_computed_independently(record):
    stepper = RefinementStepper(record)
    gain = [float(record.true_iou[k, -1]) - float(record.true_iou[k, 0]) for k in range(len(record))]
    worst_first = sorted(range(len(record)), key=lambda k: (gain[k], k))
    stepper.order_menu.value = "loss"  # what the dropdown does in the browser
    assert stepper.box == worst_first[0]
    assert gain[worst_first[0]] < 0  # the demo record has a box that refinement made worse
    stepper.next_box()
    assert stepper.box == worst_first[1]
    assert f"{gain[worst_first[1]]:+.3f}" in stepper.box_label.value
    stepper.set_order("gain")
    assert stepper.order_menu.value == "gain"
    assert stepper.box == max(range(len(record)), key=lambda k: (gain[k], -k))
    with pytest.raises(ValueError, match="order must be one of"):
        stepper.set_order("size")


@pytest.mark.parametrize(("code", "marker"), [(0, "T (ran every iteration)"), (1, "Ω1 (converged)"), (2, "Ω2 (degenerated)")])
def test_stop_reason_text_matches_the_record(record, code, marker):
    assert (record.stop_reason == code).any(), "the demo record should show every stop reason"
    b = int(np.flatnonzero(record.stop_reason == code)[0])
    stop = int(record.stop_step[b])
    stepper = RefinementStepper(record)
    stepper.show_box(b)
    for step in range(record.boxes.shape[1]):
        stepper.show_step(step)
        text = stepper.readout.value
        if step < stop:
            assert "stopped" not in text and "moving" in text
        else:
            assert marker in text
            others = {"T (ran every iteration)", "Ω1 (converged)", "Ω2 (degenerated)"} - {marker}
            assert not any(o in text for o in others)
            if code:
                assert f"after step {stop}" in text
    # An early stop is marked on the IoU plot at the recorded step, a full run is not.
    stopped = trace(stepper.figure, "stopped here")
    assert list(stopped.x) == ([stop] if code else [])


def test_works_without_images():
    record = hand_record([0.1, -0.2])
    stepper = RefinementStepper(record)  # no sidecar: no images
    assert stepper.images is None and stepper.figure.data[0].source is None
    x_range = stepper.figure.layout.xaxis.range
    assert x_range[0] < record.boxes[0, :, 0].min() and x_range[1] > record.boxes[0, :, 2].max()


def test_box_without_ground_truth_draws_none():
    record = hand_record([0.1, 0.0])
    record.gt_box[1] = np.nan  # a detection that matched no ground truth (true IoU 0 throughout)
    stepper = RefinementStepper(record)
    stepper.show_box(1)
    assert len(trace(stepper.figure, "ground truth").x) == 0
    np.testing.assert_allclose(trace(stepper.figure, "box at step").x, outline(record.boxes[1, 0])[0])
    with pytest.raises(ValueError, match="box index"):
        stepper.show_box(2)


def test_rejects_an_empty_record():
    one = hand_record([0.1])
    empty = Trajectories(**{k: v[:0] for k, v in vars(one).items() if k != "meta"})
    with pytest.raises(ValueError, match="no boxes"):
        RefinementStepper(empty)


# --- the pooling explorer -------------------------------------------------------------------------------


def pooled(d: np.ndarray, box) -> tuple[float, np.ndarray]:
    b = torch.tensor(box, dtype=torch.float64, requires_grad=True)
    value = prroi_pool(torch.tensor(d)[None, None], torch.cat([torch.zeros(1, dtype=torch.float64), b])[None], 1, 1.0).sum()
    value.backward()
    return float(value.detach()), b.grad.numpy()


def test_explorer_slider_updates_value_gradient_and_box():
    d, bin_box = example_feature_map()
    explorer = PoolingExplorer(d, bin_box)
    explorer.sliders["x1"].value = 5.5
    box = (bin_box[0], bin_box[1], 5.5, bin_box[3])
    value, grad = pooled(d, box)
    text = explorer.readout.value
    assert readout_number(text, "PrPool =") == pytest.approx(value, abs=5e-5)
    for edge, g in zip(("x0", "y0", "x1", "y1"), grad):
        assert readout_number(text, f"∂/∂{edge} =") == pytest.approx(g, abs=5e-5)
    np.testing.assert_allclose(trace(explorer.figure, "bin").x, outline(box)[0])
    # Each arrow points along its edge's axis by arrow_scale times the derivative.
    arrows = trace(explorer.figure, "∂PrPool")
    tips = np.array([(x, y) for x, y, s in zip(arrows.x, arrows.y, arrows.marker.size) if s])
    assert tips[2][0] == pytest.approx(5.5 + explorer.arrow_scale * grad[2])
    assert tips[3][1] == pytest.approx(bin_box[3] + explorer.arrow_scale * grad[3])


def test_explorer_set_box_and_empty_bin():
    d, _ = example_feature_map()
    explorer = PoolingExplorer(d, (1.0, 1.0, 3.0, 3.0))
    explorer.set_box((2.0, 0.5, 4.25, 2.75))
    assert explorer.box == (2.0, 0.5, 4.25, 2.75)
    assert readout_number(explorer.readout.value, "PrPool =") == pytest.approx(pooled(d, explorer.box)[0], abs=5e-5)
    explorer.set_box((3.0, 1.0, 2.0, 3.0))
    assert "empty bin" in explorer.readout.value
