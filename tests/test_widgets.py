"""The notebook widgets driven in-process, as the browser would drive them: set a control, read the figure.

The refinement stepper is checked against a refinement record (the demo record, and a hand-built one
whose orders are known by construction); the pooling explorer against ``prroi_pool`` called directly; the
NMS explorer against ``suppress`` called directly and its reasons against a slow greedy NMS written here.
Also here: the analyses notebooks 02-06 call (``workbench.analysis.*``) that need no trained model.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workbench.analysis import example_feature_map
from workbench.analysis.refinement import demo_trajectories
from workbench.data.images import CocoImages
from workbench.ops import box_iou, prroi_pool
from workbench.trajectories import Trajectories
from workbench.widgets import PoolingExplorer, RefinementStepper


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
    info = images.image_info[int(record.image_id[0])]
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
    if code:  # where the box stopped: its predicted IoU there, and the box no longer moves after it
        assert list(stopped.y) == [pytest.approx(float(record.predicted_iou[b, stop]))]
        np.testing.assert_array_equal(record.boxes[b, stop:], np.broadcast_to(record.boxes[b, stop], record.boxes[b, stop:].shape))
        assert stop == 0 or not np.array_equal(record.boxes[b, stop], record.boxes[b, stop - 1])


def test_every_legend_entry_is_named(record):
    # plotly labels an unnamed trace "trace N" in the legend.
    stepper = RefinementStepper(record)
    for b in range(min(3, record.boxes.shape[0])):
        stepper.show_box(b)
        shown = [tr for tr in stepper.figure.data if getattr(tr, "showlegend", True) is not False]
        assert shown and all(tr.name and not tr.name.startswith("trace") for tr in shown), [tr.name for tr in stepper.figure.data]


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


# The stand-in record's predictor, rebuilt here from its meta: the exact IoU with each box's belief box.
def stand_in_reference(record: Trajectories, b: int, **knobs):
    from workbench.ops.boxes import matched_iou
    from workbench.refine import optimize_boxes

    belief = torch.tensor(record.meta["stand_in_belief"], dtype=torch.float64)[b : b + 1]
    return optimize_boxes(lambda x: matched_iou(x, belief), torch.from_numpy(record.boxes[b, :1]), **knobs)


KNOB_CHANGES = [{"step_size": 2.0}, {"step_scaling": "log", "step_size": 0.02}, {"iterations": 9, "early_stop": 0.0},
                {"early_stop": 0.02}, {"degeneration": -0.0005, "step_size": 3.0}]


@pytest.mark.parametrize("change", KNOB_CHANGES, ids=lambda c: ",".join(c))
def test_each_setting_reruns_algorithm2_with_it(record, change):
    from workbench.analysis.refinement import record_knobs, stand_in_rerun

    knobs = {**record_knobs(record.meta), **change}
    # The box on which these settings change the outcome most: a control that were ignored would show the record.
    moved = [np.abs(stand_in_reference(record, b, **knobs).trajectory[:, 0].numpy()[-1] - record.boxes[b, -1]).max()
             for b in range(len(record))]
    b = int(np.argmax(moved))
    assert moved[b] > 0.05 or knobs["iterations"] != record.boxes.shape[1] - 1
    stepper = RefinementStepper(record, rerun=stand_in_rerun(record))
    stepper.show_box(b)
    for name, value in change.items():  # as the browser does: one control at a time, each re-runs
        stepper.knob_controls[name].value = value
    expected = stand_in_reference(record, b, **knobs)
    steps = expected.trajectory[:, 0].numpy()  # (T + 1, 4)
    assert stepper.num_steps == knobs["iterations"] == stepper.slider.max
    for step in (0, 1, stepper.num_steps):
        stepper.show_step(step)
        np.testing.assert_allclose(trace(stepper.figure, "box at step").x, outline(steps[step])[0], atol=1e-9)
        assert readout_number(stepper.readout.value, "predicted IoU") == pytest.approx(float(expected.predicted[step, 0]), abs=6e-4)
        true = float(box_iou(torch.from_numpy(steps[step : step + 1]), torch.from_numpy(record.gt_box[b : b + 1]))[0, 0])
        assert readout_number(stepper.readout.value, "true IoU") == pytest.approx(true, abs=6e-4)
    np.testing.assert_allclose(trace(stepper.figure, "predicted IoU").y, expected.predicted[:, 0].numpy(), atol=1e-12)
    assert list(trace(stepper.figure, "predicted IoU").x) == list(range(knobs["iterations"] + 1))
    # The "stopped here" mark sits on the predicted-IoU line, at the step the re-run stopped.
    stop, reason = int(expected.stop_step[0]), int(expected.stop_reason[0])
    stopped = trace(stepper.figure, "stopped here")
    assert list(stopped.x) == ([stop] if reason else [])
    if reason:
        assert list(stopped.y) == [pytest.approx(float(expected.predicted[stop, 0]))]
    assert "re-run" in stepper.box_label.value
    shown = [tr for tr in stepper.figure.data if getattr(tr, "showlegend", True) is not False]
    assert all(tr.name and not re.fullmatch(r"trace \d+", tr.name) for tr in shown)
    # Back to the record's settings: the record is replayed again.
    stepper.reset_knobs()
    assert stepper.num_steps == record.boxes.shape[1] - 1 and "re-run" not in stepper.box_label.value
    stepper.show_step(stepper.num_steps)
    np.testing.assert_allclose(trace(stepper.figure, "box at step").x, outline(record.boxes[b, -1])[0])


def test_settings_follow_the_next_box_and_bad_settings_are_named(record):
    from workbench.analysis.refinement import record_knobs, stand_in_rerun

    stepper = RefinementStepper(record, rerun=stand_in_rerun(record))
    assert {name: c.value for name, c in stepper.knob_controls.items()} == record_knobs(record.meta)
    stepper.set_knobs(step_size=1.5, iterations=7)
    stepper.next_box()
    expected = stand_in_reference(record, stepper.box, **{**record_knobs(record.meta), "step_size": 1.5, "iterations": 7})
    np.testing.assert_allclose(stepper.shown.boxes[0], expected.trajectory[:, 0].numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="unknown settings"):
        stepper.set_knobs(lr=1.0)
    with pytest.raises(ValueError, match="pass rerun="):
        RefinementStepper(record).set_knobs(step_size=1.0)


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


# --- the NMS explorer and the suppression it explains ----------------------------------------------------


def cluster_results(seed: int = 0, images: int = 2, objects: int = 3, per_object: int = 6) -> tuple[list[dict], object]:
    """Random duplicates around a few objects per image, two categories, with ``iou_pred``; and their ground truth."""
    from workbench.data.coco import coco_from_dict

    rng = np.random.default_rng(seed)
    results, anns, image_list = [], [], []
    for image_id in range(1, images + 1):
        image_list.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.png"})
        for k in range(objects):
            x, y, w, h = rng.uniform(10, 100), rng.uniform(10, 100), rng.uniform(20, 60), rng.uniform(20, 60)
            category = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for _ in range(per_object):
                jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
                results.append({"image_id": image_id, "category_id": category,
                                "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                                "score": float(rng.uniform(0.05, 1)), "iou_pred": float(rng.uniform(0.3, 1))})
    gt = coco_from_dict({"images": image_list, "annotations": anns,
                         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})
    return results, gt


def image_tensors(results: list[dict], image_id: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """One image's detections as ``suppress`` takes them, built here (not by the library), with their positions."""
    positions = np.array([i for i, r in enumerate(results) if r["image_id"] == image_id])
    xywh = torch.tensor([results[i]["bbox"] for i in positions], dtype=torch.float64)
    return positions, {
        "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
        "scores": torch.tensor([results[i]["score"] for i in positions], dtype=torch.float64),
        "labels": torch.tensor([results[i]["category_id"] for i in positions]),
        "ious": torch.tensor([results[i]["iou_pred"] for i in positions], dtype=torch.float64),
    }


