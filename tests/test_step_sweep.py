"""The held-out ``tune`` split of ``shapes`` and the refinement step sweep on it (``workbench.analysis.step_sweep``).

The sweep is checked against the pipeline itself (its NMS set and its refinement at the default step) and
against ``optimize_boxes`` called here with each grid point's reading and λ, on a tiny fast-mode run
trained under a temporary root (~1 min on 2 cores)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workbench.analysis.cocoeval import coco_ap
from workbench.analysis.step_sweep import AP90_TIE, choose, grid_points, nms_starts, sweep
from workbench.config import apply_overrides
from workbench.data import get_dataset, prepare_dataset
from workbench.data.folder import read_manifest
from workbench.data.shapes import MAX_OBJECTS, MIN_OBJECTS, draw_scene
from workbench.models import to_coco_results
from workbench.pipeline import PipelineSettings, run_pipeline
from workbench.refine import CONVERGED, DEGENERATED, RUNNING, optimize_boxes
from workbench.reproduce import load_model, stages, trained
from workbench.results import reproduce_options
from workbench.train import build_dataset

# --------------------------------------------------------------------------------------- the tune split


def _pixel_digests(dataset) -> set[str]:
    return {hashlib.sha256(np.asarray(Image.open(dataset.img_dir / img["file_name"])).tobytes()).hexdigest()
            for img in dataset.coco.dataset["images"]}


def test_tune_split_is_new_images_of_the_same_generator_and_leaves_train_val_alone(tmp_path):
    options = dict(seed=0, num_train=40, num_val=20, image_size=64)
    folder = prepare_dataset("shapes", tmp_path, **options)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    tune = get_dataset("shapes", "tune", tmp_path, num_tune=20, **options)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # its own folder: train/val untouched
    assert tune.ann_file.parents[1].name == "shapes-seed0-tune20-64px" and len(tune) == 20

    train, val = (get_dataset("shapes", s, tmp_path, **options) for s in ("train", "val"))
    digests = {name: _pixel_digests(ds) for name, ds in (("train", train), ("val", val), ("tune", tune))}
    assert len(digests["tune"]) == 20  # no two tune images alike either
    assert not digests["tune"] & (digests["train"] | digests["val"])
    # Image i is the generator's scene for the seed (seed, 2, i), as train's are (seed, 0, i) and val's (seed, 1, i).
    for index in (0, 7):
        scene = draw_scene(np.random.default_rng([0, 2, index]), 64)
        image_id = index + 1
        assert np.array_equal(np.asarray(Image.open(tune.img_dir / tune.coco.imgs[image_id]["file_name"])), scene.pixels)
        assert tune.target(image_id)["boxes"].tolist() == [list(map(float, b)) for b in scene.boxes]
    counts = [len(tune.coco.imgToAnns[i]) for i in tune.image_ids]
    assert min(counts) >= MIN_OBJECTS - 1 and max(counts) <= MAX_OBJECTS
    assert read_manifest(tune.ann_file.parents[1])["splits"] == {"tune": {"images": 20, "boxes": sum(counts)}}


def test_tune_split_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="num_tune must be an integer >= 0"):
        get_dataset("shapes", "tune", tmp_path, num_tune=-1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_images'\]"):
        get_dataset("shapes", "tune", tmp_path, num_images=3)
    with pytest.raises(ValueError, match=r"unknown split 'test' for 'shapes'; expected one of \['train', 'val', 'tune'\]"):
        get_dataset("shapes", "test", tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'tune' for 'neon-trees'"):
        get_dataset("neon-trees", "tune", tmp_path)


# --------------------------------------------------------------------------------------- the rule


def _table(ap90: list[float], ap: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"reading": ["width", "width", "log", "log"][: len(ap)], "λ": np.arange(len(ap), dtype=float),
                         "AP": ap, "AP90": ap90})


def test_choose_takes_the_best_ap90_even_with_a_lower_ap():
    assert choose(_table([0.10, 0.20, 0.15], [0.50, 0.40, 0.48])) == 1


def test_choose_breaks_ap90_ties_by_ap():
    half = AP90_TIE / 2
    # Rows 1 and 2 are within the tie margin of the best AP90 (row 1); row 2 has the higher AP. Row 3 has
    # the highest AP but its AP90 is more than the margin below the best.
    table = _table([0.10, 0.20, 0.20 - half, 0.20 - 2 * AP90_TIE], [0.50, 0.40, 0.45, 0.60])
    assert choose(table) == 2
    # Outside the margin it is no longer a tie.
    table.loc[2, "AP90"] = 0.20 - 1.5 * AP90_TIE
    assert choose(table) == 1
    # Equal AP90 and equal AP: the earlier row.
    assert choose(_table([0.2, 0.2], [0.4, 0.4])) == 0


def test_choose_refuses_missing_numbers():
    with pytest.raises(ValueError, match="finite AP and AP90"):
        choose(_table([0.1, float("nan")], [0.4, 0.5]))
    with pytest.raises(ValueError, match="at least one row"):
        choose(_table([], []))


def test_grid_always_measures_the_current_default():
    s = PipelineSettings(refine_step_scaling="log", refine_step_size=0.05)
    assert grid_points({"width": (1.0,), "log": (0.05,)}, s) == [("width", 1.0), ("log", 0.05)]
    assert grid_points({"width": (1.0,)}, s) == [("width", 1.0), ("log", 0.05)]
    with pytest.raises(ValueError, match=r"grid: expected readings \('width', 'log'\) with step sizes > 0, got 'logs': 0.1"):
        grid_points({"logs": (0.1,)}, s)
    with pytest.raises(ValueError, match=r"got 'width': 0.0"):
        grid_points({"width": (0.0,)}, s)


# --------------------------------------------------------------------------------------- the sweep on a tiny trained run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A fast-mode run (detector + IoU-Net, a few iterations) and 2 tune images at its image size."""
    opts = reproduce_options(fast=True, root=tmp_path_factory.mktemp("root"))
    opts = dataclasses.replace(opts, joint=False, settings=dataclasses.replace(opts.settings, refine_top=12))
    plan = stages(opts)
    detector, iou_net = (load_model(trained(plan.train[k]), torch.device("cpu")) for k in ("detector", "iou"))
    tune = build_dataset(apply_overrides(plan.val, ["data.split=tune", "data.options.num_tune=2"]))
    return opts.settings, tune, detector, iou_net


