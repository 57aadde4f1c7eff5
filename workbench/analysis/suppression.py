"""Which box NMS keeps, and why: the suppression explained box by box (Table 1, Fig. 3, Fig. 7 per image),
and the cases where NMS keeps the worse-localized of two duplicates (the paper's Fig. 1a).

    by_image = detections_by_image(output.sets["raw"])             # image id -> tensors ``suppress`` takes
    explain_suppression(by_image[image_id], "iou-nms")             # who suppressed whom, one row per box
    pairs = suppressed_better_boxes(output.sets["raw"], coco_gt)   # Fig. 1a, largest IoU given away first

The survivors are :func:`workbench.postprocess.suppress`'s; who suppressed whom is the NMS op's own
answer (``return_suppressors=True`` of :mod:`workbench.ops.nms`), formatted here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from workbench.ops.boxes import matched_iou
from workbench.postprocess import suppress

from ._plotting import color, draw_box, new_figure
from .matching import ground_truth_by_image, match_to_ground_truth, xyxy_from_frame


def detections_by_image(detections) -> dict[int, dict[str, torch.Tensor]]:
    """COCO results grouped by image as the tensors :func:`workbench.postprocess.suppress` takes.

    Returns:
        image id -> ``boxes`` (Tensor[M, 4] float64, ``(x0, y0, x1, y1)``), ``scores`` (float64),
        ``labels`` (int64 category ids), ``ious`` (float64 ``iou_pred``, when every detection has one)
        and ``index`` (int64 positions in ``detections``).
    """
    frame = detections.reset_index(drop=True) if isinstance(detections, pd.DataFrame) else pd.DataFrame(list(detections))
    out = {}
    if frame.empty:
        return out
    has_pred = "iou_pred" in frame.columns and frame["iou_pred"].notna().all()
    boxes = torch.from_numpy(xyxy_from_frame(frame))  # (N, 4) float64
    for image_id, rows in frame.groupby("image_id", sort=True).indices.items():
        det = {
            "boxes": boxes[rows],
            "scores": torch.tensor(frame["score"].to_numpy(np.float64)[rows]),
            "labels": torch.tensor(frame["category_id"].to_numpy(np.int64)[rows]),
            "index": torch.as_tensor(rows, dtype=torch.int64),
        }
        if has_pred:
            det["ious"] = torch.tensor(frame["iou_pred"].to_numpy(np.float64)[rows])
        out[int(image_id)] = det
    return out


def explain_suppression(
    detections: dict[str, torch.Tensor],
    method: str,
    *,
    iou_threshold: float = 0.5,
    max_detections: int | None = 100,
    **soft_nms: float | str,
) -> pd.DataFrame:
    """Run :func:`workbench.postprocess.suppress` on one image and say, box by box, what happened and why.

    The survivors are ``suppress``'s own and so is who removed whom: the op's ``return_suppressors``
    answer (:mod:`workbench.ops.nms`), decided in the input's dtype by the rule the op applies; here it
    is only formatted.

    Args:
        detections: one image's ``boxes`` (Tensor[M, 4]), ``scores``, ``labels`` and, for ``"iou-nms"``,
            ``ious`` (e.g. a value of :func:`detections_by_image`).
        method: ``"none"``, ``"nms"``, ``"soft-nms"`` or ``"iou-nms"``.
        iou_threshold: Ω_nms of NMS and IoU-guided NMS.
        max_detections: the cap after suppression (``None``: none).
        **soft_nms: ``soft_method``, ``soft_sigma``, ``soft_iou_threshold``, ``score_threshold`` of ``suppress``.

    Returns:
        DataFrame indexed by position in ``detections`` (0..M-1): ``label``, ``score``, ``iou_pred``
        (when given), ``kept`` (survives, cap included), ``rank`` (position in ``suppress``'s output, -1 if
        suppressed), ``new_score`` (nan if suppressed), ``by`` (position of the box that suppressed it; for
        a box Soft-NMS kept, the box kept before it that overlaps it most; -1 if none), ``overlap`` (IoU
        with ``by``, float64),
        ``score_from`` (IoU-guided NMS: the box whose score a kept box took; else -1) and ``why`` (a sentence).
    """
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    m = len(boxes)
    position = torch.arange(m)
    out, suppressors = suppress({**{k: v for k, v in detections.items() if k in ("boxes", "scores", "labels", "ious")},
                                 "position": position},
                                method, iou_threshold=iou_threshold, max_detections=None, return_suppressors=True, **soft_nms)
    rank = np.full(m, -1)
    rank[out["position"].numpy()] = np.arange(len(out["position"]))
    new_score = np.full(m, np.nan)
    new_score[out["position"].numpy()] = out["scores"].double().numpy()
    kept_mask = rank >= 0
    by = suppressors.cpu().numpy().copy()  # the op's answer: -1 kept, -2 dropped by no box, else the suppressor
    by[by < 0] = -1
    score_from = np.full(m, -1)
    if method == "soft-nms":
        # A kept box's score decays under every box of its class selected before it (earlier in the
        # output): name the one that overlaps it most, if any does.
        label_of = labels.cpu().numpy()
        for i in np.flatnonzero(kept_mask):
            before = np.flatnonzero(kept_mask & (label_of == label_of[i]) & (rank < rank[i]))
            if len(before):
                iou = matched_iou(boxes[i : i + 1].double(), boxes[before].double()).numpy()  # (len(before),)
                if iou.max() > 0:
                    by[i] = before[int(iou.argmax())]
    overlap = np.full(m, np.nan)
    has = np.flatnonzero(by >= 0)
    overlap[has] = matched_iou(boxes[has].double(), boxes[by[has]].double()).numpy()
    if method == "iou-nms":
        for k in np.flatnonzero(kept_mask):
            cluster = np.flatnonzero((by == k) & ~kept_mask)
            if len(cluster) and scores[cluster].max() > scores[k]:
                score_from[k] = cluster[int(scores[cluster].argmax())]
    frame = pd.DataFrame({"label": labels.numpy(), "score": scores.double().numpy()})
    if "ious" in detections:
        frame["iou_pred"] = detections["ious"].double().numpy()
    cap = np.inf if max_detections is None else max_detections
    frame["kept"] = kept_mask & (rank < cap)
    frame["rank"] = np.where(frame["kept"], rank, -1)
    frame["new_score"] = np.where(frame["kept"], new_score, np.nan)
    frame["by"], frame["overlap"], frame["score_from"] = by, overlap, score_from
    frame["why"] = [_why(frame, i, method, iou_threshold, rank[i], cap) for i in range(m)]
    return frame


def _why(frame: pd.DataFrame, i: int, method: str, threshold: float, rank: int, cap: float) -> str:
    row = frame.iloc[i]
    if method == "none":
        return f"kept: no suppression (rank {rank + 1})" if row["kept"] else f"cut: beyond the top {cap:g}"
    if rank >= cap:
        return f"cut: kept by {method} at rank {rank + 1}, beyond the top {cap:g}"
    key_name, key = ("predicted IoU", "iou_pred") if method == "iou-nms" else ("score", "score")
    k = int(row["by"])
    if method == "soft-nms":
        if rank < 0:
            return (f"dropped: selecting #{k} (IoU {row['overlap']:.2f}) decayed its score below the score threshold"
                    if k >= 0 else "dropped: its score was below the score threshold from the start")
        text = f"kept: score {row['score']:.3f} → {row['new_score']:.3f}"
        return text + (f" (largest overlap with a box kept before it: #{k}, IoU {row['overlap']:.2f})" if k >= 0 else "")
    if rank >= 0:
        text = f"kept: highest {key_name} left in its cluster ({row[key]:.3f})"
        if int(row["score_from"]) >= 0:
            text += f"; takes score {row['new_score']:.3f} from #{int(row['score_from'])}"
        return text
    other = frame.iloc[k]
    return f"suppressed by #{k}: IoU {row['overlap']:.2f} > {threshold:g}, {key_name} {other[key]:.3f} ≥ {row[key]:.3f}"


def suppressed_better_boxes(detections, coco_gt: COCO, *, iou_threshold: float = 0.5, min_iou: float = 0.5,
                            top: int | None = 6, one_per_image: bool = True) -> pd.DataFrame:
    """Where NMS keeps the worse-localized of two duplicates (the paper's Fig. 1a), worst first.

    For each image, NMS (``iou_threshold``) runs on the raw detections; a pair is a kept box and a box
    it suppressed that match the same ground-truth object, the suppressed one with the higher true IoU,
    at least ``min_iou`` (a box that would have counted as a detection of the object; the kept one may
    not). Each kept box contributes its best-localized victim.

    Args:
        detections: raw detections (COCO results, before NMS; ``iou_pred`` optional).
        coco_gt: the ground truth.
        top: keep the ``top`` pairs with the largest IoU gap (``None``: all).
        one_per_image: at most one pair per image (the largest gap), for a varied gallery.

    Returns:
        DataFrame, one row per pair, sorted by ``iou_gap`` descending: ``image_id``, ``category_id``,
        ``gt_id``, ``gt_box``; for ``kept`` and ``better`` (the suppressed box): their position in
        ``detections`` and ``*_box`` (x0, y0, x1, y1), ``*_score``, ``*_iou`` (true), ``*_iou_pred``
        (nan without); ``overlap`` (their IoU) and ``iou_gap`` (``better_iou - kept_iou``).
    """
    matched = match_to_ground_truth(detections, coco_gt)
    true_iou, gt_id = matched["iou"].to_numpy(), matched["gt_id"].to_numpy()
    pred = matched["iou_pred"].to_numpy(np.float64) if "iou_pred" in matched.columns else np.full(len(matched), np.nan)
    gt_boxes = {int(i): box.tolist() for g in ground_truth_by_image(coco_gt).values() for i, box in zip(g.ids, g.boxes)}
    rows = []
    for image_id, det in detections_by_image(detections).items():
        why = explain_suppression(det, "nms", iou_threshold=iou_threshold, max_detections=None)
        index = det["index"].numpy()
        victims = why[why["by"] >= 0]
        for local, row in victims.iterrows():
            s, k = index[local], index[int(row["by"])]
            if gt_id[s] < 0 or gt_id[s] != gt_id[k] or true_iou[s] <= true_iou[k] or true_iou[s] < min_iou:
                continue
            rows.append({
                "image_id": image_id, "category_id": int(row["label"]), "gt_id": int(gt_id[s]), "gt_box": gt_boxes[int(gt_id[s])],
                **{f"{name}{suffix}": value for name, p, q in (("kept", k, int(row["by"])), ("better", s, local))
                   for suffix, value in (("", int(p)), ("_box", det["boxes"][q].tolist()), ("_score", float(det["scores"][q])),
                                         ("_iou", float(true_iou[p])), ("_iou_pred", float(pred[p])))},
                "overlap": float(row["overlap"]), "iou_gap": float(true_iou[s] - true_iou[k]),
            })
    columns = ["image_id", "category_id", "gt_id", "gt_box", *[f"{n}{s}" for n in ("kept", "better") for s in ("", "_box", "_score", "_iou", "_iou_pred")],
               "overlap", "iou_gap"]
    pairs = pd.DataFrame(rows, columns=columns)
    if pairs.empty:
        return pairs
    pairs = pairs.sort_values(["iou_gap", "image_id"], ascending=[False, True], kind="stable")
    pairs = pairs.drop_duplicates("kept")  # a kept box's best-localized victim
    if one_per_image:
        pairs = pairs.drop_duplicates("image_id")
    return pairs.head(top if top is not None else len(pairs)).reset_index(drop=True)


def plot_suppressed_better_boxes(pairs: pd.DataFrame, images=None, *, ncols: int = 3, margin: float = 0.6) -> Figure:
    """A gallery of :func:`suppressed_better_boxes`: ground truth (green), the box NMS keeps (orange),
    the better box it suppresses (blue, dashed), each panel zoomed on the object.

    Args:
        pairs: the output of :func:`suppressed_better_boxes`.
        images: ``image_id -> ndarray[H, W, 3]`` (e.g. :func:`coco_images`), or ``None`` (boxes only).
        margin: context around the three boxes, as a fraction of their extent.
    """
    n = max(len(pairs), 1)
    cols = min(ncols, n)
    fig, axes = new_figure(cols, nrows=(n + cols - 1) // cols, panel_size=(3.6, 3.9))
    for ax in axes.ravel()[len(pairs):]:
        ax.set_axis_off()
    if pairs.empty:
        axes[0, 0].text(0.5, 0.5, "NMS suppressed no better-localized box here", ha="center", va="center", transform=axes[0, 0].transAxes)
        return fig
    for ax, (_, p) in zip(axes.ravel(), pairs.iterrows()):
        corners = np.array([p["gt_box"], p["kept_box"], p["better_box"]], dtype=np.float64)
        lo, hi = corners[:, :2].min(0), corners[:, 2:].max(0)
        pad = margin * (hi - lo).max()
        lo, hi = lo - pad, hi + pad
        if images is not None:
            image = images(int(p["image_id"]))
            ax.imshow(image)
            lo, hi = np.maximum(lo, 0.0), np.minimum(hi, [image.shape[1], image.shape[0]])
        for box, colour, style, label in ((p["gt_box"], color(2), "-", "ground truth"),
                                          (p["kept_box"], color(3), "-", f"kept: score {p['kept_score']:.2f}, IoU {p['kept_iou']:.2f}"),
                                          (p["better_box"], color(0), "--", f"suppressed: score {p['better_score']:.2f}, IoU {p['better_iou']:.2f}")):
            draw_box(ax, box, edgecolor="white", linewidth=3.5, linestyle="-")
            draw_box(ax, box, edgecolor=colour, linewidth=2.0, linestyle=style, label=label)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        pred = (f"\npredicted IoU: kept {p['kept_iou_pred']:.2f}, suppressed {p['better_iou_pred']:.2f}"
                if np.isfinite(p["better_iou_pred"]) else "")
        ax.set_title(f"image {int(p['image_id'])}, IoU +{p['iou_gap']:.2f}{pred}", fontsize=9)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.32), fontsize=7, frameon=False)
    return fig
