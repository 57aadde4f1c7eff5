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

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes


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

