"""PrRoIPool against the official recorded outputs, a float64 oracle from the math, and RoI Align."""

from __future__ import annotations

import importlib
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from workbench.ops.prroi_pool import PrRoIPool, prroi_pool

# The package re-exports the function under the module's name, as torchvision.ops does.
prroi_module = importlib.import_module("workbench.ops.prroi_pool")

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "prroi_official"


@pytest.fixture(params=["windows", "whole map"])
def both_cpu_paths(request, monkeypatch):
    """Run a test through each CPU formulation: gathered windows only, or weights over the whole map only."""
    monkeypatch.setattr(prroi_module, "_DENSE_FRACTION", 0 if request.param == "windows" else 1 << 60)


# ---------------------------------------------------------------------------------------------
# Oracle: straight from Eq. 2 and the official conventions, sharing nothing with the production
# code. f is bilinear on every unit cell, and the midpoint rule integrates a bilinear function
# over a rectangle exactly, so cutting the bin at the integer knots and summing
# area x f(centre) over the pieces is the exact integral.
# ---------------------------------------------------------------------------------------------
def _interp(d: np.ndarray, x: float, y: float) -> float:
    """f(x, y) = sum_ij d[i, j] max(0, 1 - |x - j|) max(0, 1 - |y - i|), zero outside the map."""
    h, w = d.shape
    total = 0.0
    for i in (math.floor(y), math.floor(y) + 1):
        for j in (math.floor(x), math.floor(x) + 1):
            if 0 <= i < h and 0 <= j < w:
                total += d[i, j] * max(0.0, 1 - abs(x - j)) * max(0.0, 1 - abs(y - i))
    return total


def _cuts(lo: float, hi: float) -> list[float]:
    return [lo] + [float(k) for k in range(math.floor(lo) + 1, math.ceil(hi)) if lo < k < hi] + [hi]


def _bin_mean(d: np.ndarray, xs: float, xe: float, ys: float, ye: float) -> float:
    area = (xe - xs) * (ye - ys)
    if area <= 0:
        return 0.0
    xc, yc = _cuts(xs, xe), _cuts(ys, ye)
    total = 0.0
    for a, b in zip(yc[:-1], yc[1:]):
        for c, e in zip(xc[:-1], xc[1:]):
            total += (b - a) * (e - c) * _interp(d, (c + e) / 2, (a + b) / 2)
    return total / area


def oracle(features: np.ndarray, rois: np.ndarray, ph: int, pw: int, scale: float) -> np.ndarray:
    out = np.zeros((len(rois), features.shape[1], ph, pw))
    for k, (b, x0, y0, x1, y1) in enumerate(rois.astype(np.float64)):
        x0, y0, x1, y1 = x0 * scale, y0 * scale, x1 * scale, y1 * scale
        bw, bh = max(x1 - x0, 0) / pw, max(y1 - y0, 0) / ph
        for c in range(features.shape[1]):
            d = features[int(b), c].astype(np.float64)
            for p in range(ph):
                for q in range(pw):
                    out[k, c, p, q] = _bin_mean(d, x0 + q * bw, x0 + (q + 1) * bw, y0 + p * bh, y0 + (p + 1) * bh)
    return out


def _random_rois(gen: np.random.Generator, n: int, batch: int, lo: float, hi: float, size: tuple[float, float]):
    x0 = gen.uniform(lo, hi, n)
    y0 = gen.uniform(lo, hi, n)
    w = gen.uniform(*size, n)
    h = gen.uniform(*size, n)
    return np.stack([gen.integers(0, batch, n), x0, y0, x0 + w, y0 + h], 1)