def greedy_reference(boxes: torch.Tensor, key: np.ndarray, labels: np.ndarray, threshold: float):
    """A slow greedy NMS that records who removed whom: (kept in selection order, {removed: (by, IoU)})."""
    alive, kept, removed = list(range(len(boxes))), [], {}
    while alive:
        top = max(alive, key=lambda i: (key[i], -i))  # highest key, ties to the lower index
        alive.remove(top)
        kept.append(top)
        for j in list(alive):
            iou = float(box_iou(boxes[top : top + 1], boxes[j : j + 1])[0, 0])
            if labels[j] == labels[top] and iou > threshold:
                alive.remove(j)
                removed[j] = (top, iou)
    return kept, removed


@pytest.mark.parametrize("method", ["none", "nms", "soft-nms", "iou-nms"])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_explorer_survivors_are_suppress_output(method, threshold):
    from workbench.postprocess import suppress
    from workbench.widgets import NMSExplorer

    results, gt = cluster_results()
    explorer = NMSExplorer(results, gt, max_detections=7, table_rows=len(results))  # every box listed, so every survivor drawn
    explorer.method_menu.value = method  # what the controls do in the browser
    explorer.threshold_slider.value = threshold
    for image_id in (1, 2):
        explorer.image_menu.value = image_id
        positions, det = image_tensors(results, image_id)
        expected = suppress({**det, "position": torch.from_numpy(positions)}, method, iou_threshold=threshold,
                            soft_iou_threshold=threshold, max_detections=7)
        np.testing.assert_array_equal(explorer.survivors, expected["position"].numpy())
        # The orange outlines are the survivors' boxes, in that order.
        kept = trace(explorer.figure, "survives")
        xs = [v for v in kept.x if v is not None]
        assert len(xs) == 5 * len(expected["boxes"])
        np.testing.assert_allclose(xs[::5], expected["boxes"][:, 0].numpy())
        assert f"<b>{len(expected['boxes'])}</b> of {len(positions)} boxes survive" in explorer.readout.value


