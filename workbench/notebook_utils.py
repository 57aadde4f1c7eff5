"""What the notebooks call besides the analyses: where things live, the gradient checks of Eq. 4,
a pooling sweep, a stand-in refinement record for the stepper demo, the pipeline's cached results
(notebooks 02-06), and per notebook the few data and figure functions it needs plus a ``describe_*``
function that states its findings from the computed numbers.

    from workbench.notebook_utils import gradient_table, demo_trajectories, pipeline_results
    gradient_table(feature_map, (1.3, 0.8, 4.6, 3.4))   # autograd vs Eq. 4 vs finite differences
    path = demo_trajectories()                           # cache/notebooks/.../trajectories.npz
    results = pipeline_results("neon-trees")             # what `make run` computed: .output, .coco_gt, .run_dirs
    explain_suppression(detections_by_image(results.output.sets["raw"])[image_id], "iou-nms")  # who suppressed whom

Conventions are those of :mod:`workbench.analysis.pooling`: ``feature_map[i, j]`` sits at
``(x = j, y = i)``; a bin is ``(x0, y0, x1, y1)`` in feature-map cells.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from workbench.analysis import compare_pooling, match_to_ground_truth, pearson
from workbench.analysis._plotting import color, marker, new_figure, style_axes
from workbench.models.jitter import JitterConfig, jitter_boxes
from workbench.ops import box_iou, prroi_pool
from workbench.refine import optimize_boxes
from workbench.trajectories import Trajectories

if TYPE_CHECKING:  # imported where used: training and the pipeline are heavy to import for notebook 01
    from pycocotools.coco import COCO

    from workbench.config import TrainConfig
    from workbench.pipeline import PipelineOutput
    from workbench.reproduce import ReproduceOptions

EDGES = ("x0", "y0", "x1", "y1")  # a bin's edges (cells), a box's corners (pixels)


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


# --- The pipeline's results, shared with `python -m workbench reproduce` ----------------------------
#
# Notebooks 02-06 read what `reproduce` computes: the same options, the same run folders and the same
# pipeline cache, so a notebook opened after `make run` trains and infers nothing. In fast mode (CI) a
# tiny `shapes` run goes under <root>/cache/notebooks/fast-shapes/ instead: a few training iterations on
# a few 96-px images, the whole pipeline on FAST_VAL_IMAGES of them, its report in report/ there. Its
# numbers only show that everything runs; they say nothing about the paper.

FAST_NAME = "fast-shapes"
FAST_VAL_IMAGES = 6
FAST_OVERRIDES = (  # tiny data and models for fast mode; data.root is added under the root
    "data.options.num_train=8", f"data.options.num_val={FAST_VAL_IMAGES}", "data.options.image_size=96",
    "model.min_size=96", "model.max_size=96", "batch_size=2", "checkpoint_interval=4", "log_interval=1",
)
FAST_ITERATIONS = {"detector": 4, "iou": 4, "joint": 4}  # training iterations per model kind in fast mode


class PipelineResults(NamedTuple):
    """What :func:`pipeline_results` returns."""

    output: PipelineOutput  # .sets (name -> COCO results), .seconds, .trajectories, .image_ids
    coco_gt: COCO  # ground truth of the validation split the pipeline ran on
    run_dirs: dict[str, Path]  # model kind ("detector", "iou", "joint") -> run folder (ckpt.pt, log.jsonl)
    report_dir: Path  # where `reproduce` wrote its report
    ann_file: Path  # the validation split's COCO file ...
    img_dir: Path  # ... and image folder (for CocoImages)


def reproduce_options(dataset: str = "neon-trees", fast: bool = False, root: str | Path | None = None) -> ReproduceOptions:
    """The options :func:`pipeline_results` runs ``reproduce`` with.

    ``fast=False``: exactly ``python -m workbench reproduce --config <dataset>`` (relative paths, read
    from ``root``). ``fast=True``: the tiny ``shapes`` run of fast mode (``dataset`` is not used),
    every path absolute under ``<root>/cache/notebooks/fast-shapes``.
    """
    from workbench.pipeline import PipelineSettings
    from workbench.reproduce import ReproduceOptions

    if not fast:
        return ReproduceOptions(preset=dataset)
    root = Path(root) if root is not None else project_root()
    base = (root / "cache" / "notebooks" / FAST_NAME).resolve()
    return ReproduceOptions(
        preset="shapes", overrides=[f"data.root={(root / 'cache' / 'data').resolve()}", *FAST_OVERRIDES],
        iterations=dict(FAST_ITERATIONS),
        settings=PipelineSettings(score_thresh=0.0, raw_max_detections=300),
        out_dir=str(base / "report"), runs_dir=str(base / "runs"), cache_dir=str(base / "pipeline"),
    )


def _finished(cfg: TrainConfig) -> bool:
    """Whether ``reproduce`` would reuse ``cfg``'s checkpoint (its test in ``reproduce.trained``)."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if not ckpt.is_file():
        return False
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    return state["fingerprint"] == cfg.fingerprint() and state["iteration"] >= cfg.iterations


