"""The trained models on any image: detector, predicted IoU, NMS or IoU-guided NMS, then Algorithm 2.

    boxes = detect("photo.png", dataset="shapes")   # DataFrame: one row per box after IoU-guided NMS
    models = trained_models("shapes")               # load once, pass as ``models=`` to later calls
    rerun = box_rerun(record, models)               # Algorithm 2 again for one box of a record, other settings

The models are those ``python -m workbench reproduce --config <dataset> --no-joint`` trained (``make run``),
found by the same run folders (:func:`workbench.reproduce.stages`); a model not trained yet is trained
first, after a line that says so. In fast mode, the tiny ``shapes`` run of :mod:`workbench.results`.
Boxes are ``(x0, y0, x1, y1)`` in the image's pixels throughout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from . import reproduce
from .analysis._plotting import color, new_figure
from .analysis.refinement import ALGORITHM2_KNOBS, record_knobs, refinement_to_record, stand_in_rerun
from .data.images import CocoImages, decode_image
from .models import FeatureBatch, same_features
from .paths import project_root
from .pipeline import IoUScorer, PipelineSettings, detect_image
from .postprocess import suppress
from .refine import Refinement, optimize_boxes
from .results import reproduce_options
from .trajectories import Trajectories

METHODS = ("nms", "iou-nms")  # what :func:`detect` ranks duplicates by: classification score or predicted IoU


@dataclass
class TrainedModels:
    """The detector and the standalone IoU-Net of one ``reproduce`` run, in eval mode, with what names their outputs."""

    detector: nn.Module
    iou_net: nn.Module
    settings: PipelineSettings  # the pipeline's inference hyper-parameters for this run
    label_to_cat_id: dict[int, int]  # model label (1..C) -> COCO category id
    category_names: dict[int, str]  # COCO category id -> name
    checkpoints: dict[str, Path]  # "detector", "iou" -> ckpt.pt
    val_images: CocoImages  # the run's validation images (for :func:`example_image` and the stepper)


def trained_models(dataset: str = "shapes", *, fast: bool = False, root: str | Path | None = None,
                   device: torch.device | str = "cpu") -> TrainedModels:
    """Load (training first, and saying so, where missing) the detector and IoU-Net of ``dataset``'s run.

    Args:
        dataset: a preset of :mod:`workbench.config` (``shapes``, ``neon-trees``, ``coco``).
        fast: the tiny ``shapes`` run of fast mode instead (``dataset`` is not used).
        root: the project folder runs are read from (default :func:`workbench.paths.project_root`).
        device: where the models run.
    """
    root = (Path(root) if root is not None else project_root()).resolve()
    opts = reproduce_options(dataset, fast, root)
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(root), contextlib.redirect_stderr(sys.stdout):
        plan = reproduce.stages(opts)
        configs = {kind: plan.train[kind] for kind in ("detector", "iou")}
        missing = [kind for kind, cfg in configs.items() if not reproduce.is_trained(cfg)]
        if missing:
            print(f"{' and '.join(missing)} of {'the fast run' if fast else repr(dataset)} not trained under {root}: "
                  f"training now (`python -m workbench reproduce --config {dataset} --no-joint` would too)")
        checkpoints = {kind: reproduce.trained(cfg).resolve() for kind, cfg in configs.items()}
        val = reproduce.validation_set(opts)
        device = torch.device(device)
        return TrainedModels(
            detector=reproduce.load_model(checkpoints["detector"], device),
            iou_net=reproduce.load_model(checkpoints["iou"], device),
            settings=opts.settings, label_to_cat_id=dict(val.label_to_cat_id),
            category_names={int(c["id"]): c["name"] for c in val.coco.cats.values()}, checkpoints=checkpoints,
            val_images=CocoImages(Path(val.ann_file).resolve(), Path(val.img_dir).resolve()),
        )


def example_image(models: TrainedModels) -> Path:
    """The file of the first validation image of ``models``' run: an image to try :func:`detect` on."""
    images = models.val_images
    return images.img_dir / images.image_info[min(images.image_info)]["file_name"]


