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

    # Everything cached: no training, no inference, the report kept as it is; the same numbers.
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    reproduce(opts)
    second = time.perf_counter() - start
    assert json.loads((out / "numbers.json").read_text()) == numbers
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert second < first
    # A report file changed by hand is not trusted: the report is written again, the same.
    (out / "report.md").write_text("edited")
    reproduce(opts)
    assert (out / "report.md").read_text() == report


def _tiny_shapes(tmp_path, **kwargs) -> ReproduceOptions:
    defaults = dict(out_dir=str(tmp_path / "reports"), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    return ReproduceOptions(
        preset="shapes",
        overrides=[f"data.root={tmp_path / 'data'}", "data.options.num_train=6", "data.options.num_val=3",
                   "data.options.image_size=96", "model.min_size=96", "model.max_size=96", "batch_size=2"],
        iterations={"detector": 2, "iou": 2},
        # No cap on raw detections: near-tied scores at a cap could differ between processes.
        settings=PipelineSettings(score_thresh=0.0, raw_max_detections=10**6, refine_iterations=1,
                                  regression_iterations=1),
        joint=False, **{**defaults, **kwargs},
    )


@pytest.mark.slow
def test_coco_preset_runs_unchanged_on_a_tiny_coco_format_fixture(tmp_path):
    # The MS-COCO config (ResNet-50 FPN, the paper's schedule shape) pointed at small COCO files:
    # only paths, sizes and lengths change. ResNet-50 starts from random weights (ImageNet weights
    # need a download this machine cannot make).
    from workbench.data import prepare_dataset

    root = prepare_dataset("shapes", tmp_path / "data", seed=3, num_train=4, num_val=2, image_size=96)
    opts = ReproduceOptions(
        preset="coco",
        overrides=[f"data.options.ann_file={root / 'annotations' / 'train.json'}",
                   f"data.options.img_dir={root / 'images'}", "model.pretrained_backbone=false",
                   "model.min_size=96", "model.max_size=96", "batch_size=2", "num_workers=0"],
        val_overrides=[f"data.options.ann_file={root / 'annotations' / 'val.json'}"],
        iterations={"detector": 2, "iou": 2},
        settings=PipelineSettings(score_thresh=0.0, refine_iterations=1, regression_iterations=1),
        out_dir=str(tmp_path / "reports"), runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
        joint=False,
    )
    out = reproduce(opts)
    assert (out / "table1_nms.csv").is_file() and (out / "report.md").is_file()
    ckpt = torch.load(next((tmp_path / "runs").glob("coco-detector-*/ckpt.pt")), weights_only=True)
    assert ckpt["config"]["model"]["backbone"] == "resnet50"


@pytest.mark.slow
def test_evaluation_sharded_over_two_ranks_equals_one_process(tmp_path):
    # Train once in this process; then evaluate the same checkpoints under torchrun with two gloo
    # ranks (each takes every other image, rank 0 gathers): the detections must be the same.
    import os
    import socket
    import subprocess
    import sys

    reproduce(_tiny_shapes(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = _tiny_shapes(tmp_path, cache_dir=str(tmp_path / "cache-ddp"), out_dir=str(tmp_path / "reports-ddp"))
    payload = {**opts.__dict__, "settings": opts.settings.as_dict()}
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import json, sys\n"
        "from workbench.pipeline import PipelineSettings\n"
        "from workbench.reproduce import ReproduceOptions, reproduce\n"
        "o = ReproduceOptions(**json.loads(sys.argv[1]))\n"
        "o.settings = PipelineSettings(**o.settings)\n"
        "reproduce(o)\n"
    )
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(script), json.dumps(payload)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    one = torch.load(next((tmp_path / "cache").glob("*.pt")), weights_only=False)
    two = torch.load(next((tmp_path / "cache-ddp").glob("*.pt")), weights_only=False)
    assert sorted(two.image_ids) == sorted(one.image_ids)
    assert set(two.sets) == set(one.sets)

    def rows(results, image_id):
        return torch.tensor([(r["score"], *r["bbox"]) for r in results if r["image_id"] == image_id],
                            dtype=torch.float64).reshape(-1, 5)

    # Two processes may round the last bit differently (their thread counts differ), which can swap
    # near-tied scores; so compare as sets: every detection has a twin within tolerance.
    for name in one.sets:
        for image_id in one.image_ids:
            a, b = rows(one.sets[name], image_id), rows(two.sets[name], image_id)
            assert a.shape == b.shape, (name, image_id)
            if len(a):
                distance = torch.cdist(a, b, p=float("inf"))
                assert distance.min(1).values.max() < 1e-3 and distance.min(0).values.max() < 1e-3, (name, image_id)
    assert len(two.trajectories) == len(one.trajectories)


# ============================================================ reuse of features and of refined boxes


class _AnalyticIoU:
    """Stands in for an IoU-Net: the IoU of each box with the target of its own class, box by box."""

    def __init__(self, targets: dict[int, torch.Tensor]) -> None:
        self.targets = targets

    def predict_iou(self, feats, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
        b = boxes[0]
        t = torch.stack([self.targets[int(label)] for label in labels[0]]) if len(b) else b.new_zeros(0, 4)
        inter = (torch.min(b[:, 2:], t[:, 2:]) - torch.max(b[:, :2], t[:, :2])).clamp(min=0).prod(1)
        union = (b[:, 2:] - b[:, :2]).prod(1) + (t[:, 2:] - t[:, :2]).prod(1) - inter
        return [inter / union]


def _refinement_fields(result) -> dict[str, torch.Tensor]:
    return {f: getattr(result, f) for f in ("boxes", "scores", "trajectory", "predicted", "gradients",
                                            "stop_step", "stop_reason")}


@pytest.mark.parametrize("case", ["overlapping", "nothing refined before", "everything refined before", "empty"])
def test_refining_only_the_boxes_not_refined_before_gives_the_full_refinement(case):
    from workbench.models import FeatureBatch
    from workbench.pipeline import _refine_reusing, _refine_steps

    model = _AnalyticIoU({1: torch.tensor([10.0, 10.0, 50.0, 60.0], dtype=torch.float64),
                          2: torch.tensor([30.0, 20.0, 90.0, 70.0], dtype=torch.float64)})
    feats = FeatureBatch(images=None, features={}, original_sizes=[(100, 120)])  # the analytic model reads no maps
    s = PipelineSettings(refine_top=6, refine_iterations=4, refine_step_size=0.5, refine_step_scaling="width",
                         refine_early_stop=1e-4)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=gen, dtype=torch.float64) * 40
    pool = torch.cat([xy, xy + 20 + torch.rand(8, 2, generator=gen, dtype=torch.float64) * 30], 1)
    labels = torch.tensor([1, 2, 1, 2, 1, 2, 1, 2])
    pool_labels = labels.clone()
    pool_labels[1] = 1  # row 1 below comes once with each label: the label is part of what a box is
    nms_rows, earlier_rows = {
        "overlapping": ([0, 1, 2, 3, 4, 5, 6], [5, 8, 0, 3, 7]),  # 8: row 1 with the other label
        "nothing refined before": ([0, 1, 2], [4, 5]),
        "everything refined before": ([3, 0, 2], [0, 2, 3, 6]),
        "empty": ([0, 1], []),
    }[case]
    boxes = torch.cat([pool, pool[1:2]])
    box_labels = torch.cat([pool_labels, labels[1:2]])

    def det(rows):
        rows = torch.tensor(rows, dtype=torch.long)
        return {"boxes": boxes[rows], "labels": box_labels[rows], "scores": torch.linspace(1, 0.5, len(rows))}

    earlier = _refine_steps(model, feats, det(earlier_rows), s)
    top, reused = _refine_reusing(model, feats, det(nms_rows), earlier, s)
    expected_top, expected = _refine_steps(model, feats, det(nms_rows), s)
    assert all(torch.equal(top[k], expected_top[k]) for k in expected_top)
    assert len(top["boxes"]) == min(len(nms_rows), s.refine_top)
    for name, value in _refinement_fields(expected).items():
        assert torch.equal(_refinement_fields(reused)[name], value), name
    assert expected.trajectory.shape[1] == 0 or not torch.equal(expected.trajectory[0], expected.trajectory[-1])


def _tiny_models_and_data(tmp_path):
    from workbench.data import CocoDetection, prepare_dataset
    from workbench.models import StandaloneIoUNet, build_detector

    root = prepare_dataset("shapes", tmp_path / "data", seed=5, num_train=1, num_val=2, image_size=96)
    val = CocoDetection(root / "annotations" / "val.json", root / "images")
    torch.manual_seed(0)
    detector = build_detector(val.num_classes, pretrained_backbone=False, min_size=96, max_size=96,
                              rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=40).eval()
    return val, detector, StandaloneIoUNet(detector=detector).eval()


@pytest.mark.slow
def test_pipeline_reuses_the_detectors_maps_and_gives_what_recomputing_them_gives(tmp_path, monkeypatch):
    import workbench.pipeline as pipeline

    val, detector, iou_net = _tiny_models_and_data(tmp_path)
    settings = PipelineSettings(score_thresh=0.0, raw_max_detections=30, refine_top=10, refine_iterations=2,
                                regression_iterations=1)
    grads = [p.requires_grad for p in iou_net.parameters()]
    computed = []
    extract = type(iou_net).extract_features
    monkeypatch.setattr(type(iou_net), "extract_features", lambda self, *a, **k: computed.append(1) or extract(self, *a, **k))
    shared = pipeline.run_pipeline(val, detector, iou_net, settings)
    assert not computed  # the IoU-Net's frozen copy of the backbone never ran
    assert [p.requires_grad for p in iou_net.parameters()] == grads and any(grads)  # restored after the run

    monkeypatch.setattr(pipeline, "same_features", lambda a, b: False)
    recomputed = pipeline.run_pipeline(val, detector, iou_net, settings)
    assert len(computed) == len(val)
    assert shared.sets.keys() == recomputed.sets.keys() and len(shared.sets["raw"]) > 0
    for name in shared.sets:  # the same maps, so the same numbers, bit for bit
        assert shared.sets[name] == recomputed.sets[name], name
    assert "IoU-Net (predict IoU)" in shared.seconds and pipeline.NMS_REFINE_STAGE in shared.seconds
