"""The numerical core, modelled on ``torchvision.ops``: box utilities, PrRoIPool and the NMS family.

Every op takes boxes as ``(x0, y0, x1, y1)`` in continuous pixel coordinates. CPU tensors run
pure PyTorch; CUDA tensors run the CuPy kernels in ``kernels/`` through the same call.
"""

from .boxes import box_area, box_iou
from .prroi_pool import PrRoIPool, prroi_pool

__all__ = ["box_area", "box_iou", "prroi_pool", "PrRoIPool"]
