"""Inference as the paper runs it, image by image: detector, IoU prediction, the four NMS variants,
optimization-based refinement and iterative regression, each stage timed.

    out = run_pipeline(dataset, detector, iou_net, settings=PipelineSettings(), joint=joint_model)
    out.sets["iou-nms"]          # COCO results after IoU-guided NMS
    out.sets["nms+refine/3"]     # after NMS and 3 steps of Algorithm 2
    out.trajectories             # every refined box, step by step (IoU-NMS + refinement)

Detection sets are COCO results lists (``bbox`` ``[x, y, w, h]`` in original pixels, ``score``,
``category_id``, ``image_id``; raw detections also carry ``iou_pred``), the input of
``workbench.analysis``. Under ``torchrun`` each rank takes every ``world_size``-th image and rank 0
gathers the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_convert
from tqdm import tqdm

from . import distributed
from .data.validate import validate_results
from .models import FeatureBatch, extract_features, raw_detections, regress_boxes, same_features, to_coco_results
from .ops.boxes import matched_iou, pairwise_iou
from .postprocess import METHODS, suppress
from .refine import Refinement, iterative_regression, optimize_boxes
from .trajectories import Trajectories


@dataclass
class PipelineSettings:
    score_thresh: float = 0.05  # raw detections: class score above this (torchvision's default)
    raw_max_detections: int = 1000  # cap on raw (No-NMS) detections per image, highest scores first
    nms_threshold: float = 0.5  # Ω_nms of NMS and IoU-guided NMS
    soft_nms_method: str = "linear"  # Soft-NMS decay: "linear" or "gaussian" (Bodla et al.)
    soft_nms_sigma: float = 0.5  # Gaussian Soft-NMS σ
    soft_nms_threshold: float = 0.3  # linear Soft-NMS overlap threshold
    max_detections: int = 100  # detections per image after suppression (COCO's maxDets)
    refine_top: int = 100  # refine the highest-scored boxes after suppression (paper: 100)
    refine_iterations: int = 5  # T (paper: 5)
    # Algorithm 2's scale(grad, b): "log" (λ·w²·grad, a step of λ in log-scaled coordinates) or "width"
    # (λ·w·grad); see refine.py. Chosen on the held-out shapes `tune` split, never on the reported
    # images (`python -m workbench tune-step`, experiments/step_sweep_shapes.md; rule in
    # analysis/step_sweep.py: best AP90 after T steps, ties within 0.2 by AP): log λ = 0.035 (AP90 24.3,
    # AP 47.9, both rising at every step) over log λ = 0.05 (23.6, 48.9) and the best width λ = 1
    # (23.0, 48.2); the paper's width λ = 0.5 gave 19.4 and NMS alone 6.4.
    refine_step_size: float = 0.035  # λ (paper: 0.5, in its "width" reading on COCO)
    refine_step_scaling: str = "log"
    refine_early_stop: float = 0.001  # Ω1 (paper: 0.001)
    refine_degeneration: float = -0.01  # Ω2 (paper: -0.01)
    regression_iterations: int = 5  # iterative box regression steps (Fig. 4's baseline)
    max_images: int = 0  # evaluate the first N images only (0: all)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineOutput:
    """Everything the analyses need, gathered on rank 0.

    Attributes:
        sets: name -> COCO results. Names: ``raw`` (no NMS, with ``iou_pred``), ``nms``,
            ``soft-nms``, ``iou-nms``, ``nms+refine/<t>`` and ``iou-nms+refine/<t>`` (Algorithm 2
            after t steps), ``nms+regress/<t>`` (t steps of iterative regression), and with a joint
            model ``joint/nms``, ``joint/iou-nms``, ``joint/iou-nms+refine``.
        seconds: stage -> list of seconds per image.
        trajectories: the refinement record of ``iou-nms+refine``.
        image_ids: the images evaluated.
    """

    sets: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    trajectories: Trajectories | None = None
    image_ids: list[int] = field(default_factory=list)


# Stage name of the refinement after NMS: it refines only NMS's boxes that IoU-guided NMS did not keep.
NMS_REFINE_STAGE = "refinement (nms, boxes iou-nms did not keep)"


class _Clock:
    """Per-stage wall time of one image; synchronizes CUDA so times are the GPU's too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start


