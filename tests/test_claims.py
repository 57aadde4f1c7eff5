"""The claim judge and the paper's claims on constructed detection sets of a real ``shapes`` validation split.

Each constructed case knows its answer: boxes jittered less around the ground truth are better
localized, so a set built that way must win (holds), lose when swapped (does not hold), and tie
with a copy of itself (inconclusive). Every number a claim reports is recomputed here from the named
detection set with the plain analyses (COCOeval, recall, positives, torchvision IoU), which catches a
claim reading the wrong set or the wrong field.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision

from tests.test_bootstrap import shapes_val  # noqa: F401 (session fixture: the real validation ground truth)
from workbench.analysis import claims as C
from workbench.analysis.cocoeval import coco_ap
from workbench.analysis.correlation import pearson
from workbench.analysis.experiments import TABLE1_ROWS, TABLE3_ROWS, table2_rows
from workbench.analysis.matching import match_to_ground_truth
from workbench.analysis.positives import positives_per_iou_bin
from workbench.analysis.recall import recall_vs_iou
from workbench.pipeline import PipelineOutput

REPLICATES = 300


def scaled_jitter(coco, scale: float, *, seed: int, per_object: int = 2) -> list[dict]:
    """``per_object`` boxes per object: the ground truth moved by a fixed random offset (by ``seed``)
    times ``scale``, random scores. The same ``seed`` with a smaller ``scale`` moves every box closer."""
    rng = np.random.default_rng(seed)
    out = []
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(per_object):
            j = rng.normal(0.0, 1.0, 4) * scale * np.array([w, h, w, h])
            out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                        "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]})
    return out


def true_iou(coco, dets: list[dict]) -> np.ndarray:
    """Each detection's IoU with its best same-category object, by torchvision (independent of the analyses)."""
    out = np.zeros(len(dets))
    for k, d in enumerate(dets):
        gts = [a["bbox"] for a in coco.imgToAnns[d["image_id"]] if a["category_id"] == d["category_id"]]
        if gts:
            xyxy = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in [d["bbox"], *gts]], dtype=torch.float64)
            out[k] = torchvision.ops.box_iou(xyxy[:1], xyxy[1:]).max().item()
    return out


def constructed_sets(coco) -> dict[str, list[dict]]:
    """Every set the pipeline writes, built so that each of the paper's claims is true by construction."""
    raw = scaled_jitter(coco, 0.12, seed=0, per_object=3)
    iou = true_iou(coco, raw)
    noise = np.random.default_rng(1).normal(0.0, 0.02, len(raw))
    for d, t, e in zip(raw, iou, noise):
        d["iou_pred"] = float(t + e)  # a good IoU predictor; the score stays random
    sets = {"raw": raw, "nms": scaled_jitter(coco, 0.12, seed=2, per_object=1),
            "soft-nms": scaled_jitter(coco, 0.12, seed=3, per_object=1),
            "iou-nms": scaled_jitter(coco, 0.04, seed=2, per_object=1)}
    for t, s in enumerate((0.12, 0.08, 0.05, 0.03)):  # refinement: every box closer at every step
        sets[f"nms+refine/{t}"] = scaled_jitter(coco, s, seed=2, per_object=1)
    for t, s in enumerate((0.12, 0.07, 0.10, 0.13)):  # regression: better once, then worse
        sets[f"nms+regress/{t}"] = scaled_jitter(coco, s, seed=2, per_object=1)
    sets["joint/nms"] = scaled_jitter(coco, 0.09, seed=2, per_object=1)
    sets["joint/iou-nms"] = scaled_jitter(coco, 0.05, seed=2, per_object=1)
    sets["joint/iou-nms+refine"] = scaled_jitter(coco, 0.03, seed=2, per_object=1)
    return sets


@pytest.fixture(scope="module")
def good(shapes_val):  # noqa: F811
    sets = constructed_sets(shapes_val)
    return sets, C.paper_claims(PipelineOutput(sets=sets), shapes_val, replicates=REPLICATES, seed=0)


