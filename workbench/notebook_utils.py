"""What the notebooks call besides the analyses: where things live, the gradient checks of Eq. 4,
a pooling sweep, and a stand-in refinement record for the stepper demo.

    from workbench.notebook_utils import gradient_table, demo_trajectories
    gradient_table(feature_map, (1.3, 0.8, 4.6, 3.4))   # autograd vs Eq. 4 vs finite differences
    path = demo_trajectories()                           # cache/notebooks/.../trajectories.npz

Conventions are those of :mod:`workbench.analysis.pooling`: ``feature_map[i, j]`` sits at
``(x = j, y = i)``; a bin is ``(x0, y0, x1, y1)`` in feature-map cells.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from workbench.analysis import compare_pooling
from workbench.analysis._plotting import color, marker, new_figure, style_axes
from workbench.ops import box_iou, prroi_pool
from workbench.refine import optimize_boxes
from workbench.trajectories import Trajectories

EDGES = ("x0", "y0", "x1", "y1")


def project_root() -> Path:
    """The checkout the notebooks belong to: ``$WORKBENCH_ROOT`` if set, else the folder above the
    installed ``workbench`` package (the repository root for the editable install ``make setup`` does).

    Notebooks find ``reports/`` and ``cache/`` here; tests point ``$WORKBENCH_ROOT`` at a temporary
    folder so that what a notebook builds stays out of the checkout."""
    env = os.environ.get("WORKBENCH_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


# --- Eq. 4: the gradient of PrRoI Pooling w.r.t. the bin's edges -------------------------------------


def _bin_tensor(feature_map: np.ndarray, bin_box) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.as_tensor(np.asarray(feature_map, dtype=np.float64))[None, None]  # (1, 1, H, W)
    box = torch.as_tensor(np.asarray(bin_box, dtype=np.float64)).reshape(4)
    return d, box


def pooled_value_and_gradient(feature_map: np.ndarray, bin_box) -> tuple[float, np.ndarray]:
    """PrRoI Pooling of one bin (``output_size=1``) and its autograd gradient w.r.t. ``(x0, y0, x1, y1)``.

    Returns:
        (float, ndarray[4] float64): the pooled value (Eq. 3) and ``d value / d edge``.
    """
    d, box = _bin_tensor(feature_map, bin_box)
    box.requires_grad_(True)
    rois = torch.cat([box.new_zeros(1), box])[None]  # (1, 5): batch index 0, then the box
    value = prroi_pool(d, rois, 1, 1.0).reshape(())
    (grad,) = torch.autograd.grad(value, box)
    return float(value.detach()), grad.numpy().copy()


def _tri_integral(t: np.ndarray) -> np.ndarray:
    """Antiderivative of ``tri(t) = max(0, 1 - |t|)`` from ``-inf``: 0 below -1, 1/2 at 0, 1 above 1."""
    t = np.clip(t, -1.0, 1.0)
    return np.where(t <= 0, 0.5 * (t + 1) ** 2, 0.5 + t - 0.5 * t * t)


def _line_integrals(d: np.ndarray, at: float, lo: float, hi: float, axis: str) -> float:
    """``int_lo^hi f(at, y) dy`` (``axis="x"``: a vertical edge at ``x = at``) or ``int_lo^hi f(x, at) dx``.

    ``f`` is Eq. 2, so the integral is ``sum_ij d[i, j] tri(at - j) (P(hi - i) - P(lo - i))`` (vertical
    edge) with ``P`` the antiderivative of ``tri``: exact, written here from the formula, independently
    of the library's pooling code.
    """
    rows, cols = np.arange(d.shape[0]), np.arange(d.shape[1])
    if axis == "x":
        across = np.maximum(0.0, 1.0 - np.abs(at - cols))  # (W,) tri(at - j)
        along = _tri_integral(hi - rows) - _tri_integral(lo - rows)  # (H,)
        return float(along @ d @ across)
    across = np.maximum(0.0, 1.0 - np.abs(at - rows))  # (H,) tri(at - i)
    along = _tri_integral(hi - cols) - _tri_integral(lo - cols)  # (W,)
    return float(across @ d @ along)


def eq4_gradient(feature_map: np.ndarray, bin_box) -> np.ndarray:
    """The gradient of PrRoI Pooling w.r.t. ``(x0, y0, x1, y1)`` by the paper's Eq. 4.

    ``d PrPool / d x0 = PrPool / (x1 - x0) - int_{y0}^{y1} f(x0, y) dy / area``; moving an edge
    outwards adds the line integral along it and spreads the bin's area. The other edges follow by
    symmetry (the far edges with opposite signs). The bin must have positive width and height.

    Returns:
        ndarray[4] float64.
    """
    d = np.asarray(feature_map, dtype=np.float64)
    x0, y0, x1, y1 = (float(v) for v in bin_box)
    w, h = x1 - x0, y1 - y0
    if not (w > 0 and h > 0):
        raise ValueError(f"Eq. 4 needs a bin with x0 < x1 and y0 < y1, got {bin_box}")
    value, _ = pooled_value_and_gradient(d, bin_box)
    area = w * h
    return np.array([
        value / w - _line_integrals(d, x0, y0, y1, "x") / area,
        value / h - _line_integrals(d, y0, x0, x1, "y") / area,
        -value / w + _line_integrals(d, x1, y0, y1, "x") / area,
        -value / h + _line_integrals(d, y1, x0, x1, "y") / area,
    ])


def finite_difference_gradient(feature_map: np.ndarray, bin_box, eps: float = 1e-5) -> np.ndarray:
    """Central differences ``(v(edge + eps) - v(edge - eps)) / 2 eps`` of the pooled value, per edge."""
    box = np.asarray(bin_box, dtype=np.float64)
    grad = np.empty(4)
    for k in range(4):
        step = np.zeros(4)
        step[k] = eps
        grad[k] = (pooled_value_and_gradient(feature_map, box + step)[0] - pooled_value_and_gradient(feature_map, box - step)[0]) / (2 * eps)
    return grad


def gradient_table(feature_map: np.ndarray, bin_box, eps: float = 1e-5) -> pd.DataFrame:
    """One row per edge: the library's autograd gradient, Eq. 4 and central finite differences."""
    _, autograd = pooled_value_and_gradient(feature_map, bin_box)
    return pd.DataFrame(
        {
            "autograd (workbench.ops.prroi_pool)": autograd,
            "Eq. 4 (line integrals)": eq4_gradient(feature_map, bin_box),
            f"finite difference (eps={eps:g})": finite_difference_gradient(feature_map, bin_box, eps),
        },
        index=pd.Index([f"d/d{e}" for e in EDGES], name="edge"),
    )


