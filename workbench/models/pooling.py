"""Multi-level PrRoI Pooling over an FPN: torchvision's ``MultiScaleRoIAlign`` with PrRoIPool inside.

Each box is pooled from one FPN level, chosen by FPN's Eq. 1 exactly as torchvision chooses it
for the R-CNN branch (``torchvision.ops.poolers``: scales inferred from the map and image sizes,
``LevelMapper`` with canonical scale 224 at level 4, clamped to the levels present). So the IoU
head and the R-CNN head of a detector look at the same level for the same box. The only change is
the pooling operator: :func:`workbench.ops.prroi_pool.prroi_pool`, whose output is continuously
differentiable w.r.t. the box coordinates (RoI Align's is not, paper Sec. 3.3); the level choice
is piecewise constant, so gradients w.r.t. boxes are those of the chosen level.

The module has ``MultiScaleRoIAlign``'s call signature, so it can also replace the R-CNN branch's
pooling (``build_detector(..., prroi_in_rcnn=True)``), as the paper does in its jointly trained
model (Sec. 3.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from workbench.ops.prroi_pool import prroi_pool

from .backbones import FPN_LEVELS


class MultiScalePrRoIPool(nn.Module):
    """PrRoI Pooling from the FPN level each box is assigned to.

    Args:
        featmap_names (Sequence[str]): the levels to pool from, finest first (their strides must
            double from one to the next, as torchvision assumes). Default ``"0".."3"``.
        output_size (int or Tuple[int, int]): ``(PH, PW)`` bins per box. Default 7.
        canonical_scale (int): box side (pixels) assigned to ``canonical_level``. Default 224.
        canonical_level (int): FPN level ``k0`` of Eq. 1 in the FPN paper. Default 4.
    """

    def __init__(
        self,
        featmap_names: Sequence[str] = FPN_LEVELS,
        output_size: int | tuple[int, int] = 7,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def assign_levels(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, list[float]]:
        """The level index (into ``featmap_names``) of each box and the scale of each level.

        Returns:
            (Int64Tensor[K], List[float]): level of each box of the concatenated ``boxes``, and
            ``spatial_scale`` (``1 / stride``) of each level.
        """
        maps = _filter_input(features, self.featmap_names)
        scales, mapper = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        # The level is a floor of log2(size): no gradient to pass on, so keep it off the graph. A box
        # inverted on one axis has a negative area, so NaN size and an out-of-range level after the
        # cast: clamping sends it to the finest level, where a zero-area box goes (it pools to 0).
        return mapper([b.detach() for b in boxes]).clamp(0, len(scales) - 1), scales

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool every box.

        Args:
            features (Dict[str, Tensor[B, C, h, w]]): FPN maps; only ``featmap_names`` are used.
            boxes (List[Tensor[M_i, 4]]): per image, ``(x0, y0, x1, y1)`` in input-frame pixels.
            image_shapes (List[Tuple[int, int]]): ``(height, width)`` of each image in the input frame.

        Returns:
            Tensor[K, C, PH, PW]: pooled features of the concatenated boxes, ``K = sum(M_i)``,
            differentiable w.r.t. ``features`` and ``boxes``.
        """
        maps = _filter_input(features, self.featmap_names)
        levels, scales = self.assign_levels(features, boxes, image_shapes)
        rois = _convert_to_roi_format(boxes)  # (K, 5): batch index, x0, y0, x1, y1
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(maps, scales)):
            index = torch.where(levels == level)[0]
            if len(index):
                pooled.append(prroi_pool(feature, rois[index], self.output_size, scale))
                order.append(index)
        if not pooled:
            return maps[0].new_zeros((0, maps[0].shape[1], *self.output_size))
        if len(pooled) == 1:  # every box on one level: already in box order
            return pooled[0]
        # Put the per-level results back in box order, without in-place writes, for autograd.
        return torch.cat(pooled).index_select(0, torch.cat(order).argsort())

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}"
        )