# ============================================================================= the judge
@pytest.mark.parametrize("ci, direction, verdict", [
    ((0.01, 0.3), 1, C.HOLDS), ((-0.3, -0.01), 1, C.DOES_NOT_HOLD), ((-0.1, 0.2), 1, C.INCONCLUSIVE),
    ((0.0, 0.2), 1, C.INCONCLUSIVE), ((-0.2, 0.0), 1, C.INCONCLUSIVE), ((0.0, 0.0), 1, C.INCONCLUSIVE),
    ((-0.3, -0.01), -1, C.HOLDS), ((0.01, 0.3), -1, C.DOES_NOT_HOLD), ((math.nan, math.nan), 1, C.INCONCLUSIVE),
    ((math.nan, 0.5), 1, C.INCONCLUSIVE),
])
def test_judge(ci, direction, verdict):
    assert C.judge(ci, direction) == verdict


def test_judge_rejects_a_direction_that_is_not_a_sign():
    with pytest.raises(ValueError, match="direction"):
        C.judge((0.1, 0.2), 0)


# ============================================================================= sentences
def claim(verdict: str, ci=(0.012, 0.034), metric="AP90") -> C.Claim:
    return C.Claim(claim="IoU-guided NMS improves AP90 over NMS (Table 1)", metric=metric, ours=0.081, baseline=0.055,
                   delta=0.026, ci95=ci, verdict=verdict)


def test_sentence_states_numbers_interval_and_the_verdict_it_was_given():
    text = C.sentence(claim(C.HOLDS))
    assert "AP90 8.1 vs 5.5" in text and "+2.60 AP points" in text and "95% CI +1.20 to +3.40" in text
    assert text.endswith("**holds here**.")
    assert C.sentence(claim(C.DOES_NOT_HOLD, (-0.03, -0.01))).endswith("**does not hold here**.")
    inconclusive = C.sentence(claim(C.INCONCLUSIVE, (-0.01, 0.03)))
    assert inconclusive.endswith("**inconclusive here**.") and "includes zero" in inconclusive
    for verdict in (C.DOES_NOT_HOLD, C.INCONCLUSIVE):
        assert "holds here" not in C.sentence(claim(verdict)).replace("does not hold here", "")
    assert C.sentence(claim(C.HOLDS).as_dict()) == C.sentence(claim(C.HOLDS))  # numbers.json records read back
    with pytest.raises(ValueError, match="verdict"):
        claim("probably")
    with pytest.raises(ValueError, match="verdict"):
        C.verdict_words("holds probably")


def test_claim_record_has_exactly_the_documented_keys():
    record = claim(C.HOLDS).as_dict()
    assert list(record) == ["claim", "metric", "ours", "baseline", "delta", "ci95", "verdict"]
    assert record["ci95"] == [0.012, 0.034] and json.loads(json.dumps(record)) == record


# ============================================================================= the paper's claims
def test_constructed_claims_all_hold(good):
    _, result = good
    assert list(result.claims) == ["fig2-pearson", "fig3-positives", "fig7-recall", "iou-nms-ap", "iou-nms-ap90", "iou-nms-ap50",
                                   "refine-ap", "refine-ap90", "fig4-monotonic", "fig4-vs-regression", "joint-ap", "joint-refine-ap"]
    verdicts = {key: c.verdict for key, c in result.claims.items()}
    # AP50 barely moves for boxes this close to the objects: that claim is the paper's trade-off, not built in here.
    assert {k: v for k, v in verdicts.items() if k != "iou-nms-ap50"} == {k: C.HOLDS for k in verdicts if k != "iou-nms-ap50"}
    for c in result.claims.values():
        assert c.delta == pytest.approx(c.ours - c.baseline)
        assert c.ci95[0] <= c.ci95[1]


