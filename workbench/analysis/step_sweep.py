"""Algorithm 2's step chosen by measurement on held-out images: both readings of ``scale(grad, b)``
(``"width"``: λ·w·∂IoU/∂x, ``"log"``: λ·w²·∂IoU/∂x; see :mod:`workbench.refine`) over a small λ
grid, each scored by COCO AP and AP90 after ``T`` steps from NMS, on the ``shapes`` ``tune`` split
(:func:`workbench.data.shapes.prepare_shapes_tune`: never trained on, never reported).

    python -m workbench tune-step --config shapes --images 100   # experiments/step_sweep_shapes.{json,md}

    starts = nms_starts(tune, detector, iou_net)        # detector, NMS, IoU-Net features: once per image
    table = sweep(starts, iou_net, tune.coco, tune.label_to_cat_id)   # one row per (reading, λ)
    table.loc[choose(table)]                            # the setting RULE picks

The starts are the pipeline's ``nms`` set (same settings, same order); each grid point then costs only
the refinement, run as the pipeline runs it (``refine_top`` boxes, ``T``, Ω1, Ω2 of ``PipelineSettings``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from workbench.models import FeatureBatch, same_features, to_coco_results
from workbench.pipeline import PipelineSettings, detect_image, refine_boxes
from workbench.postprocess import suppress
from workbench.refine import CONVERGED, DEGENERATED, RUNNING, STEP_SCALINGS, Refinement

from .cocoeval import coco_ap
from .iterations import is_monotonic

GRID: dict[str, tuple[float, ...]] = {"log": (0.02, 0.035, 0.05, 0.07, 0.1), "width": (0.5, 1.0, 2.0)}
"""λ values per reading (the grid of ``experiments/step_sweep_shapes.json``). The paper's λ = 0.5 is a "width"
step (pixels ∝ w); a "log" step moves ∝ w², so its λ is about ``width λ / w``. Larger steps were left out
after they wrecked AP90 on the first probes (width λ = 4: AP90 1.4 on 100 val images; log λ = 0.2: 0 on 4
tune images), as log λ = 0.1 does here."""
AP90_TIE = 0.002  # AP90 differences below 0.2 AP points are within evaluation noise here: a tie
RULE = (f"highest AP90 after T steps; settings within {AP90_TIE * 100:.1f} AP points of the best AP90 are tied, "
        "and the highest AP among them wins (then the earlier row)")


@dataclass
class Start:
    """One image's refinement input."""

    image_id: int
    detections: dict[str, Tensor]  # the refine_top highest-scored NMS boxes (Tensor[K, 4], (x0, y0, x1, y1) px), scores, labels
    features: FeatureBatch  # the IoU-Net's features of the image


def nms_starts(dataset, detector: nn.Module, iou_net: nn.Module, settings: PipelineSettings | None = None,
               device: torch.device | str = "cpu") -> list[Start]:
    """Detector, NMS and IoU-Net features of every image of ``dataset``, as :func:`workbench.pipeline.run_pipeline`
    computes them (``score_thresh``, ``raw_max_detections``, ``nms_threshold``, ``max_detections``, ``refine_top``)."""
    s = settings or PipelineSettings()
    share = same_features(detector, iou_net)
    starts = []
    for i in tqdm(range(len(dataset)), desc="detector + NMS + IoU-Net features", unit="img"):
        image, target = dataset[i]
        image = image.to(device)
        raw, _, features = detect_image(image, detector, iou_net, s, share, predict_ious=False)
        nms = suppress(raw, "nms", iou_threshold=s.nms_threshold, max_detections=s.max_detections)
        top = {k: nms[k][: s.refine_top] for k in ("boxes", "scores", "labels")}
        starts.append(Start(int(target["image_id"]), top, features))
    return starts


def refine(start: Start, iou_net: nn.Module, settings: PipelineSettings) -> Refinement:
    """Algorithm 2 on one image's start boxes with ``settings``' reading, λ, ``T``, Ω1 and Ω2."""
    return refine_boxes(iou_net, start.features, start.detections["boxes"], start.detections["labels"], settings)


def _coco(starts: list[Start], boxes: list[Tensor], label_to_cat_id: dict[int, int]) -> list[dict]:
    """COCO results of ``boxes`` (one tensor per start) with the starts' scores and labels."""
    dets = [{"boxes": b.detach().cpu(), "scores": st.detections["scores"].cpu(), "labels": st.detections["labels"].cpu()}
            for st, b in zip(starts, boxes)]
    return to_coco_results(dets, [st.image_id for st in starts], label_to_cat_id)