@pytest.mark.usefixtures("both_cpu_paths")
# ---------------------------------------------------------------------------------------------
# The official implementation's recorded outputs.
# ---------------------------------------------------------------------------------------------
def test_matches_official_outputs_and_gradients():
    features = torch.tensor(np.load(OFFICIAL / "features.npy"), requires_grad=True)
    rois = torch.tensor(np.load(OFFICIAL / "rois.npy"), requires_grad=True)
    out = prroi_pool(features, rois, 2, spatial_scale=0.5)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), np.load(OFFICIAL / "real_outputs.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(features.grad.numpy(), np.load(OFFICIAL / "gradients0.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(rois.grad.numpy(), np.load(OFFICIAL / "gradients1.npy"), atol=1e-6, rtol=0)


def test_oracle_reproduces_official_outputs():
    # The oracle itself is checked against the official numbers, so agreeing with it means something.
    ref = oracle(np.load(OFFICIAL / "features.npy"), np.load(OFFICIAL / "rois.npy"), 2, 2, 0.5)
    np.testing.assert_allclose(ref, np.load(OFFICIAL / "real_outputs.npy"), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Float64 oracle on many geometries.
# ---------------------------------------------------------------------------------------------
CASES = {
    # name: (roi corner range, roi size range, output size, spatial scale)
    "fractional": ((0.0, 18.0), (0.5, 9.0), (2, 3), 1.0),
    "partly_off_map": ((-6.0, 20.0), (2.0, 12.0), 2, 1.0),
    "wholly_off_map": ((-40.0, -15.0), (1.0, 10.0), 2, 1.0),
    "tiny": ((1.0, 18.0), (1e-3, 0.05), (1, 2), 1.0),
    "huge": ((-30.0, 5.0), (30.0, 80.0), (3, 2), 1.0),
    "scale_quarter": ((0.0, 70.0), (3.0, 40.0), 2, 0.25),
    "scale_sixteenth": ((0.0, 300.0), (20.0, 200.0), (2, 2), 1 / 16),
}


@pytest.mark.usefixtures("both_cpu_paths")
@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_float64_oracle(case):
    (lo, hi), size, output_size, scale = CASES[case]
    gen = np.random.default_rng(zlib.crc32(case.encode()))
    features = gen.normal(size=(3, 2, 21, 17))
    rois = _random_rois(gen, 12, 3, lo, hi, size)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    expected = oracle(features, rois, ph, pw, scale)
    got = prroi_pool(torch.tensor(features), torch.tensor(rois), output_size, scale).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=1e-9)
    # float32: the oracle sees the same rounded inputs; what remains is float32 arithmetic. For
    # tiny bins that is larger: a bin edge near x = 18 is placed to about 18 * 6e-8 = 1e-6 px, a
    # relative error of 1e-3 on a 1e-3 px bin (the official float32 kernel shares this).
    f32, r32 = features.astype(np.float32), rois.astype(np.float32)
    got32 = prroi_pool(torch.tensor(f32), torch.tensor(r32), output_size, scale).numpy()
    atol = 2e-3 if case == "tiny" else 2e-5
    np.testing.assert_allclose(got32, oracle(f32, r32, ph, pw, scale), atol=atol, rtol=1e-4)


@pytest.mark.usefixtures("both_cpu_paths")
def test_wholly_off_map_is_zero_and_zero_size_or_inverted_boxes_give_zero_without_gradient():
    features = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, -30, -30, -5, -5],  # more than one pixel outside: f is zero there
         [0, 3, 3, 3, 6],  # zero width
         [0, 5, 2, 2, 6],  # inverted in x
         [0, 2.5, 7, 6, 1]],  # inverted in y
        dtype=torch.float64, requires_grad=True)
    out = prroi_pool(features, rois, 2)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    assert torch.equal(rois.grad, torch.zeros_like(rois))


def test_constant_map_pools_to_constant_inside_and_fades_outside():
    # Inside the map (one cell from every border) f equals the constant; across the border it
    # falls linearly: over [-1, 0] the mean of tri is 1/2, a value derived by hand.
    features = torch.full((1, 1, 10, 10), 3.0, dtype=torch.float64)
    rois = torch.tensor([[0, 1.25, 2.5, 7.75, 8.0], [0, -1, 4, 0, 5]], dtype=torch.float64)
    out = prroi_pool(features, rois, 1)
    assert out[0].item() == pytest.approx(3.0, abs=1e-12)
    assert out[1].item() == pytest.approx(1.5, abs=1e-12)


@pytest.mark.usefixtures("both_cpu_paths")
def test_several_batch_images_read_their_own_map():
    features = torch.zeros(3, 1, 6, 6, dtype=torch.float64)
    features[1] = 1.0
    features[2] = 2.0
    rois = torch.tensor([[2, 1, 1, 4, 4], [0, 1, 1, 4, 4], [1, 1, 1, 4, 4]], dtype=torch.float64)
    assert prroi_pool(features, rois, 1).flatten().tolist() == pytest.approx([2.0, 0.0, 1.0], abs=1e-12)


