"""What the numbers say, in sentences: each notebook's closing summary and the speed comparison.

``report.md`` (:func:`workbench.reproduce.write_report`) and the notebooks print the same sentences.
Whether one of the paper's claims holds is never decided here: every verdict is the one
:func:`workbench.analysis.claims.judge` gave from a paired bootstrap, and its sentence is
:func:`workbench.analysis.claims.verdict_text`'s, so a verdict is written in exactly one place.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from workbench.trajectories import Trajectories

from . import paper_numbers as paper
from .claims import ClaimsResult, verdict_text
from .correlation import LocalizationCorrelation, pearson
from .experiments import TABLE1_ROWS
from .pooling import PoolingComparison
from .recall import recall_at


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when it is missing or not finite."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def table4_speed(speed: pd.DataFrame) -> str:
    """Table 4 as a ratio beside the paper's (``speed``: :func:`timing.speed_comparison`); no verdict: one
    timing on a shared machine has no interval."""
    ratio = speed.loc["IoU-Net / FPN"]
    return (f"Here IoU-Net takes {ratio.iloc[0]:.2f}x the baseline's time per image; the paper's Titan X figures give "
            f"{ratio.iloc[1]:.2f}x (+{100 * (ratio.iloc[1] - 1):.0f}%).")


# --- each notebook's closing summary ------------------------------------------------------------------


def describe_pooling(comparison: PoolingComparison, brute: float, sweep: pd.DataFrame, gradients: dict[str, pd.DataFrame]) -> str:
    """What notebook 01 found, as Markdown: the three pooled values of one bin (Fig. 6) beside a brute-force
    integral, how Eq. 4 and finite differences agree with autograd (``gradients``: name ->
    :func:`~workbench.analysis.pooling_gradient.gradient_table`), and how many values RoI Pooling took
    while an edge slid (``sweep``: :func:`~workbench.analysis.pooling_gradient.pooling_sweep`)."""
    lines = [f"* **Fig. 6**: pooled values of the bin: RoI Pooling {comparison.roi_pool:.4f}, RoI Align {comparison.roi_align:.4f}, "
             f"PrRoI Pooling {comparison.prroi_pool:.4f} (brute-force integral {brute:.4f})."]
    for name, table in gradients.items():
        autograd = table.iloc[:, 0].to_numpy()
        lines.append(f"* **Eq. 4**, {name}: max |Eq. 4 - autograd| = {np.abs(table.iloc[:, 1] - autograd).max():.1e}, "
                     f"max |finite difference - autograd| = {np.abs(table.iloc[:, 2] - autograd).max():.1e}.")
    lines.append(f"* **Sliding `{sweep.index.name}`** over {len(sweep)} positions, RoI Pooling took "
                 f"{sweep['RoI Pooling'].nunique()} distinct values.")
    return "\n".join(lines)


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
        f"[{min_iou:g}, 1] hold {int(counts.min())} to {int(counts.max())} boxes each (spread {fmt(100 * spread, 0)}% of the "
        f"mean; the paper samples uniformly in IoU).",
        f"* **Training**: the IoU run's loss went from {first:.4f} (first logged window) to {last:.4f} "
        f"(last) over {int(log.index[-1])} iterations.",
        f"* **Held-out detections** ({len(matched)} raw detections of the validation images): for the {len(trained)} with true "
        f"IoU >= {min_iou:g} (the training range), Pearson r(predicted, true) = {fmt(r_trained)}, mean |error| "
        f"{fmt(error)}. {len(below)} detections lie below {min_iou:g}, where the IoU-Net saw no training box"
        + (f"; there it predicts {fmt(below['iou_pred'].mean())} on average for a true {fmt(below['iou'].mean())}." if len(below) else "."),
    ]
    return "\n".join(lines)


def describe_confidence(corr: LocalizationCorrelation, pairs: pd.DataFrame, num_nms: int, verdicts: ClaimsResult) -> str:
    """What notebook 03 found, as Markdown: Fig. 2's coefficients (judged in ``verdicts``,
    :func:`~workbench.analysis.claims.paper_claims`) and how often NMS kept the worse box."""
    lines = [
        f"* **Fig. 2**: over {len(corr.matched)} detections with IoU > {corr.min_iou:g} before NMS, Pearson r with the true IoU is "
        f"{fmt(corr.r_score)} for the classification score (*paper* {paper.FIG2_PEARSON['classification']}) and "
        f"{fmt(corr.r_iou_pred)} for the predicted IoU (*paper* {paper.FIG2_PEARSON['iou_pred']}). {verdict_text(verdicts, 'Fig. 2')}",
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


def describe_nms(positives: pd.DataFrame, recall: pd.DataFrame, table: pd.DataFrame, verdicts: ClaimsResult) -> str:
    """What notebook 04 found, as Markdown, from Fig. 3's counts, Fig. 7's recall and Table 1, with their verdicts."""
    high = positives.index[-1]
    r09 = recall_at(recall, 0.9)
    nms, soft, iou = (table.loc[row] for row in TABLE1_ROWS)
    return "\n".join([
        f"* **Fig. 3**: positives with IoU in {high}: No-NMS {positives.loc[high, 'No-NMS']}, NMS {positives.loc[high, 'NMS']}, "
        f"IoU-NMS {positives.loc[high, 'IoU-NMS']}. {verdict_text(verdicts, 'Fig. 3')}",
        f"* **Fig. 7**: recall at IoU 0.9: No-NMS {r09['No-NMS']:.3f}, NMS {r09['NMS']:.3f}, Soft-NMS {r09['Soft-NMS']:.3f}, "
        f"IoU-NMS {r09['IoU-NMS']:.3f} (*paper* {paper.FIG7_RECALL_AT_09['No-NMS']}, {paper.FIG7_RECALL_AT_09['NMS']}, –, "
        f"{paper.FIG7_RECALL_AT_09['IoU-NMS']}). {verdict_text(verdicts, 'Fig. 7')}",
        f"* **Table 1**: AP {100 * nms['AP']:.1f} (NMS), {100 * soft['AP']:.1f} (Soft-NMS), {100 * iou['AP']:.1f} (IoU-NMS); "
        f"AP90 {100 * nms['AP90']:.1f}, {100 * soft['AP90']:.1f}, {100 * iou['AP90']:.1f}. {verdict_text(verdicts, 'Table 1')}",
    ])


def describe_refinement(per_iteration: pd.DataFrame, mono: pd.DataFrame, table: pd.DataFrame, trajectories: Trajectories | None,
                        verdicts: ClaimsResult) -> str:
    """What notebook 05 found, as Markdown: Fig. 4's curves, Table 2 and the refinement record, with the verdicts."""
    opt = mono.loc["optimization (IoU-Net)"]
    start = per_iteration[per_iteration["method"] == "optimization (IoU-Net)"]["AP"].iloc[0]
    lines = [f"* **Fig. 4**: AP of optimization-based refinement goes from {100 * start:.2f} to {100 * opt['final']:.2f} "
             f"(best {100 * opt['best']:.2f} at iteration {int(opt['best_iteration'])})."]
    if "iterative regression" in mono.index:
        reg = mono.loc["iterative regression"]
        lines.append(f"* Iterative regression peaks at iteration {int(reg['best_iteration'])} ({100 * reg['best']:.2f}) and ends at "
                     f"{100 * reg['final']:.2f} (drop after the best {100 * reg['drop_after_best']:.2f}).")
    lines.append(f"* {verdict_text(verdicts, 'Fig. 4')}")
    base, refined = table.loc["FPN"], table.loc["FPN + Refinement"]
    lines.append(f"* **Table 2**: refinement changes AP {100 * base['AP']:.1f} → {100 * refined['AP']:.1f} and AP90 "
                 f"{100 * base['AP90']:.1f} → {100 * refined['AP90']:.1f}. {verdict_text(verdicts, 'Table 2')}")
    if trajectories is not None and len(trajectories):
        matched = np.isfinite(trajectories.gt_box).all(1)
        gain = trajectories.gain[matched]
        what = ("boxes of the STAND-IN record (not an IoU-Net)" if "STAND-IN" in str(trajectories.meta.get("predictor", ""))
                else "boxes refined after IoU-NMS")
        lines.append(f"* **The record**: {len(trajectories)} {what}, {int(matched.sum())} with a ground truth: "
                     f"{int((gain > 0).sum())} gained true IoU, {int((gain < 0).sum())} lost it (mean {fmt(gain.mean() if len(gain) else np.nan, 4)}).")
    return "\n".join(lines)


def describe_joint_and_speed(table3: pd.DataFrame | None, speed: pd.DataFrame, device: str, verdicts: ClaimsResult) -> str:
    """What notebook 06 found, as Markdown: Table 3 (``None``: no joint model) with its verdicts, and Table 4's ratio.

    ``table3``'s rows are those of :func:`~workbench.analysis.experiments.table3_rows`, in that order.
    """
    lines = []
    if table3 is None:
        lines.append("* **Table 3**: no jointly trained model in this run (`reproduce --no-joint`).")
    else:
        base, joint, nms, refine = (row for _, row in table3.iterrows())
        lines.append(f"* **Table 3**: AP {100 * base['AP']:.1f} (detector alone), {100 * joint['AP']:.1f} (joint, NMS), "
                     f"{100 * nms['AP']:.1f} (+ IoU-NMS), {100 * refine['AP']:.1f} (+ refinement). {verdict_text(verdicts, 'Table 3')}")
    lines.append(f"* **Table 4** ({device}): {speed.iloc[0, 0]:.3f} s per image for FPN + NMS, {speed.iloc[1, 0]:.3f} s for "
                 f"{speed.index[1]}. {table4_speed(speed)}")
    return "\n".join(lines)