@dataclass(frozen=True)
class IoUScorer:
    """``boxes -> predicted IoU`` on fixed features: the objective Algorithm 2 climbs.

    Attributes:
        model: an IoU-Net (``predict_iou``); feats: its features of one image.
        labels: Int64Tensor[K], the class of each box the scorer is called with (Tensor[K, 4], (x0, y0, x1, y1) px).
    """

    model: nn.Module
    feats: FeatureBatch
    labels: Tensor

    def __call__(self, boxes: Tensor) -> Tensor:
        return self.model.predict_iou(self.feats, [boxes], [self.labels])[0]

    def select(self, index: Tensor) -> IoUScorer:
        """The scorer of the boxes at positions ``index`` (Int64Tensor[M]): Algorithm 2 scores only running boxes."""
        return IoUScorer(self.model, self.feats, self.labels[index])


def refine_boxes(model: nn.Module, feats, boxes: Tensor, labels: Tensor, s: PipelineSettings) -> Refinement:
    """Algorithm 2 (:func:`workbench.refine.optimize_boxes`) on ``boxes`` (Tensor[K, 4], (x0, y0, x1, y1)
    px) of one image with ``s``' T, λ, Ω1, Ω2 and step reading, climbing ``model``'s predicted IoU on ``feats``;
    steps are clipped to the image."""
    # PrRoIPool reads each map channels-last (one C-vector per sample): converted once here, not at
    # each of the T + 1 scorings.
    feats = dataclasses.replace(feats, features=type(feats.features)(
        (name, level.contiguous(memory_format=torch.channels_last)) for name, level in feats.features.items()))
    return optimize_boxes(IoUScorer(model, feats, labels), boxes, s.refine_iterations, s.refine_step_size,
                          s.refine_early_stop, s.refine_degeneration, image_size=feats.original_sizes[0],
                          step_scaling=s.refine_step_scaling)


def _refine_steps(model: nn.Module, feats, det: dict[str, Tensor], s: PipelineSettings):
    """Algorithm 2 on the ``refine_top`` highest-scored boxes of ``det``; returns them and their Refinement."""
    top = {k: v[: s.refine_top] for k, v in det.items()}
    return top, refine_boxes(model, feats, top["boxes"], top["labels"], s)


def _refine_reusing(model: nn.Module, feats, det: dict[str, Tensor], done: tuple[dict[str, Tensor], Refinement],
                    s: PipelineSettings) -> tuple[dict[str, Tensor], Refinement]:
    """:func:`_refine_steps` on ``det``, refining only the boxes (coordinates and label) that ``done``,
    an earlier refinement on the same features, did not: a box's refinement depends on that box alone
    (its own pooling, scores and stops), so the others' records are copied from ``done``."""
    done_top, done_result = done
    top = {k: v[: s.refine_top] for k, v in det.items()}

    def key(d: dict[str, Tensor]) -> Tensor:
        return torch.cat([d["boxes"], d["labels"][:, None].to(d["boxes"].dtype)], 1)

    same = (key(top)[:, None, :] == key(done_top)[None, :, :]).all(-1)  # (K, K_done)
    found = same.any(1)
    new = torch.where(~found)[0]
    _, fresh = _refine_steps(model, feats, {k: v[new] for k, v in top.items()}, s)
    earlier = same.to(torch.uint8).argmax(1) if same.numel() else found.new_zeros(found.shape, dtype=torch.long)
    index = torch.where(found, earlier, len(done_top["boxes"]) + (~found).cumsum(0) - 1)
    return top, Refinement.cat([done_result, fresh]).select(index)


