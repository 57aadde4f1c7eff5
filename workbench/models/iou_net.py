"""IoU-Net: predict each box's IoU with the object it covers (paper Sec. 3.1, 3.4).

Three pieces:

* :class:`IoUHead`: PrRoI-pool a box from its FPN level, two fully connected layers (1024, ReLU)
  and a class-aware linear output, one IoU per class (Sec. 3.1, Fig. 5). Differentiable w.r.t.
  the box coordinates, which is what optimization-based refinement (Sec. 3.3) climbs.
* :class:`StandaloneIoUNet`: backbone + FPN + IoU head, trained apart from any detector on
  jittered ground truth (Sec. 3.1; the variant used in Sec. 4.1, 4.2).
* :class:`JointIoUNet`: a Faster R-CNN FPN detector with the IoU head beside its R-CNN branch,
  trained end to end (Sec. 3.4).

IoU targets. Training boxes have IoU in ``[min_iou, 1]`` (``min_iou = 0.5``, uniform), and the
paper normalizes labels "s.t. the values are distributed over [-1, 1]". The head therefore
regresses ``t = 2 (IoU - min_iou) / (1 - min_iou) - 1`` (``t = 4 IoU - 3`` for 0.5), which maps
the training range onto ``[-1, 1]`` exactly, with smooth-L1 loss; :func:`target_to_iou` inverts
it. Predictions are not clamped, so they can leave ``[min_iou, 1]`` slightly (and extrapolate
below ``min_iou`` for poor boxes) but keep a non-zero gradient everywhere.

Training schedule of the paper (Sec. 3.4, ResNet-50-FPN on COCO), for a trainer to follow:
SGD, momentum 0.9, weight decay 1e-4, 16 images per batch, learning rate 0.01 with a warm-up
at 0.004 for the first 10k iterations, divided by 10 after 120k iterations, 160k iterations in
all; images resized to 800 px short side, at most 1200 px long side; the R-CNN branch samples 512
RoIs per image; new layers initialized from a zero-mean Gaussian with std 0.01 or 0.001.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..ops._checks import check_boxes
from .backbones import FPN_CHANNELS, build_backbone
from .detector import PAPER_MAX_SIZE, PAPER_MIN_SIZE, build_detector, raw_detections
from .features import FeatureBatch, extract_features
from .jitter import JitterConfig, jitter_targets
from .pooling import MultiScalePrRoIPool

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what torchvision's detectors normalize with
IMAGENET_STD = [0.229, 0.224, 0.225]


def iou_to_target(iou: Tensor, min_iou: float = 0.5) -> Tensor:
    """The regression target: ``[min_iou, 1]`` mapped affinely onto ``[-1, 1]``."""
    return 2.0 * (iou - min_iou) / (1.0 - min_iou) - 1.0


def target_to_iou(target: Tensor, min_iou: float = 0.5) -> Tensor:
    """Inverse of :func:`iou_to_target`: ``[-1, 1]`` back onto ``[min_iou, 1]``, not clamped."""
    return min_iou + (target + 1.0) * (1.0 - min_iou) / 2.0


def _detector_num_classes(detector: FasterRCNN, num_classes: int | None) -> int:
    """The detector's number of object classes (its classifier has one more, for background)."""
    own = detector.roi_heads.box_predictor.cls_score.out_features - 1
    if num_classes is not None and num_classes != own:
        raise ValueError(f"num_classes={num_classes} does not match the detector's {own} object classes")
    return own


