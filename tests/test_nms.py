"""Tests of workbench.ops.nms.

* ``nms`` / ``batched_nms`` against torchvision on generated inputs full of edge cases: tied
  scores, duplicate boxes, integer coordinates (IoUs land exactly on thresholds), zero-size and
  inverted boxes.
* ``soft_nms`` / ``iou_guided_nms`` against plain-loop float64 references written here from the
  papers' pseudo-code (Bodla et al. 2017, Algorithm 1; IoU-Net, Algorithm 1), and on small cases
  worked out by hand.
* Input checks and empty inputs.
* With a GPU, the CUDA kernels against the CPU path (skipped cleanly without one).
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.ops import _box_pairs, _nms_cpu
from workbench.ops.nms import batched_iou_guided_nms, batched_nms, batched_soft_nms, iou_guided_nms, nms, soft_nms

CUDA = torch.cuda.is_available()


def cpu_and_cuda():
    return ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")))


# ------------------------------------------------------------------------------------------------
# Input generation
# ------------------------------------------------------------------------------------------------

THRESHOLDS = st.one_of(st.sampled_from([0.0, 0.2, 0.25, 1 / 3, 0.5, 0.7, 1.0]), st.floats(0.0, 1.0))


@st.composite
def detections(draw, max_n: int = 30, continuous: bool = False, tied: bool = True):
    """(boxes [N, 4] float64, scores [N], ious [N]) on CPU.

    Integer corners (or, with ``continuous``, arbitrary floats) with widths and heights that may be
    zero or negative, some boxes copied from others, and scores / IoUs drawn from a few values so
    that ties are common (unless ``tied`` is false: then scores are distinct).
    """
    n = draw(st.integers(0, max_n))
    if continuous:
        corner, extent = st.floats(-50, 50, width=32), st.floats(-5, 40, width=32)
    else:
        corner, extent = st.integers(-4, 12), st.integers(-2, 9)
    rows = []
    for _ in range(n):
        if rows and draw(st.integers(0, 4)) == 0:
            rows.append(rows[draw(st.integers(0, len(rows) - 1))])  # an exact duplicate
        else:
            x0, y0, w, h = draw(corner), draw(corner), draw(extent), draw(extent)
            rows.append([x0, y0, x0 + w, y0 + h])
    boxes = torch.tensor(rows, dtype=torch.float64).reshape(n, 4)
    if tied:
        level = st.integers(0, 4).map(lambda k: k / 4)
        scores = draw(st.lists(level, min_size=n, max_size=n))
    else:
        scores = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
        scores = [s / 10_000 for s in scores]
    ious = draw(st.lists(st.integers(0, 4).map(lambda k: k / 4), min_size=n, max_size=n))
    return boxes, torch.tensor(scores, dtype=torch.float64), torch.tensor(ious, dtype=torch.float64)


def random_boxes(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40
    return torch.cat([xy, xy + wh], 1).to(dtype), torch.rand(n, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------
# References: plain Python floats (float64), straight from the pseudo-code
# ------------------------------------------------------------------------------------------------


def ref_iou(a: list[float], b: list[float]) -> float:
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = area_a + area_b - inter
    return math.nan if union == 0 else inter / union  # 0/0: two zero-area boxes


def ref_soft_nms(boxes, scores, iou_threshold, sigma, score_threshold, method):
    """Bodla et al. 2017, Algorithm 1, with boxes below ``score_threshold`` discarded.

    Returns (kept indices, their scores, suppressors): -1 kept, -2 below the threshold from the
    start, else the selected box whose decay pushed it below.
    """
    B = boxes.tolist()
    S = scores.tolist()
    remaining = [i for i in range(len(B)) if S[i] >= score_threshold]
    suppressors = [-2] * len(B)
    D, kept_scores = [], []
    while remaining:
        m = max(remaining, key=lambda i: (S[i], -i))  # highest score, then lowest index
        remaining.remove(m)
        D.append(m)
        kept_scores.append(S[m])
        suppressors[m] = -1
        for i in remaining:
            iou = ref_iou(B[m], B[i])
            if method == "linear":
                if iou >= iou_threshold:
                    S[i] = S[i] * (1 - iou)
            elif not math.isnan(iou):
                S[i] = S[i] * math.exp(-(iou * iou) / sigma)
            if S[i] < score_threshold:
                suppressors[i] = m
        remaining = [i for i in remaining if S[i] >= score_threshold]
    return D, kept_scores, suppressors


def ref_iou_guided_nms(boxes, scores, ious, iou_threshold):
    """IoU-Net, Algorithm 1. Returns (kept indices, their scores, suppressors: -1 kept, else the remover)."""
    B = boxes.tolist()
    S = scores.tolist()
    I = ious.tolist()  # noqa: E741 (the paper's name)
    remaining = list(range(len(B)))
    suppressors = [-1] * len(B)
    D, kept_scores = [], []
    while remaining:
        m = max(remaining, key=lambda j: (I[j], -j))
        remaining.remove(m)
        s = S[m]
        for j in list(remaining):
            if ref_iou(B[m], B[j]) > iou_threshold:
                s = max(s, S[j])
                remaining.remove(j)
                suppressors[j] = m
        D.append(m)
        kept_scores.append(s)
    return D, kept_scores, suppressors


def ref_batched(run, idxs, tensors, *args):
    """``run(*class_tensors, *args)`` on each class, merged by score descending, then index."""
    results = []
    labels = idxs.tolist()
    for c in sorted(set(labels)):
        members = [i for i, k in enumerate(labels) if k == c]
        keep, kept_scores, *_ = run(*(t[members] for t in tensors), *args)
        results += [(s, members[k]) for k, s in zip(keep, kept_scores)]
    results.sort(key=lambda r: (-r[0], r[1]))
    return [i for _, i in results], [s for s, _ in results]


# ------------------------------------------------------------------------------------------------
# nms and batched_nms against torchvision
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=300, deadline=None)
@given(case=detections(), iou_threshold=THRESHOLDS)
def test_nms_matches_torchvision_on_grid_boxes(device, dtype, case, iou_threshold):
    boxes, scores, _ = (t.to(dtype) for t in case)
    expected = torchvision.ops.nms(boxes, scores, iou_threshold)
    keep = nms(boxes.to(device), scores.to(device), iou_threshold)
    assert keep.dtype == torch.int64 and keep.device.type == device
    assert keep.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=250, deadline=None)
@given(case=detections(continuous=True), iou_threshold=THRESHOLDS)
def test_nms_matches_torchvision_on_float_boxes(device, case, iou_threshold):
    boxes, scores, _ = (t.float() for t in case)
    expected = torchvision.ops.nms(boxes, scores, iou_threshold)
    assert nms(boxes.to(device), scores.to(device), iou_threshold).cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_torchvision_on_many_boxes(device, seed):
    boxes, scores = random_boxes(1500, seed)
    scores = (scores * 20).round()  # many ties
    for iou_threshold in (0.3, 0.5, 0.8):
        expected = torchvision.ops.nms(boxes, scores, iou_threshold)
        assert nms(boxes.to(device), scores.to(device), iou_threshold).cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=250, deadline=None)
@given(case=detections(), idxs=st.lists(st.integers(0, 3), min_size=30, max_size=30), iou_threshold=THRESHOLDS)
def test_batched_nms_matches_torchvision(device, case, idxs, iou_threshold):
    # Integer coordinates, so torchvision's offset trick (boxes + class * (max + 1)) is exact.
    boxes, scores, _ = (t.float() for t in case)
    idxs = torch.tensor(idxs[: boxes.shape[0]], dtype=torch.int64)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    keep = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
    assert keep.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=120, deadline=None)
@given(case=detections(continuous=True), idxs=st.lists(st.integers(0, 3), min_size=30, max_size=30),
       iou_threshold=THRESHOLDS)
def test_batched_nms_is_nms_per_class(device, case, idxs, iou_threshold):
    # Arbitrary floats: built from torchvision.ops.nms on each class, merged by score then index.
    boxes, scores, _ = (t.float() for t in case)
    idxs = torch.tensor(idxs[: boxes.shape[0]], dtype=torch.int32)

    def tv_nms(b, s, thr):
        keep = torchvision.ops.nms(b, s, thr)
        return keep.tolist(), s[keep].tolist()

    expected, _ = ref_batched(tv_nms, idxs, (boxes, scores), iou_threshold)
    keep = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
    assert keep.cpu().tolist() == expected


def test_nms_threshold_is_strict():
    # Box 0 = [0,0,2,1] overlaps box 1 = [1,0,3,1] with IoU 1 / (2 + 2 - 1) = 1/3 and box 2 = [0,0,1,1]
    # with IoU 1 / (2 + 1 - 1) = 1/2; boxes 1 and 2 only touch (IoU 0). Box 0 is kept first.
    boxes = torch.tensor([[0, 0, 2, 1], [1, 0, 3, 1], [0, 0, 1, 1]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]  # 1/2 is not > 1/2
    assert nms(boxes, scores, 0.49).tolist() == [0, 1]  # box 2 goes
    assert nms(boxes, scores, 1 / 3).tolist() == [0, 1]  # 1/3 is not > 1/3
    assert nms(boxes, scores, 0.33).tolist() == [0]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_thresholds_are_compared_in_float64(device):
    # IoU([0,0,10,1], [0,0,1,1]) = 1/10, which float32 rounds up to 0.100000001490116. torchvision
    # compares that float to the double 0.1 and suppresses; a float32 comparison would round 0.1 to
    # the same float and keep the box.
    boxes = torch.tensor([[0.0, 0, 10, 1], [0, 0, 1, 1]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    assert torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.1).tolist() == [0]
    assert nms(boxes, scores, 0.1).tolist() == [0]
    assert iou_guided_nms(boxes, scores, scores, 0.1)[0].tolist() == [0]
    # Linear Soft-NMS decays from IoU >= threshold; 0.100000001490116 < 0.1000000015, whose float32
    # rounding is the IoU itself: no decay.
    assert soft_nms(boxes, scores, iou_threshold=0.1000000015)[1].tolist() == pytest.approx([0.9, 0.8])
    assert soft_nms(boxes, scores, iou_threshold=0.1)[1].tolist() == pytest.approx([0.9, 0.8 * 0.9])


def test_nms_ties_go_to_the_lower_index():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4 + [[20.0, 20, 30, 30]])
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [1, 4]


def test_zero_area_duplicates_never_suppress():
    # 0 / 0 IoU is NaN, which is not > any threshold (torchvision behaves the same).
    boxes = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.0).tolist() == [0, 1]
    for method in ("linear", "gaussian"):
        keep, new_scores = soft_nms(boxes, scores, 0.0, method=method)
        assert keep.tolist() == [0, 1] and new_scores.tolist() == pytest.approx([0.9, 0.8])
    assert iou_guided_nms(boxes, scores, scores, 0.0)[0].tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    boxes, scores = random_boxes(300, seed=7, dtype=dtype)
    expected = torchvision.ops.nms(boxes.float(), scores.float(), 0.5)
    assert nms(boxes, scores, 0.5).tolist() == expected.tolist()
    keep, new_scores = soft_nms(boxes, scores)
    assert new_scores.dtype == dtype
    ref_keep, ref_scores = soft_nms(boxes.float(), scores.float())
    assert keep.tolist() == ref_keep.tolist()
    assert torch.equal(new_scores, ref_scores.to(dtype))


# ------------------------------------------------------------------------------------------------
# Soft-NMS
# ------------------------------------------------------------------------------------------------

# Three boxes with exact IoUs: A = [0,0,10,10], B = [0,0,10,5], C = [5,0,15,10].
#   IoU(A, B) = 50 / 100 = 1/2;  IoU(A, C) = 50 / 150 = 1/3;  IoU(B, C) = 25 / 125 = 1/5.
# Scores A 0.9, B 0.8, C 0.7.
THREE_BOXES = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10]], dtype=torch.float64)
THREE_SCORES = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_soft_nms_linear_by_hand(device):
    # Select A (0.9). B: 1/2 >= 0.3, 0.8 * (1 - 1/2) = 0.4.  C: 1/3 >= 0.3, 0.7 * (2/3) = 0.4667.
    # Select C (0.4667). B: IoU 1/5 < 0.3, unchanged.  Select B (0.4).
    keep, new_scores = soft_nms(THREE_BOXES.to(device), THREE_SCORES.to(device), iou_threshold=0.3,
                                method="linear")
    assert keep.tolist() == [0, 2, 1]
    assert new_scores.tolist() == pytest.approx([0.9, 0.7 * 2 / 3, 0.4], rel=1e-12)
    # With score_threshold 0.45, B (0.4 after A) is dropped.
    keep, new_scores = soft_nms(THREE_BOXES.to(device), THREE_SCORES.to(device), 0.3, score_threshold=0.45)
    assert keep.tolist() == [0, 2]
    assert new_scores.tolist() == pytest.approx([0.9, 0.7 * 2 / 3], rel=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_soft_nms_gaussian_by_hand(device):
    # sigma = 0.5. Select A. B: 0.8 exp(-(1/2)^2 / 0.5) = 0.8 e^-0.5 = 0.4852.
    # C: 0.7 exp(-(1/3)^2 / 0.5) = 0.7 e^(-2/9) = 0.5605. Select C.
    # B: 0.4852 exp(-(1/5)^2 / 0.5) = 0.4852 e^-0.08 = 0.4479. Select B.
    keep, new_scores = soft_nms(THREE_BOXES.to(device), THREE_SCORES.to(device), sigma=0.5, method="gaussian")
    assert keep.tolist() == [0, 2, 1]
    expected = [0.9, 0.7 * math.exp(-2 / 9), 0.8 * math.exp(-0.5) * math.exp(-0.08)]
    assert new_scores.tolist() == pytest.approx(expected, rel=1e-12)


def test_soft_nms_linear_threshold_is_inclusive():
    # IoU(A, B) = 1/2 exactly: with iou_threshold 0.5 B decays to 0.4, with 0.5 + eps it does not.
    boxes, scores = THREE_BOXES[:2], THREE_SCORES[:2]
    assert soft_nms(boxes, scores, iou_threshold=0.5)[1].tolist() == pytest.approx([0.9, 0.4])
    assert soft_nms(boxes, scores, iou_threshold=0.5000001)[1].tolist() == pytest.approx([0.9, 0.8])


def test_soft_nms_drops_boxes_that_start_below_score_threshold():
    boxes = torch.tensor([[0.0, 0, 1, 1], [5.0, 5, 6, 6]])
    keep, new_scores = soft_nms(boxes, torch.tensor([0.0005, 0.6]))
    assert keep.tolist() == [1] and new_scores.tolist() == pytest.approx([0.6])


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=200, deadline=None)
@given(case=detections(), iou_threshold=THRESHOLDS, score_threshold=st.sampled_from([0.0, 0.001, 0.2, 0.5]))
def test_soft_nms_linear_matches_reference(device, case, iou_threshold, score_threshold):
    # Integer corners: every IoU is one correctly rounded division, so the arithmetic is exact
    # up to the same roundings in both, and ties in the decayed scores are reproduced bit for bit.
    boxes, scores, _ = case
    expected = ref_soft_nms(boxes, scores, iou_threshold, 0.5, score_threshold, "linear")[:2]
    keep, new_scores = soft_nms(boxes.to(device), scores.to(device), iou_threshold, 0.5, score_threshold, "linear")
    assert (keep.tolist(), new_scores.tolist()) == expected


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=120, deadline=None)
@given(case=detections(tied=False), sigma=st.sampled_from([0.1, 0.5, 2.0]),
       score_threshold=st.sampled_from([0.0, 0.001, 0.2]))
def test_soft_nms_gaussian_matches_reference(device, case, sigma, score_threshold):
    # torch.exp and math.exp may differ in the last bit, so scores are distinct (no near ties)
    # and compared with a tolerance.
    boxes, scores, _ = case
    expected_keep, expected_scores, _ = ref_soft_nms(boxes, scores, 0.3, sigma, score_threshold, "gaussian")
    keep, new_scores = soft_nms(boxes.to(device), scores.to(device), 0.3, sigma, score_threshold, "gaussian")
    assert keep.tolist() == expected_keep
    assert new_scores.tolist() == pytest.approx(expected_scores, rel=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("method", ["linear", "gaussian"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), idxs=st.lists(st.integers(0, 2), min_size=30, max_size=30))
def test_batched_soft_nms_matches_reference(device, method, data, idxs):
    # Ties only for the linear decay, whose arithmetic is reproduced exactly (see above).
    boxes, scores, _ = data.draw(detections(tied=method == "linear"))
    idxs = torch.tensor(idxs[: boxes.shape[0]], dtype=torch.int64)
    expected_keep, expected_scores = ref_batched(ref_soft_nms, idxs, (boxes, scores), 0.3, 0.5, 0.001, method)
    keep, new_scores = batched_soft_nms(boxes.to(device), scores.to(device), idxs.to(device), method=method)
    assert keep.tolist() == expected_keep
    assert new_scores.tolist() == pytest.approx(expected_scores, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# IoU-guided NMS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_iou_guided_nms_by_hand(device):
    # A cluster around [0,0,10,10] and an isolated box D:
    #   A [0,0,10,10]   score 0.6   predicted IoU 0.9
    #   B [1,0,11,10]   score 0.95  predicted IoU 0.7   IoU(A, B) = 90 / 110 = 0.818
    #   C [0,1,10,11]   score 0.8   predicted IoU 0.5   IoU(A, C) = 90 / 110 = 0.818
    #   D [30,30,40,40] score 0.3   predicted IoU 0.8
    # Ranked by predicted IoU: A, D, B, C. A removes B and C and takes max(0.6, 0.95, 0.8) = 0.95;
    # D keeps 0.3. Plain NMS would have kept B, the best-scored but worse-localized box.
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [30, 30, 40, 40]], dtype=torch.float32)
    scores = torch.tensor([0.6, 0.95, 0.8, 0.3])
    ious = torch.tensor([0.9, 0.7, 0.5, 0.8])
    keep, new_scores = iou_guided_nms(boxes.to(device), scores.to(device), ious.to(device), 0.5)
    assert keep.tolist() == [0, 3]
    assert new_scores.tolist() == pytest.approx([0.95, 0.3])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3]


def test_iou_guided_nms_only_takes_scores_of_boxes_removed_now():
    # A [0,0,10,10] removes B [2,0,12,10] (IoU 80/120 = 0.667). C [6,0,16,10] overlaps B
    # (IoU 0.667) but not A enough (IoU 40/160 = 0.25), so C survives with its own score even
    # though B, which it would have matched, had 0.99.
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [6, 0, 16, 10]], dtype=torch.float64)
    scores = torch.tensor([0.5, 0.99, 0.4], dtype=torch.float64)
    ious = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    keep, new_scores = iou_guided_nms(boxes, scores, ious, 0.5)
    assert keep.tolist() == [0, 2] and new_scores.tolist() == [0.99, 0.4]


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=300, deadline=None)
@given(case=detections(), iou_threshold=THRESHOLDS)
def test_iou_guided_nms_matches_reference(device, case, iou_threshold):
    boxes, scores, ious = case
    expected = ref_iou_guided_nms(boxes, scores, ious, iou_threshold)[:2]
    keep, new_scores = iou_guided_nms(boxes.to(device), scores.to(device), ious.to(device), iou_threshold)
    assert (keep.tolist(), new_scores.tolist()) == expected


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=120, deadline=None)
@given(case=detections(), idxs=st.lists(st.integers(0, 2), min_size=30, max_size=30), iou_threshold=THRESHOLDS)
def test_batched_iou_guided_nms_matches_reference(device, case, idxs, iou_threshold):
    boxes, scores, ious = case
    idxs = torch.tensor(idxs[: boxes.shape[0]], dtype=torch.int64)
    expected = ref_batched(ref_iou_guided_nms, idxs, (boxes, scores, ious), iou_threshold)
    keep, new_scores = batched_iou_guided_nms(
        boxes.to(device), scores.to(device), ious.to(device), idxs.to(device), iou_threshold
    )
    assert (keep.tolist(), new_scores.tolist()) == expected


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batched_forms_keep_classes_apart(device):
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6], device=device)
    idxs = torch.tensor([0, 1, 0, 1], device=device)
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    keep, new_scores = batched_iou_guided_nms(boxes, scores, torch.tensor([0.1, 0.2, 0.3, 0.4], device=device), idxs, 0.5)
    # Class 0: box 2 ranks first and takes 0.9 from box 0; class 1: box 3 takes 0.8 from box 1.
    assert keep.tolist() == [2, 3] and new_scores.tolist() == pytest.approx([0.9, 0.8])
    keep, new_scores = batched_soft_nms(boxes, scores, idxs, score_threshold=0.1)
    # Identical boxes: IoU 1, linear decay to 0, so one survivor per class.
    assert keep.tolist() == [0, 1] and new_scores.tolist() == pytest.approx([0.9, 0.8])


# ------------------------------------------------------------------------------------------------
# Suppressors, and the CPU fast paths against the reference loop
# ------------------------------------------------------------------------------------------------


def ref_batched_suppressors(run, idxs, tensors, *args):
    """The suppressors of ``run`` applied per class, as input indices (negative codes unchanged)."""
    labels = idxs.tolist()
    suppressors = [None] * len(labels)
    for c in sorted(set(labels)):
        members = [i for i, k in enumerate(labels) if k == c]
        for i, s in zip(members, run(*(t[members] for t in tensors), *args)[2]):
            suppressors[i] = members[s] if s >= 0 else s
    return suppressors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=200, deadline=None)
@given(case=st.one_of(detections(), detections(continuous=True)), iou_threshold=THRESHOLDS)
def test_reference_nms_matches_torchvision(dtype, case, iou_threshold):
    # The CPU fast path is torchvision.ops.nms itself, so the reference loop is checked against it here.
    boxes, scores, _ = (t.to(dtype) for t in case)
    keep = _nms_cpu.reference_suppress(boxes, scores, scores, iou_threshold, rescore=False)[0]
    assert keep.tolist() == torchvision.ops.nms(boxes, scores, iou_threshold).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescore", [False, True])
@settings(max_examples=200, deadline=None)
@given(case=st.one_of(detections(), detections(continuous=True)), iou_threshold=THRESHOLDS)
def test_fast_suppress_equals_reference(dtype, rescore, case, iou_threshold):
    boxes, scores, ious = (t.to(dtype) for t in case)
    expected = _nms_cpu.reference_suppress(boxes, ious, scores, iou_threshold, rescore)
    got = _nms_cpu.suppress(boxes, ious, scores, iou_threshold, rescore, with_suppressors=True)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.tolist() == e.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_fast_suppress_equals_reference_on_many_boxes(seed):
    boxes, scores = random_boxes(1500, seed)
    ious = (random_boxes(1500, seed + 10)[1] * 8).round()  # many ties in the ranking key
    for iou_threshold in (0.0, 0.3, 0.7):
        expected = _nms_cpu.reference_suppress(boxes, ious, scores, iou_threshold, rescore=True)
        got = _nms_cpu.suppress(boxes, ious, scores, iou_threshold, rescore=True, with_suppressors=True)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("rounds", [1, 2])
@settings(max_examples=150, deadline=None)
@given(case=st.one_of(detections(), detections(continuous=True)), iou_threshold=THRESHOLDS, rescore=st.booleans())
def test_fast_suppress_hands_undecided_boxes_to_torchvision(rounds, case, iou_threshold, rescore):
    # After a round or two of the vectorized resolution, the boxes still undecided go to
    # torchvision's loop; the result must still be the reference's, suppressors included.
    boxes, scores, ious = (t.float() for t in case)
    expected = _nms_cpu.reference_suppress(boxes, ious, scores, iou_threshold, rescore)
    with mock.patch.object(_nms_cpu, "_MAX_ROUNDS", rounds):
        got = _nms_cpu.suppress(boxes, ious, scores, iou_threshold, rescore, with_suppressors=True)
    assert all(g.tolist() == e.tolist() for g, e in zip(got, expected))


@pytest.mark.parametrize("seed", range(2))
def test_fast_nms_falls_back_to_torchvision_when_boxes_crowd(seed):
    # 400 boxes in a 60 px square: far more candidate pairs than the sparse path allows per box.
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(400, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + 40 + torch.rand(400, 2, generator=g)], 1)
    scores = (torch.rand(400, generator=g) * 10).round()
    limit = _nms_cpu._MAX_CANDIDATES_PER_BOX * 400 + 1024
    assert _box_pairs.intersecting_pairs(boxes.numpy(), 0.5, limit) is None
    for iou_threshold in (0.3, 0.5, 0.9):
        keep, _, _ = _nms_cpu.suppress(boxes, scores, scores, iou_threshold, False, False)
        assert keep.tolist() == torchvision.ops.nms(boxes, scores, iou_threshold).tolist()


@st.composite
def spread_boxes(draw):
    """float32 or float64 boxes over many magnitudes: tiny and huge extents, far-off corners."""
    n = draw(st.integers(2, 25))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 1e30]))
    offset = draw(st.sampled_from([0.0, 1e3, 1e7, -1e20]))
    corner = st.floats(0, 10, width=32).map(lambda v: v * scale + offset)
    extent = st.one_of(st.floats(0, 10, width=32).map(lambda v: v * scale), st.sampled_from([0.0, 1e-45, 1e-38]))
    rows = []
    for _ in range(n):
        x0, y0 = draw(corner), draw(corner)
        rows.append([x0, y0, x0 + draw(extent), y0 + draw(extent)])
    return torch.tensor(rows, dtype=draw(st.sampled_from([torch.float32, torch.float64]))).numpy()


@settings(max_examples=300, deadline=None)
@given(boxes=st.one_of(spread_boxes(), detections(continuous=True).map(lambda c: c[0].float().numpy())),
       min_iou=st.one_of(THRESHOLDS, st.sampled_from([1e-3, 0.999, 1.0, 1.5])))
def test_narrowed_pairs_keep_every_pair_that_reaches_the_threshold(boxes, min_iou):
    # The bounds that narrow the sweep may only leave out pairs whose IoU stays below min_iou.
    def reaching(pairs):
        first, second, iou = pairs
        return {(min(a, b), max(a, b)) for a, b, v in zip(first.tolist(), second.tolist(), iou.tolist()) if v >= min_iou}

    assert reaching(_box_pairs.intersecting_pairs(boxes, min_iou)) == reaching(_box_pairs.intersecting_pairs(boxes))


@pytest.mark.parametrize("gaussian", [False, True])
def test_fast_soft_nms_of_overflowing_boxes_equals_reference(gaussian):
    # Areas and intersections overflow to inf, so IoUs are inf / inf = NaN: no decay, as in the reference.
    boxes = torch.tensor([[0, 0, 1e200, 1e200], [1e199, 1e199, 1.5e200, 1.5e200], [0, 0, 1, 1], [0, 0, 1, 0.5]],
                         dtype=torch.float64)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.6], dtype=torch.float64)
    expected = _nms_cpu.reference_soft(boxes, scores.clone(), 0.3, 0.5, 0.001, gaussian)
    got = _nms_cpu.soft(boxes, scores.clone(), 0.3, 0.5, 0.001, gaussian)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("bound", [2**16, 2**16 + 1, 10**9])
def test_argsort_ints_is_a_stable_argsort(bound):
    keys = np.random.default_rng(bound).integers(0, min(bound, 50), 2000)
    keys[::7] = bound - 1
    assert np.array_equal(_box_pairs.argsort_ints(keys, bound), np.argsort(keys, kind="stable"))


def test_far_apart_strips_and_huge_values_pass_the_checks():
    # Strip indices beyond 16 bits (boxes far apart vertically), and float64 values whose sum
    # overflows or is inf - inf although no value is NaN: the fast checks must not reject them.
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 1e6, 10, 1e6 + 10], [1, 1e6, 11, 1e6 + 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    huge = torch.tensor([[0.0, 0, 1e308, 1e308], [1e308, 1e308, 1.5e308, 1.5e308]], dtype=torch.float64)
    assert nms(huge, torch.tensor([0.5, 0.4], dtype=torch.float64), 0.5).tolist() == [0, 1]
    infinite = torch.tensor([math.inf, -math.inf])
    assert nms(GOOD_BOXES, infinite, 0.5).tolist() == torchvision.ops.nms(GOOD_BOXES, infinite, 0.5).tolist()


@pytest.mark.parametrize("candidates", [1, 2, 64])
@settings(max_examples=150, deadline=None)
@given(case=st.one_of(detections(), detections(continuous=True)), iou_threshold=THRESHOLDS,
       score_threshold=st.sampled_from([0.0, 0.001, 0.2, 0.5]), double=st.booleans())
def test_fast_linear_soft_nms_equals_reference(candidates, case, iou_threshold, score_threshold, double):
    # Bit for bit: the fast path multiplies the same float weights in the same order. One, two
    # and many candidates per step exercise the tie handling of the candidate selection.
    boxes, scores, _ = (t.to(torch.float64 if double else torch.float32) for t in case)
    expected = _nms_cpu.reference_soft(boxes, scores.clone(), iou_threshold, 0.5, score_threshold, False)
    with mock.patch.object(_nms_cpu, "_SOFT_CANDIDATES", candidates):
        got = _nms_cpu.soft(boxes, scores.clone(), iou_threshold, 0.5, score_threshold, False)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.tolist() == e.tolist()


@pytest.mark.parametrize("candidates", [2, 64])
@settings(max_examples=100, deadline=None)
@given(case=st.one_of(detections(tied=False), detections(continuous=True, tied=False)),
       sigma=st.sampled_from([0.1, 0.5, 2.0]), score_threshold=st.sampled_from([0.0, 0.001, 0.2]))
def test_fast_gaussian_soft_nms_equals_reference(candidates, case, sigma, score_threshold):
    # NumPy's and PyTorch's exp may differ in the last bit: distinct scores, scores to a tolerance.
    boxes, scores, _ = case
    expected = _nms_cpu.reference_soft(boxes, scores.clone(), 0.3, sigma, score_threshold, True)
    with mock.patch.object(_nms_cpu, "_SOFT_CANDIDATES", candidates):
        keep, new_scores, suppressors = _nms_cpu.soft(boxes, scores.clone(), 0.3, sigma, score_threshold, True)
    assert keep.tolist() == expected[0].tolist() and suppressors.tolist() == expected[2].tolist()
    torch.testing.assert_close(new_scores, expected[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(2))
def test_fast_soft_nms_equals_reference_on_many_boxes(seed):
    boxes, scores = random_boxes(1500, seed)
    tied = (scores * 16).round() / 16  # many equal scores, and equal decayed scores
    for iou_threshold, score_threshold in ((0.0, 0.001), (0.3, 0.001), (0.5, 0.3)):
        expected = _nms_cpu.reference_soft(boxes, tied.clone(), iou_threshold, 0.5, score_threshold, False)
        got = _nms_cpu.soft(boxes, tied.clone(), iou_threshold, 0.5, score_threshold, False)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))


@settings(max_examples=300, deadline=None)
@given(threshold=st.one_of(THRESHOLDS, st.floats(0, 1e-30)), x=st.lists(st.floats(0, 1, width=32), max_size=20))
def test_strictly_above_compares_float32_as_float64(threshold, x):
    values = torch.tensor(x + [threshold], dtype=torch.float32)  # the threshold's own float32 rounding too
    bound = _nms_cpu.strictly_above(torch.float32, threshold)
    assert torch.equal(values > bound, values.double() > threshold)


def test_suppressors_by_hand():
    # A [0,0,10,10], B [1,0,11,10], C [4,0,14,10], D [30,30,40,40]: IoU(A, B) = 90/110 = 0.818,
    # IoU(B, C) = 70/130 = 0.538, IoU(A, C) = 60/140 = 0.429; D overlaps nothing.
    # NMS 0.5 by score (B, A, C, D): B removes A and C.
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [4, 0, 14, 10], [30, 30, 40, 40]], dtype=torch.float64)
    scores = torch.tensor([0.8, 0.9, 0.7, 0.1], dtype=torch.float64)
    keep, suppressors = nms(boxes, scores, 0.5, return_suppressors=True)
    assert keep.tolist() == [1, 3] and suppressors.tolist() == [1, -1, 1, -1]
    # Ranked by predicted IoU A, C, B, D: A removes B and takes its 0.9; C survives A (0.429).
    ious = torch.tensor([0.9, 0.5, 0.7, 0.1], dtype=torch.float64)
    keep, new_scores, suppressors = iou_guided_nms(boxes, scores, ious, 0.5, return_suppressors=True)
    assert keep.tolist() == [0, 2, 3] and new_scores.tolist() == [0.9, 0.7, 0.1]
    assert suppressors.tolist() == [-1, 0, -1, -1]
    # Linear Soft-NMS from IoU 0.3, score_threshold 0.3: D starts below 0.3. B (0.9) decays A to
    # 0.8 * 20/110 = 0.145, below 0.3, and C to 0.7 * 60/130 = 0.323, which is then kept.
    keep, new_scores, suppressors = soft_nms(boxes, scores, 0.3, score_threshold=0.3, return_suppressors=True)
    assert keep.tolist() == [1, 2] and suppressors.tolist() == [1, -1, -1, -2]
    assert new_scores.tolist() == pytest.approx([0.9, 0.7 * 60 / 130])


@settings(max_examples=200, deadline=None)
@given(case=st.one_of(detections(), detections(continuous=True)), iou_threshold=THRESHOLDS,
       score_threshold=st.sampled_from([0.0, 0.001, 0.2, 0.5]))
def test_suppressors_match_the_plain_references(case, iou_threshold, score_threshold):
    boxes, scores, ious = case
    keep, suppressors = nms(boxes, scores, iou_threshold, return_suppressors=True)
    # IoU-guided NMS ranked by the scores themselves removes exactly what NMS removes.
    expected_keep, _, expected = ref_iou_guided_nms(boxes, scores, scores, iou_threshold)
    assert keep.tolist() == expected_keep and suppressors.tolist() == expected
    got = iou_guided_nms(boxes, scores, ious, iou_threshold, return_suppressors=True)
    assert tuple(t.tolist() for t in got) == ref_iou_guided_nms(boxes, scores, ious, iou_threshold)
    got = soft_nms(boxes, scores, iou_threshold, 0.5, score_threshold, "linear", return_suppressors=True)
    assert tuple(t.tolist() for t in got) == ref_soft_nms(boxes, scores, iou_threshold, 0.5, score_threshold, "linear")


@settings(max_examples=100, deadline=None)
@given(case=detections(tied=False), sigma=st.sampled_from([0.1, 0.5, 2.0]),
       score_threshold=st.sampled_from([0.0, 0.001, 0.2]))
def test_gaussian_soft_nms_suppressors_match_the_plain_reference(case, sigma, score_threshold):
    boxes, scores, _ = case
    keep, _, suppressors = soft_nms(boxes, scores, 0.3, sigma, score_threshold, "gaussian", return_suppressors=True)
    expected_keep, _, expected = ref_soft_nms(boxes, scores, 0.3, sigma, score_threshold, "gaussian")
    assert keep.tolist() == expected_keep and suppressors.tolist() == expected


@settings(max_examples=100, deadline=None)
@given(case=detections(), idxs=st.lists(st.integers(0, 2), min_size=30, max_size=30), iou_threshold=THRESHOLDS)
def test_batched_suppressors_are_input_indices(case, idxs, iou_threshold):
    boxes, scores, ious = case
    idxs = torch.tensor(idxs[: boxes.shape[0]], dtype=torch.int64)
    keep, suppressors = batched_nms(boxes, scores, idxs, iou_threshold, return_suppressors=True)
    assert keep.tolist() == batched_nms(boxes, scores, idxs, iou_threshold).tolist()
    assert suppressors.tolist() == ref_batched_suppressors(ref_iou_guided_nms, idxs, (boxes, scores, scores), iou_threshold)
    got = batched_iou_guided_nms(boxes, scores, ious, idxs, iou_threshold, return_suppressors=True)
    assert got[2].tolist() == ref_batched_suppressors(ref_iou_guided_nms, idxs, (boxes, scores, ious), iou_threshold)
    assert [t.tolist() for t in got[:2]] == [t.tolist() for t in batched_iou_guided_nms(boxes, scores, ious, idxs, iou_threshold)]
    got = batched_soft_nms(boxes, scores, idxs, iou_threshold, score_threshold=0.2, return_suppressors=True)
    expected = ref_batched_suppressors(ref_soft_nms, idxs, (boxes, scores), iou_threshold, 0.5, 0.2, "linear")
    assert got[2].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_suppressors_of_empty_inputs(dtype):
    boxes, scores = torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype)
    idxs = torch.zeros(0, dtype=torch.int64)
    for out in (nms(boxes, scores, 0.5, return_suppressors=True),
                batched_nms(boxes, scores, idxs, 0.5, return_suppressors=True),
                soft_nms(boxes, scores, return_suppressors=True),
                batched_soft_nms(boxes, scores, idxs, return_suppressors=True),
                iou_guided_nms(boxes, scores, scores, 0.5, return_suppressors=True),
                batched_iou_guided_nms(boxes, scores, scores, idxs, 0.5, return_suppressors=True)):
        assert out[-1].shape == (0,) and out[-1].dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# Empty inputs and input checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_empty_inputs(device, dtype):
    boxes, scores = torch.zeros(0, 4, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device)
    idxs = torch.zeros(0, dtype=torch.int64, device=device)
    outputs = [
        (nms(boxes, scores, 0.5), None),
        (batched_nms(boxes, scores, idxs, 0.5), None),
        soft_nms(boxes, scores),
        batched_soft_nms(boxes, scores, idxs),
        iou_guided_nms(boxes, scores, scores, 0.5),
        batched_iou_guided_nms(boxes, scores, scores, idxs, 0.5),
    ]
    for keep, new_scores in outputs:
        assert keep.shape == (0,) and keep.dtype == torch.int64 and keep.device.type == device
        if new_scores is not None:
            assert new_scores.shape == (0,) and new_scores.dtype == dtype and new_scores.device.type == device


def _calls(boxes, scores, iou_threshold=0.5, ious=None, idxs=None, **soft):
    """Every public function with these arguments (the defaults filled in from valid inputs)."""
    n = boxes.shape[0] if isinstance(boxes, torch.Tensor) and boxes.dim() == 2 else 2
    ious = torch.full((n,), 0.5) if ious is None else ious
    idxs = torch.zeros(n, dtype=torch.int64) if idxs is None else idxs
    return {
        "nms": lambda: nms(boxes, scores, iou_threshold),
        "soft_nms": lambda: soft_nms(boxes, scores, iou_threshold, **soft),
        "iou_guided_nms": lambda: iou_guided_nms(boxes, scores, ious, iou_threshold),
        "batched_nms": lambda: batched_nms(boxes, scores, idxs, iou_threshold),
        "batched_soft_nms": lambda: batched_soft_nms(boxes, scores, idxs, iou_threshold, **soft),
        "batched_iou_guided_nms": lambda: batched_iou_guided_nms(boxes, scores, ious, idxs, iou_threshold),
    }


GOOD_BOXES = torch.tensor([[0.0, 0, 1, 1], [0.5, 0.5, 2, 2]])
GOOD_SCORES = torch.tensor([0.9, 0.8])
ALL_FUNCTIONS = list(_calls(GOOD_BOXES, GOOD_SCORES))

BAD_INPUTS = [
    # (description, keyword arguments of _calls, exception, message pattern)
    ("boxes not a tensor", dict(boxes=[[0.0, 0, 1, 1]] * 2), TypeError, "boxes"),
    ("boxes integer", dict(boxes=GOOD_BOXES.long()), TypeError, "boxes"),
    ("boxes wrong shape", dict(boxes=GOOD_BOXES[:, :3]), ValueError, "boxes"),
    ("boxes NaN", dict(boxes=torch.tensor([[0.0, 0, 1, math.nan], [0, 0, 1, 1]])), ValueError, "boxes"),
    ("boxes inf", dict(boxes=torch.tensor([[0.0, 0, 1, math.inf], [0, 0, 1, 1]])), ValueError, "boxes"),
    ("scores wrong length", dict(scores=torch.tensor([0.9])), ValueError, "scores"),
    ("scores NaN", dict(scores=torch.tensor([0.9, math.nan])), ValueError, "scores"),
    ("scores other dtype", dict(scores=GOOD_SCORES.double()), TypeError, "scores"),
    ("scores other device", dict(scores=torch.zeros(2, device="meta")), ValueError, "scores"),
    ("negative iou_threshold", dict(iou_threshold=-0.1), ValueError, "iou_threshold"),
    ("NaN iou_threshold", dict(iou_threshold=math.nan), ValueError, "iou_threshold"),
    ("iou_threshold not a number", dict(iou_threshold="0.5"), TypeError, "iou_threshold"),
]


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
@pytest.mark.parametrize("description, kwargs, error, pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(function, description, kwargs, error, pattern):
    args = dict(boxes=GOOD_BOXES, scores=GOOD_SCORES) | kwargs
    with pytest.raises(error, match=pattern):
        _calls(**args)[function]()


@pytest.mark.parametrize("function", ["iou_guided_nms", "batched_iou_guided_nms"])
@pytest.mark.parametrize("ious, error", [
    (torch.tensor([0.5]), ValueError),
    (torch.tensor([0.5, math.nan]), ValueError),
    (torch.tensor([0.5, 0.5], dtype=torch.float64), TypeError),
    (torch.tensor([1, 1]), TypeError),
])
def test_bad_ious(function, ious, error):
    with pytest.raises(error, match="ious"):
        _calls(GOOD_BOXES, GOOD_SCORES, ious=ious)[function]()


@pytest.mark.parametrize("function", [f for f in ALL_FUNCTIONS if f.startswith("batched")])
@pytest.mark.parametrize("idxs, error", [
    (torch.tensor([0.0, 1.0]), TypeError),
    (torch.tensor([True, False]), TypeError),
    (torch.tensor([0]), ValueError),
    (torch.zeros(2, 1, dtype=torch.int64), ValueError),
    (torch.zeros(2, dtype=torch.int64, device="meta"), ValueError),
    ([0, 1], TypeError),
])
def test_bad_idxs(function, idxs, error):
    with pytest.raises(error, match="idxs"):
        _calls(GOOD_BOXES, GOOD_SCORES, idxs=idxs)[function]()


@pytest.mark.parametrize("function", ["soft_nms", "batched_soft_nms"])
@pytest.mark.parametrize("soft, scores, error, pattern", [
    (dict(sigma=0.0), GOOD_SCORES, ValueError, "sigma"),
    (dict(sigma=-1.0), GOOD_SCORES, ValueError, "sigma"),
    (dict(score_threshold=-0.5), GOOD_SCORES, ValueError, "score_threshold"),
    (dict(method="hard"), GOOD_SCORES, ValueError, "method"),
    (dict(), torch.tensor([0.9, math.inf]), ValueError, "scores"),
])
def test_bad_soft_nms_arguments(function, soft, scores, error, pattern):
    with pytest.raises(error, match=pattern):
        _calls(GOOD_BOXES, scores, **soft)[function]()


def test_inverted_boxes_follow_the_iou_formula():
    # An inverted box has a negative area and no intersection, so IoU = 0 / (negative) = 0.
    boxes = torch.tensor([[0.0, 0, 10, 10], [10.0, 10, 0, 0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.0).tolist() == torchvision.ops.nms(boxes, scores, 0.0).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU path, on larger inputs (sizes around the 64-box mask words)
# ------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_matches_cpu(n, dtype):
    boxes, scores = random_boxes(n, seed=n, dtype=dtype)
    ious = random_boxes(n, seed=n + 1, dtype=dtype)[1]
    tied = (scores.float() * 8).round().to(dtype)
    gpu = dict(boxes=boxes.cuda(), scores=scores.cuda(), ious=ious.cuda(), tied=tied.cuda())
    for thr in (0.0, 0.5, 0.9):
        assert torch.equal(nms(gpu["boxes"], gpu["tied"], thr).cpu(), nms(boxes, tied, thr))
        for s, i in ((gpu["scores"], gpu["ious"]), (gpu["tied"], gpu["tied"])):
            keep, new_scores = iou_guided_nms(gpu["boxes"], s, i, thr)
            ref_keep, ref_scores = iou_guided_nms(boxes, s.cpu(), i.cpu(), thr)
            assert torch.equal(keep.cpu(), ref_keep) and torch.equal(new_scores.cpu(), ref_scores)
    for s in (gpu["scores"], gpu["tied"]):
        keep, new_scores = soft_nms(gpu["boxes"], s, 0.3, method="linear")
        ref_keep, ref_scores = soft_nms(boxes, s.cpu(), 0.3, method="linear")
        assert torch.equal(keep.cpu(), ref_keep) and torch.equal(new_scores.cpu(), ref_scores)
    # expf on the GPU and torch.exp on the CPU may differ in the last bit, and over thousands of
    # decays two nearly equal scores can then be selected in the other order: compare the kept
    # boxes and their scores, not the order.
    keep, new_scores = soft_nms(gpu["boxes"], gpu["scores"], method="gaussian")
    ref_keep, ref_scores = soft_nms(boxes, scores, method="gaussian")
    by_index, ref_by_index = keep.cpu().sort(), ref_keep.sort()
    assert torch.equal(by_index.values, ref_by_index.values)
    torch.testing.assert_close(new_scores.cpu()[by_index.indices], ref_scores[ref_by_index.indices])


@cuda_only
def test_cuda_batched_matches_cpu():
    boxes, scores = random_boxes(3000, seed=3)
    ious = random_boxes(3000, seed=4)[1]
    idxs = torch.randint(0, 7, (3000,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(),
                       batched_nms(boxes, scores, idxs, 0.5))
    for got, expected in (
        (batched_iou_guided_nms(boxes.cuda(), scores.cuda(), ious.cuda(), idxs.cuda(), 0.5),
         batched_iou_guided_nms(boxes, scores, ious, idxs, 0.5)),
        (batched_soft_nms(boxes.cuda(), scores.cuda(), idxs.cuda()), batched_soft_nms(boxes, scores, idxs)),
    ):
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
