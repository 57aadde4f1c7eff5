"""Backbone + FPN builders shared by the detector and the standalone IoU-Net.

Both return torchvision's ``BackboneWithFPN`` with the same output layout: an ``OrderedDict`` of
256-channel maps ``"0", "1", "2", "3"`` at strides 4, 8, 16, 32 and ``"pool"`` at stride 64 (the
max-pooled top level used only by the RPN). Because the layout is the same for both backbones,
torchvision's default FPN anchors (32 to 512 px, one size per level) and its default
``MultiScaleRoIAlign(["0", "1", "2", "3"])`` apply to either, and the IoU head pools from the
same four levels as the R-CNN branch.
"""

from __future__ import annotations

import warnings

from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _validate_trainable_layers,
    mobilenet_backbone,
    resnet_fpn_backbone,
)
from torchvision.ops import misc as misc_nn_ops

from ..weights import ensure_mobilenet_v2_weights

BACKBONES = ("mobilenet_v2", "resnet50")
FPN_LEVELS = ("0", "1", "2", "3")  # the pooled levels, strides 4, 8, 16, 32
FPN_CHANNELS = 256

# MobileNetV2 stages (torchvision's ``_mobilenet_extractor`` numbering, 0..5). Stages 1-3 start
# at strides 4, 8, 16; stage 5 is the final 1x1 conv (1280 channels, stride 32), so the whole
# ImageNet network feeds the pyramid, as ResNet's C2..C5 do.
_MOBILENET_V2_LEVELS = [1, 2, 3, 5]
_MAX_TRAINABLE = {"mobilenet_v2": 6, "resnet50": 5}  # stages torchvision can unfreeze
_DEFAULT_TRAINABLE = 3  # torchvision's default for its pretrained FPN detectors


def build_backbone(
    name: str = "mobilenet_v2",
    pretrained: bool = True,
    trainable_layers: int | None = None,
) -> BackboneWithFPN:
    """A backbone with FPN, ImageNet-initialized or random.

    Args:
        name (str): ``"mobilenet_v2"`` (weights available offline, see
            :func:`workbench.weights.ensure_mobilenet_v2_weights`) or ``"resnet50"`` (the paper's
            backbone; its ImageNet weights need torchvision's download).
        pretrained (bool): load ``IMAGENET1K_V1`` weights and freeze batch norm
            (``FrozenBatchNorm2d``), as torchvision's detectors do. With ``False`` the network is
            randomly initialized, uses ordinary ``BatchNorm2d`` and every layer trains.
        trainable_layers (int, optional): number of stages, counted from the top, left trainable
            (0 to 6 for MobileNetV2, 0 to 5 for ResNet-50). Default 3. Ignored with a warning by
            torchvision when ``pretrained=False``.

    Returns:
        BackboneWithFPN: maps an image batch ``Tensor[B, 3, H, W]`` to an ``OrderedDict`` with
        keys ``"0", "1", "2", "3", "pool"`` (strides 4, 8, 16, 32, 64), each ``Tensor[B, 256, h, w]``;
        ``out_channels == 256``.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    trainable_layers = _validate_trainable_layers(
        pretrained, trainable_layers, _MAX_TRAINABLE[name], _DEFAULT_TRAINABLE
    )
    # Frozen statistics only make sense for trained ones; random init needs real batch norm.
    norm_layer: type[nn.Module] = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name == "mobilenet_v2":
        weights = None
        if pretrained:
            weights = MobileNet_V2_Weights.IMAGENET1K_V1
            try:
                ensure_mobilenet_v2_weights()
            except RuntimeError as e:  # torchvision may still download the file itself
                warnings.warn(f"{e}\nFalling back to torchvision's own download.", stacklevel=2)
        return mobilenet_backbone(
            backbone_name="mobilenet_v2",
            weights=weights,
            fpn=True,
            norm_layer=norm_layer,
            trainable_layers=trainable_layers,
            returned_layers=_MOBILENET_V2_LEVELS,
        )
    return resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=ResNet50_Weights.IMAGENET1K_V1 if pretrained else None,
        norm_layer=norm_layer,
        trainable_layers=trainable_layers,
    )
