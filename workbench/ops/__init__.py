"""The numerical core, modelled on ``torchvision.ops``: box utilities, PrRoIPool and the NMS family.

Every op takes boxes as ``(x0, y0, x1, y1)`` in continuous pixel coordinates. CPU tensors run
pure PyTorch; CUDA tensors run the CuPy kernels in ``workbench/kernels/`` through the same call.
"""

from .boxes import box_area, box_iou
from .nms import batched_iou_guided_nms, batched_nms, batched_soft_nms, iou_guided_nms, nms, soft_nms
from .prroi_pool import PrRoIPool, prroi_pool

__all__ = [
    "box_area",
    "box_iou",
    "prroi_pool",
    "PrRoIPool",
    "nms",
    "soft_nms",
    "iou_guided_nms",
    "batched_nms",
    "batched_soft_nms",
    "batched_iou_guided_nms",
]
