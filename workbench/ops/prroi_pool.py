"""Precise RoI Pooling (PrRoIPool): the exact average of the bilinearly interpolated feature map over each bin.

Paper Eq. 2-4. Conventions are those of the official implementation:

* the sample ``features[..., i, j]`` sits at the point ``(x = j, y = i)`` (no half-pixel offset);
* the continuous map is ``f(x, y) = sum_ij d[i, j] tri(x - j) tri(y - i)`` with
  ``tri(t) = max(0, 1 - |t|)`` and samples outside the map read as zero, so ``f`` fades to zero
  within one cell past the border;
* box coordinates are multiplied by ``spatial_scale``; no rounding, no minimum size;
* bin ``(ph, pw)`` spans ``[x0 + pw bw, x0 + (pw + 1) bw] x [y0 + ph bh, y0 + (ph + 1) bh]`` with
  ``bw = max(x1 - x0, 0) / PW`` and ``bh = max(y1 - y0, 0) / PH``;
* a bin of zero area gives 0 and no gradient.

The integral is separable. With ``P`` the antiderivative of ``tri``, a bin ``[xs, xe] x [ys, ye]``
integrates to ``sum_ij d[i, j] Wy[i] Wx[j]`` where ``Wx[j] = P(xe - j) - P(xs - j)`` (same for
``y``). The CPU path computes exactly that, vectorized over RoIs and bins, and autograd through
``P`` gives the exact coordinate gradient (``dWx[j] / dxe = tri(xe - j)``: the line integrals of
Eq. 4). CUDA tensors go to the kernels in ``workbench/kernels/prroi_pool.cu``, which implement the same sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _cuda
from ._checks import check_finite, check_floating, check_same_device, check_same_dtype, check_shape, check_tensor

# Upper bound on the elements of one gathered feature window (RoIs x rows x cols x channels);
# RoIs are processed in chunks that stay below it, so a few huge boxes cannot exhaust memory.
_WINDOW_BUDGET = 1 << 24
# RoIs per chunk at most: every window of a chunk is padded to its largest, so small chunks of
# RoIs sorted by size waste little gathering (FPN-like RoIs: 2.8x roi_align's time with 128 per
# chunk, 1.3x with 16), while a chunk's fixed overhead of some twenty tensor ops stays small.
_MAX_CHUNK = 16
# A chunk whose windows cover more than 1/_DENSE_FRACTION of the map pools with weights over the
# whole map (two matrix products) instead of gathering windows: for boxes large against their
# map, gathering every window costs more than the few wasted multiplications by zero weights.
_DENSE_FRACTION = 4

_THREADS = 256


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or a pair (PH, PW) of positive ints, got {output_size!r}")
    return tuple(size)  # type: ignore[return-value]


def _check_spatial_scale(spatial_scale: object) -> None:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise TypeError(f"spatial_scale must be a real number, got {type(spatial_scale).__name__}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be a finite number > 0, got {spatial_scale}")


def _check_inputs(features: Tensor, rois: Tensor, spatial_scale: float) -> None:
    check_tensor("features", features)
    check_tensor("rois", rois)
    check_floating("features", features)
    check_shape("features", features, (None, None, None, None), "[N, C, H, W]")
    if min(features.shape[1:]) == 0:
        raise ValueError(f"features must have C, H, W >= 1 (shape [N, C, H, W]), got {tuple(features.shape)}")
    check_floating("rois", rois)
    check_shape("rois", rois, (None, 5), "[K, 5] rows (batch_index, x0, y0, x1, y1)")
    check_same_device(features=features, rois=rois)
    check_same_dtype(features=features, rois=rois)
    check_finite("rois", rois)
    _check_spatial_scale(spatial_scale)
    # Finite coordinates can still overflow once scaled, or in the box extent x1 - x0, in the dtype
    # the pooling computes in (float32 for float16 and bfloat16).
    scaled = rois[:, 1:].to(torch.promote_types(rois.dtype, torch.float32)) * spatial_scale
    if scaled.numel() and not bool(torch.isfinite(torch.cat([scaled, scaled[:, 2:] - scaled[:, :2]], 1)).all()):
        raise ValueError(f"rois[:, 1:] * spatial_scale ({spatial_scale}) and the box extents x1 - x0, y1 - y0 "
                         f"must be finite in {rois.dtype}; some coordinates are too large")
    if rois.numel():
        batch = rois[:, 0]
        if not bool((batch == batch.round()).all()):
            raise ValueError("rois[:, 0] (batch index) must hold whole numbers")
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= features.shape[0]:
            raise ValueError(
                f"rois[:, 0] (batch index) must lie in [0, {features.shape[0] - 1}] for features of batch size "
                f"{features.shape[0]}, got values in [{lo}, {hi}]"
            )


def _tri_antiderivative(t: Tensor) -> Tensor:
    """``P(t)``: integral of ``tri`` from ``-inf`` to ``t``; 0 below -1, 1 above 1, C1-smooth."""
    t = t.clamp(-1.0, 1.0)
    return torch.where(t <= 0, 0.5 * (t + 1) ** 2, 0.5 + t - 0.5 * t * t)


def _axis_weights(start: Tensor, length: Tensor, bins: int, size: int, whole: bool = False) -> tuple[Tensor, Tensor]:
    """Per-bin interpolation weights along one axis, restricted to a window of samples.

    Args:
        start (Tensor[K]): first edge of each RoI on this axis, in feature-map units.
        length (Tensor[K]): extent of each RoI, already clamped at 0.
        bins: number of bins on this axis.
        size: number of samples of the feature map on this axis.
        whole: the window is the whole axis, ``S = size``, for every RoI.

    Returns:
        (Tensor[K, bins, S], Tensor[K, S] int64): weights and the sample indices of each RoI's
        window. The window starts at ``floor(start)`` (no sample left of it can touch the box) and
        is wide enough for the largest RoI; entries past the map get weight 0.
    """
    end = start + length
    if whole:
        lo, span = torch.zeros(start.shape, dtype=torch.long, device=start.device), size
    else:
        lo = start.detach().floor().clamp(0, size - 1).long()
        hi = end.detach().ceil().clamp(0, size - 1).long()
        span = int((hi - lo).max()) + 1 if start.numel() else 1
    index = lo[:, None] + torch.arange(span, device=start.device)  # (K, S)
    inside = index < size
    edges = start[:, None] + length[:, None] / bins * torch.arange(bins + 1, device=start.device, dtype=start.dtype)
    prim = _tri_antiderivative(edges[:, :, None] - index[:, None, :].to(start.dtype))  # (K, bins + 1, S)
    weights = (prim[:, 1:] - prim[:, :-1]) * inside[:, None, :]
    return weights, index.clamp(max=size - 1)


def _prroi_pool_chunk(table: Tensor, shape: torch.Size, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
    """PrRoIPool of some RoIs from ``table``, the ``(N, C, H, W)`` map ``shape`` laid out as ``(N*H*W, C)``."""
    _, _, height, width = shape
    batch = rois[:, 0].long()
    x0, y0, x1, y1 = (rois[:, 1:] * spatial_scale).unbind(1)
    w = (x1 - x0).clamp(min=0)
    h = (y1 - y0).clamp(min=0)
    wy, rows = _axis_weights(y0, h, ph, height)  # (K, PH, Sy), (K, Sy)
    wx, cols = _axis_weights(x0, w, pw, width)  # (K, PW, Sx), (K, Sx)
    flat = (batch[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]  # (K, Sy, Sx)
    window = table.index_select(0, flat.reshape(-1)).view(*flat.shape, table.shape[1])  # (K, Sy, Sx, C)
    partial = torch.einsum("kpi,kijc->kpjc", wy, window)  # (K, PH, Sx, C)
    integral = torch.einsum("kpjc,kqj->kcpq", partial, wx)  # (K, C, PH, PW)
    return _bin_means(integral, w, h, ph, pw)


def _prroi_pool_whole(features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
    """PrRoIPool of RoIs of one image with weights over the whole map: ``Wy · F · Wxᵀ`` as two matrix products."""
    _, channels, height, width = features.shape
    x0, y0, x1, y1 = (rois[:, 1:] * spatial_scale).unbind(1)
    w = (x1 - x0).clamp(min=0)
    h = (y1 - y0).clamp(min=0)
    wy, _ = _axis_weights(y0, h, ph, height, whole=True)  # (K, PH, H)
    wx, _ = _axis_weights(x0, w, pw, width, whole=True)  # (K, PW, W)
    rows = features[int(rois[0, 0])].transpose(0, 1).reshape(height, channels * width)  # (H, C*W)
    partial = (wy.reshape(-1, height) @ rows).view(len(rois), ph * channels, width)  # (K, PH*C, W)
    integral = torch.bmm(partial, wx.transpose(1, 2)).view(len(rois), ph, channels, pw).transpose(1, 2)
    return _bin_means(integral, w, h, ph, pw)


def _bin_means(integral: Tensor, w: Tensor, h: Tensor, ph: int, pw: int) -> Tensor:
    """Bin integrals ``(K, C, PH, PW)`` divided by the bin areas of RoIs of extents ``w`` x ``h``."""
    area = (w / pw) * (h / ph)
    # Dividing by a substitute area of 1 keeps zero-area bins at exactly 0 with a zero gradient.
    nonempty = area > 0
    area = torch.where(nonempty, area, torch.ones_like(area))
    return torch.where(nonempty[:, None, None, None], integral / area[:, None, None, None], torch.zeros_like(integral))


def _prroi_pool_cpu(features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
    """The reference path: pure PyTorch, differentiable by autograd, any device.

    Each RoI reads a window of samples as large as the largest RoI in its chunk, so RoIs are
    sorted by image and window size and chunked: similar sizes share a chunk, and a chunk's
    gathered window stays under ``_WINDOW_BUDGET`` elements. A chunk whose windows cover much of
    the map uses weights over the whole map instead (:func:`_prroi_pool_whole`).
    """
    _, channels, height, width = features.shape
    # Channels-last rows, so that each gathered sample is one contiguous C-vector and the
    # backward is an index_add of rows. Made on the first windowed chunk: a copy of the map.
    table = None
    if rois.shape[0] == 0:
        # Still through the graph, so the (empty) gradient reaches ``features`` as zeros.
        return _prroi_pool_chunk(features.permute(0, 2, 3, 1).reshape(-1, channels), features.shape, rois, ph, pw,
                                 spatial_scale)
    scaled = rois[:, 1:].detach() * spatial_scale
    rows = ((scaled[:, 3] - scaled[:, 1]).clamp(min=0) + 3).clamp(max=height)
    cols = ((scaled[:, 2] - scaled[:, 0]).clamp(min=0) + 3).clamp(max=width)
    window = (rows * cols * channels).tolist()
    # By image, then by window size: a chunk pooled over the whole map must hold one image.
    images = rois[:, 0].tolist()
    order = sorted(range(len(window)), key=lambda i: (images[i], window[i]))
    whole_map = height * width * channels
    outputs, start = [], 0
    while start < len(order):
        image = images[order[start]]
        end = min(start + _MAX_CHUNK, len(order))
        while images[order[end - 1]] != image:
            end -= 1
        # The window at the chunk's furthest possible end bounds every window inside it.
        bound = window[order[end - 1]]
        whole = bound * _DENSE_FRACTION > whole_map
        per_roi = max(ph, pw) * max(height, width) * channels if whole else bound
        size = int(min(end - start, max(1, _WINDOW_BUDGET // per_roi)))
        index = torch.tensor(order[start:start + size], device=rois.device)
        if whole:
            outputs.append(_prroi_pool_whole(features, rois[index], ph, pw, spatial_scale))
        else:
            if table is None:
                table = features.permute(0, 2, 3, 1).reshape(-1, channels)  # (N*H*W, C)
            outputs.append(_prroi_pool_chunk(table, features.shape, rois[index], ph, pw, spatial_scale))
        start += size
    inverse = torch.empty(len(order), dtype=torch.long, device=rois.device)
    inverse[torch.tensor(order, device=rois.device)] = torch.arange(len(order), device=rois.device)
    return torch.cat(outputs)[inverse]


_KERNEL_DTYPES = {torch.float32: ("float", np.float32), torch.float64: ("double", np.float64)}


def _launch(kernel: str, total: int, tensors: tuple[Tensor, ...], shape: tuple[int, ...], spatial_scale: float) -> None:
    """Launch ``kernel`` of ``workbench/kernels/prroi_pool.cu`` over ``total`` work items.

    ``shape`` is ``(C, H, W, PH, PW)``; every kernel takes its tensors (contiguous, the last one
    the output) first, then those sizes, the spatial scale and the item count, in that order.
    """
    suffix, scalar = _KERNEL_DTYPES[tensors[0].dtype]
    args = (*tensors, *map(np.int32, shape), scalar(spatial_scale), np.int64(total))
    _cuda.launch("prroi_pool.cu", f"{kernel}_{suffix}", _cuda.blocks_for(total, _THREADS), _THREADS, args)


class _PrRoIPoolCUDA(torch.autograd.Function):
    """Autograd wrapper of the CUDA kernels, for float32 and float64 tensors."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
        features, rois = features.contiguous(), rois.contiguous()
        shape = (*features.shape[1:], ph, pw)
        # The forward kernel writes every element.
        out = features.new_empty((rois.shape[0], features.shape[1], ph, pw))
        if out.numel():
            _launch("prroi_forward", out.numel(), (features, rois, out), shape, spatial_scale)
        ctx.save_for_backward(features, rois)
        ctx.shape, ctx.spatial_scale = shape, spatial_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        features, rois = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_features = grad_rois = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.zeros_like(features)
            if grad_out.numel():
                _launch("prroi_backward_features", grad_out.numel(), (grad_out, rois, grad_features), ctx.shape,
                        ctx.spatial_scale)
        if ctx.needs_input_grad[1]:
            grad_rois = torch.zeros_like(rois)
            items = rois.shape[0] * ctx.shape[3] * ctx.shape[4]  # one thread per (RoI, bin), looping over channels
            if items and features.shape[1]:
                _launch("prroi_backward_coords", items, (features, rois, grad_out, grad_rois), ctx.shape,
                        ctx.spatial_scale)
        return grad_features, grad_rois, None, None, None