@pytest.mark.parametrize("method", ["nms", "iou-nms"])
@pytest.mark.parametrize("seed", range(3))
def test_suppression_reasons_match_a_slow_greedy_reference(method, seed):
    from workbench.analysis.suppression import explain_suppression

    results, _ = cluster_results(seed, images=1, objects=4, per_object=8)
    _, det = image_tensors(results, 1)
    key = (det["ious"] if method == "iou-nms" else det["scores"]).numpy()
    kept, removed = greedy_reference(det["boxes"], key, det["labels"].numpy(), 0.5)
    why = explain_suppression(det, method, iou_threshold=0.5, max_detections=None)
    assert set(np.flatnonzero(why["kept"])) == set(kept)
    for j, (by, iou) in removed.items():
        assert why.loc[j, "by"] == by and why.loc[j, "overlap"] == pytest.approx(iou)
        assert why.loc[j, "why"].startswith(f"suppressed by #{by}: IoU {iou:.2f} > 0.5")
    assert (why.loc[why["kept"], "by"] == -1).all()
    if method == "iou-nms":  # each kept box takes the best score of the boxes it removed (Algorithm 1)
        for k in kept:
            cluster = [j for j, (by, _) in removed.items() if by == k]
            best = max([det["scores"][k].item(), *(det["scores"][j].item() for j in cluster)])
            assert why.loc[k, "new_score"] == pytest.approx(best)
            if best > det["scores"][k].item():
                assert f"takes score {best:.3f} from #{why.loc[k, 'score_from']}" in why.loc[k, "why"]


@pytest.mark.parametrize("method", ["none", "nms", "soft-nms", "iou-nms"])
def test_suppress_reports_the_ops_suppressors_and_keeps_its_output(method):
    from workbench.postprocess import suppress

    results, _ = cluster_results(2, images=1, objects=4, per_object=8)
    _, det = image_tensors(results, 1)
    det = {k: v.float() if v.is_floating_point() else v for k, v in det.items()}  # decided in float32, as the op does
    plain = suppress(det, method, soft_iou_threshold=0.3, max_detections=None)
    kept, suppressors = suppress(det, method, soft_iou_threshold=0.3, max_detections=None, return_suppressors=True)
    for key in plain:
        torch.testing.assert_close(kept[key], plain[key], rtol=0, atol=0)
    assert suppressors.dtype == torch.int64 and suppressors.shape == (len(det["boxes"]),)
    survivors = {tuple(b) for b in kept["boxes"].tolist()}
    for i, by in enumerate(suppressors.tolist()):
        box = tuple(det["boxes"][i].tolist())
        assert (by == -1) == (box in survivors)
        if by >= 0:  # removed by a box that survived, of its own class
            assert tuple(det["boxes"][by].tolist()) in survivors and det["labels"][by] == det["labels"][i]
            if method in ("nms", "iou-nms"):
                assert box_iou(det["boxes"][by : by + 1], det["boxes"][i : i + 1]).item() > 0.5


