"""The paired bootstrap against pycocotools: the vectorized re-accumulation equals ``COCOeval.accumulate()``
on a real validation set, and each replicate equals ``COCOeval`` re-run on a ground truth in which the
drawn images are literally duplicated (renamed copies)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

from workbench.analysis import bootstrap as bs
from workbench.analysis.cocoeval import AP_METRICS, coco_ap, evaluate_bbox
from workbench.analysis.correlation import localization_correlation, pearson
from workbench.analysis.recall import recall_vs_iou
from workbench.data import get_dataset
from workbench.data.coco import coco_from_dict


@pytest.fixture(scope="session")
def shapes_val(tmp_path_factory):
    """The ground truth of a real (generated) ``shapes`` validation split: 60 images, 3 categories."""
    root = tmp_path_factory.mktemp("shapes")
    return get_dataset("shapes", "val", root=root, seed=0, num_train=2, num_val=60, image_size=128).coco


def jittered_detections(coco, *, sigma: float, seed: int, per_object: int = 2, false_per_image: int = 2,
                        with_iou_pred: bool = False) -> list[dict]:
    """Boxes around each object (relative jitter ``sigma``) plus random false positives; scores uniform (no ties)."""
    rng = np.random.default_rng(seed)
    cats = coco.getCatIds()
    out = []
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.integers(0, per_object + 1)):
            j = rng.normal(0.0, sigma, 4) * [w, h, w, h]
            out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)], "score": float(rng.random())})
    for image_id in coco.getImgIds():
        for _ in range(rng.integers(0, false_per_image + 1)):
            out.append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                        "bbox": [*rng.uniform(0, 90, 2), *rng.uniform(4, 30, 2)], "score": float(rng.random())})
    if with_iou_pred:
        for d in out:
            d["iou_pred"] = float(rng.random())
    return out


@pytest.fixture(scope="session")
def hard_gt(shapes_val):
    """The real ground truth made harder for the evaluator: crowd regions, an image with no objects and a
    category with no objects at all (COCOeval leaves its precision at -1)."""
    data = copy.deepcopy(shapes_val.dataset)
    for a in data["annotations"][::17]:
        a["iscrowd"] = 1
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    data["categories"].append({"id": 99, "name": "never annotated"})
    return coco_from_dict(data)


@pytest.fixture(scope="session")
def hard_dets(hard_gt):
    dets = jittered_detections(hard_gt, sigma=0.08, seed=1)
    image = hard_gt.getImgIds()[3]
    dets += [{"image_id": image, "category_id": 99, "bbox": [1.0, 2.0, 20.0, 20.0], "score": 0.5}]
    return dets


def test_precision_array_equals_cocoeval_accumulate(hard_gt, hard_dets):
    ref = evaluate_bbox(hard_gt, hard_dets).eval["precision"][:, :, :, 0, -1]  # area "all", maxDets 100
    got = bs.precision_array(bs.per_image_matches(hard_gt, hard_dets))
    assert got.shape == (1, *ref.shape)
    assert (ref[:, :, -1] == -1).all() and (ref > 0).any() and (ref == 0).any()  # the fixture is not degenerate
    np.testing.assert_array_equal(got[0], ref)


def test_ap_replicates_of_the_full_set_equal_coco_ap(hard_gt, hard_dets):
    got = bs.ap_replicates(bs.per_image_matches(hard_gt, hard_dets))
    ref = coco_ap(hard_gt, hard_dets)
    assert list(got) == list(AP_METRICS)
    for metric in AP_METRICS:
        assert got[metric][0] == pytest.approx(ref[metric], abs=1e-12), metric


def test_empty_detections_give_zero_ap(shapes_val):
    got = bs.ap_replicates(bs.per_image_matches(shapes_val, []), bs.resample_weights(len(shapes_val.getImgIds()), 5))
    assert all((v == 0).all() for v in got.values())


def duplicated(coco, dets: list[dict], draw: np.ndarray):
    """The slow reference: a ground truth and detections in which drawn image ``k`` becomes a new image
    ``k + 1`` (every object and detection copied), so an image drawn twice is evaluated twice."""
    ids = sorted(coco.getImgIds())
    images = {im["id"]: im for im in coco.dataset["images"]}
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    new_images, new_anns, new_dets = [], [], []
    for k, i in enumerate(draw):
        old = ids[i]
        new_images.append({**images[old], "id": k + 1})
        for a in coco.imgToAnns[old]:
            new_anns.append({**a, "id": len(new_anns) + 1, "image_id": k + 1})
        new_dets += [{**d, "image_id": k + 1} for d in by_image.get(old, [])]
    data = {"images": new_images, "annotations": new_anns, "categories": coco.dataset["categories"]}
    return coco_from_dict(data), new_dets


def test_resample_weights_count_the_drawn_images():
    draws = bs.resample_indices(7, 50, seed=3)
    weights = bs.resample_weights(7, 50, seed=3)
    assert weights.shape == (50, 7) and (weights.sum(axis=1) == 7).all()
    for row, w in zip(draws, weights):
        np.testing.assert_array_equal(np.bincount(row, minlength=7), w)
    assert not np.array_equal(bs.resample_weights(7, 50, seed=4), weights)


def test_bootstrap_replicates_equal_cocoeval_on_duplicated_images(hard_gt, hard_dets):
    n = len(hard_gt.getImgIds())
    draws, weights = bs.resample_indices(n, 3, seed=7), bs.resample_weights(n, 3, seed=7)
    assert (weights > 1).any() and (weights == 0).any()  # images really duplicated and left out
    got = bs.ap_replicates(bs.per_image_matches(hard_gt, hard_dets), weights)
    for b, draw in enumerate(draws):
        ref = coco_ap(*duplicated(hard_gt, hard_dets, draw))
        for metric in AP_METRICS:
            assert got[metric][b] == pytest.approx(ref[metric], abs=1e-12), (b, metric)


def test_ap_difference_is_paired(shapes_val):
    n = len(shapes_val.getImgIds())
    better, worse = (jittered_detections(shapes_val, sigma=s, seed=2) for s in (0.02, 0.12))
    m_better, m_worse = bs.per_image_matches(shapes_val, better), bs.per_image_matches(shapes_val, worse)
    weights = bs.resample_weights(n, 200, seed=0)
    d = bs.ap_difference(m_better, m_worse, "AP90", weights)
    ref_better, ref_worse = coco_ap(shapes_val, better)["AP90"], coco_ap(shapes_val, worse)["AP90"]
    assert (d.ours, d.baseline) == (pytest.approx(ref_better, abs=1e-12), pytest.approx(ref_worse, abs=1e-12))
    assert d.delta == pytest.approx(ref_better - ref_worse)
    assert 0 < d.ci95[0] < d.delta < d.ci95[1]
    same = bs.ap_difference(m_worse, m_worse, "AP", weights)  # paired: a set against itself never differs
    assert same.delta == 0 and same.ci95 == (0.0, 0.0) and (same.replicates == 0).all()


def test_pearson_and_recall_replicates_equal_the_slow_reference(shapes_val):
    dets = jittered_detections(shapes_val, sigma=0.1, seed=5, with_iou_pred=True)
    nms_like = jittered_detections(shapes_val, sigma=0.1, seed=6)
    ids = np.asarray(sorted(shapes_val.getImgIds()))
    draws, weights = bs.resample_indices(len(ids), 3, seed=11), bs.resample_weights(len(ids), 3, seed=11)

    m = localization_correlation(dets, shapes_val).matched
    d = bs.pearson_difference(m["iou"], m["iou_pred"], m["score"], m["image_id"], ids, weights)
    assert d.ours == pytest.approx(pearson(m["iou"], m["iou_pred"])) and d.baseline == pytest.approx(pearson(m["iou"], m["score"]))

    recall = recall_vs_iou({"a": dets, "b": nms_like}, shapes_val).loc[0.9]
    from workbench.analysis.matching import best_iou_per_ground_truth
    best = [best_iou_per_ground_truth(x, shapes_val) for x in (dets, nms_like)]
    sums = [bs.image_sums((b["best_iou"] >= 0.9).to_numpy(), b["image_id"], ids)[:, 0] for b in best]
    objects = bs.image_sums(np.ones(len(best[0])), best[0]["image_id"], ids)[:, 0]
    r = bs.ratio_difference(sums[0], sums[1], weights, objects)
    assert (r.ours, r.baseline) == (pytest.approx(recall["a"]), pytest.approx(recall["b"]))

    for b, draw in enumerate(draws):
        gt_b, dets_b = duplicated(shapes_val, dets, draw)
        m_b = localization_correlation(dets_b, gt_b).matched
        ref = pearson(m_b["iou"], m_b["iou_pred"]) - pearson(m_b["iou"], m_b["score"])
        assert d.replicates[b] == pytest.approx(ref, abs=1e-10)
        rec_b = recall_vs_iou({"a": dets_b, "b": duplicated(shapes_val, nms_like, draw)[1]}, gt_b).loc[0.9]
        assert r.replicates[b] == pytest.approx(rec_b["a"] - rec_b["b"], abs=1e-12)


def test_pearson_replicates_use_the_true_iou_not_a_stand_in(shapes_val):
    # An independent IoU (torchvision) as the predicted IoU: r must be exactly 1 in every replicate.
    dets = jittered_detections(shapes_val, sigma=0.1, seed=8)
    m = localization_correlation(dets, shapes_val).matched
    gts = {a["id"]: a["bbox"] for a in shapes_val.dataset["annotations"]}
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    true = [torchvision.ops.box_iou(torch.tensor([xyxy(b)], dtype=torch.float64), torch.tensor([xyxy(gts[g])], dtype=torch.float64)).item()
            for b, g in zip(m["bbox"], m["gt_id"])]
    ids = np.asarray(sorted(shapes_val.getImgIds()))
    d = bs.pearson_difference(m["iou"], np.asarray(true), m["score"], m["image_id"], ids, bs.resample_weights(len(ids), 100))
    assert d.ours == pytest.approx(1.0) and abs(d.baseline) < 0.2  # the scores are random
    assert d.ci95[0] > 0.5  # a perfect predictor against a random score, in every replicate


def test_bad_weights_and_mismatched_sets_are_named(shapes_val):
    m = bs.per_image_matches(shapes_val, [])
    with pytest.raises(ValueError, match="weights"):
        bs.ap_replicates(m, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="weights"):
        bs.ap_replicates(m, np.full((2, len(m.image_ids)), 0.5))
    with pytest.raises(ValueError, match="same images"):
        fewer_images = duplicated(shapes_val, [], np.arange(10))[0]
        bs.ap_difference(m, bs.per_image_matches(fewer_images, []), "AP", np.ones((1, len(m.image_ids)), dtype=np.int64))
    with pytest.raises(ValueError, match="metric"):
        bs.ap_replicates(m, None, ("AP95",))
    with pytest.raises(ValueError, match="image"):
        bs.resample_indices(0, 10)


def test_difference_interval_needs_most_replicates_defined():
    d = bs.difference(0.5, 0.2, np.array([np.nan] * 6 + [0.1] * 4))
    assert np.isnan(d.ci95).all() and d.delta == pytest.approx(0.3)
    d = bs.difference(0.5, 0.2, np.linspace(0, 1, 1001))
    assert d.ci95 == (pytest.approx(0.025), pytest.approx(0.975))