def _with_boxes(det: dict[str, Tensor], boxes: Tensor) -> dict[str, Tensor]:
    return {**det, "boxes": boxes}


def _trajectory_record(top: dict[str, Tensor], result, target: dict[str, Tensor], image_id: int,
                       label_to_cat_id: dict[int, int]) -> dict[str, np.ndarray]:
    """Per-box arrays of one image for :class:`Trajectories`, with the truth: the ground truth of the
    same class that overlaps the starting box most, and the IoU with it at every step."""
    k = len(top["boxes"])
    steps = result.trajectory.transpose(0, 1)  # (K, T + 1, 4)
    gt_box = torch.full((k, 4), float("nan"), dtype=torch.float64)
    true_iou = torch.zeros(steps.shape[:2], dtype=torch.float64)
    gt, gt_labels = target["boxes"].double(), target["labels"]
    if k and len(gt):
        iou0 = pairwise_iou(steps[:, 0].double(), gt)
        iou0[top["labels"][:, None] != gt_labels[None, :]] = -1
        best, index = iou0.max(1)
        has = best > 0
        gt_box[has] = gt[index[has]]
        true_iou[has] = matched_iou(steps[has].double(), gt_box[has][:, None, :])
    return {
        "image_id": np.full(k, image_id, dtype=np.int64),
        "category_id": np.array([label_to_cat_id[int(label)] for label in top["labels"]], dtype=np.int64),
        "score": top["scores"].double().numpy(),
        "gt_box": gt_box.numpy(),
        "boxes": steps.double().numpy(),
        "predicted_iou": result.predicted.transpose(0, 1).double().numpy(),
        "true_iou": true_iou.numpy(),
        "gradient": result.gradients.transpose(0, 1).double().numpy(),
        "stop_step": result.stop_step.numpy(),
        "stop_reason": result.stop_reason.numpy(),
    }


def detect_image(
    image: Tensor, detector: nn.Module | None, iou_net: nn.Module, s: PipelineSettings, share_features: bool = False,
    external: dict[str, Tensor] | None = None, clock: _Clock | None = None, predict_ious: bool = True,
) -> tuple[dict[str, Tensor], FeatureBatch | None, FeatureBatch]:
    """The pipeline's first stage on one image: raw detections with the IoU-Net's predicted IoU.

    Args:
        image (Tensor[3, H, W]): in ``[0, 1]``, on the models' device.
        detector: the baseline Faster R-CNN (eval mode); not used with ``external``.
        iou_net: the IoU-Net (eval mode).
        s: ``score_thresh`` and ``raw_max_detections`` are read.
        share_features: the IoU-Net's backbone computes the detector's maps (:func:`same_features`), so
            those are reused instead of computed again.
        external: another detector's raw detections of this image (``boxes``, ``scores``, ``labels``,
            highest score first), used instead of ``detector``'s.
        clock: times the stages "detector (backbone + heads)" and "IoU-Net (predict IoU)".
        predict_ious: add ``ious``; without it only the IoU-Net's features are computed.

    Returns:
        ``(raw, feats, iou_feats)``: ``raw`` holds ``boxes`` (Tensor[M, 4], (x0, y0, x1, y1) original
        pixels), ``scores``, ``labels`` and ``ious`` (predicted IoU, with ``predict_ious``), highest score first, at most
        ``raw_max_detections``; ``feats`` the detector's features (``None`` with ``external``);
        ``iou_feats`` the IoU-Net's.
    """
    def stage(name: str):
        return clock.stage(name) if clock is not None else contextlib.nullcontext()

    with torch.no_grad():
        if external is None:
            with stage("detector (backbone + heads)"):
                feats = extract_features(detector, [image])
                raw = raw_detections(detector, feats, s.score_thresh)[0]
        else:
            feats, raw = None, {k: v.to(image.device) for k, v in external.items()}
        raw = {k: v[: s.raw_max_detections] for k, v in raw.items()}
        with stage("IoU-Net (predict IoU)"):
            iou_feats = feats if share_features and feats is not None else iou_net.extract_features([image])
            if predict_ious:
                raw["ious"] = iou_net.predict_iou(iou_feats, [raw["boxes"]], [raw["labels"]])[0]
    return raw, feats, iou_feats


