"""The CUDA sources without a GPU.

* Every kernel compiles with NVRTC, from the source tree and from an installed wheel.
* The unmodified kernels run on the host, one OS thread per CUDA thread with real barriers
  (``tests/cuda_host.py``), through the real glue of ``ops/prroi_pool.py`` and ``ops/nms.py``:
  PrRoIPool agrees with the PyTorch path, and NMS, IoU-guided NMS and Soft-NMS agree bit for bit
  with the CPU path, suppressors included.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.ops import _cuda, iou_guided_nms, nms, soft_nms
from workbench.ops._cuda import compile_ptx, kernel_names
from workbench.ops.prroi_pool import _prroi_pool_cpu, _PrRoIPoolCUDA, prroi_pool

from . import cuda_host

# The module, not the function that ``workbench.ops`` exports under the same name.
nms_module = importlib.import_module("workbench.ops.nms")

SOURCES = kernel_names()
ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------------
# The wheel carries the kernels (issue 8)
# ------------------------------------------------------------------------------------------------

# Run in a fresh interpreter whose only copy of ``workbench`` is the installed wheel.
_LOAD_FROM_INSTALL = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, workbench
from workbench.ops import _cuda
assert workbench.__file__.startswith(sys.argv[1]), workbench.__file__
names = _cuda.kernel_names()
for name in names:
    assert ".visible .entry" in _cuda.compile_ptx(name)
if torch.cuda.is_available():
    for name in names:
        _cuda.load_module(name).get_function("prroi_forward_float" if name == "prroi_pool.cu" else "nms_scan_float")
print(" ".join(names), torch.cuda.is_available())
"""


@pytest.mark.slow
def test_wheel_ships_kernels(tmp_path):
    # Build from a copy, so the build leaves nothing behind in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    import shutil

    shutil.copytree(ROOT / "workbench", src / "workbench", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {Path(n).name for n in z.namelist() if n.startswith("workbench/kernels/")}
    assert set(SOURCES) <= shipped

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   text=True)
    done = subprocess.run([sys.executable, "-c", _LOAD_FROM_INSTALL, str(site)], cwd=tmp_path, check=True,
                          capture_output=True, text=True)
    assert done.stdout.split()[: len(SOURCES)] == SOURCES


# ------------------------------------------------------------------------------------------------
# Host emulation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if not cuda_host.compiler_available():
        pytest.skip("no host C++ compiler (g++) to emulate the kernels")
    return cuda_host.HostDevice(tmp_path_factory.mktemp("cuda_host"))


@pytest.fixture
def emulated(host, monkeypatch):
    """The glue's one door to the GPU, ``_cuda.launch``, opened onto the host emulation."""
    monkeypatch.setattr(_cuda, "launch", host.launch)
    return host


_PRIMITIVES = r"""
extern "C" __global__ void primitives(const long long* in, long long* shuffled, long long* neighbour) {
    __shared__ long long cell[1024];
    const int t = threadIdx.x;
    shuffled[t] = __shfl_down_sync(0xffffffffu, in[t], 5);
    cell[t] = in[t];
    __syncthreads();
    neighbour[t] = cell[(t + 1) % blockDim.x];
}
"""


def test_emulated_shuffle_and_barrier_follow_cuda(tmp_path):
    # The emulator's own primitives against their CUDA definitions: lane i of __shfl_down_sync
    # reads lane i + 5 of its warp (its own value past the warp's end), and after __syncthreads
    # every thread sees what the others wrote.
    if not cuda_host.compiler_available():
        pytest.skip("no host C++ compiler (g++) to emulate the kernels")
    (tmp_path / "primitives.cu").write_text(_PRIMITIVES)
    device = cuda_host.HostDevice(tmp_path, kernel_dir=tmp_path)
    block = 96
    values = torch.arange(block, dtype=torch.int64) * 7 + 3
    shuffled, neighbour = torch.empty_like(values), torch.empty_like(values)
    device.launch("primitives.cu", "primitives", 1, block, (values, shuffled, neighbour))
    lane = torch.arange(block) % 32
    assert torch.equal(shuffled, torch.where(lane + 5 < 32, values.roll(-5), values))
    assert torch.equal(neighbour, values.roll(-1))


