"""Image features computed once and shared by every head that looks at them.

Detection, box regression, IoU prediction and IoU-guided refinement all run on the same FPN maps.
:func:`extract_features` runs a model's ``transform`` (resize + normalize + pad, torchvision's
``GeneralizedRCNNTransform``) and ``backbone`` once and keeps what is needed to move boxes
between the two coordinate frames involved:

* *original* frame: pixels of the images as given, what datasets and COCO results use;
* *input* frame: pixels of the resized image the network saw, what the heads pool in.

The resize is a per-axis scale, so ``to_input`` / ``to_original`` are differentiable (gradients
w.r.t. boxes in the original frame flow through them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops.misc import FrozenBatchNorm2d

# Batch norm in eval mode and FrozenBatchNorm2d compute the same affine map from the same four
# tensors; a detector loaded for inference has the first, the IoU-Net's frozen copy the second.
_BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
# The transform's settings that decide the input tensor (resizing, normalization, padding).
_TRANSFORM_SETTINGS = ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size",
                       "_skip_resize")


@dataclass
class FeatureBatch:
    """FPN features of a batch of images plus the geometry to map boxes.

    Attributes:
        images (ImageList): the normalized, resized and padded batch (``tensors`` is
            ``Tensor[B, 3, H, W]``); the RPN needs it for anchor generation.
        features (OrderedDict[str, Tensor[B, C, h, w]]): FPN levels, as the backbone returns them.
        original_sizes (List[Tuple[int, int]]): ``(height, width)`` of each image as given.
        targets (List[Dict[str, Tensor]], optional): the targets, resized into the input frame
            by the transform, when targets were passed.
    """

    images: ImageList
    features: OrderedDict[str, Tensor]
    original_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] | None = None

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each image in the input frame (resized, before padding)."""
        return self.images.image_sizes

    def to_input(self, boxes: list[Tensor]) -> list[Tensor]:
        """Map per-image boxes ``Tensor[M_i, 4]`` ``(x0, y0, x1, y1)`` from original to input pixels."""
        return [resize_boxes(b, o, s) for b, o, s in zip(boxes, self.original_sizes, self.image_sizes)]

    def to_original(self, boxes: list[Tensor]) -> list[Tensor]:
        """Map per-image boxes ``Tensor[M_i, 4]`` ``(x0, y0, x1, y1)`` from input to original pixels."""
        return [resize_boxes(b, s, o) for b, o, s in zip(boxes, self.original_sizes, self.image_sizes)]


def extract_features(
    model: nn.Module,
    images: list[Tensor],
    targets: list[dict[str, Tensor]] | None = None,
) -> FeatureBatch:
    """Run ``model.transform`` and ``model.backbone`` on a list of images.

    Works for any model with those two attributes: torchvision's ``FasterRCNN`` (and so
    :func:`~workbench.models.detector.build_detector`'s result) and
    :class:`~workbench.models.iou_net.StandaloneIoUNet`. Gradient tracking follows the caller's
    context (wrap in ``torch.no_grad()`` for inference).

    Args:
        model (nn.Module): has ``transform`` (``GeneralizedRCNNTransform``) and ``backbone``
            (returns an ``OrderedDict`` of maps, or a single ``Tensor``).
        images (List[Tensor[3, H_i, W_i]]): RGB images in ``[0, 1]``, sizes may differ.
        targets (List[Dict[str, Tensor]], optional): ``boxes`` ``Tensor[N_i, 4]``
            ``(x0, y0, x1, y1)`` in original pixels, ``labels`` ``Int64Tensor[N_i]``; returned
            resized in ``FeatureBatch.targets`` (the input dicts are not modified).

    Returns:
        FeatureBatch
    """
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    image_list, resized_targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):  # a backbone without FPN, as GeneralizedRCNN handles it
        features = OrderedDict([("0", features)])
    return FeatureBatch(image_list, features, original_sizes, resized_targets)



def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Whether two (sub)modules in eval mode compute the same function of their input, judged by type,
    settings (``extra_repr``: strides, padding, groups ...) and direct parameters and buffers."""
    if a.training or b.training:
        return False  # dropout, batch statistics: the output depends on more than the weights
    if isinstance(a, _BATCH_NORMS) and isinstance(b, _BATCH_NORMS):
        if a.eps != b.eps or any(getattr(m, "track_running_stats", True) is False for m in (a, b)):
            return False
        names = ("weight", "bias", "running_mean", "running_var")
        return all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)
    if type(a) is not type(b) or a.extra_repr() != b.extra_repr():
        return False
    tensors_a = {**dict(a.named_parameters(recurse=False)), **dict(a.named_buffers(recurse=False))}
    tensors_b = {**dict(b.named_parameters(recurse=False)), **dict(b.named_buffers(recurse=False))}
    return tensors_a.keys() == tensors_b.keys() and all(
        t.shape == tensors_b[n].shape and t.dtype == tensors_b[n].dtype and t.device == tensors_b[n].device
        and torch.equal(t, tensors_b[n]) for n, t in tensors_a.items())


def same_features(a: nn.Module, b: nn.Module) -> bool:
    """Whether :func:`extract_features` gives the same maps with ``a`` as with ``b``, so one model's can
    stand in for the other's (e.g. a standalone IoU-Net's frozen copy of its detector's backbone).

    Judged by the weights, never by a config: both transforms have the same resizing, normalization
    and padding, and both backbones, in eval mode, have the same modules (type and settings) with
    equal parameters and buffers, module by module. A ``BatchNorm2d`` in eval mode and a
    ``FrozenBatchNorm2d`` with the same four tensors and ``eps`` count as the same; their outputs
    then agree to float rounding, not bit for bit. The check costs one comparison of the weights:
    call it once per model pair, not per image.
    """
    ta, tb = getattr(a, "transform", None), getattr(b, "transform", None)
    if ta is None or tb is None or type(ta) is not type(tb) or ta.training or tb.training:
        return False  # in training mode the resize draws its size
    if any(getattr(ta, k, None) != getattr(tb, k, None) for k in _TRANSFORM_SETTINGS):
        return False
    modules_a, modules_b = dict(a.backbone.named_modules()), dict(b.backbone.named_modules())
    return modules_a.keys() == modules_b.keys() and all(_same_module(m, modules_b[n]) for n, m in modules_a.items())
