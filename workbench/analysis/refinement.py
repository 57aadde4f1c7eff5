"""Paper Algorithm 2 box by box: summaries of a refinement record (:class:`workbench.trajectories.Trajectories`)
and a stand-in record for demonstrating the refinement stepper without a trained IoU-Net.

    record = refinement_record(output, stand_in=FAST)   # the pipeline's record, or the stand-in
    refinement_summary(record)                          # per stop reason: steps, IoU before/after, gains
    record_knobs(record.meta)                           # the Algorithm 2 settings that made it

Fig. 4's curves (AP per iteration) are :func:`workbench.analysis.experiments.refinement_runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_convert

from workbench.data import get_dataset
from workbench.ops.boxes import matched_iou
from workbench.paths import project_root
from workbench.refine import STOP_REASONS, Refinement, optimize_boxes
from workbench.trajectories import Trajectories

if TYPE_CHECKING:  # the pipeline (models, training) is heavy to import; only its output's type is needed
    from workbench.pipeline import PipelineOutput

ALGORITHM2_KNOBS = ("iterations", "step_size", "early_stop", "degeneration", "step_scaling")
"""Algorithm 2's settings, as :func:`workbench.refine.optimize_boxes` names them: T, λ, Ω1, Ω2, the step reading."""


def demo_trajectories(
    root: str | Path | None = None,
    *,
    num_images: int = 8,
    seed: int = 0,
    jitter: float = 0.15,
    belief_error: float = 0.06,
    iterations: int = 5,
) -> Path:
    """Write a refinement record of jittered ``shapes`` ground truth, refined by a STAND-IN predictor.

    For demonstrations and tests of the stepper only: no network is involved. The "predicted IoU"
    is the exact IoU with a misplaced copy of each ground-truth box (every coordinate off by
    ``N(0, belief_error * size)``), so the stand-in is confidently wrong by a little, as a trained
    IoU-Net is; refinement by Algorithm 2 (paper hyper-parameters) then gains true IoU on most boxes
    and loses it on some.

    Args:
        root: cache folder (default ``<project>/cache``): the first ``num_images`` ``shapes`` val images
            go to ``<root>/data`` (the same pixels as in the full val set), the record to
            ``<root>/notebooks/demo-shapes-.../trajectories.npz``.
        num_images: val images to take; every ground-truth box in them is used.
        seed: seeds the dataset and the jitter.
        jitter: start boxes are ground truth plus ``N(0, jitter * size)`` per coordinate.
        belief_error: spread of the stand-in's misplacement, as a fraction of the box size.
        iterations: ``T`` of Algorithm 2.

    Returns:
        Path of the ``.npz`` (a :class:`~workbench.trajectories.Trajectories` with its JSON sidecar).
    """
    root = Path(root) if root is not None else project_root() / "cache"
    dataset = get_dataset("shapes", "val", root / "data", seed=seed, num_train=0, num_val=num_images)
    anns = [ann for image_id in dataset.image_ids for ann in dataset.coco.imgToAnns.get(image_id, [])]
    image_ids, category_ids, ann_ids = ([a[k] for a in anns] for k in ("image_id", "category_id", "id"))
    gt_box = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")  # (B, 4)
    size = (gt_box[:, 2:] - gt_box[:, :2]).repeat(1, 2)  # (B, 4): (w, h, w, h)
    # Each box draws from its own generator, seeded by its annotation id: a box is jittered the same way
    # whatever num_images is.
    noise = torch.from_numpy(np.stack([np.random.default_rng([seed, a]).standard_normal((2, 4)) for a in ann_ids]).reshape(-1, 2, 4))
    start = gt_box + noise[:, 0] * jitter * size
    belief = gt_box + noise[:, 1] * belief_error * size

    hyper = dict(iterations=iterations, step_size=0.5, early_stop=0.001, degeneration=-0.01, step_scaling="width")
    result = optimize_boxes(lambda b: matched_iou(b, belief), start, **hyper)
    record = _record(result, gt_box, {
        "image_id": np.asarray(image_ids, dtype=np.int64),
        "category_id": np.asarray(category_ids, dtype=np.int64),
        "score": np.ones(len(image_ids)),
    }, meta={
        "dataset": "shapes",
        "ann_file": str(dataset.ann_file.resolve()),
        "img_dir": str(dataset.img_dir.resolve()),
        "predictor": "STAND-IN (demo only): exact IoU with a misplaced copy of the ground truth",
        "stand_in_belief": belief.tolist(),  # (B, 4): the box each "prediction" is the IoU with
        **hyper,
    })
    name = f"demo-shapes-{num_images}img-seed{seed}"
    return record.save(root / "notebooks" / name / "trajectories.npz")


def _record(result: Refinement, gt_box: torch.Tensor, ids: dict[str, np.ndarray], meta: dict) -> Trajectories:
    """A :class:`Trajectories` of ``result`` (``B`` boxes) with the true IoU against ``gt_box`` (Tensor[B, 4],
    float64; NaN rows: no ground truth, true IoU 0); ``ids``: ``image_id``, ``category_id``, ``score``."""
    steps = result.trajectory.transpose(0, 1).double()  # (B, T + 1, 4)
    has = torch.isfinite(gt_box).all(dim=1)
    true_iou = torch.zeros(steps.shape[:2], dtype=torch.float64)
    true_iou[has] = matched_iou(steps[has], gt_box[has][:, None, :])
    return Trajectories(
        **ids, gt_box=gt_box.numpy(), boxes=steps.numpy(), predicted_iou=result.predicted.T.double().numpy(),
        true_iou=true_iou.numpy(), gradient=result.gradients.transpose(0, 1).double().numpy(),
        stop_step=result.stop_step.numpy(), stop_reason=result.stop_reason.numpy(), meta=meta,
    )