# --- Fig. 6 in motion: slide one edge ------------------------------------------------------------------


def pooling_sweep(feature_map: np.ndarray, bin_box, edge: str = "x0", offsets=np.linspace(-0.8, 0.8, 161)) -> pd.DataFrame:
    """The three pooled values (RoI Pooling, RoI Align, PrRoI Pooling) while one edge of the bin moves.

    Args:
        edge: ``"x0"``, ``"y0"``, ``"x1"`` or ``"y1"``.
        offsets: shifts of that edge in cells (RoI Align's samples must stay on the map, see
            :func:`workbench.analysis.compare_pooling`).

    Returns:
        DataFrame indexed by the edge's position, one column per operator.
    """
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    k = EDGES.index(edge)
    rows = []
    for offset in np.asarray(offsets, dtype=np.float64):
        box = list(bin_box)
        box[k] = float(box[k]) + float(offset)
        r = compare_pooling(feature_map, tuple(box))
        rows.append({edge: box[k], "RoI Pooling": r.roi_pool, "RoI Align": r.roi_align, "PrRoI Pooling": r.prroi_pool})
    return pd.DataFrame(rows).set_index(edge)


def sweep_slopes(sweep: pd.DataFrame) -> pd.DataFrame:
    """Finite-difference slopes of a :func:`pooling_sweep`, indexed by the midpoints between positions."""
    x = sweep.index.to_numpy()
    slopes = np.diff(sweep.to_numpy(), axis=0) / np.diff(x)[:, None]
    return pd.DataFrame(slopes, columns=sweep.columns, index=pd.Index(0.5 * (x[1:] + x[:-1]), name=sweep.index.name))


