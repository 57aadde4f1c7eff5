"""The lab-then-real-data helpers of notebooks 03-05: object size against the IoU scale, and loading both runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench import results as results_module
from workbench.analysis import localization_correlation
from workbench.analysis.label_noise import describe_label_noise, label_noise_table, object_sizes, shift_tolerance
from workbench.data.coco import coco_from_dict
from workbench.ops import box_iou


def coco(boxes_xywh: list[list[float]]):
    return coco_from_dict({
        "images": [{"id": 1, "width": 200, "height": 200, "file_name": "1.jpg"}],
        "categories": [{"id": 1, "name": "tree"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": float(b[2] * b[3]), "iscrowd": 0}
                        for k, b in enumerate(boxes_xywh)],
    })


@pytest.mark.parametrize("size, iou", [(40.0, 0.9), (12.0, 0.75), (100.0, 0.5)])
def test_shift_tolerance_is_the_last_shift_above_the_iou(size, iou):
    # Oracle: shift a square along x on a fine grid and ask box_iou where it drops below the threshold.
    shifts = np.arange(0, size, 1e-3)
    boxes = torch.tensor([[d, 0.0, size + d, size] for d in shifts], dtype=torch.float64)
    ious = box_iou(boxes, torch.tensor([[0.0, 0.0, size, size]], dtype=torch.float64))[:, 0].numpy()
    last = shifts[ious >= iou - 1e-12].max()
    assert float(shift_tolerance(size, iou)) == pytest.approx(last, abs=1.5e-3)
    with pytest.raises(ValueError, match="iou"):
        shift_tolerance(size, 0.0)


def test_object_sizes_are_geometric_means_of_width_and_height():
    np.testing.assert_allclose(object_sizes(coco([[0, 0, 40, 10], [5, 5, 30, 30]])), [20.0, 30.0])
    assert object_sizes(coco([])).shape == (0,)


def test_table_and_description_from_the_measured_numbers():
    gt = coco([[0, 0, 100, 100]])
    # Detections [0, 0, 100, h]: IoU h / 100 against the one object; the predicted IoU is 0.2 + 0.5 IoU.
    heights = [60, 70, 80, 90, 95]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, h], "score": 0.5 + 0.01 * (k % 2),
             "iou_pred": 0.2 + 0.5 * h / 100} for k, h in enumerate(heights)]
    corr = localization_correlation(dets, gt)
    lab_gt = coco([[0, 0, 40, 40], [0, 0, 60, 60], [0, 0, 200, 200]])
    table = label_noise_table({"lab": (lab_gt, corr), "real": (gt, corr)})
    assert table.loc["lab", "objects"] == 3 and table.loc["lab", "median size (px)"] == 60.0
    assert table.loc["real", "shift at IoU 0.9 (px)"] == pytest.approx(100 * 0.1 / 1.9)
    slope = np.polyfit(0.2 + 0.5 * np.array(heights) / 100, np.array(heights) / 100, 1)[0]
    assert table.loc["real", "calibration slope"] == pytest.approx(slope)  # 2.0: true IoU per unit predicted
    assert table.loc["real", "r predicted IoU"] == pytest.approx(corr.r_iou_pred)
    text = describe_label_noise(table, "lab", "real")
    assert "60 px on *lab*" not in text and "60 px across on *lab*" in text and "100 px on *real*" in text
    assert f"{60 * 0.1 / 1.9:.1f} px and {100 * 0.1 / 1.9:.1f} px" in text and f"{slope:.2f} on *real*" in text
    assert "holds" not in text  # verdicts come from analysis.claims only


def test_dataset_results_loads_each_dataset_and_fast_mode_once(monkeypatch):
    calls = []
    monkeypatch.setattr(results_module, "pipeline_results", lambda dataset="neon-trees", fast=False, root=None: calls.append((dataset, fast)) or object())
    runs = results_module.dataset_results(("shapes", "neon-trees"))
    assert list(runs) == ["shapes", "neon-trees"] and calls == [("shapes", False), ("neon-trees", False)]
    calls.clear()
    runs = results_module.dataset_results(("shapes", "neon-trees"), fast=True)
    assert len(calls) == 1 and calls[0][1] is True and runs["shapes"] is runs["neon-trees"]
    with pytest.raises(ValueError, match="datasets"):
        results_module.dataset_results(())
    assert "stands in" in results_module.run_label("neon-trees", True) and results_module.run_label("shapes", False) == "shapes"


def test_a_missing_cache_names_the_command_that_creates_it(monkeypatch, tmp_path, capsys):
    class Stop(Exception):
        pass

    def stop(opts):
        raise Stop

    monkeypatch.setattr(results_module.reproduce, "pipeline_cache_path", lambda opts: None)
    monkeypatch.setattr(results_module.reproduce, "pipeline_output", stop)
    with pytest.raises(Stop):
        results_module.pipeline_results("neon-trees", root=tmp_path)
    out = capsys.readouterr().out
    assert "python -m workbench reproduce --config neon-trees" in out and "make run" in out