def refinement_to_record(result: Refinement, record: Trajectories, b: int, knobs: dict) -> Trajectories:
    """One box of ``record`` (index ``b``) refined again (``result``, one box) as a one-box record: its ids and
    ground truth, the true IoU at every new step, ``knobs`` (the settings used) in its ``meta``."""
    ids = {"image_id": record.image_id[b : b + 1], "category_id": record.category_id[b : b + 1], "score": record.score[b : b + 1]}
    return _record(result, torch.from_numpy(record.gt_box[b : b + 1]).double(), ids, {**record.meta, "knobs": dict(knobs)})


def record_knobs(meta: dict) -> dict:
    """The Algorithm 2 settings (:data:`ALGORITHM2_KNOBS`) a record was made with, from its ``meta``: the
    pipeline's ``settings`` (``refine_*``), or the stand-in's own keys (step reading "width" if unnamed)."""
    if "knobs" in meta:
        return dict(meta["knobs"])
    s = meta.get("settings")
    if s:
        return dict(iterations=int(s["refine_iterations"]), step_size=float(s["refine_step_size"]),
                    early_stop=float(s["refine_early_stop"]), degeneration=float(s["refine_degeneration"]),
                    step_scaling=s.get("refine_step_scaling", "width"))
    missing = [k for k in ALGORITHM2_KNOBS[:4] if k not in meta]
    if missing:
        raise ValueError(f"the record's meta names no refinement settings (missing {missing})")
    return {**{k: meta[k] for k in ALGORITHM2_KNOBS[:4]}, "step_scaling": meta.get("step_scaling", "width")}


def stand_in_rerun(record: Trajectories):
    """``rerun(b, knobs)`` for the stand-in record of :func:`demo_trajectories`: box ``b`` refined again from
    its start with the same stand-in predictor (IoU with its ``stand_in_belief`` box) and the settings
    ``knobs`` (:data:`ALGORITHM2_KNOBS`), as a one-box record (:func:`refinement_to_record`)."""
    belief = torch.tensor(record.meta["stand_in_belief"], dtype=torch.float64)  # (B, 4)

    def rerun(b: int, knobs: dict) -> Trajectories:
        result = optimize_boxes(lambda x: matched_iou(x, belief[b : b + 1]), torch.from_numpy(record.boxes[b, :1]), **knobs)
        return refinement_to_record(result, record, b, knobs)

    return rerun


def refinement_summary(trajectories: Trajectories) -> pd.DataFrame:
    """Per stop reason (and overall): boxes, mean steps taken, mean true IoU before and after, how many gained.

    Gains are ``trajectories.gain`` (true IoU after the last step minus before the first); "misled" counts
    the boxes whose predicted IoU rose while their true IoU fell.
    """
    t = trajectories
    frame = pd.DataFrame({
        "stop reason": [STOP_REASONS[int(r)] for r in t.stop_reason],
        "steps": t.stop_step,
        "true IoU before": t.true_iou[:, 0],
        "true IoU after": t.true_iou[:, -1],
        "gain": t.gain,
        "misled": (t.predicted_iou[:, -1] > t.predicted_iou[:, 0]) & (t.gain < 0),
    })

    def summarize(group: pd.DataFrame) -> pd.Series:
        return pd.Series({
            "boxes": len(group),
            "mean steps": group["steps"].mean(),
            "mean true IoU before": group["true IoU before"].mean(),
            "mean true IoU after": group["true IoU after"].mean(),
            "mean gain": group["gain"].mean(),
            "gained IoU": int((group["gain"] > 0).sum()),
            "lost IoU": int((group["gain"] < 0).sum()),
            "misled": int(group["misled"].sum()),
        })

    rows = {reason: summarize(group) for reason, group in frame.groupby("stop reason", sort=True)}
    rows["all boxes"] = summarize(frame)
    table = pd.DataFrame(rows).T
    for column in ("boxes", "gained IoU", "lost IoU", "misled"):
        table[column] = table[column].astype(int)
    return table.round(3)


def refinement_record(output: PipelineOutput, *, stand_in: bool = False, root: str | Path | None = None) -> Trajectories:
    """The pipeline's refinement record (``output.trajectories``), or the stand-in of :func:`demo_trajectories`.

    Args:
        stand_in: use the stand-in (fast mode: the tiny run's IoU-Net, trained for a few iterations, is
            nearly flat, so its boxes move by a fraction of a pixel and stop after one step: nothing to
            step through). The stand-in is also used when the pipeline refined no box. A line says
            which record it is and, for the pipeline's, how far its boxes moved.
        root: where the stand-in is written (default ``<project>/cache``).
    """
    t = output.trajectories
    if t is not None and len(t):
        moved = np.abs(t.boxes[:, -1] - t.boxes[:, 0]).max(axis=1)  # (B,) largest edge displacement, pixels
        print(f"the pipeline's record: {len(t)} boxes; largest edge move per box: median {np.median(moved):.2f} px, "
              f"max {moved.max():.2f} px; {int((t.stop_step == 1).sum())} stopped after one step")
    if stand_in or t is None or not len(t):
        print("showing the STAND-IN record of demo_trajectories instead (its predictor is not an IoU-Net)")
        return Trajectories.load(demo_trajectories(root))
    return t