def _stages(opts: ReproduceOptions) -> tuple[dict[str, TrainConfig], TrainConfig]:
    """The training configs ``reproduce(opts)`` uses (kind -> config) and its validation config.

    Mirrors the first lines of :func:`workbench.reproduce.reproduce` (see ``notebooks/README.md``)."""
    from workbench.config import apply_overrides
    from workbench.reproduce import _config as _reproduce_config

    det = _reproduce_config(opts, "detector")
    configs = {"detector": det, "iou": _reproduce_config(opts, "iou", [f"model.detector_checkpoint={Path(det.out_dir) / 'ckpt.pt'}"])}
    if opts.joint:
        configs["joint"] = _reproduce_config(opts, "joint")
    return configs, apply_overrides(det, ["data.split=val", *opts.val_overrides])


def cached_pipeline_path(opts: ReproduceOptions) -> Path | None:
    """Where ``reproduce(opts)`` caches its :class:`PipelineOutput`, or ``None`` while a model is untrained.

    Paths in ``opts`` are relative to the working directory, as for ``reproduce``."""
    from workbench.reproduce import _pipeline_key

    configs, val = _stages(opts)
    if not all(_finished(cfg) for cfg in configs.values()):
        return None
    checkpoints = [Path(cfg.out_dir) / "ckpt.pt" for cfg in configs.values()]
    key = _pipeline_key(checkpoints, opts.settings, val.to_dict()["data"], opts.external_detections)
    return Path(opts.cache_dir) / f"{opts.preset}-{key}.pt"


def pipeline_results(dataset: str = "neon-trees", fast: bool = False, root: str | Path | None = None, *,
                     options: ReproduceOptions | None = None) -> PipelineResults:
    """The pipeline output of ``python -m workbench reproduce --config <dataset>``, from its cache.

    Runs ``reproduce`` (training what is not trained yet, running the pipeline, writing the report) only
    when its cached output is missing; otherwise just loads it. Training progress goes to stdout.

    Args:
        dataset: a preset of :mod:`workbench.config` (``neon-trees``, ``shapes``, ``coco``).
        fast: the tiny ``shapes`` run of fast mode instead (see :func:`reproduce_options`); a first
            call under a ``root`` trains it (~1 min on 2 cores), later calls reuse it.
        root: the project folder (default :func:`project_root`); ``reports/``, ``runs/`` and
            ``cache/`` are read and written there, as ``make run`` does from the repository root.
        options: any other ``reproduce`` options instead of ``dataset`` and ``fast`` (e.g. those of
            ``reproduce --config coco --val-set ...``), paths relative to ``root``.
    """
    from workbench.reproduce import reproduce
    from workbench.train import build_dataset

    root = (Path(root) if root is not None else project_root()).resolve()
    opts = options if options is not None else reproduce_options(dataset, fast, root)
    root.mkdir(parents=True, exist_ok=True)  # a fresh $WORKBENCH_ROOT
    with contextlib.chdir(root):
        path = cached_pipeline_path(opts)
        if path is None or not path.is_file():
            print(f"no cached pipeline output for {opts.preset!r} under {root}: running reproduce (training what is missing)")
            with contextlib.redirect_stderr(sys.stdout):  # progress bars: ordinary output in a notebook
                reproduce(opts)
            path = cached_pipeline_path(opts)
            if path is None or not path.is_file():
                raise RuntimeError(f"reproduce did not leave its output where expected ({path}): "
                                   "has workbench.reproduce changed its cache key?")
        output = torch.load(path, weights_only=False)
        configs, val = _stages(opts)
        val_set = build_dataset(val)
        report_dir = Path(opts.out_dir or f"reports/{opts.preset}").resolve()
        return PipelineResults(
            output=output, coco_gt=val_set.coco, run_dirs={k: Path(c.out_dir).resolve() for k, c in configs.items()},
            report_dir=report_dir, ann_file=Path(val_set.ann_file).resolve(), img_dir=Path(val_set.img_dir).resolve(),
        )


