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
``y``). The CPU path computes exactly that, vectorized over RoIs and bins, and its backward is
written out: the transposed sums for the map, and for the coordinates ``dWx[j] / dxe = tri(xe - j)``
(the line integrals of Eq. 4). CUDA tensors go to the kernels in ``workbench/kernels/prroi_pool.cu``,
which implement the same sums.
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


class _Axis:
    """One axis of a chunk of RoIs: bin edges, the window of samples each RoI reads, their weights.

    ``start`` (Tensor[K]) is the first edge of each RoI and ``length`` (Tensor[K]) its extent clamped
    at 0, in feature-map units; ``size`` samples on the axis; ``whole``: every window is the whole
    axis. Attributes: ``edges`` (K, bins + 1); ``index`` (K, S) int64, the window, from
    ``floor(start)`` (no sample left of it can touch the box) and as wide as the largest RoI, clamped
    into the map; ``inside`` (K, S), the samples really in the map; ``weights`` (K, bins, S),
    ``P(edge[b + 1] - s) - P(edge[b] - s)``, zero past the map.
    """

    def __init__(self, start: Tensor, length: Tensor, bins: int, size: int, whole: bool) -> None:
        if whole:
            lo, span = torch.zeros(start.shape, dtype=torch.long, device=start.device), size
        else:
            lo = start.floor().clamp(0, size - 1).long()
            hi = (start + length).ceil().clamp(0, size - 1).long()
            span = int((hi - lo).max()) + 1 if start.numel() else 1
        index = lo[:, None] + torch.arange(span, device=start.device)
        self.bins, self.length = bins, length
        self.inside = index < size
        self.index = index.clamp(max=size - 1)
        self.edges = start[:, None] + length[:, None] / bins * torch.arange(bins + 1, device=start.device,
                                                                          dtype=start.dtype)
        self.offsets = self.edges[:, :, None] - index[:, None, :].to(start.dtype)  # (K, bins + 1, S)
        prim = _tri_antiderivative(self.offsets)
        self.weights = (prim[:, 1:] - prim[:, :-1]) * self.inside[:, None, :]

    def start_and_length_gradients(self, grad_weights: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients w.r.t. ``start`` and ``length`` given those w.r.t. ``weights``: ``dP/dt = tri(t)``
        (the line integrals along the bin edges of Eq. 4) and ``edge[b] = start + length * b / bins``."""
        grad_weights = grad_weights * self.inside[:, None, :]
        zero = grad_weights.new_zeros(grad_weights[:, :1].shape)
        grad_prim = torch.cat([zero, grad_weights], 1) - torch.cat([grad_weights, zero], 1)  # (K, bins + 1, S)
        tri = (1 - self.offsets.abs()).clamp(min=0)
        grad_edges = (grad_prim * tri).sum(2)  # (K, bins + 1)
        fraction = torch.arange(self.bins + 1, device=grad_edges.device, dtype=grad_edges.dtype) / self.bins
        return grad_edges.sum(1), grad_edges @ fraction


class _Chunk:
    """Forward of PrRoIPool for RoIs of one image whose windows are similar, with what the backward needs.

    Every bin is ``sum_ij wy[p, i] window[i, j] wx[q, j] / area``: two products whose long side is C
    (batched products with a side of a few bins run far below the CPU's speed). ``window`` is the
    ``(N*H*W, C)`` table gathered at each RoI's window (rows of contiguous C-vectors), or with
    ``whole`` the image's whole map, shared by every RoI.
    """

    def __init__(self, table: Tensor, shape: tuple[int, int, int], rois: Tensor, ph: int, pw: int,
                 spatial_scale: float, whole: bool) -> None:
        height, width, channels = shape
        x0, y0, x1, y1 = (rois[:, 1:] * spatial_scale).unbind(1)
        self.spatial_scale = spatial_scale
        self.positive_w, self.positive_h = x1 - x0 >= 0, y1 - y0 >= 0
        w, h = (x1 - x0).clamp(min=0), (y1 - y0).clamp(min=0)
        self.y = _Axis(y0, h, ph, height, whole)
        self.x = _Axis(x0, w, pw, width, whole)
        k, sy, sx = len(rois), self.y.index.shape[1], self.x.index.shape[1]
        if whole:
            self.flat = None
            image = int(rois[0, 0])
            self.rows = slice(image * height * width, (image + 1) * height * width)  # of the table
            self.window = table[self.rows].view(1, sy, sx * channels)
            self.partial = (self.y.weights.reshape(k * ph, sy) @ self.window[0]).view(k, ph, sx, channels)
        else:
            batch = rois[:, 0].long()
            self.flat = ((batch[:, None, None] * height + self.y.index[:, :, None]) * width
                         + self.x.index[:, None, :]).view(k, -1)  # (K, Sy*Sx)
            self.window = table.index_select(0, self.flat.view(-1)).view(k, sy, sx * channels)
            self.partial = torch.bmm(self.y.weights, self.window).view(k, ph, sx, channels)
        area = (w / pw) * (h / ph)
        # A zero-area RoI pools to exactly 0, with a zero gradient: its 1 / area is taken as 0.
        self.inv_area = torch.where(area > 0, 1 / torch.where(area > 0, area, torch.ones_like(area)),
                                    torch.zeros_like(area))
        self.mean = torch.matmul(self.x.weights[:, None], self.partial) * self.inv_area[:, None, None, None]

    def backward(self, grad: Tensor, grad_table: Tensor | None, coordinates: bool) -> Tensor | None:
        """Given ``grad`` (K, PH, PW, C) w.r.t. the chunk's means, adds the gradient w.r.t. the map
        into ``grad_table`` (the table's shape) when given, and returns the one w.r.t. the chunk's
        ``rois`` (K, 5) if ``coordinates``."""
        k, ph, pw, channels = grad.shape
        sy, sx = self.y.index.shape[1], self.x.index.shape[1]
        grad_sum = grad * self.inv_area[:, None, None, None]  # w.r.t. the bin integrals
        # (K, PH, Sx, C): the row sums' gradient, sum_q wx[q, j] grad_sum[p, q]
        grad_partial = torch.matmul(self.x.weights.transpose(1, 2)[:, None], grad_sum)
        flat_partial = grad_partial.view(k, ph, sx * channels)
        if grad_table is not None:
            if self.flat is None:  # summed over the RoIs, which share the map
                grad_map = self.y.weights.reshape(k * ph, sy).T @ flat_partial.reshape(k * ph, -1)  # (H, W*C)
                grad_table[self.rows] += grad_map.view(-1, channels)
            else:
                grad_window = torch.bmm(self.y.weights.transpose(1, 2), flat_partial)  # (K, Sy, Sx*C)
                grad_table.index_add_(0, self.flat.view(-1), grad_window.view(-1, channels))
        if not coordinates:
            return None
        grad_wx = torch.matmul(grad_sum, self.partial.transpose(2, 3)).sum(1)  # (K, PW, Sx)
        if self.flat is None:
            grad_wy = (flat_partial.reshape(k * ph, -1) @ self.window[0].T).view(k, ph, sy)
        else:
            grad_wy = torch.bmm(flat_partial, self.window.transpose(1, 2))
        # Through 1 / area: d mean / d area = -mean / area, and area = (w / PW) (h / PH).
        grad_area = -(grad * self.mean).sum((1, 2, 3)) * self.inv_area
        dx0, dw = self.x.start_and_length_gradients(grad_wx)
        dy0, dh = self.y.start_and_length_gradients(grad_wy)
        dw = dw + grad_area * self.y.length / (ph * pw)
        dh = dh + grad_area * self.x.length / (ph * pw)
        dw, dh = dw * self.positive_w, dh * self.positive_h
        coords = torch.stack([dx0 - dw, dy0 - dh, dw, dh], 1) * self.spatial_scale
        return torch.cat([coords.new_zeros(k, 1), coords], 1)


def _chunks(features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> list[tuple[Tensor, bool]]:
    """Positions of the RoIs of each chunk and whether it pools over the whole map.

    Each RoI reads a window of samples as large as the largest RoI in its chunk, so RoIs are
    sorted by image and window size and chunked: similar sizes share a chunk, and a chunk's
    gathered window stays under ``_WINDOW_BUDGET`` elements. A chunk whose windows cover much of
    the map uses weights over the whole map instead, one image per chunk.
    """
    _, channels, height, width = features.shape
    scaled = rois[:, 1:] * spatial_scale
    rows = ((scaled[:, 3] - scaled[:, 1]).clamp(min=0) + 3).clamp(max=height)
    cols = ((scaled[:, 2] - scaled[:, 0]).clamp(min=0) + 3).clamp(max=width)
    window = (rows * cols * channels).tolist()
    images = rois[:, 0].tolist()
    order = sorted(range(len(window)), key=lambda i: (images[i], window[i]))
    whole_map = height * width * channels
    chunks, start = [], 0
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
        chunks.append((torch.tensor(order[start:start + size], device=rois.device), whole))
        start += size
    return chunks


class _PrRoIPoolTorch(torch.autograd.Function):
    """PrRoIPool in PyTorch tensor ops (any device), with the exact backward written out: w.r.t.
    the map, the transposed sums; w.r.t. the coordinates, the line integrals of Eq. 4."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
        n, channels, height, width = features.shape
        # Channels-last rows: each gathered sample is one contiguous C-vector.
        table = features.permute(0, 2, 3, 1).contiguous().view(n * height * width, channels)
        out = features.new_zeros((len(rois), ph, pw, channels))
        ctx.chunks = []
        for index, whole in _chunks(features, rois, ph, pw, spatial_scale):
            chunk = _Chunk(table, (height, width, channels), rois.index_select(0, index), ph, pw, spatial_scale, whole)
            out.index_copy_(0, index, chunk.mean)
            if any(ctx.needs_input_grad):  # else each chunk's windows are freed before the next is gathered
                ctx.chunks.append((index, chunk))
        ctx.table_shape = (n, height, width, channels)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        n, height, width, channels = ctx.table_shape
        grad = grad_out.permute(0, 2, 3, 1)  # (K, PH, PW, C), as the chunks hold their means
        grad_table = grad.new_zeros((n * height * width, channels)) if ctx.needs_input_grad[0] else None
        grad_rois = grad.new_zeros((grad.shape[0], 5)) if ctx.needs_input_grad[1] else None
        for index, chunk in ctx.chunks:
            part = chunk.backward(grad.index_select(0, index), grad_table, grad_rois is not None)
            if grad_rois is not None:
                grad_rois.index_copy_(0, index, part)
        grad_features = None
        if grad_table is not None:
            grad_features = grad_table.view(n, height, width, channels).permute(0, 3, 1, 2)
        return grad_features, grad_rois, None, None, None


def _prroi_pool_cpu(features: Tensor, rois: Tensor, ph: int, pw: int, spatial_scale: float) -> Tensor:
    """The PyTorch path (:class:`_PrRoIPoolTorch`): CPU tensors, and the reference of the CUDA kernels."""
    return _PrRoIPoolTorch.apply(features, rois, ph, pw, spatial_scale)


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
