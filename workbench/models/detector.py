"""The baseline detector: torchvision's Faster R-CNN with FPN, and its raw output before NMS.

IoU-Net's analyses (Sec. 2, 4) start from the *raw* detections of an FPN detector: every
proposal after one class-specific box-regression step, with its per-class softmax score, before
any NMS. torchvision's ``RoIHeads.postprocess_detections`` applies NMS and a top-k cut, so
:func:`raw_detections` runs the model's parts itself (transform, backbone, RPN, the R-CNN box
head and box coder) and stops before NMS. :func:`regress_boxes` applies the box regressor once
more to given boxes (the iterative-regression baseline of Sec. 2.2), and
:func:`to_coco_results` writes detections in COCO's results format.

    model = build_detector(num_classes=3, min_size=128, max_size=128, pretrained_backbone=False)
    model.eval()
    with torch.no_grad():
        feats = extract_features(model, images)  # reusable by an IoU head
        dets = raw_detections(model, feats)

Label convention: ``num_classes`` counts object classes only; labels are ``1..num_classes`` and
0 is background (torchvision's ``FasterRCNN`` is built with ``num_classes + 1`` outputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_convert, clip_boxes_to_image, remove_small_boxes

from .backbones import build_backbone
from .features import FeatureBatch, extract_features
from .pooling import MultiScalePrRoIPool

# Paper Sec. 3.4: "resized to have 800px along the short axis and a maximum of 1200px along the long axis".
PAPER_MIN_SIZE = 800
PAPER_MAX_SIZE = 1200

_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # FPN's three anchor shapes per level
_BOX_FIELDS = ("boxes", "scores", "labels")  # written as COCO's bbox / score / category_id


def build_detector(
    num_classes: int,
    backbone: str = "mobilenet_v2",
    pretrained_backbone: bool = True,
    min_size: int | tuple[int, ...] = PAPER_MIN_SIZE,
    max_size: int = PAPER_MAX_SIZE,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: Sequence[int] | None = None,
    prroi_in_rcnn: bool = False,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with an FPN backbone (Lin et al. 2017), the paper's baseline detector.

    Args:
        num_classes (int): number of object classes, *excluding* background (labels ``1..num_classes``).
        backbone (str): ``"mobilenet_v2"`` or ``"resnet50"`` (see
            :func:`~workbench.models.backbones.build_backbone`).
        pretrained_backbone (bool): ImageNet-initialized backbone (MobileNetV2's weights work
            offline; ResNet-50's need torchvision's download). ``False``: random init.
        min_size (int or Tuple[int, ...]): short side after resizing, in pixels; a tuple picks one
            at random per training batch (multi-scale training). Default: the paper's 800.
        max_size (int): cap on the long side, in pixels. Default: the paper's 1200.
        trainable_backbone_layers (int, optional): stages left trainable, counted from the top.
        anchor_sizes (Sequence[int], optional): five anchor sizes in pixels of the input frame, one
            per FPN level (strides 4 to 64), each with aspect ratios 0.5, 1, 2. Default
            torchvision's ``(32, 64, 128, 256, 512)``; smaller images with small objects want
            smaller anchors, e.g. ``(16, 32, 64, 128, 256)``.
        prroi_in_rcnn (bool): pool the R-CNN branch with PrRoI Pooling
            (:class:`~workbench.models.pooling.MultiScalePrRoIPool`, same levels, 7x7) instead of
            torchvision's RoI Align, as the paper's jointly trained model does (Sec. 3.4). Default
            ``False``: the CPU path of PrRoI Pooling is several times slower, and this branch pools
            512 RoIs per training image.
        **kwargs: passed to ``torchvision.models.detection.FasterRCNN``: RPN options
            (``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_test``, ...) and R-CNN options
            (``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``,
            ``box_batch_size_per_image`` = 512 as in the paper, ...).

    Returns:
        FasterRCNN: in train mode ``model(images, targets)`` returns the dict of losses
        ``loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg``; in eval mode
        ``model(images)`` returns torchvision's post-NMS detections.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes counts object classes and must be >= 1, got {num_classes}")
    if anchor_sizes is not None:
        if "rpn_anchor_generator" in kwargs:
            raise ValueError("pass either anchor_sizes or rpn_anchor_generator, not both")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {tuple(anchor_sizes)}")
        kwargs["rpn_anchor_generator"] = AnchorGenerator(
            tuple((int(s),) for s in anchor_sizes), (_ASPECT_RATIOS,) * len(anchor_sizes)
        )
    if prroi_in_rcnn and "box_roi_pool" in kwargs:
        raise ValueError("pass either prroi_in_rcnn=True or box_roi_pool, not both")
    body = build_backbone(backbone, pretrained_backbone, trainable_backbone_layers)
    model = FasterRCNN(body, num_classes=num_classes + 1, min_size=min_size, max_size=max_size, **kwargs)
    if prroi_in_rcnn:
        # FasterRCNN's constructor only accepts MultiScaleRoIAlign; the box head was sized for its
        # 7x7 output, which MultiScalePrRoIPool's default matches.
        model.roi_heads.box_roi_pool = MultiScalePrRoIPool()
    return model


def _box_head_outputs(model: FasterRCNN, feats: FeatureBatch, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """R-CNN branch on boxes in the input frame: ``(class_logits [K, C+1], box_regression [K, (C+1)*4])``."""
    heads = model.roi_heads
    pooled = heads.box_roi_pool(feats.features, boxes, feats.image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


@torch.no_grad()
def raw_detections(
    model: FasterRCNN,
    images: list[Tensor] | FeatureBatch,
    score_thresh: float = 0.05,
) -> list[dict[str, Tensor]]:
    """Detections before NMS: every (proposal, class) pair after one box-regression step.

    The same computation as torchvision's eval path up to, but excluding, NMS and the
    ``detections_per_img`` cut: RPN proposals (after the RPN's own NMS, which makes the
    proposals and is part of the detector), R-CNN head, class-specific decoding, clipping to the
    image, per-class softmax scores, dropping background, ``score > score_thresh`` and boxes
    smaller than 0.01 px. With ``model.roi_heads.nms_thresh = 1.0`` and a large
    ``detections_per_img`` torchvision's own output is the same set of boxes. Runs without
    autograd (detections are never differentiated; the IoU head is, see
    :func:`~workbench.models.iou_net.predict_ious`).

    Args:
        model (FasterRCNN): in eval mode (the RPN's train mode needs targets and samples differently).
        images (List[Tensor[3, H_i, W_i]] or FeatureBatch): images in ``[0, 1]``, or features already
            computed by :func:`~workbench.models.features.extract_features` (to share them with an IoU head).
        score_thresh (float): keep detections whose class score is above this.

    Returns:
        List[Dict[str, Tensor]], one per image, sorted by descending score, ``M`` detections each:

        - ``boxes`` (``Tensor[M, 4]``): ``(x0, y0, x1, y1)`` in original-image pixels.
        - ``scores`` (``Tensor[M]``): softmax probability of ``labels`` for the source proposal.
        - ``labels`` (``Int64Tensor[M]``): class, ``1..num_classes``.
        - ``rois`` (``Tensor[M, 4]``): the RPN proposal each box was regressed from, original pixels.
        - ``roi_index`` (``Int64Tensor[M]``): index of that proposal among the image's proposals, so
          the class-specific boxes of one proposal can be grouped.
    """
    if model.training:
        raise ValueError("raw_detections needs the model in eval mode (call model.eval())")
    feats = images if isinstance(images, FeatureBatch) else extract_features(model, images)
    proposals, _ = model.rpn(feats.images, feats.features)
    class_logits, box_regression = _box_head_outputs(model, feats, proposals)
    pred_boxes = model.roi_heads.box_coder.decode(box_regression, proposals)  # (K, C+1, 4)
    pred_scores = F.softmax(class_logits, -1)  # (K, C+1)

    counts = [len(p) for p in proposals]
    results = []
    for boxes, scores, rois, size, original in zip(
        pred_boxes.split(counts), pred_scores.split(counts), proposals, feats.image_sizes, feats.original_sizes
    ):
        boxes = clip_boxes_to_image(boxes, size)
        labels = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        roi_index = torch.arange(len(rois), device=scores.device)[:, None].expand_as(scores)
        # One detection per (proposal, object class); column 0 is background.
        boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
        labels, roi_index = labels[:, 1:].reshape(-1), roi_index[:, 1:].reshape(-1)

        keep = torch.where(scores > score_thresh)[0]
        keep = keep[remove_small_boxes(boxes[keep], min_size=1e-2)]
        keep = keep[scores[keep].argsort(descending=True, stable=True)]
        results.append({
            "boxes": resize_boxes(boxes[keep], size, original),
            "scores": scores[keep],
            "labels": labels[keep],
            "rois": resize_boxes(rois[roi_index[keep]], size, original),
            "roi_index": roi_index[keep],
        })
    return results


def regress_boxes(
    model: FasterRCNN,
    feats: FeatureBatch,
    boxes: list[Tensor],
    labels: list[Tensor],
) -> list[Tensor]:
    """Apply the R-CNN box regressor once to given boxes (one step of iterative regression, Sec. 2.2).

    Each box is pooled again (``model.roi_heads.box_roi_pool``), passed through the box head, and
    moved by the regression output of its own class, decoded with the model's ``box_coder``; the
    result is clipped to the image, as the detector's own output is.

    Args:
        model (FasterRCNN): the detector; its mode only matters for batch norm in the head
            (eval mode for analyses).
        feats (FeatureBatch): features of the images, from
            :func:`~workbench.models.features.extract_features` with this model.
        boxes (List[Tensor[M_i, 4]]): ``(x0, y0, x1, y1)`` in original-image pixels, per image.
        labels (List[Int64Tensor[M_i]]): class of each box, ``1..num_classes``.

    Returns:
        List[Tensor[M_i, 4]]: regressed boxes ``(x0, y0, x1, y1)`` in original-image pixels.
    """
    if len(boxes) != len(feats.original_sizes) or len(labels) != len(boxes):
        raise ValueError(
            f"need one boxes and one labels tensor per image ({len(feats.original_sizes)}), "
            f"got {len(boxes)} and {len(labels)}"
        )
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return [b.clone() for b in boxes]
    boxes_in = feats.to_input(boxes)
    _, box_regression = _box_head_outputs(model, feats, boxes_in)
    all_labels = torch.cat(labels)
    deltas = box_regression.reshape(len(all_labels), -1, 4)[torch.arange(len(all_labels)), all_labels]  # (K, 4)
    refined = model.roi_heads.box_coder.decode_single(deltas, torch.cat(boxes_in))
    return [
        resize_boxes(clip_boxes_to_image(r, size), size, original)
        for r, size, original in zip(refined.split(counts), feats.image_sizes, feats.original_sizes)
    ]


def to_coco_results(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Detections in COCO's results format, ready for ``COCO.loadRes`` / ``COCOeval``.

    Args:
        detections (Sequence[Mapping[str, Tensor]]): per image, ``boxes`` (``Tensor[M, 4]``,
            ``(x0, y0, x1, y1)`` pixels), ``scores`` (``Tensor[M]``), ``labels`` (``Int64Tensor[M]``), and
            optionally more per-detection fields, e.g. from :func:`raw_detections` or an IoU head.
        image_ids (Sequence[int]): COCO image id of each entry of ``detections``.
        label_to_cat_id (Mapping[int, int], optional): COCO category id of each label; default
            the identity (labels are category ids).

    Returns:
        List[dict]: one dict per detection with ``image_id``, ``category_id``, ``bbox``
        (``[x, y, width, height]``), ``score`` and ``label``; plus every other tensor field whose
        first dimension is ``M``: ``rois`` is converted to ``[x, y, width, height]`` like
        ``bbox``, fields of shape ``[M]`` become numbers (e.g. ``iou``, ``roi_index``), others
        nested lists. Fields of any other shape are left out.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"need one image id per detections entry, got {len(image_ids)} ids for {len(detections)}")
    results: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids):
        n = len(det["scores"])
        columns: dict[str, list] = {
            "bbox": box_convert(det["boxes"], "xyxy", "xywh").tolist(),
            "score": det["scores"].tolist(),
            "label": det["labels"].tolist(),
        }
        for key, value in det.items():
            if key in _BOX_FIELDS or not isinstance(value, Tensor) or value.dim() == 0 or len(value) != n:
                continue
            columns[key] = (box_convert(value, "xyxy", "xywh") if key == "rois" else value).tolist()
        for row in zip(*columns.values()):
            entry = dict(zip(columns, row))
            label = entry["label"]
            entry["category_id"] = label if label_to_cat_id is None else label_to_cat_id[label]
            entry["image_id"] = int(image_id)
            results.append(entry)
    return results
