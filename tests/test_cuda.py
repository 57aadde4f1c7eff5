"""The CuPy kernel path against the PyTorch path, on a GPU. Skipped where there is none.

Without a GPU the same kernels run in the host emulation of ``tests/test_kernels.py``; these
tests are what only a device can check: the CUDA compiler's arithmetic (FMA fusion), DLPack and
stream handling, devices other than the current one, sizes beyond the emulation's reach, and
intermittent races.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.ops import (
    batched_iou_guided_nms,
    batched_nms,
    batched_soft_nms,
    iou_guided_nms,
    nms,
    prroi_pool,
    soft_nms,
)
from workbench.ops.nms import _MAX_CUDA_BOXES
from workbench.ops.prroi_pool import _prroi_pool_cpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(dtype, seed=0, n_rois=200, min_size=0.01):
    gen = np.random.default_rng(seed)
    features = torch.tensor(gen.normal(size=(3, 16, 40, 50)), dtype=dtype)
    x0, y0 = gen.uniform(-10, 45, n_rois), gen.uniform(-10, 35, n_rois)
    w, h = gen.uniform(min_size, 30, n_rois), gen.uniform(min_size, 30, n_rois)
    rois = np.stack([gen.integers(0, 3, n_rois), x0, y0, x0 + w, y0 + h], 1)
    rois[:5, 3] = rois[:5, 1] - 1  # inverted boxes
    return features, torch.tensor(rois, dtype=dtype)


def _pool_and_grads(features, rois, output_size, scale, device, dtype=None):
    """(out, grad features, grad rois) of ``sum(out * ramp)`` in float64 on the CPU."""
    dtype = dtype or features.dtype
    f = features.detach().to(device, dtype).clone().requires_grad_(True)
    r = rois.detach().to(device, dtype).clone().requires_grad_(True)
    out = prroi_pool(f, r, output_size, scale)
    weights = torch.linspace(-1, 1, out.numel(), dtype=dtype, device=device).reshape(out.shape)
    (out * weights).sum().backward()
    return [t.detach().cpu().double() for t in (out, f.grad, r.grad)]


# ------------------------------------------------------------------------------------------------
# PrRoIPool
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_size, scale", [(7, 1.0), ((3, 5), 0.5)])
def test_float64_kernels_match_cpu_path(output_size, scale):
    features, rois = _inputs(torch.float64)
    for gpu, cpu in zip(_pool_and_grads(features, rois, output_size, scale, "cuda"),
                        _pool_and_grads(features, rois, output_size, scale, "cpu")):
        torch.testing.assert_close(gpu, cpu, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("output_size, scale", [(7, 1.0), ((3, 5), 0.5)])
def test_float32_kernels_as_accurate_as_float32_cpu_path(output_size, scale):
    # Both are compared with the float64 reference on the same (float32) inputs. The GPU compiler
    # fuses the bin edges x0 + pw * bw into one FMA and boxes down to 0.01 px wide make the
    # integrals cancel, so the float32 kernel and the float32 CPU path each miss the exact value
    # by up to ~1e-3 (a host build of the kernel with FMA: out 7.7e-4 vs 7.7e-4 for the CPU path,
    # coordinate gradient 2.4e-4 vs 2.3e-3, feature gradient up to 1.9x the CPU path's error).
    # Holding the kernel to 4x the float32 CPU path's own error leaves room for that, not more.
    features, rois = _inputs(torch.float32)
    reference = _pool_and_grads(features, rois, output_size, scale, "cpu", torch.float64)
    gpu = _pool_and_grads(features, rois, output_size, scale, "cuda")
    cpu = _pool_and_grads(features, rois, output_size, scale, "cpu")
    for name, g, c, ref in zip(("output", "feature gradient", "coordinate gradient"), gpu, cpu, reference):
        err_gpu, err_cpu = (g - ref).abs(), (c - ref).abs()
        assert err_gpu.max() <= 4 * err_cpu.max() + 1e-6, name
        assert err_gpu.mean() <= 4 * err_cpu.mean() + 1e-8, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_and_backward(dtype):
    # Computed in float32 and cast back: compare with the float32 CPU path on the same rounded
    # inputs, at the low dtype's resolution. Boxes of at least 2 px keep float32 cancellation
    # far below that resolution.
    features, rois = _inputs(torch.float32, min_size=2.0)
    features, rois = features.to(dtype), rois.to(dtype)
    f = features.cuda().clone().requires_grad_(True)
    r = rois.cuda().clone().requires_grad_(True)
    out = prroi_pool(f, r, 7)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert f.grad.dtype == dtype and r.grad.dtype == dtype
    f_ref = features.float().requires_grad_(True)
    r_ref = rois.float().requires_grad_(True)
    ref = _prroi_pool_cpu(f_ref, r_ref, 7, 7, 1.0)
    ref.to(dtype).float().square().sum().backward()
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(f.grad.float().cpu(), f_ref.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(r.grad.float().cpu(), r_ref.grad, atol=tol * r_ref.grad.abs().max().item(), rtol=tol)


def test_gradcheck_on_gpu():
    features, _ = _inputs(torch.float64, n_rois=3)
    f = features[:, :2, :8, :8].clone().cuda().requires_grad_(True)
    r = torch.tensor([[0, 1.3, 2.2, 5.6, 6.7], [2, 0.4, 1.45, 3.3, 7.1]], dtype=torch.float64, device="cuda")
    coords = r[:, 1:].clone().requires_grad_(True)
    # Atomic scatters add in a varying order, so repeated backward passes differ in the last bits.
    assert torch.autograd.gradcheck(lambda a, b: prroi_pool(a, torch.cat([r[:, :1], b], 1), 2), (f, coords),
                                    nondet_tol=1e-10)


def test_noncontiguous_channels_last_and_stride0_grad():
    # out.sum().backward() hands the kernel an expanded (stride-0) grad_out; features in
    # channels-last memory and rois sliced out of a wider tensor are not contiguous.
    features, rois = _inputs(torch.float64, n_rois=50)
    f = features.cuda().to(memory_format=torch.channels_last).requires_grad_(True)
    r = rois.cuda().t().contiguous().t().requires_grad_(True)  # column-major
    assert not f.is_contiguous() and not r.is_contiguous()
    out = prroi_pool(f, r, 4, 0.5)
    out.sum().backward()
    f_ref, r_ref = features.clone().requires_grad_(True), rois.clone().requires_grad_(True)
    ref = _prroi_pool_cpu(f_ref, r_ref, 4, 4, 0.5)
    ref.sum().backward()
    for got, expected in ((out, ref), (f.grad, f_ref.grad), (r.grad, r_ref.grad)):
        torch.testing.assert_close(got.detach().cpu(), expected.detach(), atol=1e-10, rtol=1e-10)


def test_empty_inputs():
    features, _ = _inputs(torch.float32)
    f = features.cuda().requires_grad_(True)
    r = torch.zeros((0, 5), device="cuda", requires_grad=True)
    out = prroi_pool(f, r, 3)
    assert out.shape == (0, 16, 3, 3)
    out.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f)) and r.grad.shape == (0, 5)


def test_side_stream_orders_with_pytorch_work():
    features, rois = _inputs(torch.float32)
    base, r = features.cuda(), rois.cuda()
    expected = prroi_pool(base * 2, r, 5)
    boxes, scores = _boxes(3000, seed=1, device="cuda")
    expected_keep = nms(boxes * 2, scores, 0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The inputs are produced on the side stream just before the kernels read them.
        out = prroi_pool(base * 2, r, 5)
        keep = nms(boxes * 2, scores, 0.5)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected) and torch.equal(keep, expected_keep)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_a_device_other_than_the_current_one():
    features, rois = _inputs(torch.float64, n_rois=20)
    boxes, scores = _boxes(500, seed=2)
    torch.cuda.set_device(0)
    out = prroi_pool(features.to("cuda:1"), rois.to("cuda:1"), 3)
    keep = nms(boxes.to("cuda:1"), scores.to("cuda:1"), 0.5)
    assert out.device == keep.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.cpu(), _prroi_pool_cpu(features, rois, 3, 3, 1.0), atol=1e-10, rtol=1e-10)
    assert torch.equal(keep.cpu(), nms(boxes, scores, 0.5))


# ------------------------------------------------------------------------------------------------
# NMS family
# ------------------------------------------------------------------------------------------------


def _boxes(n, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1000
    wh = torch.rand(n, 2, generator=g) * 80 + 1
    boxes = torch.cat([xy, xy + wh], 1).round()
    scores = (torch.rand(n, generator=g) * 16).round() / 16  # many ties
    return boxes.to(device, dtype), scores.to(device, dtype)


def _same(got, expected):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device.type == "cuda" and torch.equal(g.cpu(), e)


@pytest.mark.parametrize("n", [1000, 20_000])  # 20,000 boxes: 313 mask words, more than the 256 threads
def test_suppressors_and_large_inputs_match_cpu(n):
    boxes, scores = _boxes(n, seed=n)
    ious = _boxes(n, seed=n + 1)[1]
    gb, gs, gi = boxes.cuda(), scores.cuda(), ious.cuda()
    _same(nms(gb, gs, 0.5, return_suppressors=True), nms(boxes, scores, 0.5, return_suppressors=True))
    _same(iou_guided_nms(gb, gs, gi, 0.5, return_suppressors=True),
          iou_guided_nms(boxes, scores, ious, 0.5, return_suppressors=True))
    _same(soft_nms(gb, gs, 0.3, return_suppressors=True), soft_nms(boxes, scores, 0.3, return_suppressors=True))


def test_batched_suppressors_match_cpu():
    n = 1000
    boxes, scores = _boxes(n, seed=n)
    ious = _boxes(n, seed=n + 1)[1]
    gb, gs, gi = boxes.cuda(), scores.cuda(), ious.cuda()
    idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n))
    gx = idxs.cuda()
    _same(batched_nms(gb, gs, gx, 0.5, return_suppressors=True),
          batched_nms(boxes, scores, idxs, 0.5, return_suppressors=True))
    _same(batched_iou_guided_nms(gb, gs, gi, gx, 0.5, return_suppressors=True),
          batched_iou_guided_nms(boxes, scores, ious, idxs, 0.5, return_suppressors=True))
    _same(batched_soft_nms(gb, gs, gx, return_suppressors=True),
          batched_soft_nms(boxes, scores, idxs, return_suppressors=True))


def test_nms_empty_inputs():
    boxes, scores = torch.zeros((0, 4), device="cuda"), torch.zeros(0, device="cuda")
    assert nms(boxes, scores, 0.5).shape == (0,)
    assert iou_guided_nms(boxes, scores, scores, 0.5)[0].shape == (0,)
    assert soft_nms(boxes, scores)[0].shape == (0,)
    # Everything pruned by Soft-NMS: all scores below score_threshold from the start.
    b, s = _boxes(100, seed=3, device="cuda")
    keep, new_scores, suppressors = soft_nms(b, s * 0, score_threshold=0.5, return_suppressors=True)
    assert keep.numel() == 0 and new_scores.numel() == 0 and bool((suppressors == -2).all())


def test_nms_box_limit_error():
    boxes, scores = _boxes(_MAX_CUDA_BOXES + 1, seed=4, device="cuda")
    with pytest.raises(ValueError, match=f"at most {_MAX_CUDA_BOXES} boxes"):
        nms(boxes, scores, 0.5)
    with pytest.raises(ValueError, match=f"at most {_MAX_CUDA_BOXES} boxes"):
        iou_guided_nms(boxes, scores, scores, 0.5)


def test_repeated_runs_give_identical_results():
    # An intermittent race would show as a run that differs from the others.
    boxes, scores = _boxes(5000, seed=5, device="cuda")
    ious = _boxes(5000, seed=6, device="cuda")[1]
    features, rois = _inputs(torch.float32)
    f, r = features.cuda(), rois.cuda()
    first = (nms(boxes, scores, 0.5), iou_guided_nms(boxes, scores, ious, 0.5), soft_nms(boxes, scores, 0.3),
             prroi_pool(f, r, 7))
    for _ in range(30):
        again = (nms(boxes, scores, 0.5), iou_guided_nms(boxes, scores, ious, 0.5), soft_nms(boxes, scores, 0.3),
                 prroi_pool(f, r, 7))
        assert torch.equal(again[0], first[0]) and torch.equal(again[3], first[3])
        for a, b in zip(again[1:3], first[1:3]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