class IoUHead(nn.Module):
    """Class-aware IoU predictor on FPN features (paper Sec. 3.1, Fig. 5).

    Boxes are PrRoI-pooled from the FPN level torchvision's FPN assigns them to (see
    :class:`~workbench.models.pooling.MultiScalePrRoIPool`), flattened, passed through two
    fully connected layers with ReLU (torchvision's ``TwoMLPHead``, the R-CNN branch's shape) and a
    linear layer with one output per object class; each box reads the output of its own class.

    Args:
        num_classes (int): object classes, excluding background (labels ``1..num_classes``).
        in_channels (int): channels of the FPN maps. Default 256.
        pooler (MultiScalePrRoIPool, optional): default: levels ``"0".."3"``, 7x7 bins.
        representation_size (int): width of the two hidden layers. Default 1024.
        min_iou (float): lower end of the training IoUs, for the target mapping. Default 0.5.
        smooth_l1_beta (float): transition point of the smooth-L1 loss, in target units. Default 1.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = FPN_CHANNELS,
        pooler: MultiScalePrRoIPool | None = None,
        representation_size: int = 1024,
        min_iou: float = 0.5,
        smooth_l1_beta: float = 1.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes counts object classes and must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.pooler = pooler if pooler is not None else MultiScalePrRoIPool()
        ph, pw = self.pooler.output_size
        self.fc = TwoMLPHead(in_channels * ph * pw, representation_size)
        self.predictor = nn.Linear(representation_size, num_classes)
        self.min_iou = min_iou
        self.smooth_l1_beta = smooth_l1_beta
        # Paper Sec. 3.4: new layers from N(0, 0.01^2) or N(0, 0.001^2). We use 0.01 for all three:
        # initial outputs are still ~0.05 (IoU 0.75 +- 0.01), and with 0.001 on the output layer
        # the gradient reaching the hidden layers is 10x weaker, which slowed early training markedly.
        for layer in (self.fc.fc6, self.fc.fc7, self.predictor):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> Tensor:
        """Raw outputs, on the target scale of :func:`iou_to_target`.

        Args:
            features (Dict[str, Tensor[B, C, h, w]]): FPN maps of the batch.
            boxes (List[Tensor[M_i, 4]]): per image, ``(x0, y0, x1, y1)`` in input-frame pixels.
            labels (List[Int64Tensor[M_i]]): class of each box, ``1..num_classes``.
            image_sizes (List[Tuple[int, int]]): ``(height, width)`` of each image in the input frame.

        Returns:
            Tensor[K]: one value per box of the concatenated ``boxes``, whatever the boxes: inverted
            or zero-size boxes pool to zero features, boxes off the image fade to them.

        Raises:
            ValueError: naming ``boxes[i]`` or ``labels[i]``: not ``[M_i, 4]`` finite floats, or a
                label count that differs from the box count.
        """
        if len(boxes) != len(labels):
            raise ValueError(f"boxes and labels must be lists of the same length (one entry per image), "
                             f"got {len(boxes)} and {len(labels)}")
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            check_boxes(f"boxes[{i}]", b)
            if lab.shape != b.shape[:1]:
                raise ValueError(f"labels[{i}] must have shape [{len(b)}] (one label per box), got {tuple(lab.shape)}")
        labels_cat = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if labels_cat.numel() and not (1 <= int(labels_cat.min()) and int(labels_cat.max()) <= self.num_classes):
            raise ValueError(f"labels must lie in [1, {self.num_classes}], got values in "
                             f"[{int(labels_cat.min())}, {int(labels_cat.max())}]")
        pooled = self.pooler(features, boxes, image_sizes)  # (K, C, 7, 7)
        per_class = self.predictor(self.fc(pooled))  # (K, num_classes)
        return per_class.gather(1, (labels_cat.to(per_class.device) - 1)[:, None])[:, 0]

    def predict_iou(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> Tensor:
        """Predicted IoU of each box, on the IoU scale (see :meth:`forward` for the arguments).

        Returns:
            Tensor[K]: differentiable w.r.t. ``boxes`` (and the features); not clamped to ``[0, 1]``.
        """
        return target_to_iou(self(features, boxes, labels, image_sizes), self.min_iou)

    def loss(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        ious: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> Tensor:
        """Smooth-L1 loss between the outputs and the mapped true IoUs, averaged over boxes.

        Args:
            ious (List[Tensor[M_i]]): true IoU of each box with its ground truth; other
                arguments as in :meth:`forward`.

        Returns:
            Tensor[]: the loss; 0 (still attached to the parameters) when there are no boxes.
        """
        if sum(len(b) for b in boxes) == 0:
            return sum(p.sum() for p in self.parameters()) * 0.0
        output = self(features, boxes, labels, image_sizes)
        target = iou_to_target(torch.cat(ious).to(output), self.min_iou)
        return F.smooth_l1_loss(output, target, beta=self.smooth_l1_beta)


def predict_ious(iou_head: IoUHead, feats: FeatureBatch, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
    """Run ``iou_head`` on boxes given in original-image pixels.

    Args:
        iou_head (IoUHead): the head.
        feats (FeatureBatch): features of the images, from the backbone ``iou_head`` was trained on.
        boxes (List[Tensor[M_i, 4]]): per image, ``(x0, y0, x1, y1)`` in original-image pixels.
        labels (List[Int64Tensor[M_i]]): class of each box, ``1..num_classes``.

    Returns:
        List[Tensor[M_i]]: predicted IoUs, differentiable w.r.t. ``boxes`` (refinement's gradient).
    """
    counts = [len(b) for b in boxes]
    ious = iou_head.predict_iou(feats.features, feats.to_input(boxes), labels, feats.image_sizes)
    return list(ious.split(counts))


class StandaloneIoUNet(nn.Module):
    """IoU predictor trained on its own: backbone + FPN + :class:`IoUHead` (paper Sec. 3.1).

    Train mode: ``model(images, targets)`` jitters each image's ground truth
    (:func:`~workbench.models.jitter.jitter_targets`, uniform in IoU over ``[0.5, 1]``) and returns
    ``{"loss_iou": Tensor[]}``. Eval mode: ``model(images, targets)`` treats ``targets`` as the
    boxes to score and returns ``[{"iou": Tensor[M_i]}]``; :meth:`predict` says the same with
    explicit arguments, and :meth:`predict_iou` works on features computed once (refinement).

    Two ways to build it:

    * from scratch: ``StandaloneIoUNet(num_classes, backbone="mobilenet_v2", ...)``;
    * on a trained detector: ``StandaloneIoUNet(detector=detector)`` copies the detector's
      backbone (so training never changes the detector), freezes it by default, and takes the
      number of classes, resizing and normalization from the detector, so both see the same
      features.

    Args:
        num_classes (int, optional): object classes, excluding background. Required unless
            ``detector`` is given (then it must match the detector's, if given).
        backbone (str or nn.Module, optional): a name for
            :func:`~workbench.models.backbones.build_backbone` or a module with the same output
            (an ``OrderedDict`` of FPN maps, ``out_channels``). Default ``"mobilenet_v2"``. Not
            together with ``detector``.
        pretrained_backbone (bool): ImageNet init when ``backbone`` is a name.
        trainable_backbone_layers (int, optional): when ``backbone`` is a name.
        freeze_backbone (bool, optional): train the IoU head only: backbone parameters get no
            gradient and the backbone stays in eval mode (batch-norm statistics fixed) even in
            ``model.train()``. Default ``True`` with ``detector``, else ``False``. ``False`` with
            ``detector`` is the paper's standalone IoU-Net: its own backbone + FPN, initialised
            from the detector's and trained on the IoU loss.
        cache_features (bool, optional): with a frozen backbone, compute each training image's
            FPN maps once and keep them (float16, on their device; keyed by ``target["image_id"]``),
            so later passes cost only the head: many more iterations for the same time. Default
            ``True`` when the backbone is frozen; ignored when it is not.
        min_size, max_size (int, optional): resizing of ``GeneralizedRCNNTransform``. Default
            the detector's, else the paper's 800 and 1200.
        image_mean, image_std (List[float], optional): normalization. Default the detector's, else ImageNet's.
        jitter (JitterConfig): how training boxes are drawn.
        iou_head (IoUHead, optional): default ``IoUHead(num_classes, backbone.out_channels)``.
        detector (FasterRCNN, optional): a trained detector to build on (see above).

    Attributes:
        generator (torch.Generator or None): randomness of the training boxes; ``None`` uses the
            global generator (``torch.manual_seed``).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        backbone: str | nn.Module | None = None,
        pretrained_backbone: bool = True,
        trainable_backbone_layers: int | None = None,
        freeze_backbone: bool | None = None,
        min_size: int | tuple[int, ...] | None = None,
        max_size: int | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        jitter: JitterConfig = JitterConfig(),
        iou_head: IoUHead | None = None,
        detector: FasterRCNN | None = None,
        cache_features: bool | None = None,
    ) -> None:
        super().__init__()
        if detector is not None:
            if backbone is not None:
                raise ValueError("pass either a backbone or a detector to take it from, not both")
            num_classes = _detector_num_classes(detector, num_classes)
            backbone = copy.deepcopy(detector.backbone)
            t = detector.transform
            min_size = t.min_size if min_size is None else min_size
            max_size = t.max_size if max_size is None else max_size
            image_mean = list(t.image_mean) if image_mean is None else image_mean
            image_std = list(t.image_std) if image_std is None else image_std
            freeze_backbone = True if freeze_backbone is None else freeze_backbone
        elif num_classes is None:
            raise ValueError("StandaloneIoUNet needs num_classes (or a detector to take it from)")
        self.transform = GeneralizedRCNNTransform(
            PAPER_MIN_SIZE if min_size is None else min_size,
            PAPER_MAX_SIZE if max_size is None else max_size,
            IMAGENET_MEAN if image_mean is None else image_mean,
            IMAGENET_STD if image_std is None else image_std,
        )
        if backbone is None or isinstance(backbone, str):
            backbone = build_backbone(backbone or "mobilenet_v2", pretrained_backbone, trainable_backbone_layers)
        self.backbone = backbone
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.iou_head = iou_head if iou_head is not None else IoUHead(
            num_classes, backbone.out_channels, min_iou=jitter.min_iou
        )
        self.jitter = jitter
        self.generator: torch.Generator | None = None
        self.cache_features = self.freeze_backbone and (True if cache_features is None else bool(cache_features))
        # image_id -> (FPN maps of that image alone, its input size, its resized ground truth). Not
        # in the state dict: it is a pure function of the frozen weights and the image.
        self._feature_cache: dict[int, tuple[dict[str, Tensor], tuple[int, int], dict[str, Tensor]]] = {}

    def train(self, mode: bool = True) -> StandaloneIoUNet:
        super().train(mode)
        if self.freeze_backbone:  # frozen means frozen batch-norm statistics too
            self.backbone.eval()
        return self

    def extract_features(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> FeatureBatch:
        """:func:`~workbench.models.features.extract_features` with this model; no graph for a frozen backbone."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return extract_features(self, images, targets)

    def predict_iou(self, feats: FeatureBatch, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """See :func:`predict_ious`: boxes in original pixels, one IoU tensor per image."""
        return predict_ious(self.iou_head, feats, boxes, labels)

    def predict(self, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Predicted IoU of given boxes.

        Args:
            images (List[Tensor[3, H_i, W_i]]): images in ``[0, 1]``.
            boxes (List[Tensor[M_i, 4]]): per image, ``(x0, y0, x1, y1)`` in original-image pixels.
            labels (List[Int64Tensor[M_i]]): class of each box, ``1..num_classes``.

        Returns:
            List[Tensor[M_i]]: predicted IoUs (see :meth:`IoUHead.predict_iou`).
        """
        return self.predict_iou(self.extract_features(images), boxes, labels)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: ``{"loss_iou"}`` on jittered ground truth. Eval mode: ``[{"iou"}]`` for ``targets``' boxes.

        Args:
            images (List[Tensor[3, H_i, W_i]]): images in ``[0, 1]``.
            targets (List[Dict[str, Tensor]]): per image, ``boxes`` (``Tensor[N_i, 4]``,
                ``(x0, y0, x1, y1)``, original pixels) and ``labels`` (``Int64Tensor[N_i]``): the
                ground truth in train mode, the boxes to score in eval mode.
        """
        if targets is None:
            raise ValueError("StandaloneIoUNet needs targets: ground truth in train mode, boxes to score in eval mode")
        if not self.training:
            ious = self.predict(images, [t["boxes"] for t in targets], [t["labels"] for t in targets])
            return [{"iou": iou} for iou in ious]
        if self.cache_features and all("image_id" in t for t in targets):
            features, image_sizes, resized = self._cached_batch(images, targets)
        else:
            feats = self.extract_features(images, targets)
            features, image_sizes, resized = feats.features, feats.image_sizes, feats.targets
        boxes, labels, ious = jitter_targets(resized, self.jitter, self.generator)
        return {"loss_iou": self.iou_head.loss(features, boxes, labels, ious, image_sizes)}

    def _cached_batch(
        self, images: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[tuple[int, int]], list[dict[str, Tensor]]]:
        """The frozen backbone's FPN maps of a training batch from the cache, computing the missing
        ones one image at a time (so an image's maps never depend on the batch it came in);
        levels are zero-padded to the batch's largest map, as batching pads images."""
        for image, target in zip(images, targets):
            key = int(target["image_id"])
            if key not in self._feature_cache:
                with torch.no_grad():
                    feats = extract_features(self, [image], [target])
                maps = {k: feats.features[k].to(torch.float16) for k in self.iou_head.pooler.featmap_names}
                self._feature_cache[key] = maps, feats.image_sizes[0], feats.targets[0]
        entries = [self._feature_cache[int(t["image_id"])] for t in targets]
        features = {}
        for k in entries[0][0]:
            maps = [e[0][k] for e in entries]
            h, w = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
            features[k] = torch.cat([F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2])) for m in maps]).float()
        return features, [e[1] for e in entries], [e[2] for e in entries]