def coco_images(results: PipelineResults):
    """The validation images of ``results``, by image id (:class:`workbench.widgets.CocoImages`)."""
    from workbench.widgets import CocoImages  # the widgets import this module

    return CocoImages(results.ann_file, results.img_dir)


def figure_saver(folder: str | Path | None):
    """``save(fig, name)``: writes ``<folder>/<name>.png`` when ``folder`` is set, else does nothing; returns ``fig``."""

    def save(fig: Figure, name: str) -> Figure:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(folder) / f"{name}.png", dpi=150, bbox_inches="tight")
        return fig

    return save


def _holds(flag: bool | None) -> str:
    return "**holds here**" if flag else ("**cannot be judged here**" if flag is None else "**does not hold here**")


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# --- 02: training the IoU predictor (Sec. 3.1) --------------------------------------------------------


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
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        gt = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)  # (G, 4)
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


def _draw_box(ax, box, **kw) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw))


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
        _draw_box(ax, row[list(EDGES)], edgecolor=cmap((row["iou"] - lo) / (1 - lo)), linewidth=1.0, alpha=0.8)
    for _, row in here.drop_duplicates("gt_id").iterrows():
        _draw_box(ax, row[[f"gt_{c}" for c in EDGES]], edgecolor="white", linewidth=3.5)
        _draw_box(ax, row[[f"gt_{c}" for c in EDGES]], edgecolor=color(2), linewidth=2.0)
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