def test_starts_and_default_step_are_the_pipelines(tiny):
    s, tune, detector, iou_net = tiny
    out = run_pipeline(tune, detector, iou_net, dataclasses.replace(s, regression_iterations=0))
    starts = nms_starts(tune, detector, iou_net, s)
    table = sweep(starts, iou_net, tune.coco, tune.label_to_cat_id, grid={}, settings=s)  # the default point only
    assert table[["reading", "λ"]].values.tolist() == [[s.refine_step_scaling, s.refine_step_size]]
    assert table.loc[0, "default"]
    # The pipeline's NMS set cut to refine_top per image, and its refinement after every step, give the same APs.
    def top(name: str) -> list[dict]:
        return [r for image_id in tune.image_ids for r in [r for r in out.sets[name] if r["image_id"] == image_id][: s.refine_top]]
    assert sum(len(st.detections["boxes"]) for st in starts) == len(top("nms")) > 0
    assert table.attrs["nms"] == coco_ap(tune.coco, top("nms"))
    ap = [coco_ap(tune.coco, out.sets[f"nms+refine/{t}"])["AP"] for t in range(s.refine_iterations + 1)]
    np.testing.assert_allclose(table.loc[0, "AP per step"], ap, atol=1e-9)


def test_each_grid_point_is_optimize_boxes_with_its_reading_and_step(tiny):
    s, tune, detector, iou_net = tiny
    starts = nms_starts(tune, detector, iou_net, s)
    grid = {"width": (0.5, 4.0), "log": (0.02, 0.3)}
    table = sweep(starts, iou_net, tune.coco, tune.label_to_cat_id, grid=grid, settings=s)
    assert len(table) == 5  # the four points and the current default
    for _, row in table.iterrows():
        moves, reasons, per_step = [], [], [[] for _ in range(s.refine_iterations + 1)]
        for st in starts:
            labels = st.detections["labels"]
            result = optimize_boxes(lambda b: iou_net.predict_iou(st.features, [b], [labels])[0], st.detections["boxes"],
                                    iterations=s.refine_iterations, step_size=row["λ"], early_stop=s.refine_early_stop,
                                    degeneration=s.refine_degeneration, image_size=tuple(tune.coco.imgs[st.image_id][k]
                                                                                        for k in ("height", "width")),
                                    step_scaling=row["reading"])
            moves.append((result.trajectory[-1] - result.trajectory[0]).abs().amax(dim=1))
            reasons.append(result.stop_reason)
            for t, boxes in enumerate(result.trajectory):
                per_step[t] += to_coco_results([{**st.detections, "boxes": boxes}], [st.image_id], tune.label_to_cat_id)
        reasons = torch.cat(reasons)
        assert row["median move (px)"] == pytest.approx(float(torch.cat(moves).median()), abs=1e-6)
        assert row["stops"] == [int((reasons == r).sum()) for r in (RUNNING, CONVERGED, DEGENERATED)]
        np.testing.assert_allclose(row["AP per step"], [coco_ap(tune.coco, d)["AP"] for d in per_step], atol=1e-9)
    # The grid points really differ (so a sweep that ignored λ or the reading would fail above).
    assert table["median move (px)"].nunique() == len(table) and table["median move (px)"].min() > 0