def _image_sets(
    image: Tensor, detector: nn.Module, iou_net: nn.Module, joint: nn.Module | None,
    s: PipelineSettings, clock: _Clock, nms_kwargs: dict, external: dict[str, Tensor] | None, share_features: bool,
) -> tuple[dict[str, dict[str, Tensor]], tuple]:
    """All detection sets of one image (tensors on the CPU) and the refinement to record; ``share_features``
    and ``external`` as in :func:`detect_image`."""
    sets: dict[str, dict[str, Tensor]] = {}
    raw, feats, iou_feats = detect_image(image, detector, iou_net, s, share_features, external, clock)
    sets["raw"] = raw
    for method in METHODS[1:]:
        with clock.stage(method):
            sets[method] = suppress(raw, method, max_detections=s.max_detections, **nms_kwargs)

    refined = {}
    with clock.stage("refinement (iou-nms)"):
        refined["iou-nms"] = _refine_steps(iou_net, iou_feats, sets["iou-nms"], s)
    # IoU-guided NMS keeps its boxes' coordinates, so most of NMS's top boxes were just refined.
    with clock.stage(NMS_REFINE_STAGE):
        refined["nms"] = _refine_reusing(iou_net, iou_feats, sets["nms"], refined["iou-nms"], s)
    for start in ("nms", "iou-nms"):
        top, result = refined[start]
        for t in range(result.trajectory.shape[0]):
            sets[f"{start}+refine/{t}"] = _with_boxes(top, result.trajectory[t])

    if feats is not None and s.regression_iterations:
        top = {k: v[: s.refine_top] for k, v in sets["nms"].items()}
        labels = top["labels"]
        with clock.stage("iterative regression"):
            steps = iterative_regression(lambda b: regress_boxes(detector, feats, [b], [labels])[0], top["boxes"],
                                         s.regression_iterations)
        for t, boxes in enumerate(steps):
            sets[f"nms+regress/{t}"] = _with_boxes(top, boxes)

    if joint is not None:
        with torch.no_grad(), clock.stage("joint IoU-Net (backbone + heads + IoU)"):
            jfeats = extract_features(joint.detector, [image])
            jraw = raw_detections(joint.detector, jfeats, s.score_thresh)[0]
            jraw = {k: v[: s.raw_max_detections] for k, v in jraw.items()}
            jraw["ious"] = joint.predict_iou(jfeats, [jraw["boxes"]], [jraw["labels"]])[0]
        sets["joint/nms"] = suppress(jraw, "nms", max_detections=s.max_detections, **nms_kwargs)
        sets["joint/iou-nms"] = suppress(jraw, "iou-nms", max_detections=s.max_detections, **nms_kwargs)
        top, result = _refine_steps(joint, jfeats, sets["joint/iou-nms"], s)
        sets["joint/iou-nms+refine"] = _with_boxes(top, result.boxes)
    cpu = {name: {k: v.detach().cpu() for k, v in det.items()} for name, det in sets.items()}
    top, result = refined["iou-nms"]
    top = {k: v.detach().cpu() for k, v in top.items()}
    return cpu, (top, dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu()
                                                     for f in dataclasses.fields(result)}))