def test_claims_read_the_sets_the_report_rows_name(good, shapes_val):  # noqa: F811
    sets, result = good
    c = result.claims
    assert TABLE1_ROWS["FPN + IoU-NMS"] == "iou-nms" and TABLE1_ROWS["FPN"] == "nms"
    assert table2_rows(sets) == {"FPN": "nms", "FPN + Refinement": "nms+refine/3"}
    assert TABLE3_ROWS["ResNet-50 IoU-Net"] == "joint/nms"
    ap = {name: coco_ap(shapes_val, sets[name]) for name in ("nms", "iou-nms", "nms+refine/3", "joint/nms", "joint/iou-nms+refine")}
    expected = {"iou-nms-ap": ("iou-nms", "nms", "AP"), "iou-nms-ap90": ("iou-nms", "nms", "AP90"), "iou-nms-ap50": ("iou-nms", "nms", "AP50"),
                "refine-ap": ("nms+refine/3", "nms", "AP"), "refine-ap90": ("nms+refine/3", "nms", "AP90"),
                "joint-ap": ("joint/nms", "nms", "AP"), "joint-refine-ap": ("joint/iou-nms+refine", "joint/nms", "AP")}
    for key, (ours, base, metric) in expected.items():
        assert (c[key].ours, c[key].baseline) == (pytest.approx(ap[ours][metric], abs=1e-12), pytest.approx(ap[base][metric], abs=1e-12)), key
    recall = recall_vs_iou({"IoU-NMS": sets["iou-nms"], "NMS": sets["nms"]}, shapes_val).loc[0.9]
    assert (c["fig7-recall"].ours, c["fig7-recall"].baseline) == (pytest.approx(recall["IoU-NMS"]), pytest.approx(recall["NMS"]))
    positives = positives_per_iou_bin({"IoU-NMS": sets["iou-nms"], "NMS": sets["nms"]}, shapes_val).iloc[-1]
    assert (c["fig3-positives"].ours, c["fig3-positives"].baseline) == (positives["IoU-NMS"], positives["NMS"])


def test_fig2_claim_correlates_the_predicted_iou_not_the_score(good, shapes_val):  # noqa: F811
    sets, result = good
    raw = sets["raw"]
    iou = true_iou(shapes_val, raw)
    keep = iou > 0.5
    c = result.claims["fig2-pearson"]
    assert c.ours == pytest.approx(pearson(iou[keep], np.array([d["iou_pred"] for d in raw])[keep]))
    assert c.baseline == pytest.approx(pearson(iou[keep], np.array([d["score"] for d in raw])[keep]))
    assert c.ours > 0.9 and abs(c.baseline) < 0.2  # built that way: the check above cannot pass with the fields swapped


def test_fig4_curves_are_coco_ap_per_step(good, shapes_val):  # noqa: F811
    sets, result = good
    for method, prefix in (("optimization", "nms+refine/"), ("regression", "nms+regress/")):
        expected = [coco_ap(shapes_val, sets[f"{prefix}{t}"])["AP"] for t in range(4)]
        assert result.fig4[method] == pytest.approx(expected, abs=1e-12)
    steps = np.diff(result.fig4["optimization"])
    worst = int(np.argmin(steps))
    mono = result.claims["fig4-monotonic"]
    assert mono.delta == pytest.approx(steps[worst]) and mono.ours == pytest.approx(result.fig4["optimization"][worst + 1])
    vs = result.claims["fig4-vs-regression"]
    assert (vs.ours, vs.baseline) == (pytest.approx(result.fig4["optimization"][-1]), pytest.approx(max(result.fig4["regression"])))