def grid_points(grid: dict[str, tuple[float, ...]], settings: PipelineSettings) -> list[tuple[str, float]]:
    """``(reading, λ)`` of every grid point, plus ``settings``' own when the grid lacks it (always measured).

    Raises:
        ValueError: a reading not in ``STEP_SCALINGS`` or a λ that is not > 0 (named).
    """
    points = [(reading, float(lam)) for reading, lams in grid.items() for lam in lams]
    for reading, lam in points:
        if reading not in STEP_SCALINGS or not lam > 0:
            raise ValueError(f"grid: expected readings {STEP_SCALINGS} with step sizes > 0, got {reading!r}: {lam}")
    default = (settings.refine_step_scaling, float(settings.refine_step_size))
    return points if default in points else [*points, default]


def sweep(starts: list[Start], iou_net: nn.Module, coco_gt, label_to_cat_id: dict[int, int],
          grid: dict[str, tuple[float, ...]] = GRID, settings: PipelineSettings | None = None,
          on_row: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Refine ``starts`` at every grid point and evaluate each step with pycocotools.

    ``on_row(table so far)`` is called after each grid point (e.g. to save partial results of a long sweep).

    Returns:
        DataFrame, one row per ``(reading, λ)``: ``AP``, ``AP50``, ``AP90`` after ``T`` steps (fractions),
        ``AP per step``/``AP90 per step`` (lists, step 0 = NMS), ``AP monotonic``/``AP90 monotonic``,
        ``median move (px)`` (per box, its largest edge displacement), ``stops`` (boxes that ran all T
        steps, stopped by Ω1, by Ω2) and ``default`` (``settings``' own reading and λ).
    """
    s = settings or PipelineSettings()
    nms = coco_ap(coco_gt, _coco(starts, [st.detections["boxes"] for st in starts], label_to_cat_id))
    rows = []
    for reading, lam in grid_points(grid, s):
        point = dataclasses.replace(s, refine_step_scaling=reading, refine_step_size=lam)
        results = [refine(st, iou_net, point) for st in tqdm(starts, desc=f"refine {reading} λ={lam:g}", unit="img")]
        steps = [coco_ap(coco_gt, _coco(starts, [r.trajectory[t] for r in results], label_to_cat_id))
                 for t in range(1, s.refine_iterations + 1)]
        ap, ap90 = [nms["AP"], *(m["AP"] for m in steps)], [nms["AP90"], *(m["AP90"] for m in steps)]
        moves = torch.cat([(r.trajectory[-1] - r.trajectory[0]).abs().amax(dim=1) for r in results])  # (B,) px
        reasons = torch.cat([r.stop_reason for r in results])
        last = steps[-1] if steps else nms
        rows.append({"reading": reading, "λ": lam, "AP": last["AP"], "AP50": last["AP50"], "AP90": last["AP90"],
                     "AP per step": ap, "AP90 per step": ap90, "AP monotonic": is_monotonic(ap),
                     "AP90 monotonic": is_monotonic(ap90),
                     "median move (px)": float(moves.median()) if len(moves) else float("nan"),
                     "stops": [int((reasons == r).sum()) for r in (RUNNING, CONVERGED, DEGENERATED)],
                     "default": (reading, lam) == (s.refine_step_scaling, float(s.refine_step_size))})
        table = pd.DataFrame(rows)
        table.attrs["nms"] = nms  # the starting point's AP, AP50 ... AP90
        if on_row is not None:
            on_row(table)
    return table


def choose(table: pd.DataFrame) -> int:
    """Index of the row :data:`RULE` picks from a table with ``AP`` and ``AP90`` columns (fractions)."""
    if table.empty or table[["AP", "AP90"]].isna().any().any():
        raise ValueError("choose: table must have at least one row and finite AP and AP90 in every row")
    tied = table[table["AP90"] >= table["AP90"].max() - AP90_TIE]
    return tied["AP"].idxmax()


def markdown(table: pd.DataFrame, meta: dict) -> str:
    """The sweep as Markdown: what was measured on what, the table (AP x 100), the rule and the choice."""
    nms, best = table.attrs["nms"], table.loc[choose(table)]
    view = pd.DataFrame({
        "reading": table["reading"], "λ": table["λ"], "AP": 100 * table["AP"], "AP50": 100 * table["AP50"],
        "AP90": 100 * table["AP90"], "AP90 - NMS": 100 * (table["AP90"] - nms["AP90"]),
        "monotonic AP / AP90": [f"{'yes' if a else 'no'} / {'yes' if b else 'no'}"
                                for a, b in zip(table["AP monotonic"], table["AP90 monotonic"])],
        "median move (px)": table["median move (px)"], "stops T / Ω1 / Ω2": [" / ".join(map(str, s)) for s in table["stops"]],
        "": ["**chosen**" * (i == best.name) + " (current default)" * bool(d) for i, d in zip(table.index, table["default"])],
    })
    m = meta
    return "\n".join([
        f"# Refinement step sweep: {m['dataset']} `{m['split']}` split", "",
        *([] if m["complete"] else ["**Partial: grid points still running.**", ""]),
        f"{m['images']} held-out images ({m['boxes']} boxes, `{m['data_folder']}`; never trained on or reported), "
        f"Algorithm 2 from NMS (top {m['settings']['refine_top']} boxes, T = {m['settings']['refine_iterations']}, "
        f"Ω1 = {m['settings']['refine_early_stop']}, Ω2 = {m['settings']['refine_degeneration']}). Models: "
        + ", ".join(f"{k} `{v['checkpoint']}`" for k, v in m["models"].items())
        + f". {m['date']}, {m['machine']}, {m['seconds']:.0f} s.", "",
        *(["Merged from runs on the same images and models: "
           + "; ".join(f"`{r['command']}` ({r['date']})" for r in m["runs"]) + ".", ""] if m.get("runs") else []),
        f"NMS (step 0): AP {100 * nms['AP']:.2f}, AP50 {100 * nms['AP50']:.2f}, AP90 {100 * nms['AP90']:.2f}.", "",
        view.to_markdown(index=False, floatfmt=("", "g", ".2f", ".2f", ".2f", ".2f", "", ".2f", "", "")), "",
        f"Rule: {RULE}.", "",
        f"Chosen: **{best['reading']} reading, λ = {best['λ']:g}** (AP {100 * best['AP']:.2f}, AP90 {100 * best['AP90']:.2f}); "
        + ("this is the current default." if best["default"] else
           f"the current default ({m['current_default']['refine_step_scaling']}, λ = {m['current_default']['refine_step_size']:g}) "
           "is not."), ""])


def tune_step(opts, num_images: int = 100, out_dir: str | Path = "experiments",
              grid: dict[str, tuple[float, ...]] = GRID) -> tuple[pd.DataFrame, dict]:
    """The sweep for ``reproduce(opts)``'s trained models on ``num_images`` tune images, written to
    ``<out_dir>/step_sweep_<preset>.{json,md}``; returns the table and the JSON's metadata.

    ``opts``: :class:`workbench.reproduce.ReproduceOptions` (``make run``'s are ``ReproduceOptions(preset=...,
    joint=False)``); its models are trained first when missing, as :func:`~workbench.reproduce.reproduce` does.
    """
    from workbench.config import apply_overrides
    from workbench.reproduce import load_model, stages, trained
    from workbench.train import build_dataset

    start = time.perf_counter()
    grid_points(grid, opts.settings)  # a bad grid fails now, not after the detector has run on every image
    plan = stages(opts)
    tune = build_dataset(apply_overrides(plan.val, ["data.split=tune", f"data.options.num_tune={num_images}"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = {kind: trained(plan.train[kind]) for kind in ("detector", "iou")}
    detector, iou_net = (load_model(ckpt[k], device) for k in ("detector", "iou"))
    starts = nms_starts(tune, detector, iou_net, opts.settings, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(table: pd.DataFrame, complete: bool = False) -> dict:
        meta = _metadata(opts, tune, ckpt, grid, table, device, time.perf_counter() - start, complete)
        rows = json.loads(table.to_json(orient="records", force_ascii=False))
        (out / f"step_sweep_{opts.preset}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
        (out / f"step_sweep_{opts.preset}.md").write_text(markdown(table, meta))
        return meta

    table = sweep(starts, iou_net, tune.coco, tune.label_to_cat_id, grid, opts.settings, on_row=write)
    return table, write(table, complete=True)


def _metadata(opts, tune, ckpt: dict[str, Path], grid: dict[str, tuple[float, ...]], table: pd.DataFrame,
              device: torch.device, seconds: float, complete: bool) -> dict:
    """What a sweep file says besides its rows: data, models, settings, rule, choice, date, machine."""
    from workbench.train import load_checkpoint

    best = table.loc[choose(table)]
    s = opts.settings
    return {
        "complete": complete,  # False while grid points are still running (partial results)
        "dataset": opts.preset, "split": "tune", "data_folder": Path(tune.ann_file).parents[1].name,
        "images": len(tune), "boxes": len(tune.coco.dataset["annotations"]),
        "models": {k: {"checkpoint": str(p), "fingerprint": load_checkpoint(p, mmap=True)["fingerprint"]} for k, p in ckpt.items()},
        "settings": s.as_dict(), "grid": {k: list(v) for k, v in grid.items()}, "rule": RULE,
        "current_default": {"refine_step_scaling": s.refine_step_scaling, "refine_step_size": s.refine_step_size},
        "chosen": {"refine_step_scaling": best["reading"], "refine_step_size": float(best["λ"])},
        "chosen_is_current_default": bool(best["default"]), "nms": table.attrs["nms"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"CPU ({os.cpu_count()} cores, {platform.machine()}, torch threads {torch.get_num_threads()})"),
        "torch": torch.__version__, "seconds": seconds,
    }