def test_chunked_evaluation_equals_one_pass(monkeypatch):
    gen = np.random.default_rng(3)
    features = torch.tensor(gen.normal(size=(2, 4, 15, 15)))
    rois = torch.tensor(_random_rois(gen, 9, 2, -3, 12, (0.5, 14)))
    whole = prroi_pool(features, rois, 3)
    monkeypatch.setattr(prroi_module, "_WINDOW_BUDGET", 1)  # one RoI per chunk
    torch.testing.assert_close(prroi_pool(features, rois, 3), whole, rtol=0, atol=1e-12)


def test_close_to_roi_align_with_dense_sampling_inside_the_map():
    # RoI Align (aligned=False: same pixel convention) averages the same bilinear map at
    # sampling_ratio^2 midpoints per bin; for boxes one pixel inside the border, where its border
    # clamping does not matter, it converges to the exact integral as the sampling gets denser.
    gen = np.random.default_rng(5)
    features = torch.tensor(gen.normal(size=(2, 3, 20, 20)))
    rois = torch.tensor(_random_rois(gen, 10, 2, 1.5, 9, (2.0, 8.0)))
    exact = prroi_pool(features, rois, 2)
    dense = torchvision.ops.roi_align(features, rois, 2, 1.0, sampling_ratio=64, aligned=False)
    coarse = torchvision.ops.roi_align(features, rois, 2, 1.0, sampling_ratio=2, aligned=False)
    assert (dense - exact).abs().max() < 2e-3
    assert (dense - exact).abs().max() < (coarse - exact).abs().max() / 20


# ---------------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------------
def _off_knot_rois(gen, n, batch, scale):
    # The coordinate gradient has kinks where a bin edge crosses an integer knot; keep every bin
    # edge at least 0.05 cells from one so finite differences see a smooth function.
    rois = []
    while len(rois) < n:
        b, x0, y0, x1, y1 = _random_rois(gen, 1, batch, -2, 7, (1.0, 6.0))[0]
        edges = np.concatenate([np.linspace(x0, x1, 3), np.linspace(y0, y1, 3)]) * scale
        if np.all(np.abs(edges - np.round(edges)) > 0.05):
            rois.append([b, x0, y0, x1, y1])
    return torch.tensor(rois, dtype=torch.float64)


@pytest.mark.usefixtures("both_cpu_paths")
def test_gradcheck_features_and_coordinates():
    gen = np.random.default_rng(11)
    features = torch.tensor(gen.normal(size=(2, 2, 9, 8)), requires_grad=True)
    rois = _off_knot_rois(gen, 4, 2, 1.0)
    coords = rois[:, 1:].clone().requires_grad_(True)

    def pool(f, c):
        return prroi_pool(f, torch.cat([rois[:, :1], c], 1), 2)

    assert torch.autograd.gradcheck(pool, (features, coords), eps=1e-6, atol=1e-6)


@pytest.mark.usefixtures("both_cpu_paths")
def test_coordinate_gradient_matches_finite_differences_of_oracle():
    gen = np.random.default_rng(12)
    features = gen.normal(size=(1, 2, 10, 10))
    scale = 0.5
    rois = _off_knot_rois(gen, 3, 1, scale) * torch.tensor([1, 2, 2, 2, 2], dtype=torch.float64)
    weights = gen.normal(size=(3, 2, 2, 2))
    rois.requires_grad_(True)
    out = prroi_pool(torch.tensor(features), rois, 2, scale)
    (out * torch.tensor(weights)).sum().backward()
    step = 1e-5
    numeric = np.zeros((3, 4))
    for k in range(3):
        for c in range(4):
            plus, minus = rois.detach().numpy().copy(), rois.detach().numpy().copy()
            plus[k, c + 1] += step
            minus[k, c + 1] -= step
            diff = oracle(features, plus, 2, 2, scale) - oracle(features, minus, 2, 2, scale)
            numeric[k, c] = (diff * weights).sum() / (2 * step)
    np.testing.assert_allclose(rois.grad[:, 1:].numpy(), numeric, atol=1e-6, rtol=1e-5)
    assert torch.equal(rois.grad[:, 0], torch.zeros(3, dtype=torch.float64))


