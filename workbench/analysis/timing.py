"""Paper Table 4: per-stage inference time as a table, and the paper's two columns (FPN vs IoU-Net) from
the pipeline's stage clocks. Formatting only; measure elsewhere (``workbench.pipeline``, ``benchmarks/``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import paper_numbers as paper

if TYPE_CHECKING:  # the pipeline (models, training) is heavy to import; only its output's type is needed
    from workbench.pipeline import PipelineOutput


def timing_table(stages: Mapping[str, float]) -> pd.DataFrame:
    """Per-stage seconds per image, with milliseconds, share of the total and a ``total`` row.

    Args:
        stages: stage name (e.g. ``"backbone"``, ``"rpn"``, ``"iou_nms"``, ``"refine"``) -> mean
            seconds per image, finite and >= 0, in pipeline order.

    Returns:
        DataFrame indexed by stage (then ``"total"``) with ``seconds_per_image``, ``ms_per_image``
        and ``share`` (fraction of the total; nan when the total is 0).
    """
    for name, seconds in stages.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"stage {name!r}: seconds per image must be a finite number >= 0, got {seconds!r}")
    if "total" in stages:
        raise ValueError("'total' is added by timing_table; do not pass it as a stage")
    seconds = pd.Series({**stages}, dtype="float64")
    total = float(seconds.sum())
    seconds["total"] = total
    table = pd.DataFrame({
        "seconds_per_image": seconds,
        "ms_per_image": seconds * 1e3,
        "share": seconds / total if total > 0 else float("nan"),
    })
    table.index.name = "stage"
    return table


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
