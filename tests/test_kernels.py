"""The CUDA sources without a GPU: every kernel compiles with NVRTC, and the PrRoIPool kernels,
run on the host one emulated thread at a time (``tests/cuda_host.py``), agree with the PyTorch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.ops._cuda import compile_ptx, kernel_names
from workbench.ops.prroi_pool import prroi_pool

from . import cuda_host

SOURCES = kernel_names()


def test_every_kernel_source_is_found():
    assert {"prroi_pool.cu", "nms.cu"} <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_kernel_compiles_with_nvrtc(name):
    ptx = compile_ptx(name)
    assert ".visible .entry" in ptx


def test_compile_error_reports_the_log(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void f(float* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr("workbench.ops._cuda.KERNEL_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="undefined_name"):
        compile_ptx("broken.cu")


@pytest.fixture(scope="module")
def prroi_host(tmp_path_factory):
    if not cuda_host.compiler_available():
        pytest.skip("no host C++ compiler (g++) to emulate the kernels")
    return cuda_host.build("prroi_pool.cu", tmp_path_factory.mktemp("cuda_host"))


def _case(dtype, seed=0):
    gen = np.random.default_rng(seed)
    features = gen.normal(size=(2, 3, 9, 11)).astype(dtype)
    n = 7
    x0, y0 = gen.uniform(-4, 10, n), gen.uniform(-4, 8, n)
    rois = np.stack([gen.integers(0, 2, n), x0, y0, x0 + gen.uniform(0.3, 9, n), y0 + gen.uniform(0.3, 9, n)], 1)
    rois[0, 1:] = [3, 3, 1, 6]  # inverted: zero output, zero gradient
    rois[1, 1:] = [-20, -20, -8, -9]  # off the map
    return features, np.ascontiguousarray(rois.astype(dtype))


@pytest.mark.parametrize("dtype, suffix, tol", [(np.float64, "double", 1e-12), (np.float32, "float", 2e-5)])
@pytest.mark.parametrize("grid, block", [(1, 1), (3, 5), (64, 32)])
def test_host_emulated_kernels_match_pytorch_path(prroi_host, dtype, suffix, tol, grid, block):
    # Grid sizes below and above the item count exercise the grid-stride loops.
    features, rois = _case(dtype)
    ph, pw, scale = 2, 3, 0.75
    n, c, h, w = features.shape
    shape = (np.int32(c), np.int32(h), np.int32(w), np.int32(ph), np.int32(pw), dtype(scale))

    f_t = torch.tensor(features, requires_grad=True)
    r_t = torch.tensor(rois, requires_grad=True)
    expected = prroi_pool(f_t, r_t, (ph, pw), scale)
    grad_out = np.random.default_rng(1).normal(size=expected.shape).astype(dtype)
    (expected * torch.tensor(grad_out)).sum().backward()

    out = np.zeros(expected.shape, dtype)
    cuda_host.launch(prroi_host, f"prroi_forward_{suffix}", grid, block, features, rois, out, *shape,
                     np.int64(out.size))
    np.testing.assert_allclose(out, expected.detach().numpy(), atol=tol, rtol=tol)

    grad_features = np.zeros_like(features)
    cuda_host.launch(prroi_host, f"prroi_backward_features_{suffix}", grid, block, grad_out, rois, grad_features,
                     *shape, np.int64(grad_out.size))
    np.testing.assert_allclose(grad_features, f_t.grad.numpy(), atol=tol, rtol=tol)

    grad_rois = np.zeros_like(rois)
    cuda_host.launch(prroi_host, f"prroi_backward_coords_{suffix}", grid, block, features, rois, grad_out,
                     grad_rois, *shape, np.int64(len(rois) * ph * pw))
    np.testing.assert_allclose(grad_rois, r_t.grad.numpy(), atol=10 * tol, rtol=10 * tol)
    assert np.all(grad_rois[:2] == 0) and np.all(grad_rois[:, 0] == 0)
