"""Post-processing on hand-built detections, and the whole `reproduce` command on a tiny config."""

from __future__ import annotations

import json
import time

import pytest
import torch

from workbench.pipeline import PipelineSettings
from workbench.postprocess import suppress
from workbench.reproduce import ReproduceOptions, reproduce

# Two detections of one tree plus one of another tree, class 1, and one box of class 2 on top of
# the first cluster. IoU(A, B) = 80 / 120 = 0.667 > 0.5 (A = [0, 0, 10, 10], B = [0, 2, 10, 12]:
# intersection 10 x 8 = 80, union 100 + 100 - 80 = 120); C is far away; D overlaps A but is
# another class.
CLUSTER = {
    "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 2, 10, 12], [50, 50, 60, 60], [0, 0, 10, 10]]),
    "scores": torch.tensor([0.9, 0.6, 0.5, 0.4]),  # A is the most confident ...
    "ious": torch.tensor([0.55, 0.95, 0.8, 0.7]),  # ... B the best localized
    "labels": torch.tensor([1, 1, 1, 2]),
}


def test_iou_guided_nms_keeps_the_best_localized_box_with_the_clusters_best_score():
    kept = suppress(CLUSTER, "iou-nms", iou_threshold=0.5)
    # B survives (highest predicted IoU of its cluster) and takes A's score 0.9; C and D stay.
    got = {tuple(b.tolist()): s for b, s in zip(kept["boxes"], kept["scores"].tolist())}
    assert got == {(0.0, 2.0, 10.0, 12.0): pytest.approx(0.9), (50.0, 50.0, 60.0, 60.0): pytest.approx(0.5),
                   (0.0, 0.0, 10.0, 10.0): pytest.approx(0.4)}
    assert kept["labels"].tolist() == [1, 1, 2]  # sorted by new score: B (0.9), C (0.5), D (0.4)
    assert kept["ious"].tolist() == pytest.approx([0.95, 0.8, 0.7])


def test_nms_keeps_the_most_confident_box_and_no_nms_keeps_all():
    kept = suppress(CLUSTER, "nms", iou_threshold=0.5)
    assert kept["boxes"].tolist() == [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]]
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.5, 0.4])
    assert len(suppress(CLUSTER, "none")["boxes"]) == 4
    assert suppress(CLUSTER, "none", max_detections=2)["scores"].tolist() == pytest.approx([0.9, 0.6])


def test_soft_nms_decays_instead_of_removing():
    kept = suppress(CLUSTER, "soft-nms", soft_iou_threshold=0.3)
    # Linear decay of B by A: 0.6 * (1 - 2/3) = 0.2.
    scores = dict(zip(map(tuple, kept["boxes"].tolist()), kept["scores"].tolist()))
    assert scores[(0.0, 2.0, 10.0, 12.0)] == pytest.approx(0.2, abs=1e-6)
    assert len(kept["boxes"]) == 4


def test_bad_method_and_missing_ious_are_named():
    with pytest.raises(ValueError, match="method"):
        suppress(CLUSTER, "greedy")
    with pytest.raises(ValueError, match="ious"):
        suppress({k: v for k, v in CLUSTER.items() if k != "ious"}, "iou-nms")


EXPECTED_FILES = [
    "report.md", "numbers.json", "trajectories.npz", "trajectories.json",
    *[f"{name}.{ext}" for name in ("fig2_iou_vs_confidence", "fig3_positives_per_iou", "fig4_ap_per_iteration",
                                   "fig6_pooling", "fig7_recall_vs_iou") for ext in ("png", "svg")],
    *[f"{name}.{ext}" for name in ("table1_nms", "table2_refinement", "table3_joint", "table4_timing",
                                   "fig3_positives_per_iou", "fig7_recall_vs_iou") for ext in ("csv", "md")],
]


@pytest.mark.slow
def test_reproduce_end_to_end_on_a_tiny_config_then_from_cache(tmp_path):
    opts = ReproduceOptions(
        preset="shapes",
        overrides=[f"data.root={tmp_path / 'data'}", "data.options.num_train=8", "data.options.num_val=3",
                   "data.options.image_size=96", "model.min_size=96", "model.max_size=96", "batch_size=2",
                   "checkpoint_interval=2"],
        iterations={"detector": 3, "iou": 3, "joint": 3},
        settings=PipelineSettings(score_thresh=0.0, refine_iterations=2, regression_iterations=2),
        out_dir=str(tmp_path / "reports"), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
    )
    start = time.perf_counter()
    out = reproduce(opts)
    first = time.perf_counter() - start
    missing = [name for name in EXPECTED_FILES if not (out / name).is_file()]
    assert not missing, f"reproduce did not write {missing}"
    report = (out / "report.md").read_text()
    for heading in ("Fig. 2", "Fig. 3", "Fig. 4", "Fig. 6", "Fig. 7", "Table 1", "Table 2", "Table 3", "Table 4"):
        assert heading in report
    numbers = json.loads((out / "numbers.json").read_text())

    # Everything cached: no training, no inference; the same numbers.
    start = time.perf_counter()
    reproduce(opts)
    second = time.perf_counter() - start
    assert json.loads((out / "numbers.json").read_text()) == numbers
    assert second < first