def plot_pooling_sweep(sweep: pd.DataFrame) -> Figure:
    """Pooled value (left) and its slope by finite differences (right) against the moving edge."""
    fig, axes = new_figure(2, panel_size=(5.2, 3.6))
    edge = sweep.index.name
    slopes = sweep_slopes(sweep)
    for i, name in enumerate(sweep.columns):
        kw = dict(color=color(i), marker=marker(i), markevery=max(1, len(sweep) // 12), label=name)
        axes[0, 0].plot(sweep.index, sweep[name], **kw)
        axes[0, 1].plot(slopes.index, slopes[name], **kw)
    style_axes(axes[0, 0], xlabel=f"{edge} (feature-map cells)", ylabel="pooled value", title="value of the bin")
    smooth = slopes.drop(columns=["RoI Pooling"], errors="ignore").to_numpy()
    if smooth.size:  # RoI Pooling's slope is 0 with spikes at its jumps: let those leave the axes
        lo, hi = float(smooth.min()), float(smooth.max())
        pad = 0.25 * max(hi - lo, 1e-6)
        axes[0, 1].set_ylim(min(lo, 0.0) - pad, max(hi, 0.0) + pad)
    style_axes(axes[0, 1], xlabel=f"{edge} (feature-map cells)", ylabel=f"d value / d {edge}",
               title="its slope (finite differences)\nRoI Pooling: 0, with spikes off the axes at its jumps")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Moving the bin's {edge} edge: steps (RoI Pooling), kinks (RoI Align), smooth (PrRoI Pooling)")
    return fig


# --- A stand-in refinement record for the stepper demo ----------------------------------------------


def paired_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes[k]`` with ``others[k]`` (Tensor[K]), differentiable w.r.t. both."""
    return torch.diagonal(box_iou(boxes, others))


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
    from workbench.data import get_dataset  # the data layer is only needed here

    root = Path(root) if root is not None else project_root() / "cache"
    dataset = get_dataset("shapes", "val", root / "data", seed=seed, num_train=0, num_val=num_images)
    image_ids, category_ids, ann_ids, gt = [], [], [], []
    for image_id in dataset.image_ids:
        for ann in dataset.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            ann_ids.append(ann["id"])
            image_ids.append(image_id)
            category_ids.append(ann["category_id"])
            gt.append([x, y, x + w, y + h])
    gt_box = torch.tensor(gt, dtype=torch.float64).reshape(-1, 4)  # (B, 4)
    size = (gt_box[:, 2:] - gt_box[:, :2]).repeat(1, 2)  # (B, 4): (w, h, w, h)
    # Each box draws from its own generator, seeded by its annotation id: a box is jittered the same way
    # whatever num_images is.
    noise = torch.from_numpy(np.stack([np.random.default_rng([seed, a]).standard_normal((2, 4)) for a in ann_ids]).reshape(-1, 2, 4))
    start = gt_box + noise[:, 0] * jitter * size
    belief = gt_box + noise[:, 1] * belief_error * size

    hyper = dict(iterations=iterations, step_size=0.5, early_stop=0.001, degeneration=-0.01)
    result = optimize_boxes(lambda b: paired_iou(b, belief), start, **hyper)
    steps = result.trajectory.transpose(0, 1)  # (B, T + 1, 4)
    true_iou = torch.stack([paired_iou(step, gt_box) for step in result.trajectory], dim=1)  # (B, T + 1)
    record = Trajectories(
        image_id=np.asarray(image_ids, dtype=np.int64),
        category_id=np.asarray(category_ids, dtype=np.int64),
        score=np.ones(len(image_ids)),
        gt_box=gt_box.numpy(),
        boxes=steps.numpy(),
        predicted_iou=result.predicted.T.numpy(),
        true_iou=true_iou.numpy(),
        gradient=result.gradients.transpose(0, 1).numpy(),
        stop_step=result.stop_step.numpy(),
        stop_reason=result.stop_reason.numpy(),
        meta={
            "dataset": "shapes",
            "ann_file": str(dataset.ann_file.resolve()),
            "img_dir": str(dataset.img_dir.resolve()),
            "predictor": "STAND-IN (demo only): exact IoU with a misplaced copy of the ground truth",
            **hyper,
        },
    )
    name = f"demo-shapes-{num_images}img-seed{seed}"
    return record.save(root / "notebooks" / name / "trajectories.npz")


def refinement_summary(trajectories: Trajectories) -> pd.DataFrame:
    """Per stop reason (and overall): boxes, mean steps taken, mean true IoU before and after, how many gained.

    Gains are ``trajectories.gain`` (true IoU after the last step minus before the first); "misled" counts
    the boxes whose predicted IoU rose while their true IoU fell.
    """
    from workbench.refine import STOP_REASONS

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