def image_tensor(image: str | Path | np.ndarray) -> torch.Tensor:
    """``image`` (a file path, or ``ndarray[H, W, 3]`` uint8 RGB) as the models' input: ``Tensor[3, H, W]``
    float32 in ``[0, 1]``, exactly as the datasets decode their files (:func:`workbench.data.images.decode_image`).

    Raises:
        FileNotFoundError: ``image`` names no file. ValueError: naming ``image``: the file cannot be
        decoded, or the array is not ``(H, W, 3)`` uint8 with H, W >= 1.
    """
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image: no file at {path}")
        pixels = decode_image(path)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"image: expected an RGB array of shape (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image: expected dtype uint8 (0-255), got {image.dtype}")
        pixels = image.astype(np.float32) / 255.0
    else:
        raise TypeError(f"image: expected a file path or an (H, W, 3) uint8 ndarray, got {type(image).__name__}")
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def refine(iou_net: nn.Module, feats: FeatureBatch, boxes: torch.Tensor, labels: torch.Tensor, **knobs) -> Refinement:
    """Algorithm 2 (:func:`workbench.refine.optimize_boxes`) on ``boxes`` (Tensor[K, 4]) of one image whose
    IoU-Net features are ``feats``, climbing ``iou_net``'s predicted IoU; ``knobs``: its
    :data:`~workbench.analysis.refinement.ALGORITHM2_KNOBS`. Steps are clipped to the image."""
    unknown = set(knobs) - set(ALGORITHM2_KNOBS)
    if unknown:
        raise ValueError(f"unknown refinement settings {sorted(unknown)}; expected some of {ALGORITHM2_KNOBS}")
    return optimize_boxes(IoUScorer(iou_net, feats, labels), boxes, image_size=feats.original_sizes[0], **knobs)


