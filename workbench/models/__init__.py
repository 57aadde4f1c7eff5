"""Models: the FPN detector baseline and IoU-Net (standalone and jointly trained).

| module | what |
| --- | --- |
| ``backbones`` | MobileNetV2 / ResNet-50 + FPN, same five-level layout |
| ``features`` | ``extract_features``: transform + backbone once, box mapping between frames; ``same_features`` |
| ``detector`` | ``build_detector``, ``raw_detections`` (no NMS), ``regress_boxes``, ``to_coco_results`` |
| ``jitter`` | IoU-head training boxes: jittered ground truth, uniform in IoU |
| ``pooling`` | ``MultiScalePrRoIPool``: PrRoI Pooling at FPN's level for each box |
| ``iou_net`` | ``IoUHead``, ``StandaloneIoUNet``, ``JointIoUNet`` |
"""

from .backbones import build_backbone
from .detector import build_detector, raw_detections, regress_boxes, to_coco_results
from .features import FeatureBatch, extract_features, same_features
from .iou_net import (
    IoUHead,
    JointIoUNet,
    StandaloneIoUNet,
    iou_to_target,
    predict_ious,
    target_to_iou,
)
from .jitter import JitterConfig, jitter_boxes, jitter_targets, matched_iou
from .pooling import MultiScalePrRoIPool

__all__ = [
    "FeatureBatch",
    "IoUHead",
    "JitterConfig",
    "JointIoUNet",
    "MultiScalePrRoIPool",
    "StandaloneIoUNet",
    "build_backbone",
    "build_detector",
    "extract_features",
    "iou_to_target",
    "jitter_boxes",
    "jitter_targets",
    "matched_iou",
    "predict_ious",
    "raw_detections",
    "regress_boxes",
    "same_features",
    "target_to_iou",
    "to_coco_results",
]