def run_pipeline(
    dataset,
    detector: nn.Module | None,
    iou_net: nn.Module,
    settings: PipelineSettings | None = None,
    joint: nn.Module | None = None,
    external_detections: Sequence[dict] | None = None,
    device: torch.device | str = "cpu",
) -> PipelineOutput | None:
    """Run the whole post-detection pipeline over ``dataset``.

    Args:
        dataset: a :class:`~workbench.data.CocoDetection` (``image_ids``, ``label_to_cat_id``).
        detector: the baseline Faster R-CNN (eval mode), or ``None`` with ``external_detections``.
        iou_net: a :class:`~workbench.models.StandaloneIoUNet` (eval mode).
        settings: the hyper-parameters (defaults: the paper's).
        joint: an optional :class:`~workbench.models.JointIoUNet` for Table 3.
        external_detections: another detector's raw detections in COCO results format (``bbox``,
            ``score``, ``category_id``, ``image_id``) used instead of ``detector``; iterative
            regression is then skipped (it needs the detector's regressor).
        device: where the models run.

    Returns:
        PipelineOutput on rank 0, ``None`` on the other ranks.
    """
    s = settings or PipelineSettings()
    ctx = distributed.setup("cpu" if torch.device(device).type == "cpu" else "auto")
    device = torch.device(device)
    nms_kwargs = dict(iou_threshold=s.nms_threshold, soft_method=s.soft_nms_method, soft_sigma=s.soft_nms_sigma,
                      soft_iou_threshold=s.soft_nms_threshold)
    external = _external_by_image(external_detections, dataset) if external_detections is not None else None
    if detector is None and external is None:
        raise ValueError("run_pipeline needs a detector or external_detections")

    share_features = detector is not None and external is None and same_features(detector, iou_net)
    indices = list(range(len(dataset)))[: s.max_images or None][ctx.rank:: ctx.world_size]
    per_set: dict[str, list[dict]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    records: list[dict[str, np.ndarray]] = []
    for i in tqdm(indices, desc="pipeline", disable=not ctx.is_main):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        clock = _Clock(device)
        # Algorithm 2's gradients are taken w.r.t. the boxes alone (autograd.grad(inputs=boxes)), so
        # the models' weight gradients are never computed.
        sets, (top, result) = _image_sets(
            image.to(device), detector, iou_net, joint, s, clock, nms_kwargs,
            None if external is None else external.get(image_id, _no_detections()), share_features,
        )
        for name, det in sets.items():
            fields = {k: det[k] for k in ("boxes", "scores", "labels")}
            if name == "raw":
                fields["iou_pred"] = det["ious"]
            per_set[name].extend(to_coco_results([fields], [image_id], dataset.label_to_cat_id))
        for stage, value in clock.seconds.items():
            seconds[stage].append(value)
        records.append(_trajectory_record(top, result, target, image_id, dataset.label_to_cat_id))

    gathered = distributed.all_gather_objects(ctx, (dict(per_set), dict(seconds), records))
    if not ctx.is_main:
        return None
    out = PipelineOutput(image_ids=list(dataset.image_ids)[: s.max_images or None])
    for sets_r, seconds_r, _ in gathered:
        for name, results in sets_r.items():
            out.sets.setdefault(name, []).extend(results)
        for stage, values in seconds_r.items():
            out.seconds.setdefault(stage, []).extend(values)
    all_records = [r for _, _, records_r in gathered for r in records_r]
    if all_records:
        out.trajectories = Trajectories(
            **{key: np.concatenate([r[key] for r in all_records]) for key in all_records[0]},
            meta={"ann_file": str(dataset.ann_file), "img_dir": str(dataset.img_dir), "settings": s.as_dict()},
        )
    return out


def _no_detections() -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


def _external_by_image(results: Sequence[dict], dataset) -> dict[int, dict[str, Tensor]]:
    """Another detector's COCO results grouped per image, as raw detections (highest score first)."""
    validate_results(results, "external_detections", set(dataset.image_ids), set(dataset.cat_id_to_label))
    grouped: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        grouped[r["image_id"]].append(r)
    out = {}
    for image_id, rows in grouped.items():
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float32)
        scores = torch.tensor([r["score"] for r in rows], dtype=torch.float32)
        order = scores.argsort(descending=True, stable=True)
        out[image_id] = {
            "boxes": box_convert(xywh, "xywh", "xyxy")[order],
            "scores": scores[order],
            "labels": torch.tensor([dataset.cat_id_to_label[r["category_id"]] for r in rows])[order],
        }
    return out
