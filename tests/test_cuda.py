"""The CuPy kernel path of PrRoIPool against the PyTorch path, on a GPU. Skipped where there is none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.ops.prroi_pool import _prroi_pool_cpu, prroi_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(dtype, seed=0, n_rois=200):
    gen = np.random.default_rng(seed)
    features = torch.tensor(gen.normal(size=(3, 16, 40, 50)), dtype=dtype)
    x0, y0 = gen.uniform(-10, 45, n_rois), gen.uniform(-10, 35, n_rois)
    w, h = gen.uniform(0.01, 30, n_rois), gen.uniform(0.01, 30, n_rois)
    rois = np.stack([gen.integers(0, 3, n_rois), x0, y0, x0 + w, y0 + h], 1)
    rois[:5, 3] = rois[:5, 1] - 1  # inverted boxes
    return features, torch.tensor(rois, dtype=dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("output_size, scale", [(7, 1.0), ((3, 5), 0.5)])
def test_kernels_match_cpu_path(dtype, tol, output_size, scale):
    features, rois = _inputs(dtype)
    results = []
    for device in ("cpu", "cuda"):
        f = features.to(device).requires_grad_(True)
        r = rois.to(device).requires_grad_(True)
        out = prroi_pool(f, r, output_size, scale)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape).to(device)
        (out * weights).sum().backward()
        results.append([t.detach().cpu() for t in (out, f.grad, r.grad)])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu, cpu, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    features, rois = _inputs(torch.float32)
    out = prroi_pool(features.cuda().to(dtype), rois.cuda().to(dtype), 7)
    assert out.dtype == dtype
    ref = _prroi_pool_cpu(features.to(dtype).float(), rois.to(dtype).float(), 7, 7, 1.0)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


def test_gradcheck_on_gpu():
    features, rois = _inputs(torch.float64, n_rois=3)
    f = features[:, :2, :8, :8].clone().cuda().requires_grad_(True)
    r = torch.tensor([[0, 1.3, 2.2, 5.6, 6.7], [2, 0.4, 1.45, 3.3, 7.1]], dtype=torch.float64, device="cuda")
    coords = r[:, 1:].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: prroi_pool(a, torch.cat([r[:, :1], b], 1), 2), (f, coords))