def test_module_matches_functional_and_low_precision_is_close():
    gen = np.random.default_rng(2)
    features = torch.tensor(gen.normal(size=(2, 3, 12, 12)), dtype=torch.float32)
    rois = torch.tensor(_random_rois(gen, 5, 2, 0, 8, (1, 6)), dtype=torch.float32)
    module = PrRoIPool((2, 3), spatial_scale=0.5)
    assert torch.equal(module(features, rois), prroi_pool(features, rois, (2, 3), 0.5))
    assert "output_size=(2, 3)" in repr(module)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        low = prroi_pool(features.to(dtype), rois.to(dtype), (2, 3), 0.5)
        assert low.dtype == dtype
        ref = prroi_pool(features.to(dtype).float(), rois.to(dtype).float(), (2, 3), 0.5)
        torch.testing.assert_close(low.float(), ref, atol=tol, rtol=tol)


@pytest.mark.usefixtures("both_cpu_paths")
def test_empty_rois():
    features = torch.randn(1, 4, 5, 5, requires_grad=True)
    out = prroi_pool(features, torch.zeros(0, 5), 3)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


# ---------------------------------------------------------------------------------------------
# Bad input names the argument.
# ---------------------------------------------------------------------------------------------
GOOD_F = torch.zeros(2, 1, 4, 4)
GOOD_R = torch.tensor([[0.0, 0, 0, 2, 2]])


@pytest.mark.parametrize(
    "features, rois, output_size, scale, error, match",
    [
        (GOOD_F[0], GOOD_R, 2, 1.0, ValueError, "features"),
        (GOOD_F.long(), GOOD_R, 2, 1.0, TypeError, "features"),
        ([[0.0]], GOOD_R, 2, 1.0, TypeError, "features"),
        (GOOD_F, GOOD_R[:, :4], 2, 1.0, ValueError, "rois"),
        (GOOD_F, GOOD_R.double(), 2, 1.0, TypeError, "rois"),
        (GOOD_F, torch.tensor([[0.0, 0, float("nan"), 2, 2]]), 2, 1.0, ValueError, "rois"),
        (GOOD_F, torch.tensor([[0.0, 0, 0, float("inf"), 2]]), 2, 1.0, ValueError, "rois"),
        (GOOD_F, torch.tensor([[2.0, 0, 0, 2, 2]]), 2, 1.0, ValueError, r"rois\[:, 0\]"),
        (GOOD_F, torch.tensor([[-1.0, 0, 0, 2, 2]]), 2, 1.0, ValueError, r"rois\[:, 0\]"),
        (GOOD_F, torch.tensor([[0.5, 0, 0, 2, 2]]), 2, 1.0, ValueError, r"rois\[:, 0\]"),
        (GOOD_F, GOOD_R, 0, 1.0, ValueError, "output_size"),
        (GOOD_F, GOOD_R, (2, 2, 2), 1.0, ValueError, "output_size"),
        (GOOD_F, GOOD_R, 2.5, 1.0, ValueError, "output_size"),
        (GOOD_F, GOOD_R, 2, 0.0, ValueError, "spatial_scale"),
        (GOOD_F, GOOD_R, 2, float("nan"), ValueError, "spatial_scale"),
        (GOOD_F, GOOD_R, 2, "1", TypeError, "spatial_scale"),
    ],
)
def test_bad_input_raises_naming_the_argument(features, rois, output_size, scale, error, match):
    with pytest.raises(error, match=match):
        prroi_pool(features, rois, output_size, scale)


@pytest.mark.usefixtures("both_cpu_paths")
def test_each_input_gets_the_same_gradient_whether_or_not_the_other_needs_one():
    # The backward skips the coordinate gradient when the boxes need none (training a head on fixed
    # boxes), and the map's when the map needs none (refinement).
    gen = np.random.default_rng(21)
    features = torch.tensor(gen.normal(size=(2, 3, 11, 9)))
    rois = torch.tensor(_random_rois(gen, 7, 2, -2, 8, (0.5, 6)))
    weights = torch.tensor(gen.normal(size=(7, 3, 2, 3)))

    def grads(f_grad: bool, r_grad: bool):
        f, r = features.clone().requires_grad_(f_grad), rois.clone().requires_grad_(r_grad)
        (prroi_pool(f, r, (2, 3), 0.7) * weights).sum().backward()
        return f.grad, r.grad

    both = grads(True, True)
    assert torch.equal(grads(True, False)[0], both[0]) and grads(True, False)[1] is None
    assert torch.equal(grads(False, True)[1], both[1]) and grads(False, True)[0] is None
