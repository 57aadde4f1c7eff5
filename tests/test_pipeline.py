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
