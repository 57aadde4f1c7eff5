"""Tests of the data layer: the COCO loader and its validation, the shapes generator, the NEON conversion.

The NEON tests prepare the real dataset once per session into the default cache folder (``cache/data``,
git-ignored); the first run downloads the ~20 MB ``deepforest`` wheel from the package registry.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from workbench.data import CocoDetection, collate_fn, get_dataset, prepare_dataset
from workbench.data import neon, shapes
from workbench.data.__main__ import main as cli_main
from workbench.data.folder import prepare_atomically, read_manifest

REPO_CACHE = Path(__file__).resolve().parents[1] / "cache" / "data"


# =========================================================================== loader: a good fixture


def _good_coco(root: Path) -> tuple[Path, Path, dict]:
    """Three images (RGB, greyscale, one without annotations), non-contiguous category ids, one crowd box."""
    img_dir = root / "images"
    (img_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img_dir / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(img_dir / "sub" / "b.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img_dir / "c.png")
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 5, "file_name": "sub/b.png", "width": 20, "height": 20},
            {"id": 7, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20.5, 0, 11.5, 24], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 32, 24], "iscrowd": 1},
            {"id": 4, "image_id": 5, "category_id": 7, "bbox": [2, 3, 4, 5]},  # iscrowd absent: 0
        ],
    }
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir, data


@pytest.fixture
def good_coco(tmp_path):
    return _good_coco(tmp_path)


def test_loader_targets_format_and_dtypes(good_coco):
    ann_file, img_dir, _ = good_coco
    ds = CocoDetection(ann_file, img_dir)
    assert len(ds) == 3 and ds.image_ids == [5, 7, 10]
    assert ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"]  # ordered by COCO category id: 3, 7
    assert ds.label_to_cat_id == {1: 3, 2: 7} and ds.cat_id_to_label == {3: 1, 7: 2}
    assert isinstance(ds.coco, COCO)

    image, target = ds[ds.image_ids.index(10)]
    assert image.dtype == torch.float32 and image.shape == (3, 24, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0
    expected_pixels = np.asarray(Image.open(img_dir / "a.png"), dtype=np.float32) / 255.0
    torch.testing.assert_close(image, torch.from_numpy(expected_pixels).permute(2, 0, 1))
    assert target["image_id"] == 10 and type(target["image_id"]) is int
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # xywh -> xyxy; the crowd box (id 3) is left out
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [20.5, 0.0, 32.0, 24.0]]))
    assert target["labels"].tolist() == [1, 2]


def test_loader_greyscale_becomes_rgb_and_empty_image_is_kept(good_coco):
    ann_file, img_dir, _ = good_coco
    ds = CocoDetection(ann_file, img_dir)
    grey, target = ds[ds.image_ids.index(5)]
    assert grey.shape == (3, 20, 20) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert target["labels"].tolist() == [2]
    empty_image, empty = ds[ds.image_ids.index(7)]
    assert empty_image.shape == (3, 16, 16)
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64


def test_loader_crowd_stays_in_coco_index(good_coco):
    ann_file, img_dir, _ = good_coco
    ds = CocoDetection(ann_file, img_dir)
    assert [a["id"] for a in ds.coco.imgToAnns[10]] == [1, 2, 3]  # evaluation still sees the crowd region
    assert len(ds.target(10)["boxes"]) == 2


def test_collate_fn_returns_lists(good_coco):
    ds = CocoDetection(*good_coco[:2])
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == ds.image_ids[:2]
    assert images[0].shape == (3, 20, 20) and images[1].shape == (3, 16, 16)


def test_loader_transforms_are_applied(good_coco):
    def flip(image, target):
        return image.flip(-1), {**target, "flipped": True}

    ds = CocoDetection(*good_coco[:2], transforms=flip)
    plain = CocoDetection(*good_coco[:2])
    image, target = ds[2]
    assert target["flipped"] and torch.equal(image, plain[2][0].flip(-1))


def test_zero_size_box_is_dropped_with_warning(good_coco):
    ann_file, img_dir, data = good_coco
    data["annotations"][0]["bbox"] = [296.65 % 30, 3, 1.03, 0.0]  # like COCO train2017 annotation 918
    ann_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"ann\.json: 1 annotation\(s\) with zero width or height.*\[1\]"):
        ds = CocoDetection(ann_file, img_dir)
    assert ds.target(10)["labels"].tolist() == [2]


def test_small_overshoot_is_tolerated_and_clipped(good_coco):
    ann_file, img_dir, data = good_coco
    data["annotations"][0]["bbox"] = [-1.5, 20, 10, 5.5]  # 1.5 px left of and past the bottom of a 32x24 image
    ann_file.write_text(json.dumps(data))
    boxes = CocoDetection(ann_file, img_dir).target(10)["boxes"]
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 20.0, 8.5, 24.0]))


def test_image_size_mismatch_raises_on_load(good_coco):
    ann_file, img_dir, data = good_coco
    data["images"][0]["width"] = 40
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(ann_file, img_dir)
    with pytest.raises(ValueError, match=r"ann\.json: image id 10: .*a\.png is 32x24 but the annotation file says 40x24"):
        ds[ds.image_ids.index(10)]


# =========================================================================== loader: malformed files


def _set(path, value):
    """A mutation that sets ``data[path[0]][path[1]]... = value``."""
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _append(section, record):
    return lambda data: data[section].append(record)


MALFORMED = {
    # name: (mutation, expected message fragment after "<file>: ")
    "no images key": (_delete(["images"]), "missing top-level key 'images'"),
    "no annotations key": (_delete(["annotations"]), "missing top-level key 'annotations'"),
    "no categories key": (_delete(["categories"]), "missing top-level key 'categories'"),
    "annotations not a list": (_set(["annotations"], {}), "'annotations' must be a list"),
    "annotation missing bbox": (_delete(["annotations", 1, "bbox"]), "annotations[1] (id 2): missing key 'bbox'"),
    "annotation missing image_id": (_delete(["annotations", 2, "image_id"]), "annotations[2] (id 3): missing key 'image_id'"),
    "annotation missing id": (_delete(["annotations", 3, "id"]), "annotations[3]: missing key 'id'"),
    "image missing file_name": (_delete(["images", 1, "file_name"]), "images[1] (id 5): missing key 'file_name'"),
    "image missing width": (_delete(["images", 0, "width"]), "images[0] (id 10): missing key 'width'"),
    "category missing name": (_delete(["categories", 1, "name"]), "categories[1] (id 3): missing key 'name'"),
    "record not an object": (_set(["annotations", 2], [1, 2]), "annotations[2]: must be a JSON object"),
    "bbox three numbers": (_set(["annotations", 1, "bbox"], [1, 2, 3]), "annotations[1] (id 2): bbox must be 4 finite numbers"),
    "bbox NaN": (_set(["annotations", 1, "bbox"], [1, 2, float("nan"), 3]), "annotations[1] (id 2): bbox must be 4 finite numbers"),
    "bbox infinite": (_set(["annotations", 0, "bbox"], [1, 2, 3, float("inf")]), "annotations[0] (id 1): bbox must be 4 finite numbers"),
    "bbox string": (_set(["annotations", 0, "bbox"], [1, "2", 3, 4]), "annotations[0] (id 1): bbox must be 4 finite numbers"),
    "bbox negative width": (_set(["annotations", 3, "bbox"], [5, 5, -2, 3]), "annotations[3] (id 4): bbox width and height must not be negative"),
    "bbox negative height": (_set(["annotations", 3, "bbox"], [5, 5, 2, -3]), "annotations[3] (id 4): bbox width and height must not be negative"),
    "bbox past right edge": (_set(["annotations", 1, "bbox"], [25, 0, 11, 10]), "annotations[1] (id 2): bbox [25, 0, 11, 10] ([x, y, width, height]) lies outside its image"),
    "bbox xyxy read as xywh": (_set(["annotations", 3, "bbox"], [8, 9, 18, 19]), "annotations[3] (id 4): bbox [8, 9, 18, 19]"),
    "bbox above the image": (_set(["annotations", 0, "bbox"], [1, -5, 4, 4]), "annotations[0] (id 1): bbox [1, -5, 4, 4]"),
    "bbox inside the tolerance margin only": (_set(["annotations", 0, "bbox"], [32.5, 1, 1, 1]), "annotations[0] (id 1): bbox [32.5, 1, 1, 1]"),
    "unknown category": (_set(["annotations", 3, "category_id"], 4), "annotations[3] (id 4): category_id 4 is not the id of any entry in 'categories'"),
    "unknown image": (_set(["annotations", 2, "image_id"], 99), "annotations[2] (id 3): image_id 99 is not the id of any entry in 'images'"),
    "duplicate annotation id": (_set(["annotations", 3, "id"], 2), "annotations[3] (id 2): duplicate id, already used by annotations[1]"),
    "duplicate image id": (_set(["images", 2, "id"], 10), "images[2] (id 10): duplicate id, already used by images[0]"),
    "duplicate category id": (_append("categories", {"id": 7, "name": "wolf"}), "categories[2] (id 7): duplicate id, already used by categories[0]"),
    "string id": (_set(["annotations", 0, "id"], "1"), "annotations[0]: id must be an integer, got '1'"),
    "bool id": (_set(["images", 0, "id"], True), "images[0]: id must be an integer, got True"),
    "iscrowd 2": (_set(["annotations", 0, "iscrowd"], 2), "annotations[0] (id 1): iscrowd must be 0 or 1"),
    "zero image width": (_set(["images", 2, "width"], 0), "images[2] (id 7): width must be a positive number"),
    "empty file_name": (_set(["images", 2, "file_name"], ""), "images[2] (id 7): file_name must be a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_naming_file_and_record(good_coco, case):
    ann_file, img_dir, data = good_coco
    CocoDetection(ann_file, img_dir)  # the good file loads: the error below comes from the mutation
    mutate, message = MALFORMED[case]
    bad = copy.deepcopy(data)
    mutate(bad)
    bad_file = ann_file.with_name("bad.json")
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as info:
        CocoDetection(bad_file, img_dir)
    assert str(info.value).startswith(f"{bad_file}: "), str(info.value)
    assert message in str(info.value)


def test_not_json_raises_value_error(good_coco):
    ann_file, img_dir, _ = good_coco
    ann_file.write_text('{"images": [}')
    with pytest.raises(ValueError, match=rf"^{ann_file}: not a valid JSON file"):
        CocoDetection(ann_file, img_dir)


def test_top_level_list_raises_value_error(good_coco):
    ann_file, img_dir, data = good_coco
    ann_file.write_text(json.dumps([data]))
    with pytest.raises(ValueError, match=rf"^{ann_file}: top level must be a JSON object"):
        CocoDetection(ann_file, img_dir)


def test_missing_image_file_raises_file_not_found(good_coco):
    ann_file, img_dir, _ = good_coco
    (img_dir / "sub" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ann\.json: images\[1\] \(id 5\): image file .*sub/b\.png not found"):
        CocoDetection(ann_file, img_dir)


def test_missing_annotation_file_and_image_dir_raise_file_not_found(good_coco, tmp_path):
    ann_file, img_dir, _ = good_coco
    with pytest.raises(FileNotFoundError, match=r"nope\.json: annotation file not found"):
        CocoDetection(tmp_path / "nope.json", img_dir)
    with pytest.raises(FileNotFoundError, match=r"ann\.json: image directory .*no_images not found"):
        CocoDetection(ann_file, tmp_path / "no_images")


def test_get_dataset_coco_options(good_coco):
    ann_file, img_dir, _ = good_coco
    ds = get_dataset("coco", "val", ann_file=ann_file, img_dir=img_dir)
    assert isinstance(ds, CocoDetection) and len(ds) == 3
    with pytest.raises(ValueError, match=r"needs the options ann_file and img_dir \(missing: \['img_dir'\]\)"):
        get_dataset("coco", "val", ann_file=ann_file)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['seed'\]"):
        get_dataset("coco", "val", ann_file=ann_file, img_dir=img_dir, seed=1)


def test_get_dataset_rejects_unknown_name_split_and_option(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'voc'"):
        get_dataset("voc", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'test' for 'shapes'"):
        get_dataset("shapes", "test", root=tmp_path)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_images'\]"):
        get_dataset("shapes", "train", root=tmp_path, num_images=3)
    assert list(tmp_path.iterdir()) == []  # nothing was generated for a bad request


# =========================================================================== prepared folders


def test_prepare_atomically_leaves_nothing_when_build_fails(tmp_path):
    def build(tmp):
        (tmp / "annotations").mkdir()
        (tmp / "annotations" / "train.json").write_text("{}")
        raise KeyboardInterrupt  # a killed preparation

    with pytest.raises(KeyboardInterrupt):
        prepare_atomically(tmp_path / "ds", {"v": 1}, build)
    assert list(tmp_path.iterdir()) == []


def test_prepare_atomically_skips_when_prepared_and_rebuilds_on_new_params(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        for split in ("train", "val"):
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"{split}.json").write_text(str(len(calls)))
        return {"n": len(calls)}

    folder = prepare_atomically(tmp_path / "ds", {"v": 1}, build)
    prepare_atomically(tmp_path / "ds", {"v": 1}, build)
    assert len(calls) == 1 and read_manifest(folder) == {"params": {"v": 1}, "n": 1}
    prepare_atomically(tmp_path / "ds", {"v": 2}, build)
    assert len(calls) == 2 and read_manifest(folder) == {"params": {"v": 2}, "n": 2}
    assert (folder / "annotations" / "val.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folders left


# =========================================================================== shapes


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_is_deterministic_for_a_seed(tmp_path):
    a = prepare_dataset("shapes", tmp_path / "a", seed=3, num_train=6, num_val=3, image_size=64)
    b = prepare_dataset("shapes", tmp_path / "b", seed=3, num_train=6, num_val=3, image_size=64)
    files_a, files_b = _tree_bytes(a), _tree_bytes(b)
    assert len(files_a) == 6 + 3 + 3  # images, two annotation files, manifest
    assert files_a == files_b


def test_shapes_image_does_not_depend_on_split_size(tmp_path):
    small = prepare_dataset("shapes", tmp_path, seed=3, num_train=2, num_val=1, image_size=64)
    large = prepare_dataset("shapes", tmp_path, seed=3, num_train=5, num_val=1, image_size=64)
    assert (small / "images/train/000001.png").read_bytes() == (large / "images/train/000001.png").read_bytes()


def test_shapes_differs_for_another_seed(tmp_path):
    a = _tree_bytes(prepare_dataset("shapes", tmp_path, seed=0, num_train=4, num_val=2, image_size=64))
    b = _tree_bytes(prepare_dataset("shapes", tmp_path, seed=1, num_train=4, num_val=2, image_size=64))
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in images)
    assert a["annotations/train.json"] != b["annotations/train.json"]


def test_shapes_loads_with_valid_crowded_boxes(tmp_path):
    size = 96
    train = get_dataset("shapes", "train", root=tmp_path, num_train=12, num_val=4, image_size=size)
    val = get_dataset("shapes", "val", root=tmp_path, num_train=12, num_val=4, image_size=size)
    assert (len(train), len(val)) == (12, 4)
    assert train.class_names == ["rectangle", "ellipse", "triangle"] and train.num_classes == 3
    overlapping, counts = 0, []
    for ds in (train, val):
        for image_id in ds.image_ids:
            t = ds.target(image_id)
            boxes = t["boxes"]
            counts.append(len(boxes))
            assert (boxes >= 0).all() and (boxes <= size).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert set(t["labels"].tolist()) <= {1, 2, 3}
            inter = (torch.min(boxes[:, None, 2:], boxes[None, :, 2:]) - torch.max(boxes[:, None, :2], boxes[None, :, :2])).clamp(min=0).prod(-1)
            overlapping += int((inter.triu(diagonal=1) > 0).sum())
    assert min(counts) >= shapes.MIN_OBJECTS - 1 and max(counts) <= shapes.MAX_OBJECTS
    assert np.mean(counts) >= 4 and overlapping >= 10  # crowded scenes, not isolated objects
    manifest = read_manifest(train.ann_file.parents[1])
    assert manifest["splits"]["train"] == {"images": 12, "boxes": sum(counts[:12])}


def test_shapes_sixteen_images_under_a_second(tmp_path):
    start = time.perf_counter()
    prepare_dataset("shapes", tmp_path, seed=5, num_train=12, num_val=4, image_size=128)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("label", [1, 2])
def test_rectangle_and_ellipse_masks_touch_all_four_sides_of_their_box(label):
    mask = shapes.shape_mask(np.random.default_rng(0), label, 17, 11)
    assert mask.shape == (11, 17)
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_triangle_mask_fills_about_half_its_box():
    for seed in range(20):
        mask = shapes.shape_mask(np.random.default_rng(seed), 3, 40, 30)
        assert 0.4 < mask.mean() < 0.6


@pytest.mark.parametrize("seed", range(5))
def test_scene_boxes_are_tight_around_each_objects_visible_pixels(seed):
    scene = shapes.draw_scene(np.random.default_rng(seed), 96)
    assert scene.pixels.shape == (96, 96, 3) and scene.pixels.dtype == np.uint8
    assert len(scene.boxes) == len(scene.labels) == scene.owner.max() + 1
    for k, (x0, y0, x1, y1) in enumerate(scene.boxes):
        ys, xs = np.nonzero(scene.owner == k)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_visible_box_is_tight_around_the_uncovered_pixels():
    owner = np.full((10, 10), -1)
    owner[2:8, 1:9] = 0  # object 0 drawn in (1, 2, 9, 8)
    owner[2:8, 5:9] = 1  # object 1 covers its right half
    assert shapes._visible_box(owner, 0, (1, 2, 9, 8)) == (1, 2, 5, 8)
    assert shapes._visible_box(owner, 1, (5, 2, 9, 8)) == (5, 2, 9, 8)


def test_shapes_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"image_size must be an integer >= 32, got 8"):
        prepare_dataset("shapes", tmp_path, image_size=8)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got 1.5"):
        prepare_dataset("shapes", tmp_path, seed=1.5)


def test_cli_prepare_shapes_and_check(tmp_path, capsys):
    assert cli_main(["prepare", "shapes", "--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "48"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "shapes-seed0-train3-val2-48px"
    assert out.startswith(f"{folder}: ") and '"images": 3' in out
    assert cli_main(["check", str(folder / "annotations/val.json"), str(folder / "images")]) == 0
    assert "OK, 2 images" in capsys.readouterr().out


# =========================================================================== NEON tree crowns: pure parts


def test_tile_origins_cover_evenly_with_bounded_stride():
    assert neon.tile_origins(400) == [0]
    assert neon.tile_origins(700) == [0, 300]
    assert neon.tile_origins(1035) == [0, 212, 423, 635]
    for length in range(400, 3000, 37):
        xs = neon.tile_origins(length)
        assert xs[0] == 0 and xs[-1] == length - 400
        assert all(0 < b - a <= 300 for a, b in zip(xs, xs[1:]))
    with pytest.raises(ValueError, match="cannot hold"):
        neon.tile_origins(399)


def test_grid_windows_tile_a_region_without_overlap():
    assert neon.grid_windows((0, 0, 400, 400)) == [(0, 0, 400, 400)]
    assert neon.grid_windows((10, 20, 900, 420)) == [(10, 20, 410, 420), (410, 20, 810, 420), (810, 20, 900, 420)]
    for w, h in [(400, 1035), (2299, 800), (37, 950)]:
        covered = np.zeros((h, w), dtype=int)
        for x0, y0, x1, y1 in neon.grid_windows((0, 0, w, h)):
            assert 0 < x1 - x0 <= 400 and 0 < y1 - y0 <= 400
            covered[y0:y1, x0:x1] += 1
        assert (covered == 1).all()


def test_clip_to_tile_keeps_boxes_at_least_half_inside():
    window = (100, 100, 500, 500)
    boxes = np.array([
        [150, 150, 200, 200],  # inside: kept as is
        [80, 150, 120, 200],   # exactly half inside: kept, clipped
        [79, 150, 119, 200],   # 19/40 inside: dropped
        [480, 480, 540, 540],  # 1/9 inside: dropped
        [600, 600, 650, 650],  # outside: dropped
    ], dtype=float)
    kept, clipped = neon.clip_to_tile(boxes, window)
    assert kept.tolist() == [0, 1]
    assert clipped.tolist() == [[50, 50, 100, 100], [0, 50, 20, 100]]


def test_download_failure_raises_runtime_error_naming_package_and_registry(tmp_path, monkeypatch):
    # No index and an empty find-links folder: pip cannot find the wheel anywhere, without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"could not download the wheel deepforest==2\.1\.0 from the Python package index \(PyPI"):
        neon.download_wheel(tmp_path / "downloads")
    assert not (tmp_path / "downloads" / neon.WHEEL_NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []  # the temporary download folder is gone


# =========================================================================== NEON tree crowns: the prepared dataset


@pytest.fixture(scope="session")
def neon_folder() -> Path:
    """Prepared once per session into the default cache (downloads the wheel the first time)."""
    return prepare_dataset("neon-trees", REPO_CACHE)


@pytest.fixture(scope="session")
def neon_raw(neon_folder) -> dict[str, tuple[int, int, list[tuple[str, list[float]]]]]:
    """Straight from the wheel's XML, parsed here independently of the module: ``{stem: (w, h, objects)}``."""
    raw = {}
    with zipfile.ZipFile(REPO_CACHE / "downloads" / neon.WHEEL_NAME) as zf:
        for name in zf.namelist():
            if name.startswith("deepforest/data/") and name.endswith(".xml"):
                root = ET.fromstring(zf.read(name))
                objects = [(o.findtext("name"), [float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
                           for o in root.iter("object")]
                raw[Path(name).stem] = (int(root.findtext("size/width")), int(root.findtext("size/height")), objects)
    return raw


@pytest.fixture(scope="session")
def neon_coco(neon_folder) -> dict[str, dict]:
    return {s: json.loads((neon_folder / "annotations" / f"{s}.json").read_text()) for s in ("train", "val")}


def test_neon_raw_data_is_what_the_docs_say(neon_raw):
    sizes = {stem: (w, h, len(objs)) for stem, (w, h, objs) in neon_raw.items()}
    assert sizes == {
        "2019_YELL_2_528000_4978000_image_crop2": (2299, 2472, 574),
        "2019_YELL_2_541000_4977000_image_crop": (1249, 1035, 279),
        "OSBS_029": (400, 400, 61),
        "SOAP_061": (400, 400, 37),
    }
    assert sum(n for _, _, n in sizes.values()) == 951
    labels = {stem: sorted({label for label, _ in objs}) for stem, (_, _, objs) in neon_raw.items()}
    assert labels["SOAP_061"] == ["Alive", "Dead"]
    assert all(labels[stem] == ["Tree"] for stem in labels if stem != "SOAP_061")


def test_neon_counts_match_manifest_and_readme(neon_folder, neon_coco):
    manifest = read_manifest(neon_folder)
    for split, coco in neon_coco.items():
        assert manifest["splits"][split]["images"] == len(coco["images"])
        assert manifest["splits"][split]["boxes"] == len(coco["annotations"])
        assert manifest["splits"][split]["tile_files"] == [img["file_name"] for img in coco["images"]]
    # The numbers stated in data/README.md
    counts = {s: (len(c["images"]), len(c["annotations"]), manifest["splits"][s]["source_boxes"]) for s, c in neon_coco.items()}
    assert counts == {"train": (62, 1257, 683), "val": (15, 269, 268)}


def test_neon_boxes_equal_a_recount_from_the_raw_xml(neon_raw, neon_coco):
    """Every tile's boxes are exactly the raw boxes at least half inside it, clipped (slow reference)."""
    for split, coco in neon_coco.items():
        anns_of = {img["id"]: [] for img in coco["images"]}
        for a in coco["annotations"]:
            anns_of[a["image_id"]].append([round(v, 6) for v in a["bbox"]])
        for img in coco["images"]:
            wx0, wy0, wx1, wy1 = img["tile_window"]
            assert (wx1 - wx0, wy1 - wy0) == (img["width"], img["height"])
            assert split == "val" or (img["width"], img["height"]) == (400, 400)
            expected = []
            for _, (x0, y0, x1, y1) in neon_raw[img["source_image"]][2]:
                ix0, iy0, ix1, iy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
                inside = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
                if inside > 0 and inside >= 0.5 * (x1 - x0) * (y1 - y0):
                    expected.append([ix0 - wx0, iy0 - wy0, ix1 - ix0, iy1 - iy0])
            assert sorted(anns_of[img["id"]]) == sorted(expected), img["file_name"]


def test_neon_every_raw_box_lands_in_exactly_one_split(neon_raw, neon_coco):
    seen = {}
    for split, coco in neon_coco.items():
        source_of = {img["id"]: img["source_image"] for img in coco["images"]}
        seen[split] = {(source_of[a["image_id"]], a["source_index"]) for a in coco["annotations"]}
    everything = {(stem, i) for stem, (_, _, objs) in neon_raw.items() for i in range(len(objs))}
    assert seen["train"] | seen["val"] == everything and not seen["train"] & seen["val"]


def test_neon_no_box_outside_its_tile(neon_folder):
    for split in ("train", "val"):
        ds = get_dataset("neon-trees", split, root=REPO_CACHE)
        for image_id in ds.image_ids:
            boxes = ds.target(image_id)["boxes"]
            assert (boxes >= 0).all() and (boxes <= 400).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_neon_split_shares_no_tile_and_no_pixel(neon_coco):
    train, val = neon_coco["train"]["images"], neon_coco["val"]["images"]
    assert not {i["file_name"] for i in train} & {i["file_name"] for i in val}
    assert not {i["id"] for i in train} & {i["id"] for i in val}
    for t in train:
        for v in val:
            if t["source_image"] == v["source_image"]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = t["tile_window"], v["tile_window"]
                assert min(ax1, bx1) <= max(ax0, bx0) or min(ay1, by1) <= max(ay0, by0), (t, v)
    # The declared regions: val is the bottom of the large YELL image and the right of the smaller one.
    for v in val:
        x0, y0, _, _ = v["tile_window"]
        assert {"2019_YELL_2_528000_4978000_image_crop2": y0 >= 1672, "2019_YELL_2_541000_4977000_image_crop": x0 >= 849}[v["source_image"]]


def test_neon_val_tiles_do_not_overlap(neon_coco):
    val = neon_coco["val"]["images"]
    for i, a in enumerate(val):
        for b in val[i + 1:]:
            if a["source_image"] == b["source_image"]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["tile_window"], b["tile_window"]
                assert min(ax1, bx1) <= max(ax0, bx0) or min(ay1, by1) <= max(ay0, by0), (a, b)
        x0, y0, x1, y1 = a["tile_window"]
        assert (a["width"], a["height"]) == (x1 - x0, y1 - y0) and max(x1 - x0, y1 - y0) == neon.TILE_SIZE


def test_neon_tiles_cover_their_source_images(neon_coco):
    for stem, (w, h) in {"2019_YELL_2_528000_4978000_image_crop2": (2299, 2472), "2019_YELL_2_541000_4977000_image_crop": (1249, 1035)}.items():
        covered = np.zeros((h, w), dtype=bool)
        for coco in neon_coco.values():
            for img in coco["images"]:
                if img["source_image"] == stem:
                    x0, y0, x1, y1 = img["tile_window"]
                    covered[y0:y1, x0:x1] = True
        assert covered.all(), stem


def test_neon_tile_pixels_are_the_source_crop(neon_folder, neon_coco):
    with zipfile.ZipFile(REPO_CACHE / "downloads" / neon.WHEEL_NAME) as zf:
        source = np.asarray(Image.open(io.BytesIO(zf.read("deepforest/data/2019_YELL_2_541000_4977000_image_crop.png"))).convert("RGB"))
    for coco in neon_coco.values():
        for img in coco["images"]:
            if img["source_image"] == "2019_YELL_2_541000_4977000_image_crop":
                x0, y0, x1, y1 = img["tile_window"]
                tile = np.asarray(Image.open(neon_folder / "images" / img["file_name"]))
                assert np.array_equal(tile, source[y0:y1, x0:x1]), img["file_name"]


def test_neon_single_class_keeps_source_label(neon_coco):
    for coco in neon_coco.values():
        assert coco["categories"] == [{"id": 1, "name": "tree", "supercategory": "plant"}]
        assert {a["category_id"] for a in coco["annotations"]} == {1}
    labels = {a["source_label"] for c in neon_coco.values() for a in c["annotations"]}
    assert labels == {"Tree", "Dead", "Alive"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_neon_coco_round_trip_ground_truth_as_detections_gives_ap_1(neon_folder, split):
    ds = get_dataset("neon-trees", split, root=REPO_CACHE)
    assert ds.class_names == ["tree"] and ds.num_classes == 1
    detections = []
    for image_id in ds.image_ids:
        t = ds.target(image_id)
        for (x0, y0, x1, y1), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            detections.append({"image_id": image_id, "category_id": ds.label_to_cat_id[label],
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0})
    assert len(detections) == len(ds.coco.dataset["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        reloaded = COCO(str(ds.ann_file))  # the file pycocotools reads itself
        ev = COCOeval(reloaded, reloaded.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert math.isclose(ev.stats[0], 1.0) and math.isclose(ev.stats[1], 1.0)  # AP@[.5:.95], AP@.5


def test_neon_preparation_is_idempotent(neon_folder):
    manifest = neon_folder / "manifest.json"
    before = manifest.stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_dataset("neon-trees", REPO_CACHE) == neon_folder
    assert time.perf_counter() - start < 0.5 and manifest.stat().st_mtime_ns == before