class JointIoUNet(nn.Module):
    """Faster R-CNN FPN with an IoU head in parallel with the R-CNN branch (paper Sec. 3.4, Fig. 5).

    Both heads read the same FPN features. Following Sec. 3.4, the IoU head is *not* trained on
    the RPN proposals the R-CNN branch samples: "the training data for the IoU predictor is
    separately generated as described in Section 3.1 within images in a training batch", i.e. on
    jittered ground truth of the batch's images, uniform in IoU over ``[0.5, 1]``. Its loss flows
    into the shared backbone, which is the point of joint training (Sec. 4.3).

    Train mode: ``model(images, targets)`` returns torchvision's detector losses
    (``loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg``) plus ``loss_iou``, to be
    summed. Eval mode: ``model(images)`` returns :func:`~workbench.models.detector.raw_detections`
    (no NMS) with an extra ``iou`` (``Tensor[M]``) per detection, ready for IoU-guided NMS. To
    refine boxes afterwards, compute the features once::

        feats = extract_features(model.detector, images)
        dets = raw_detections(model.detector, feats)
        ious = model.predict_iou(feats, boxes, labels)   # differentiable w.r.t. boxes

    Args:
        num_classes (int, optional): object classes, excluding background; builds a new detector
            with :func:`~workbench.models.detector.build_detector`. Required unless ``detector``.
        detector (FasterRCNN, optional): use this detector instead of building one.
        jitter (JitterConfig): how the IoU head's training boxes are drawn.
        score_thresh (float): class-score threshold of the raw detections in eval mode.
        iou_head (IoUHead, optional): default: one output per class of the detector.
        **detector_kwargs: when building: :func:`~workbench.models.detector.build_detector`'s
            arguments (``backbone``, ``pretrained_backbone``, ``min_size``, ``anchor_sizes``,
            ``prroi_in_rcnn`` for the paper's PrRoI Pooling in the R-CNN branch too, ...).

    Attributes:
        generator (torch.Generator or None): randomness of the IoU head's training boxes.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        detector: FasterRCNN | None = None,
        jitter: JitterConfig = JitterConfig(),
        score_thresh: float = 0.05,
        iou_head: IoUHead | None = None,
        **detector_kwargs: Any,
    ) -> None:
        super().__init__()
        if detector is None:
            if num_classes is None:
                raise ValueError("JointIoUNet needs num_classes (or a detector)")
            detector = build_detector(num_classes, **detector_kwargs)
        elif detector_kwargs:
            raise ValueError("detector options apply only when JointIoUNet builds its detector, not with detector=")
        num_classes = _detector_num_classes(detector, num_classes)
        self.detector = detector
        self.iou_head = iou_head if iou_head is not None else IoUHead(
            num_classes, detector.backbone.out_channels, min_iou=jitter.min_iou
        )
        self.jitter = jitter
        self.score_thresh = score_thresh
        self.generator: torch.Generator | None = None

    def predict_iou(self, feats: FeatureBatch, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """See :func:`predict_ious`: boxes in original pixels, one IoU tensor per image."""
        return predict_ious(self.iou_head, feats, boxes, labels)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """See the class docstring.

        Args:
            images (List[Tensor[3, H_i, W_i]]): images in ``[0, 1]``.
            targets (List[Dict[str, Tensor]], optional): ground truth for training: ``boxes``
                (``Tensor[N_i, 4]``, ``(x0, y0, x1, y1)``, pixels) and ``labels`` (``Int64Tensor[N_i]``).
        """
        det = self.detector
        if not self.training:
            feats = extract_features(det, images)
            detections = raw_detections(det, feats, self.score_thresh)
            ious = self.predict_iou(feats, [d["boxes"] for d in detections], [d["labels"] for d in detections])
            for d, iou in zip(detections, ious):
                d["iou"] = iou
            return detections
        if targets is None:
            raise ValueError("JointIoUNet needs targets in train mode")
        feats = extract_features(det, images, targets)
        # The two halves of GeneralizedRCNN.forward, on features we keep for the IoU head.
        proposals, rpn_losses = det.rpn(feats.images, feats.features, feats.targets)
        _, rcnn_losses = det.roi_heads(feats.features, proposals, feats.image_sizes, feats.targets)
        boxes, labels, ious = jitter_targets(feats.targets, self.jitter, self.generator)
        loss_iou = self.iou_head.loss(feats.features, boxes, labels, ious, feats.image_sizes)
        return {**rcnn_losses, **rpn_losses, "loss_iou": loss_iou}