def _prroi_case(dtype, seed=0):
    gen = np.random.default_rng(seed)
    features = gen.normal(size=(2, 3, 9, 11))
    n = 7
    x0, y0 = gen.uniform(-4, 10, n), gen.uniform(-4, 8, n)
    rois = np.stack([gen.integers(0, 2, n), x0, y0, x0 + gen.uniform(0.3, 9, n), y0 + gen.uniform(0.3, 9, n)], 1)
    rois[0, 1:] = [3, 3, 1, 6]  # inverted: zero output, zero gradient
    rois[1, 1:] = [-20, -20, -8, -9]  # off the map
    return torch.tensor(features, dtype=dtype), torch.tensor(rois, dtype=dtype)


@pytest.mark.parametrize("dtype, scalar, tol", [(torch.float64, np.float64, 1e-12), (torch.float32, np.float32, 2e-5)])
@pytest.mark.parametrize("grid, block", [(1, 1), (3, 5), (64, 32)])
def test_host_emulated_prroi_kernels_match_pytorch_path(host, dtype, scalar, tol, grid, block):
    # Grid sizes below and above the item count exercise the grid-stride loops.
    features, rois = _prroi_case(dtype)
    ph, pw, scale = 2, 3, 0.75
    shape = (*map(np.int32, (*features.shape[1:], ph, pw)), scalar(scale))
    suffix = "double" if dtype == torch.float64 else "float"

    f_t, r_t = features.clone().requires_grad_(True), rois.clone().requires_grad_(True)
    expected = prroi_pool(f_t, r_t, (ph, pw), scale)
    grad_out = torch.tensor(np.random.default_rng(1).normal(size=expected.shape), dtype=dtype)
    (expected * grad_out).sum().backward()

    out = torch.empty(expected.shape, dtype=dtype)
    host.launch("prroi_pool.cu", f"prroi_forward_{suffix}", grid, block,
                (features, rois, out, *shape, np.int64(out.numel())))
    torch.testing.assert_close(out, expected.detach(), atol=tol, rtol=tol)

    grad_features = torch.zeros_like(features)
    host.launch("prroi_pool.cu", f"prroi_backward_features_{suffix}", grid, block,
                (grad_out, rois, grad_features, *shape, np.int64(grad_out.numel())))
    torch.testing.assert_close(grad_features, f_t.grad, atol=tol, rtol=tol)

    grad_rois = torch.zeros_like(rois)
    host.launch("prroi_pool.cu", f"prroi_backward_coords_{suffix}", grid, block,
                (features, rois, grad_out, grad_rois, *shape, np.int64(len(rois) * ph * pw)))
    torch.testing.assert_close(grad_rois, r_t.grad, atol=10 * tol, rtol=10 * tol)
    assert torch.all(grad_rois[:2] == 0) and torch.all(grad_rois[:, 0] == 0)


def test_prroi_glue_through_emulated_kernels(emulated):
    # The autograd Function of the CUDA path, run on CPU tensors: non-contiguous inputs, the
    # stride-0 grad_out of out.sum(), new_empty outputs and zeroed gradient buffers all go
    # through the same code as on a GPU. Reference: the float64 PyTorch path.
    features, rois = _prroi_case(torch.float64, seed=3)
    features = features.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    f1, r1 = features.clone().requires_grad_(True), rois.clone().requires_grad_(True)
    f2, r2 = features.clone().requires_grad_(True), rois.clone().requires_grad_(True)
    out = _PrRoIPoolCUDA.apply(f1, r1, 3, 2, 0.5)
    out.sum().backward()
    ref = _prroi_pool_cpu(f2, r2, 3, 2, 0.5)
    ref.sum().backward()
    for got, expected in ((out, ref), (f1.grad, f2.grad), (r1.grad, r2.grad)):
        torch.testing.assert_close(got.detach(), expected.detach(), atol=1e-11, rtol=1e-11)