def test_cap_and_soft_nms_reasons():
    from workbench.analysis.suppression import explain_suppression

    results, _ = cluster_results(1, images=1)
    _, det = image_tensors(results, 1)
    why = explain_suppression(det, "nms", max_detections=2)
    assert why["kept"].sum() == 2 and why.loc[why["kept"], "rank"].tolist() == [0, 1]
    cut = why[why["why"].str.startswith("cut:")]
    assert len(cut) == len(explain_suppression(det, "nms", max_detections=None).query("kept")) - 2
    soft = explain_suppression(det, "soft-nms", max_detections=None, soft_iou_threshold=0.3)
    decayed = soft[soft["kept"] & (soft["new_score"] < soft["score"] - 1e-12)]
    assert len(decayed) and all(w.startswith("kept: score") and "largest overlap" in w for w in decayed["why"])


def test_explorer_table_hover_and_image_switch():
    from workbench.widgets import NMSExplorer

    results, gt = cluster_results()
    explorer = NMSExplorer(results, gt, method="iou-nms", table_rows=5)
    explorer.set_image(2)
    assert explorer.image_id == 2 and "image 2" in explorer.table.value
    assert len(explorer.listed) >= 5 and explorer.table.value.count("<tr") == 1 + len(explorer.listed)  # header + rows
    assert "suppressed by #" in explorer.table.value and "true IoU" in explorer.table.value
    # Ground truth drawn: three objects per image.
    assert sum(v is None for v in trace(explorer.figure, "ground truth").x) == 3
    hover = trace(explorer.figure, "hover · survives").text
    listed_survivors = int(explorer.explanation.loc[explorer.listed, "kept"].sum())
    assert len(hover) == listed_survivors and all("predicted IoU" in h and "kept:" in h for h in hover)
    explorer.set_method("none")
    assert len(explorer.survivors) == len(image_tensors(results, 2)[0])
    with pytest.raises(ValueError, match="no detections"):
        explorer.set_image(99)
    with pytest.raises(ValueError, match="method must be one of"):
        NMSExplorer([{k: v for k, v in r.items() if k != "iou_pred"} for r in results], method="iou-nms")


@pytest.mark.parametrize("seed", range(3))
def test_explorer_draws_and_numbers_exactly_the_listed_boxes(seed):
    from workbench.widgets import NMSExplorer

    results, gt = cluster_results(seed, images=1, objects=4, per_object=8)
    _, det = image_tensors(results, 1)
    scores, boxes = det["scores"].numpy(), det["boxes"].numpy()
    _, removed = greedy_reference(det["boxes"], scores, det["labels"].numpy(), 0.5)

    def expected(min_score: float, rows: int) -> set[int]:
        # The `rows` highest scores at or above min_score, plus the boxes that suppressed them (slow reference).
        top = [int(j) for j in np.argsort(-scores, kind="stable") if scores[j] >= min_score][:rows]
        return set(top) | {removed[j][0] for j in top if j in removed}

    explorer = NMSExplorer(results, gt, method="nms", table_rows=5)
    for min_score in (0.0, float(np.sort(scores)[-3])):
        explorer.set_min_score(min_score)
        listed = list(explorer.listed)
        assert set(listed) == expected(min_score, 5) and explorer.score_slider.value == min_score
        assert scores[listed].tolist() == sorted(scores[listed].tolist(), reverse=True)
        # Numbers on the boxes: the table's "#", at each listed box's top-left corner.
        numbers = trace(explorer.figure, "box numbers")
        assert list(numbers.text) == [str(i) for i in listed]
        np.testing.assert_allclose(numbers.x, boxes[listed, 0])
        np.testing.assert_allclose(numbers.y, boxes[listed, 1])
        # Drawn outlines: the listed boxes and no others (one None after each outline).
        drawn = [x for name in ("survives", "suppressed") for x in trace(explorer.figure, name).x]
        assert sum(v is None for v in drawn) == len(listed)
        assert sorted(x for x in drawn[::6]) == sorted(boxes[listed, 0].tolist())
        # The table lists the same boxes, and every box a reason names is among them.
        assert explorer.table.value.count("<tr") == 1 + len(listed)
        assert {int(j) for j in re.findall(r"#(\d+)", explorer.table.value)} <= set(listed)
    # Ground truth is drawn over the boxes, so crowded images do not hide it.
    names = [t.name for t in explorer.figure.data]
    assert names.index("ground truth") > max(names.index("survives"), names.index("suppressed"))
    with pytest.raises(ValueError, match="min score"):
        explorer.set_min_score(1.5)


