"""The trained models on one image (``workbench.inference``), against the pipeline's own output for the same
image, and Algorithm 2 re-run for one recorded box (the refinement stepper's settings) against
``optimize_boxes`` called here on the dataset's own image tensor. They use the tiny fast-mode run the
notebook tests use (``fast_root``: trained once per session, ~1 min on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from workbench import reproduce
from workbench.analysis.refinement import record_knobs
from workbench.inference import box_rerun, detect, example_image, image_tensor, plot_detections, trained_models
from workbench.ops.boxes import matched_iou
from workbench.refine import optimize_boxes
from workbench.results import pipeline_results, reproduce_options
from workbench.widgets import RefinementStepper


@pytest.fixture(scope="module")
def run(fast_root):
    root = fast_root
    results = pipeline_results(fast=True, root=root)
    return root, results, trained_models(fast=True, root=root)


def coco_xyxy(results: list[dict]) -> np.ndarray:
    return box_convert(torch.tensor([r["bbox"] for r in results], dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy").numpy()


def test_detect_gives_the_pipelines_boxes_for_a_dataset_image(run):
    root, results, models = run
    sets, s = results.output.sets, models.settings
    image_id = results.output.image_ids[1]
    path = results.img_dir / results.coco_gt.imgs[image_id]["file_name"]
    found = detect(path, models=models)
    kept = [r for r in sets["iou-nms"] if r["image_id"] == image_id]
    assert len(found) == len(kept) > 0
    np.testing.assert_allclose(found[["x0", "y0", "x1", "y1"]].to_numpy(), coco_xyxy(kept), atol=1e-3)
    np.testing.assert_allclose(found["score"], [r["score"] for r in kept], atol=1e-5)
    assert list(found["category_id"]) == [r["category_id"] for r in kept]
    names = {c["id"]: c["name"] for c in results.coco_gt.cats.values()}
    assert list(found["class"]) == [names[r["category_id"]] for r in kept]
    # The predicted IoU of each kept box is the one the pipeline gave that raw detection.
    raw = [r for r in sets["raw"] if r["image_id"] == image_id]
    raw_boxes = coco_xyxy(raw)
    for _, row in found.iterrows():
        j = int(np.abs(raw_boxes - row[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)).max(axis=1).argmin())
        assert row["predicted IoU"] == pytest.approx(raw[j]["iou_pred"], abs=1e-4)
    refined = [r for r in sets[f"iou-nms+refine/{s.refine_iterations}"] if r["image_id"] == image_id]
    np.testing.assert_allclose(found[["refined x0", "refined y0", "refined x1", "refined y1"]].to_numpy()[: len(refined)],
                               coco_xyxy(refined), atol=1e-3)
    # The same pixels as an array give the same boxes; the nms method keeps the pipeline's NMS set.
    again = detect(np.asarray(Image.open(path).convert("RGB")), models=models)
    np.testing.assert_allclose(again[["x0", "y0", "x1", "y1"]].to_numpy(), found[["x0", "y0", "x1", "y1"]].to_numpy(), atol=1e-5)
    by_nms = detect(path, models=models, method="nms")
    np.testing.assert_allclose(by_nms[["x0", "y0", "x1", "y1"]].to_numpy(),
                               coco_xyxy([r for r in sets["nms"] if r["image_id"] == image_id]), atol=1e-3)
    assert example_image(models).is_file()
    assert len(plot_detections(path, found, top=3).axes[0].patches) == 2 * min(3, len(found))


def test_bad_images_are_named(run, tmp_path):
    _, _, models = run
    with pytest.raises(FileNotFoundError, match="image: no file at"):
        detect(tmp_path / "missing.png", models=models)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        detect(tmp_path / "text.png", models=models)
    with pytest.raises(ValueError, match=r"image: expected an RGB array of shape \(H, W, 3\), got shape \(8, 8\)"):
        image_tensor(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"image: expected an RGB array of shape \(H, W, 3\), got shape \(8, 8, 4\)"):
        image_tensor(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="image: expected dtype uint8 .*got float32"):
        image_tensor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="image: expected a file path"):
        image_tensor([[0, 0, 0]])
    with pytest.raises(ValueError, match="method must be one of"):
        detect(np.zeros((8, 8, 3), np.uint8), models=models, method="soft")


def test_rerun_reproduces_the_record_and_follows_every_setting(run):
    root, results, models = run
    record = results.output.trajectories
    knobs = record_knobs(record.meta)
    assert knobs["step_size"] == models.settings.refine_step_size
    rerun = box_rerun(record, models)
    with pytest.raises(ValueError, match="models: a pipeline record re-runs with the IoU-Net that made it"):
        box_rerun(record)
    # The dataset's own image tensor and the IoU-Net called here, not through the module under test.
    opts = reproduce_options(fast=True, root=root)
    val = reproduce.validation_set(opts)
    b = int(np.argmax(np.abs(record.boxes[:, -1] - record.boxes[:, 0]).max(axis=1)))  # the box that moved most
    image, _ = val[val.image_ids.index(int(record.image_id[b]))]
    label = torch.tensor([val.cat_id_to_label[int(record.category_id[b])]])
    with torch.no_grad():
        feats = models.iou_net.extract_features([image])

    def reference(**k):
        return optimize_boxes(lambda x: models.iou_net.predict_iou(feats, [x], [label])[0],
                              torch.tensor(record.boxes[b, :1], dtype=torch.float32), image_size=tuple(image.shape[1:]), **k)

    same = rerun(b, knobs)
    np.testing.assert_allclose(same.boxes[0], record.boxes[b], atol=1e-3)
    np.testing.assert_allclose(same.predicted_iou[0], record.predicted_iou[b], atol=1e-4)
    np.testing.assert_allclose(same.true_iou[0], record.true_iou[b], atol=1e-4)
    stepper = RefinementStepper(record, rerun=rerun)
    stepper.show_box(b)
    for change in ({"step_size": knobs["step_size"] * 40}, {"step_scaling": "width", "step_size": 5.0},
                   {"iterations": 9, "early_stop": 0.0}):
        stepper.set_knobs(**change)
        expected = reference(**stepper.knobs)
        shown = stepper.shown
        np.testing.assert_allclose(shown.boxes[0], expected.trajectory[:, 0].double().numpy(), atol=1e-4)
        np.testing.assert_allclose(shown.predicted_iou[0], expected.predicted[:, 0].double().numpy(), atol=1e-5)
        assert stepper.num_steps == stepper.knobs["iterations"] == stepper.slider.max
        truth = matched_iou(expected.trajectory[:, 0].double(), torch.from_numpy(record.gt_box[b : b + 1]))
        if np.isfinite(record.gt_box[b]).all():
            np.testing.assert_allclose(shown.true_iou[0], truth.numpy(), atol=1e-5)
        stepper.reset_knobs()
    assert not np.allclose(reference(**{**knobs, "step_size": knobs["step_size"] * 40}).trajectory[-1, 0].numpy(),
                           record.boxes[b, -1], atol=1e-3), "the test box must move differently with a larger λ"