def training_log(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``log.jsonl`` (one line per ``log_interval``) as a DataFrame indexed by iteration."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).set_index("iteration")


def plot_training_log(log: pd.DataFrame, *, title: str = "training") -> Figure:
    """Left: every loss of the log against iteration. Right: the learning rate (the warm-up and the step)."""
    fig, axes = new_figure(2, panel_size=(5.0, 3.6))
    parts = [c for c in log.columns if c.startswith("loss_")]
    losses = parts if len(parts) == 1 else ["loss", *parts]  # "loss" is their sum: shown only when there are several
    for k, name in enumerate(losses):
        axes[0, 0].plot(log.index, log[name], color="black" if name == "loss" else color(k), marker=marker(k),
                        markevery=max(1, len(log) // 10), linewidth=2.5 if name == "loss" else 1.5, label=name)
    style_axes(axes[0, 0], xlabel="iteration", ylabel="mean loss over the logging window", title=title)
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].plot(log.index, log["lr"], color=color(3), drawstyle="steps-post")
    style_axes(axes[0, 1], xlabel="iteration", ylabel="learning rate", title="schedule: warm-up, then x0.1 at 3/4")
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


def describe_iou_training(jittered: pd.DataFrame, log: pd.DataFrame, matched: pd.DataFrame, *, min_iou: float = 0.5) -> str:
    """What notebook 02 found, as Markdown, from the numbers computed there."""
    counts = np.histogram(jittered["iou"], bins=np.linspace(min_iou, 1.0, 11))[0] if len(jittered) else np.zeros(10)
    spread = (counts.max() - counts.min()) / counts.mean() if counts.mean() > 0 else float("nan")
    first, last = float(log["loss"].iloc[0]), float(log["loss"].iloc[-1])
    trained = matched[matched["iou"] >= min_iou]
    r_trained = pearson(trained["iou"], trained["iou_pred"]) if len(trained) >= 2 else float("nan")
    error = (trained["iou_pred"] - trained["iou"]).abs().mean() if len(trained) else float("nan")
    below = matched[matched["iou"] < min_iou]
    lines = [
        f"* **Training boxes** (Sec. 3.1): {len(jittered)} jittered boxes, all with IoU >= {min_iou:g}; the ten bins of "
        f"[{min_iou:g}, 1] hold {int(counts.min())} to {int(counts.max())} boxes each (spread {_fmt(100 * spread, 0)}% of the mean). "
        f"Uniform in IoU {_holds(bool(np.isfinite(spread) and spread < 0.25))}.",
        f"* **Training**: the IoU run's loss went from {first:.4f} (first logged window) to {last:.4f} "
        f"(last) over {int(log.index[-1])} iterations: training lowering the loss {_holds(last < first)}.",
        f"* **Held-out detections** ({len(matched)} raw detections of the validation images): for the {len(trained)} with true "
        f"IoU >= {min_iou:g} (the training range), Pearson r(predicted, true) = {_fmt(r_trained)}, mean |error| "
        f"{_fmt(error)}. {len(below)} detections lie below {min_iou:g}, where the IoU-Net saw no training box"
        + (f"; there it predicts {_fmt(below['iou_pred'].mean())} on average for a true {_fmt(below['iou'].mean())}." if len(below) else "."),
    ]
    return "\n".join(lines)


# --- 03 and 04: which box NMS keeps, and why ------------------------------------------------------------


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
    for image_id, rows in frame.groupby("image_id", sort=True).indices.items():
        xywh = torch.tensor(np.asarray(frame["bbox"].iloc[rows].tolist(), dtype=np.float64).reshape(-1, 4))
        det = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
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

    The survivors are ``suppress``'s own; the reasons are read off its result, not from a second NMS:
    in greedy NMS a removed box was removed by the first kept box of its class, in selection order, that
    ranks above it (higher score, or higher predicted IoU for IoU-guided NMS; ties: lower index) and
    overlaps it by more than ``iou_threshold``.

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
        suppressed), ``new_score`` (nan if suppressed), ``by`` (position of the box that suppressed it, for
        Soft-NMS the kept box before it that overlaps it most; -1 if none), ``overlap`` (IoU with ``by``),
        ``score_from`` (IoU-guided NMS: the box whose score a kept box took; else -1) and ``why`` (a sentence).
    """
    from workbench.ops.boxes import pairwise_iou
    from workbench.postprocess import suppress

    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    m = len(boxes)
    position = torch.arange(m)
    out = suppress({**{k: v for k, v in detections.items() if k in ("boxes", "scores", "labels", "ious")}, "position": position},
                   method, iou_threshold=iou_threshold, max_detections=None, **soft_nms)
    rank = np.full(m, -1)
    rank[out["position"].numpy()] = np.arange(len(out["position"]))
    new_score = np.full(m, np.nan)
    new_score[out["position"].numpy()] = out["scores"].double().numpy()
    by, overlap, score_from = np.full(m, -1), np.full(m, np.nan), np.full(m, -1)
    key = (detections["ious"] if method == "iou-nms" else scores).double().numpy()
    if method == "soft-nms":
        key = np.where(rank >= 0, new_score, -np.inf)  # Soft-NMS selects by the decayed score
    kept_mask = rank >= 0
    for label in labels.unique().tolist():
        members = np.flatnonzero(labels.numpy() == label)
        kept = members[kept_mask[members]]
        kept = kept[np.lexsort((kept, -key[kept]))]  # selection order: key descending, then index
        gone = members[~kept_mask[members]] if method != "soft-nms" else members
        if not len(kept) or not len(gone):
            continue
        iou = pairwise_iou(boxes[gone].double(), boxes[kept].double()).numpy()  # (gone, kept)
        above = (key[kept][None, :] > key[gone][:, None]) | ((key[kept][None, :] == key[gone][:, None]) & (kept[None, :] < gone[:, None]))
        if method == "soft-nms":
            candidates = np.where(above & (kept[None, :] != gone[:, None]), iou, -1.0)
            best = candidates.argmax(1)
            has = candidates[np.arange(len(gone)), best] > 0
        else:
            hits = above & (iou > iou_threshold)
            best = hits.argmax(1)  # the first kept box, in selection order, that overlaps enough
            has = hits[np.arange(len(gone)), best]
        by[gone[has]] = kept[best[has]]
        overlap[gone[has]] = iou[np.flatnonzero(has), best[has]]
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
            return "dropped: its score decayed below the score threshold"
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
    gt_boxes = {a["id"]: [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in coco_gt.dataset["annotations"]}
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
            _draw_box(ax, box, edgecolor="white", linewidth=3.5, linestyle="-")
            _draw_box(ax, box, edgecolor=colour, linewidth=2.0, linestyle=style, label=label)
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


def describe_confidence(corr, pairs: pd.DataFrame, num_nms: int) -> str:
    """What notebook 03 found, as Markdown: Fig. 2's coefficients and how often NMS kept the worse box."""
    from workbench.analysis import paper_numbers as paper

    lines = [
        f"* **Fig. 2**: over {len(corr.matched)} detections with IoU > {corr.min_iou:g} before NMS, Pearson r with the true IoU is "
        f"{_fmt(corr.r_score)} for the classification score (*paper* {paper.FIG2_PEARSON['classification']}) and "
        f"{_fmt(corr.r_iou_pred)} for the predicted IoU (*paper* {paper.FIG2_PEARSON['iou_pred']}). The predicted IoU tracking "
        f"localization better than the classification score "
        f"{_holds(None if not np.isfinite(corr.r_iou_pred - corr.r_score) else corr.r_iou_pred > corr.r_score)}.",
    ]
    if pairs.empty:
        lines.append("* **Fig. 1a**: in these images NMS never suppressed a better-localized duplicate of the box it kept.")
    else:
        picks = pairs["better_iou_pred"] > pairs["kept_iou_pred"]
        lines.append(
            f"* **Fig. 1a**: the gallery shows the {len(pairs)} largest cases of NMS keeping the worse of two duplicates (IoU gaps "
            f"{pairs['iou_gap'].min():.2f} to {pairs['iou_gap'].max():.2f}; {num_nms} boxes survive NMS in all). The IoU-Net ranks the "
            f"suppressed box higher in {int(picks.sum())} of them, i.e. IoU-guided NMS would have kept the better box there."
        )
    return "\n".join(lines)


# --- 04: NMS variants (Fig. 3, Fig. 7, Table 1) ----------------------------------------------------------


def describe_nms(positives: pd.DataFrame, recall: pd.DataFrame, table: pd.DataFrame) -> str:
    """What notebook 04 found, as Markdown, from Fig. 3's counts, Fig. 7's recall and Table 1."""
    from workbench.analysis import paper_numbers as paper

    high = positives.index[-1]
    r09 = recall.loc[recall.index[np.abs(recall.index - 0.9) < 1e-9][0]]
    nms, soft, iou = (table.loc[k] for k in ("FPN", "FPN + Soft-NMS", "FPN + IoU-NMS"))
    return "\n".join([
        f"* **Fig. 3**: positives with IoU in {high}: No-NMS {positives.loc[high, 'No-NMS']}, NMS {positives.loc[high, 'NMS']}, "
        f"IoU-NMS {positives.loc[high, 'IoU-NMS']}. IoU-guided NMS keeping more well-localized positives than NMS "
        f"{_holds(positives.loc[high, 'IoU-NMS'] > positives.loc[high, 'NMS'])}.",
        f"* **Fig. 7**: recall at IoU 0.9: No-NMS {r09['No-NMS']:.3f}, NMS {r09['NMS']:.3f}, Soft-NMS {r09['Soft-NMS']:.3f}, "
        f"IoU-NMS {r09['IoU-NMS']:.3f} (*paper* {paper.FIG7_RECALL_AT_09['No-NMS']}, {paper.FIG7_RECALL_AT_09['NMS']}, –, "
        f"{paper.FIG7_RECALL_AT_09['IoU-NMS']}). IoU-NMS recalling more than NMS at 0.9 {_holds(r09['IoU-NMS'] > r09['NMS'])}.",
        f"* **Table 1**: AP {100 * nms['AP']:.1f} (NMS), {100 * soft['AP']:.1f} (Soft-NMS), {100 * iou['AP']:.1f} (IoU-NMS); "
        f"AP90 {100 * nms['AP90']:.1f}, {100 * soft['AP90']:.1f}, {100 * iou['AP90']:.1f}. IoU-NMS improving AP90 over NMS "
        f"{_holds(iou['AP90'] > nms['AP90'])}; improving AP {_holds(iou['AP'] > nms['AP'])}; the paper's trade-off, lower AP50 "
        f"with IoU-NMS, {_holds(iou['AP50'] < nms['AP50'])}.",
    ])


# --- 05: refinement (Fig. 4, Table 2) ---------------------------------------------------------------------


def refinement_runs(output: PipelineOutput) -> dict[str, list]:
    """Fig. 4's curves as ``ap_per_iteration`` takes them: method -> detection sets for iteration 0..T.

    ``optimization (IoU-Net)``: Algorithm 2 after NMS (``nms+refine/<t>``); ``iterative regression``
    (when the pipeline ran it): the detector's regressor applied t times (``nms+regress/<t>``).
    """
    s = output.sets

    def steps(prefix: str) -> list:
        last = max((int(k.split("/")[1]) for k in s if k.startswith(prefix)), default=-1)
        return [s[f"{prefix}{t}"] for t in range(last + 1)]

    runs = {"optimization (IoU-Net)": steps("nms+refine/")}
    if any(k.startswith("nms+regress/") for k in s):
        runs["iterative regression"] = steps("nms+regress/")
    return runs


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


def describe_refinement(per_iteration: pd.DataFrame, mono: pd.DataFrame, table: pd.DataFrame, trajectories: Trajectories | None) -> str:
    """What notebook 05 found, as Markdown: Fig. 4's curves, Table 2 and the refinement record."""
    opt = mono.loc["optimization (IoU-Net)"]
    lines = [f"* **Fig. 4**: AP of optimization-based refinement goes from {100 * per_iteration[per_iteration['method'] == 'optimization (IoU-Net)']['AP'].iloc[0]:.2f} "
             f"to {100 * opt['final']:.2f} (best {100 * opt['best']:.2f} at iteration {int(opt['best_iteration'])}); "
             f"monotonic {_holds(bool(opt['monotonic']))}."]
    if "iterative regression" in mono.index:
        reg = mono.loc["iterative regression"]
        lines.append(f"* Iterative regression peaks at iteration {int(reg['best_iteration'])} ({100 * reg['best']:.2f}) and ends at "
                     f"{100 * reg['final']:.2f} (drop after the best {100 * reg['drop_after_best']:.2f}); the paper's claim that it is "
                     f"non-monotonic {_holds(not bool(reg['monotonic']))}.")
    base, refined = table.iloc[0], table.iloc[1]
    lines.append(f"* **Table 2**: refinement changes AP {100 * base['AP']:.1f} → {100 * refined['AP']:.1f} and AP90 "
                 f"{100 * base['AP90']:.1f} → {100 * refined['AP90']:.1f}; improving AP {_holds(refined['AP'] > base['AP'])}, "
                 f"AP90 {_holds(refined['AP90'] > base['AP90'])}.")
    if trajectories is not None and len(trajectories):
        matched = np.isfinite(trajectories.gt_box).all(1)
        gain = trajectories.gain[matched]
        what = ("boxes of the STAND-IN record (not an IoU-Net)" if "STAND-IN" in str(trajectories.meta.get("predictor", ""))
                else "boxes refined after IoU-NMS")
        lines.append(f"* **The record**: {len(trajectories)} {what}, {int(matched.sum())} with a ground truth: "
                     f"{int((gain > 0).sum())} gained true IoU, {int((gain < 0).sum())} lost it (mean {_fmt(gain.mean() if len(gain) else np.nan, 4)}).")
    return "\n".join(lines)


# --- 06: joint training and speed (Tables 3, 4) ----------------------------------------------------------


TABLE3_ROWS = {  # Table 3's row names (the paper's) -> pipeline set
    "ResNet-50 FPN": "nms", "ResNet-50 IoU-Net": "joint/nms", "ResNet-50 IoU-Net + IoU-NMS": "joint/iou-nms",
    "ResNet-50 IoU-Net + IoU-NMS + Refine": "joint/iou-nms+refine",
}


def mean_seconds(output: PipelineOutput) -> dict[str, float]:
    """Stage -> mean seconds per image, in pipeline order (the input of :func:`workbench.analysis.timing_table`)."""
    return {stage: float(np.mean(values)) for stage, values in output.seconds.items()}


def speed_comparison(output: PipelineOutput) -> pd.DataFrame:
    """Table 4's two columns from our stages: seconds per image of the baseline and of IoU-Net, with the paper's.

    FPN = detector + NMS. IoU-Net = the jointly trained model (backbone, heads and IoU head in one pass) +
    IoU-NMS + refinement; the joint model's refinement is not timed on its own, so that of the standalone
    IoU-Net after IoU-NMS stands in (same head, same number of boxes). Without a joint model, IoU-Net =
    detector + standalone IoU-Net (its own backbone) + IoU-NMS + refinement.
    """
    from workbench.analysis import paper_numbers as paper

    t = mean_seconds(output)
    fpn = t.get("detector (backbone + heads)", np.nan) + t.get("nms", np.nan)
    joint = "joint IoU-Net (backbone + heads + IoU)" in t
    head = t["joint IoU-Net (backbone + heads + IoU)"] if joint else t.get("detector (backbone + heads)", np.nan) + t.get("IoU-Net (predict IoU)", np.nan)
    iou_net = head + t.get("iou-nms", np.nan) + t.get("refinement (iou-nms)", np.nan)
    table = pd.DataFrame({
        "ours (s / image)": [fpn, iou_net],
        "paper (s / image, Titan X)": [paper.TABLE4_SECONDS_PER_IMAGE["FPN"], paper.TABLE4_SECONDS_PER_IMAGE["IoU-Net"]],
    }, index=pd.Index(["FPN", "IoU-Net" + ("" if joint else " (standalone)")], name="model"))
    table.loc["IoU-Net / FPN"] = table.iloc[1] / table.iloc[0]
    return table


def describe_joint_and_speed(table3: pd.DataFrame | None, speed: pd.DataFrame, device: str) -> str:
    """What notebook 06 found, as Markdown."""
    lines = []
    if table3 is None:
        lines.append("* **Table 3**: no jointly trained model in this run (`reproduce --no-joint`).")
    else:
        base, joint, nms, refine = (table3.loc[k] for k in TABLE3_ROWS)
        lines.append(f"* **Table 3**: AP {100 * base['AP']:.1f} (detector alone), {100 * joint['AP']:.1f} (joint, NMS), "
                     f"{100 * nms['AP']:.1f} (+ IoU-NMS), {100 * refine['AP']:.1f} (+ refinement). Joint training improving AP over "
                     f"the detector alone {_holds(joint['AP'] > base['AP'])}; IoU-NMS + refinement improving it further "
                     f"{_holds(refine['AP'] > joint['AP'])}.")
    ratio = speed.loc["IoU-Net / FPN"]
    lines.append(f"* **Table 4** ({device}): {speed.iloc[0, 0]:.3f} s per image for FPN + NMS, {speed.iloc[1, 0]:.3f} s for "
                 f"{speed.index[1]}: {ratio.iloc[0]:.2f}x (*paper* {ratio.iloc[1]:.2f}x on a Titan X). IoU-Net adding at most "
                 f"30% to the baseline's time (the paper: {100 * (ratio.iloc[1] - 1):.0f}%) {_holds(ratio.iloc[0] <= 1.3)}.")
    return "\n".join(lines)
