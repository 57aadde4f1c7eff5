"""Paper Sec. 3.1 and Fig. 2b in detail: what the IoU predictor is trained on (jittered ground truth,
uniform in IoU) and how well it predicts the IoU of held-out detections, per range of true IoU.

    jittered = jittered_training_boxes(coco_gt, image_ids)     # the draw of workbench.models.jitter_boxes
    matched = predicted_vs_true_iou(output.sets["raw"], coco_gt)
    iou_prediction_error(matched)                             # bias and mean |error| per true-IoU bin
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from torchvision.ops import box_convert

from workbench.models.jitter import JitterConfig, jitter_boxes

from ._plotting import color, draw_box, new_figure, style_axes
from .matching import match_to_ground_truth
from .pooling_gradient import EDGES


def jittered_training_boxes(coco_gt: COCO, image_ids=None, *, config: JitterConfig = JitterConfig(), seed: int = 0) -> pd.DataFrame:
    """IoU-Net training boxes as the training loop draws them: jittered ground truth, uniform in IoU.

    Args:
        coco_gt: ground truth; every non-crowd object of ``image_ids`` (default: all images) is jittered.
        config: the sampling settings of the models (``num_per_gt`` boxes per object, IoU >= ``min_iou``).
        seed: seeds the generator.

    Returns:
        DataFrame, one row per box: ``image_id``, ``gt_id``, ``category_id``, the box ``x0 y0 x1 y1``,
        its ground truth ``gt_x0 .. gt_y1`` and ``iou`` (with its ground truth).
    """
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for image_id in image_ids if image_ids is not None else coco_gt.getImgIds():
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            continue
        gt = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64), "xywh", "xyxy")  # (G, 4)
        boxes, ious, index = jitter_boxes(gt, config.num_per_gt, config.min_iou, config.num_bins, generator=generator,
                                          max_sigma=config.max_sigma)
        frame = pd.DataFrame(boxes.numpy(), columns=list(EDGES))
        frame[[f"gt_{c}" for c in EDGES]] = gt[index].numpy()
        frame.insert(0, "image_id", image_id)
        frame.insert(1, "gt_id", [anns[i]["id"] for i in index.tolist()])
        frame.insert(2, "category_id", [anns[i]["category_id"] for i in index.tolist()])
        frame["iou"] = ious.numpy()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "gt_id", "category_id", *EDGES, "iou"])


def plot_jittered_boxes(boxes: pd.DataFrame, image: np.ndarray | None = None, *, image_id: int | None = None,
                        max_objects: int = 3, num_bins: int = 10) -> Figure:
    """Left: the jittered boxes of a few objects of one image, coloured by IoU. Right: the IoU histogram of all.

    Args:
        boxes: the output of :func:`jittered_training_boxes`.
        image: the pixels of ``image_id`` (``ndarray[H, W, 3]``), or ``None`` to draw on white.
        image_id: the image drawn on the left (default: the first of ``boxes``).
        max_objects: objects of that image whose boxes are drawn.
        num_bins: histogram bins over ``[min IoU, 1]``.
    """
    from matplotlib import colormaps

    fig, axes = new_figure(2, panel_size=(5.0, 4.2))
    ax, hist = axes[0]
    image_id = int(boxes["image_id"].iloc[0]) if image_id is None else image_id
    here = boxes[boxes["image_id"] == image_id]
    objects = list(dict.fromkeys(here["gt_id"]))[:max_objects]
    here = here[here["gt_id"].isin(objects)]
    lo = float(boxes["iou"].min()) if len(boxes) else 0.5
    lo = np.floor(lo * 10) / 10
    cmap = colormaps["viridis"]
    if image is not None:
        ax.imshow(image)
    for _, row in here.iterrows():
        draw_box(ax, row[list(EDGES)], edgecolor=cmap((row["iou"] - lo) / (1 - lo)), linewidth=1.0, alpha=0.8)
    for _, row in here.drop_duplicates("gt_id").iterrows():
        draw_box(ax, row[[f"gt_{c}" for c in EDGES]], edgecolor="white", linewidth=3.5)
        draw_box(ax, row[[f"gt_{c}" for c in EDGES]], edgecolor=color(2), linewidth=2.0)
    if image is None:
        corners = here[list(EDGES)].to_numpy()
        ax.set_xlim(corners[:, 0].min() - 5, corners[:, 2].max() + 5)
        ax.set_ylim(corners[:, 3].max() + 5, corners[:, 1].min() - 5)
    ax.set_aspect("equal")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig.colorbar(ScalarMappable(Normalize(lo, 1.0), cmap), ax=ax, label="IoU with its ground truth (green)")
    style_axes(ax, xlabel="x (pixels)", ylabel="y (pixels)", title=f"image {image_id}: {len(here)} training boxes of {len(objects)} objects", grid=False)

    edges = np.linspace(lo, 1.0, num_bins + 1)
    hist.hist(boxes["iou"], bins=edges, color=color(0), edgecolor="white")
    hist.axhline(len(boxes) / num_bins, color="0.3", linestyle="--", label="uniform")
    style_axes(hist, xlabel="IoU with the ground truth", ylabel="training boxes", title=f"all {len(boxes)} jittered boxes")
    hist.legend()
    return fig


def predicted_vs_true_iou(detections, coco_gt: COCO) -> pd.DataFrame:
    """Each detection carrying ``iou_pred`` with its true IoU (:func:`workbench.analysis.match_to_ground_truth`).

    Returns:
        DataFrame with the detections' fields, ``iou`` (true) and ``iou_pred`` (float64).
    """
    matched = match_to_ground_truth(detections, coco_gt)
    if "iou_pred" not in matched.columns:
        raise ValueError("the detections carry no 'iou_pred' (the raw set of the pipeline does)")
    matched = matched[matched["iou_pred"].notna()].copy()
    matched["iou_pred"] = matched["iou_pred"].astype(np.float64)
    return matched


def iou_prediction_error(matched: pd.DataFrame, edges=(0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> pd.DataFrame:
    """Per bin of true IoU: boxes, mean true and predicted IoU, bias (predicted - true) and mean |error|.

    Args:
        matched: the output of :func:`predicted_vs_true_iou`.
        edges: bin edges of the true IoU; bins ``[lo, hi)``, the last one closed.
    """
    edges = np.asarray(edges, dtype=np.float64)
    index = np.clip(np.searchsorted(edges, matched["iou"].to_numpy(), side="right") - 1, 0, len(edges) - 2)
    error = matched["iou_pred"].to_numpy() - matched["iou"].to_numpy()
    rows = {}
    for b in range(len(edges) - 1):
        sel = index == b
        label = f"[{edges[b]:g}, {edges[b + 1]:g}{']' if b == len(edges) - 2 else ')'}"
        rows[label] = {
            "boxes": int(sel.sum()),
            "mean true IoU": matched["iou"].to_numpy()[sel].mean() if sel.any() else np.nan,
            "mean predicted IoU": matched["iou_pred"].to_numpy()[sel].mean() if sel.any() else np.nan,
            "bias": error[sel].mean() if sel.any() else np.nan,
            "mean |error|": np.abs(error[sel]).mean() if sel.any() else np.nan,
        }
    table = pd.DataFrame(rows).T
    table.index.name = "true IoU"
    table["boxes"] = table["boxes"].astype(int)
    return table.round(3)


def plot_predicted_vs_true(matched: pd.DataFrame, training_ious: np.ndarray | None = None, *, min_iou: float = 0.5,
                           max_points: int = 20_000, seed: int = 0) -> Figure:
    """Left: predicted against true IoU, the line ``y = x`` and the mean per bin. Right: where the true IoUs lie.

    Args:
        matched: the output of :func:`predicted_vs_true_iou`.
        training_ious: IoUs of the training boxes (e.g. of :func:`jittered_training_boxes`), for the histogram.
        min_iou: ``Omega_train``: the IoU-Net saw no training box below it (shaded).
    """
    fig, axes = new_figure(2, panel_size=(5.0, 4.2))
    ax, hist = axes[0]
    data = matched
    if len(data) > max_points:
        data = data.iloc[np.sort(np.random.default_rng(seed).choice(len(data), max_points, replace=False))]
    ax.axvspan(0, min_iou, color="0.9", label=f"no training boxes (IoU < {min_iou:g})")
    ax.scatter(data["iou"], data["iou_pred"], s=5, alpha=0.3, linewidths=0, color=color(0), rasterized=True)
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect prediction")
    edges = np.linspace(0, 1, 11)
    centers, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (matched["iou"] >= lo) & (matched["iou"] < hi if hi < 1 else matched["iou"] <= hi)
        if sel.sum() >= 3:
            centers.append(0.5 * (lo + hi))
            means.append(matched.loc[sel, "iou_pred"].mean())
    ax.plot(centers, means, color=color(1), marker="o", linewidth=2, label="mean per 0.1 of true IoU")
    style_axes(ax, xlabel="true IoU with the matched ground truth", ylabel="predicted IoU",
               title=f"{len(matched)} detections before NMS")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left")
    hist.hist(matched["iou"], bins=edges, color=color(0), alpha=0.7, density=True, label="detections (test time)")
    if training_ious is not None and len(training_ious):
        hist.hist(training_ious, bins=edges, color=color(1), alpha=0.5, density=True, label="jittered boxes (training)")
    style_axes(hist, xlabel="true IoU", ylabel="density", title="what the IoU-Net is trained on and tested on")
    hist.legend(fontsize=8)
    return fig