def _clustered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes [n, 4], scores [n], ious [n]) float64: jittered clusters, so suppression is common
    (and the emulation short), with integer corners (IoUs on the threshold), tied scores and a
    duplicate box."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 20)
    centers = torch.rand(k, 2, generator=g, dtype=torch.float64) * 300
    size = torch.rand(k, 2, generator=g, dtype=torch.float64) * 40 + 10
    member = torch.randint(0, k, (n,), generator=g)
    corner = centers[member] - size[member] / 2
    boxes = torch.cat([corner, corner + size[member]], 1) + torch.randn(n, 4, generator=g, dtype=torch.float64) * 3
    boxes[::3] = boxes[::3].round()
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    scores[::4] = (scores[::4] * 4).round() / 4
    if n > 3:
        boxes[n // 2] = boxes[1]
    return boxes, scores, torch.rand(n, generator=g, dtype=torch.float64)


def _assert_same(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [32, 256])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 130, 1000])
def test_host_emulated_nms_kernels_match_cpu_path(emulated, monkeypatch, n, block, dtype):
    # The one-block scan and Soft-NMS kernels at two block sizes; sizes around the 64-box words.
    monkeypatch.setattr(nms_module, "_BLOCK_THREADS", block)
    boxes, scores, ious = (t.to(dtype) for t in _clustered(n, seed=n))

    keep, _, suppressors = nms_module._suppress_cuda(boxes, scores, None, 0.5, with_suppressors=True)
    _assert_same((keep, suppressors), nms(boxes, scores, 0.5, return_suppressors=True))

    keep, new_scores, suppressors = nms_module._suppress_cuda(boxes, ious, scores, 0.5, with_suppressors=True)
    _assert_same((keep, new_scores, suppressors), iou_guided_nms(boxes, scores, ious, 0.5, return_suppressors=True))

    got = nms_module._soft_cuda(boxes, scores.clone(), 0.3, 0.5, 0.01, gaussian=False, with_suppressors=True)
    _assert_same(got, soft_nms(boxes, scores, 0.3, 0.5, 0.01, "linear", return_suppressors=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_emulated_nms_variants(emulated, monkeypatch, dtype):
    # Null pointers (no rescoring, no suppressors), threshold 0 (every overlap suppresses),
    # boxes below score_threshold from the start (suppressor -2) and the gaussian decay, whose
    # exp comes from the host libm here: its result may differ from torch.exp in the last bit,
    # so scores are compared to float tolerance, the decisions exactly.
    monkeypatch.setattr(nms_module, "_BLOCK_THREADS", 64)
    boxes, scores, ious = (t.to(dtype) for t in _clustered(130, seed=7))
    for thr in (0.0, 0.7):
        keep, new_scores, suppressors = nms_module._suppress_cuda(boxes, scores, None, thr)
        assert new_scores is None and suppressors is None
        assert torch.equal(keep, nms(boxes, scores, thr))
    low = scores.clone()
    low[::5] = 0.001
    keep, kept_scores, suppressors = nms_module._soft_cuda(boxes, low.clone(), 0.3, 0.5, 0.01, gaussian=False)
    assert suppressors is None
    _assert_same((keep, kept_scores), soft_nms(boxes, low, 0.3, 0.5, 0.01, "linear"))
    keep, kept_scores, suppressors = nms_module._soft_cuda(boxes, low.clone(), 0.3, 0.5, 0.01, gaussian=True,
                                                           with_suppressors=True)
    ref_keep, ref_scores, ref_suppressors = soft_nms(boxes, low, 0.3, 0.5, 0.01, "gaussian", return_suppressors=True)
    assert torch.equal(keep, ref_keep) and torch.equal(suppressors, ref_suppressors)
    assert bool((suppressors[::5] == -2).all())
    torch.testing.assert_close(kept_scores, ref_scores)


def test_host_emulated_mask_grid_stride(emulated, monkeypatch):
    # Two blocks for 16 tiles: the mask kernel walks its tiles with the grid-stride loop, which the
    # glue's one-block-per-tile geometry only reaches past 65,535 tiles (about 16,000 boxes).
    monkeypatch.setattr(_cuda, "blocks_for", lambda n, threads, max_blocks=65535: min(2, n))
    boxes, scores, ious = _clustered(200, seed=11)
    keep, new_scores, suppressors = nms_module._suppress_cuda(boxes, ious, scores, 0.5, with_suppressors=True)
    _assert_same((keep, new_scores, suppressors), iou_guided_nms(boxes, scores, ious, 0.5, return_suppressors=True))


def test_host_emulated_nms_empty_and_single(emulated):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    keep, new_scores, suppressors = nms_module._suppress_cuda(boxes, torch.ones(1), torch.ones(1), 0.5, True)
    assert keep.tolist() == [0] and new_scores.tolist() == [1.0] and suppressors.tolist() == [-1]
    # Soft-NMS with every box below score_threshold from the start: nothing kept, all -2.
    keep, kept_scores, suppressors = nms_module._soft_cuda(boxes.repeat(3, 1), torch.zeros(3), 0.3, 0.5, 0.01, False,
                                                           True)
    assert keep.numel() == 0 and kept_scores.numel() == 0 and suppressors.tolist() == [-2, -2, -2]