def test_swapped_sets_do_not_hold(shapes_val):  # noqa: F811
    sets = constructed_sets(shapes_val)
    sets["iou-nms"], sets["nms"] = sets["nms"], sets["iou-nms"]
    for d in sets["raw"]:
        d["iou_pred"], d["score"] = d["score"], d["iou_pred"]  # the score is now the good predictor
    sets = {k: v for k, v in sets.items() if not k.startswith(("nms+", "joint/"))} | {"nms+refine/0": sets["nms"], "nms+refine/1": sets["soft-nms"]}
    result = C.paper_claims(PipelineOutput(sets=sets), shapes_val, replicates=REPLICATES)
    for key in ("fig2-pearson", "fig3-positives", "fig7-recall", "iou-nms-ap", "iou-nms-ap90", "fig4-monotonic"):
        assert result.claims[key].verdict == C.DOES_NOT_HOLD, key
        assert result.claims[key].ci95[1] < 0
    assert "fig4-vs-regression" not in result.claims and "joint-ap" not in result.claims  # no such sets: no such claims
    assert "regression" not in result.fig4


def test_equal_sets_and_a_one_image_difference_are_inconclusive(shapes_val):  # noqa: F811
    nms = scaled_jitter(shapes_val, 0.12, seed=2, per_object=1)
    one_image = shapes_val.getImgIds()[0]
    exact = [{"image_id": one_image, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.5}
             for a in shapes_val.imgToAnns[one_image]]  # that image's objects, found exactly
    better_there = [d for d in nms if d["image_id"] != one_image] + exact
    sets = {"raw": scaled_jitter(shapes_val, 0.12, seed=0), "nms": nms, "iou-nms": better_there, "nms+refine/0": nms, "nms+refine/1": list(nms)}
    result = C.paper_claims(PipelineOutput(sets=sets), shapes_val, replicates=REPLICATES)
    assert coco_ap(shapes_val, better_there)["AP"] > coco_ap(shapes_val, nms)["AP"]  # better, but in one image of 60
    for key in ("iou-nms-ap", "refine-ap", "fig4-monotonic", "fig2-pearson"):
        assert result.claims[key].verdict == C.INCONCLUSIVE, key
    assert result.claims["refine-ap"].ci95 == (0.0, 0.0)
    assert math.isnan(result.claims["fig2-pearson"].ours)  # no iou_pred in the raw set: undefined, not judged


def test_claims_on_empty_detection_sets_are_inconclusive_not_errors(shapes_val):  # noqa: F811
    sets = {name: [] for name in ("raw", "nms", "soft-nms", "iou-nms", "nms+refine/0", "nms+refine/1", "nms+regress/0", "nms+regress/1")}
    result = C.paper_claims(PipelineOutput(sets=sets), shapes_val, replicates=20)
    assert {c.verdict for c in result.claims.values()} == {C.INCONCLUSIVE}
    assert result.claims["iou-nms-ap"].ours == 0 and result.claims["fig3-positives"].ours == 0
    assert math.isnan(result.claims["fig2-pearson"].ours)


# ============================================================================= reports/index.md
def test_index_lists_every_claim_with_the_paper_and_one_column_per_dataset(good, tmp_path):
    _, result = good
    for dataset, records in (("neon-trees", result.records()[:3]), ("shapes", result.records())):
        (tmp_path / dataset).mkdir()
        (tmp_path / dataset / "numbers.json").write_text(json.dumps({"pearson_cls": 0.2, "claims": records}))
    text = C.write_index(tmp_path).read_text()
    assert text == (tmp_path / "index.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Claim"))
    assert header == "| Claim | Metric | Paper | shapes | neon-trees |"  # the lab first
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    ap90 = rows["IoU-guided NMS improves AP90 over NMS (Table 1)"]
    assert ap90[2] == "13.3 vs 9.8"  # the paper's Table 1
    c = result.claims["iou-nms-ap90"]
    assert ap90[3].startswith(f"{100 * c.ours:.1f} vs {100 * c.baseline:.1f}: ") and ap90[3].endswith(C.verdict_words(c.verdict))
    assert ap90[4].strip(" |") == "–"  # not in neon-trees' records
    assert rows["The predicted IoU tracks localization better than the classification score (Fig. 2)"][2] == "0.617 vs 0.217"
    assert len(rows) == 1 + len(result.claims)


def test_write_index_without_reports_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        C.write_index(tmp_path)
