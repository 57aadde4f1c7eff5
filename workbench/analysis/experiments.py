"""Which of the pipeline's detection sets each of the paper's figures and tables compares.

``report.md`` (:func:`workbench.reproduce.write_report`) and the notebooks build every figure and
table from these, so they compare the same sets under the same row names. Set names are those of
:class:`workbench.pipeline.PipelineOutput` ``.sets``: ``raw`` (before NMS), ``nms``, ``soft-nms``,
``iou-nms``, ``nms+refine/<t>`` (Algorithm 2 after NMS, ``t`` steps), ``nms+regress/<t>``
(iterative regression), ``joint/...`` (the jointly trained model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pipeline (models, training) is heavy to import; only its output's type is needed
    from workbench.pipeline import PipelineOutput

FIG3_SETS = {"No-NMS": "raw", "NMS": "nms", "IoU-NMS": "iou-nms"}
"""Fig. 3 (positives per IoU bin): curve name -> set."""
FIG7_SETS = {"No-NMS": "raw", "NMS": "nms", "Soft-NMS": "soft-nms", "IoU-NMS": "iou-nms"}
"""Fig. 7 (recall vs IoU threshold): curve name -> set."""
TABLE1_ROWS = {"FPN": "nms", "FPN + Soft-NMS": "soft-nms", "FPN + IoU-NMS": "iou-nms"}
"""Table 1 (NMS variants): the paper's row name -> set."""
TABLE3_ROWS = {
    "ResNet-50 FPN": "nms", "ResNet-50 IoU-Net": "joint/nms", "ResNet-50 IoU-Net + IoU-NMS": "joint/iou-nms",
    "ResNet-50 IoU-Net + IoU-NMS + Refine": "joint/iou-nms+refine",
}
"""Table 3 (joint training): the paper's row name -> set; the paper's rows are ResNet-50 ones."""
BACKBONE_NAMES = {"mobilenet_v2": "MobileNetV2", "resnet50": "ResNet-50"}
"""How Table 3's row names spell each ``ModelConfig.backbone``."""


def table3_paper_names(backbone: str) -> dict[str, str]:
    """Table 3's rows named after the backbone actually used: our row name -> the paper's row it stands for.

    Args:
        backbone: ``ModelConfig.backbone`` of the run (``"mobilenet_v2"``: ``"MobileNetV2 FPN"``, ...).
    """
    if backbone not in BACKBONE_NAMES:
        raise ValueError(f"backbone: expected one of {sorted(BACKBONE_NAMES)}, got {backbone!r}")
    return {row.replace("ResNet-50", BACKBONE_NAMES[backbone], 1): row for row in TABLE3_ROWS}


def table3_rows(backbone: str) -> dict[str, str]:
    """Table 3 as the run has it: our row name (:func:`table3_paper_names`) -> set."""
    return {ours: TABLE3_ROWS[row] for ours, row in table3_paper_names(backbone).items()}


def select(sets: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """``{row: sets[set name]}`` for ``names`` (row -> set name), e.g. ``select(output.sets, TABLE1_ROWS)``."""
    missing = sorted(set(names.values()) - set(sets))
    if missing:
        raise KeyError(f"the pipeline output has no detection sets {missing} (it has {sorted(sets)})")
    return {row: sets[name] for row, name in names.items()}


def _last_step(sets: Mapping[str, Any], prefix: str) -> int:
    """The largest ``t`` of the sets named ``<prefix><t>``; -1 if there are none."""
    return max((int(k[len(prefix):]) for k in sets if k.startswith(prefix)), default=-1)


def table2_rows(sets: Mapping[str, Any]) -> dict[str, str]:
    """Table 2 (refinement): the paper's row name -> set; refinement after its last step ``T``."""
    return {"FPN": "nms", "FPN + Refinement": f"nms+refine/{_last_step(sets, 'nms+refine/')}"}


def refinement_runs(output: PipelineOutput) -> dict[str, list]:
    """Fig. 4's curves as ``ap_per_iteration`` takes them: method -> detection sets for iteration 0..T.

    ``optimization (IoU-Net)``: Algorithm 2 after NMS (``nms+refine/<t>``); ``iterative regression``
    (when the pipeline ran it): the detector's regressor applied t times (``nms+regress/<t>``).
    """
    s = output.sets
    runs = {}
    for method, prefix in (("optimization (IoU-Net)", "nms+refine/"), ("iterative regression", "nms+regress/")):
        last = _last_step(s, prefix)
        if last >= 0 or method == "optimization (IoU-Net)":
            runs[method] = [s[f"{prefix}{t}"] for t in range(last + 1)]
    return runs
