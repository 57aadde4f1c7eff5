"""Paper Table 4: per-stage inference time as a table. Formatting only; measure elsewhere (``benchmarks/``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd


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