def detect(image: str | Path | np.ndarray, dataset: str = "shapes", *, method: str = "iou-nms", fast: bool = False,
           root: str | Path | None = None, models: TrainedModels | None = None) -> pd.DataFrame:
    """Run the trained models on one image as the pipeline does: detector, predicted IoU of every raw
    detection, ``method`` (NMS or IoU-guided NMS, per class, the pipeline's threshold and cap), then
    Algorithm 2 with the pipeline's settings on the ``refine_top`` highest-scored boxes.

    Args:
        image: a file path, or an ``ndarray[H, W, 3]`` uint8 RGB image.
        dataset: whose trained models (see :func:`trained_models`); they only know its classes.
        method: ``"iou-nms"`` (the paper's) or ``"nms"``.
        fast, root: see :func:`trained_models`; ``models``: already loaded ones (then these are not used).

    Returns:
        One row per kept box, highest score first: ``x0, y0, x1, y1`` (pixels), ``class``, ``category_id``,
        ``score`` (after suppression), ``predicted IoU``, ``refined x0 .. refined y1`` and
        ``refined predicted IoU`` (NaN beyond ``refine_top``), ``steps`` taken by Algorithm 2.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = image_tensor(image)
    models = models if models is not None else trained_models(dataset, fast=fast, root=root)
    s, device = models.settings, next(models.iou_net.parameters()).device
    x = x.to(device)
    raw, _, feats = detect_image(x, models.detector, models.iou_net, s, same_features(models.detector, models.iou_net))
    kept = suppress(raw, method, iou_threshold=s.nms_threshold, max_detections=s.max_detections)
    top = min(s.refine_top, len(kept["boxes"]))
    result = refine(models.iou_net, feats, kept["boxes"][:top], kept["labels"][:top], **record_knobs({"settings": s.as_dict()}))

    k = len(kept["boxes"])
    refined = np.full((k, 4), np.nan)
    refined[:top] = result.boxes.detach().cpu().double().numpy()
    refined_iou, steps = np.full(k, np.nan), np.zeros(k, dtype=np.int64)
    refined_iou[:top], steps[:top] = result.scores.cpu().double().numpy(), result.stop_step.cpu().numpy()
    cat_ids = [models.label_to_cat_id[int(label)] for label in kept["labels"]]
    frame = pd.DataFrame(kept["boxes"].cpu().double().numpy(), columns=["x0", "y0", "x1", "y1"])
    frame["class"] = [models.category_names.get(c, str(c)) for c in cat_ids]
    frame["category_id"] = cat_ids
    frame["score"] = kept["scores"].cpu().double().numpy()
    frame["predicted IoU"] = kept["ious"].cpu().double().numpy()
    for j, name in enumerate(("x0", "y0", "x1", "y1")):
        frame[f"refined {name}"] = refined[:, j]
    frame["refined predicted IoU"], frame["steps"] = refined_iou, steps
    return frame


def box_rerun(record: Trajectories, models: TrainedModels | None = None) -> Callable[[int, dict], Trajectories]:
    """``rerun(b, knobs)``: Algorithm 2 again for box ``b`` of ``record``, from its recorded start, with other
    settings (``knobs``: :data:`~workbench.analysis.refinement.ALGORITHM2_KNOBS`), as a one-box record with
    the true IoU against the record's ground truth: what the refinement stepper's controls call.

    The stand-in record of :func:`~workbench.analysis.refinement.demo_trajectories` re-runs with its own
    stand-in predictor; a pipeline record with ``models``' IoU-Net on the features of the box's image (its
    file from the record's sidecar), which must be the run that made the record.
    """
    if "stand_in_belief" in record.meta:
        return stand_in_rerun(record)
    if models is None:
        raise ValueError("models: a pipeline record re-runs with the IoU-Net that made it; pass trained_models(...)")
    images = CocoImages.from_meta(record.meta) or models.val_images
    cat_to_label = {c: label for label, c in models.label_to_cat_id.items()}

    @lru_cache(maxsize=4)
    def features(image_id: int) -> FeatureBatch:
        with torch.no_grad():
            return models.iou_net.extract_features([image_tensor(images(image_id))])

    def rerun(b: int, knobs: dict) -> Trajectories:
        image_id = int(record.image_id[b])
        start = torch.as_tensor(record.boxes[b, :1], dtype=torch.float32)
        label = torch.tensor([cat_to_label[int(record.category_id[b])]])
        result = refine(models.iou_net, features(image_id), start, label, **knobs)
        return refinement_to_record(result, record, b, knobs)

    return rerun


def plot_detections(image: str | Path | np.ndarray, boxes: pd.DataFrame, *, top: int = 10) -> Figure:
    """The ``top`` highest-scored rows of :func:`detect` on ``image``: each box as kept (dashed) and after
    refinement (solid), numbered by its row, with its class, score and predicted IoU before -> after."""
    pixels = image_tensor(image).permute(1, 2, 0).numpy()
    fig, axes = new_figure(1, panel_size=(7.0, 7.0 * pixels.shape[0] / pixels.shape[1] + 0.6))
    ax = axes[0, 0]
    ax.imshow(pixels)
    for i, row in boxes.head(top).iterrows():
        for prefix, style in (("", dict(linestyle="--", linewidth=1.2, edgecolor=color(1))),
                              ("refined ", dict(linestyle="-", linewidth=2.0, edgecolor=color(3)))):
            x0, y0, x1, y1 = (row[f"{prefix}{c}"] for c in ("x0", "y0", "x1", "y1"))
            if np.isfinite([x0, y0, x1, y1]).all():
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **style))
        ax.text(row["x0"], row["y0"], f"{i}: {row['class']} {row['score']:.2f}, IoU {row['predicted IoU']:.2f}"
                f"→{row['refined predicted IoU']:.2f}", color="black", fontsize=7, va="bottom",
                bbox=dict(facecolor="white", alpha=0.7, pad=1, linewidth=0))
    ax.set_title(f"top {min(top, len(boxes))} of {len(boxes)} boxes: kept (dashed), refined (solid)")
    ax.set_axis_off()
    return fig