def prroi_pool(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """Precise RoI Pooling (IoU-Net, Eq. 2-4): each bin's exact mean of the interpolated map.

    Args:
        features (Tensor[N, C, H, W]): feature maps; sample ``[i, j]`` sits at ``(x = j, y = i)``.
        rois (Tensor[K, 5]): rows ``(batch_index, x0, y0, x1, y1)`` in input-image coordinates,
            same dtype and device as ``features``; ``batch_index`` a whole number in ``[0, N)``.
            Boxes may be fractional, partly or wholly off the map, zero-size or inverted
            (``x1 < x0`` gives an empty box: output 0).
        output_size (int or Tuple[int, int]): ``(PH, PW)``, bins per RoI.
        spatial_scale (float): factor mapping input coordinates to feature-map coordinates,
            e.g. ``1/16`` for stride 16.

    Returns:
        Tensor[K, C, PH, PW]: pooled features, the same dtype as ``features``. Differentiable
        w.r.t. ``features`` and ``rois[:, 1:]`` (the batch column receives a zero gradient).

    CPU tensors use the pure PyTorch path; CUDA tensors use CuPy kernels (float16 and bfloat16 are
    computed in float32 and cast back, so accumulation is float32).
    """
    ph, pw = _pair(output_size)
    _check_inputs(features, rois, spatial_scale)
    spatial_scale = float(spatial_scale)
    low_precision = features.dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        out = prroi_pool(features.float(), rois.float(), (ph, pw), spatial_scale)
        return out.to(features.dtype)
    if features.is_cuda:
        return _PrRoIPoolCUDA.apply(features, rois, ph, pw, spatial_scale)
    return _prroi_pool_cpu(features, rois, ph, pw, spatial_scale)


class PrRoIPool(nn.Module):
    """See :func:`prroi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        _check_spatial_scale(spatial_scale)  # at construction, not at the first call
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return prroi_pool(features, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