def test_suppressed_better_boxes_finds_the_hand_built_case():
    from workbench.data.coco import coco_from_dict
    from workbench.analysis.suppression import suppressed_better_boxes

    gt = coco_from_dict({"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}],
                         "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}],
                         "categories": [{"id": 1, "name": "a"}]})
    # A: confident, shifted by 8 px (IoU 0.667 with the object); B: less confident, 2 px off (IoU 0.905);
    # IoU(A, B) = 0.739 > 0.5, so NMS keeps A and suppresses B. C: elsewhere, no duplicate.
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [18, 10, 40, 40], "score": 0.9, "iou_pred": 0.6},
        {"image_id": 1, "category_id": 1, "bbox": [12, 10, 40, 40], "score": 0.7, "iou_pred": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.8, "iou_pred": 0.5},
    ]
    pairs = suppressed_better_boxes(results, gt)
    assert len(pairs) == 1
    p = pairs.iloc[0]
    assert (p["kept"], p["better"], p["gt_id"]) == (0, 1, 7)
    assert p["kept_iou"] == pytest.approx(32 * 40 / (2 * 1600 - 32 * 40))
    assert p["better_iou"] == pytest.approx(38 * 40 / (2 * 1600 - 38 * 40))
    assert p["overlap"] == pytest.approx(34 * 40 / (2 * 1600 - 34 * 40))
    assert p["iou_gap"] == pytest.approx(p["better_iou"] - p["kept_iou"])
    np.testing.assert_allclose(p["kept_box"], [18, 10, 58, 50])
    # With the better box scored higher, NMS keeps it: nothing to show.
    results[1]["score"] = 0.95
    assert suppressed_better_boxes(results, gt).empty


# --- the other helpers of notebooks 02-06 ----------------------------------------------------------------


def test_jittered_training_boxes_are_the_iou_they_claim():
    from workbench.analysis.iou_prediction import jittered_training_boxes

    _, gt = cluster_results(images=2, objects=3)
    boxes = jittered_training_boxes(gt, [1, 2])
    assert len(boxes) == 6 * 16 and (boxes["iou"] >= 0.5).all()
    iou = box_iou(torch.tensor(boxes[["x0", "y0", "x1", "y1"]].to_numpy()),
                  torch.tensor(boxes[["gt_x0", "gt_y0", "gt_x1", "gt_y1"]].to_numpy())).diagonal().numpy()
    np.testing.assert_allclose(boxes["iou"], iou, atol=1e-12)
    # 16 slots per object dealt round-robin over 10 IoU bins: each bin gets 1 or 2 of each object's boxes.
    counts = np.histogram(boxes["iou"], bins=np.linspace(0.5, 1, 11))[0]
    assert counts.min() >= 6 and counts.max() <= 12


def test_training_log_and_prediction_error(tmp_path):
    from workbench.analysis.iou_prediction import iou_prediction_error
    from workbench.analysis.training_log import training_log

    lines = [{"iteration": 10, "lr": 0.004, "loss": 0.5, "loss_iou": 0.5}, {"iteration": 20, "lr": 0.01, "loss": 0.3, "loss_iou": 0.3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = training_log(tmp_path)
    assert list(log.index) == [10, 20] and log.loc[20, "loss_iou"] == 0.3
    matched = pd.DataFrame({"iou": [0.2, 0.55, 0.58, 0.95, 1.0], "iou_pred": [0.6, 0.65, 0.5, 0.9, 0.9]})
    table = iou_prediction_error(matched)
    assert table.loc["[0, 0.3)", "boxes"] == 1 and table.loc["[0, 0.3)", "bias"] == pytest.approx(0.4)
    assert table.loc["[0.5, 0.6)", "mean |error|"] == pytest.approx(round((0.1 + 0.08) / 2, 3))
    assert table.loc["[0.9, 1]", "boxes"] == 2 and table.loc["[0.9, 1]", "bias"] == pytest.approx(-0.075, abs=1e-3)
    assert table["boxes"].sum() == len(matched)


def test_train_longer_estimate_from_the_runs_own_log(tmp_path):
    from workbench.analysis.training_log import train_longer, training_speed

    runs = {}
    for kind, batch, rates in (("detector", 4, (8.0, 4.0, 4.0)), ("iou", 2, (20.0, 10.0, 2.0))):
        run = tmp_path / kind
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"batch_size": batch}))
        lines = [{"iteration": it, "loss": 1.0, "images_per_s": r} for it, r in zip((10, 20, 30), rates)]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs[kind] = run
    # detector: 0.5, 1, 1 s per iteration over three windows of 10; iou: 0.1, 0.2, 1.
    assert training_speed(runs["detector"]) == {"iterations": 30, "batch_size": 4, "seconds_per_iteration": 1.0, "seconds": 25.0}
    table = train_longer(runs, 100)
    assert table.loc["iou", "seconds per iteration"] == pytest.approx(0.2)
    assert table.loc["iou", "measured seconds"] == pytest.approx(13.0)
    assert table.loc["detector", "estimated seconds"] == pytest.approx(100.0)
    assert table.loc["all", "estimated seconds"] == pytest.approx(120.0)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        train_longer(runs, 0)
    (runs["iou"] / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        training_speed(runs["iou"])


def test_refinement_runs_and_speed_from_a_hand_built_output():
    from workbench.analysis import paper_numbers as paper
    from workbench.analysis import speed_comparison
    from workbench.analysis.experiments import refinement_runs
    from workbench.pipeline import PipelineOutput

    sets = {f"nms+refine/{t}": [t] for t in range(3)} | {f"nms+regress/{t}": [10 + t] for t in range(2)} | {"nms": [], "raw": []}
    seconds = {"detector (backbone + heads)": [0.2, 0.4], "IoU-Net (predict IoU)": [0.1, 0.1], "nms": [0.01, 0.03],
               "iou-nms": [0.02, 0.02], "refinement (iou-nms)": [0.05, 0.05], "joint IoU-Net (backbone + heads + IoU)": [0.3, 0.3]}
    output = PipelineOutput(sets=sets, seconds=seconds)
    runs = refinement_runs(output)
    assert runs == {"optimization (IoU-Net)": [[0], [1], [2]], "iterative regression": [[10], [11]]}
    speed = speed_comparison(output)
    assert speed.loc["FPN", "ours (s / image)"] == pytest.approx(0.3 + 0.02)
    assert speed.loc["IoU-Net", "ours (s / image)"] == pytest.approx(0.3 + 0.02 + 0.05)
    assert speed.loc["IoU-Net / FPN", "paper (s / image, Titan X)"] == pytest.approx(
        paper.TABLE4_SECONDS_PER_IMAGE["IoU-Net"] / paper.TABLE4_SECONDS_PER_IMAGE["FPN"])


def test_fast_options_live_under_the_root_and_nothing_is_cached_yet(tmp_path):
    from workbench.reproduce import pipeline_cache_path
    from workbench.results import reproduce_options

    opts = reproduce_options("neon-trees", fast=True, root=tmp_path)
    assert opts.preset == "shapes"
    for path in (opts.out_dir, opts.runs_dir, opts.cache_dir):
        assert Path(path).is_relative_to(tmp_path / "cache" / "notebooks")
    assert pipeline_cache_path(opts) is None  # nothing trained under tmp_path
    cli = reproduce_options("neon-trees")  # exactly `python -m workbench reproduce --config neon-trees`
    assert (cli.preset, cli.out_dir, cli.runs_dir, cli.cache_dir, cli.overrides) == ("neon-trees", "", "runs", "cache/pipeline", [])
