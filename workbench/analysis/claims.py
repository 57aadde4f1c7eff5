"""The paper's claims, each judged on our data by one rule, and the sentences that state the verdicts.

A claim compares a statistic of our method with a baseline's on the same validation images (e.g.
AP90 after IoU-guided NMS vs after NMS). Its difference gets a 95% interval from a paired bootstrap
over images (:mod:`workbench.analysis.bootstrap`) and :func:`judge` gives the verdict:

* ``holds``: the interval excludes zero on the side the paper claims;
* ``does not hold``: it excludes zero on the other side;
* ``inconclusive``: it includes zero (or the statistic is undefined here).

``report.md``, ``numbers.json``, ``reports/index.md`` and the notebooks take their verdicts and
verdict sentences from this module (:func:`sentence`, :func:`verdict_words`) and nowhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pycocotools.coco import COCO

from . import paper_numbers as paper
from .bootstrap import REPLICATES, Difference, PerImageMatches, ap_replicates, difference, image_sums, pearson_difference, per_image_matches, ratio_difference, resample_weights
from .correlation import localization_correlation
from .experiments import TABLE1_ROWS, TABLE3_ROWS, table2_rows
from .matching import best_iou_per_ground_truth
from .positives import positive_detections

if TYPE_CHECKING:  # the pipeline (models, training) is heavy to import; only its output's type is needed
    from workbench.pipeline import PipelineOutput

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
RULE = (f"Each claim compares our method with its baseline on the same validation images; the 95% interval of the "
        f"difference comes from resampling the images ({REPLICATES} paired bootstrap replicates). A claim holds only when "
        f"the interval excludes zero on the paper's side, does not hold when it excludes zero on the other side, and is "
        f"inconclusive otherwise.")
"""The rule :func:`judge` applies, in words, for the reports."""


def judge(ci95: Sequence[float], direction: int = 1) -> str:
    """The verdict on a difference ``ours - baseline`` from its 95% interval ``(lo, hi)``.

    Args:
        ci95: lower and upper end of the interval; ``nan`` ends mean the statistic is undefined.
        direction: ``+1`` when the paper claims ``ours > baseline``, ``-1`` when ``ours < baseline``.

    Returns:
        :data:`HOLDS` when the interval lies strictly on the paper's side of zero,
        :data:`DOES_NOT_HOLD` when strictly on the other side, :data:`INCONCLUSIVE` otherwise.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    lo, hi = (float(v) * direction for v in ci95)
    lo, hi = min(lo, hi), max(lo, hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if lo > 0:
        return HOLDS
    if hi < 0:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One judged claim: the record ``numbers.json`` lists under ``"claims"``.

    ``ours``, ``baseline``, ``delta = ours - baseline`` and ``ci95`` are in the metric's own units
    (AP and recall as fractions, Pearson r, counts of boxes); ``verdict`` is one of :data:`VERDICTS`.
    """

    claim: str
    metric: str
    ours: float
    baseline: float
    delta: float
    ci95: tuple[float, float]
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def as_dict(self) -> dict[str, Any]:
        """The JSON record ``{"claim", "metric", "ours", "baseline", "delta", "ci95": [lo, hi], "verdict"}``."""
        return {**asdict(self), "ci95": [float(v) for v in self.ci95]}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Claim":
        return cls(**{**record, "ci95": tuple(record["ci95"])})


@dataclass(frozen=True)
class ClaimSpec:
    """A claim of the paper: what is compared, in which direction, and the paper's own two numbers."""

    key: str  # stable name, e.g. "iou-nms-ap90"
    claim: str  # the statement, e.g. "IoU-guided NMS improves AP90 over NMS (Table 1)"
    metric: str  # an AP metric ("AP", "AP90", ...) or one of the names below
    ours: str  # detection set of our method (PipelineOutput.sets; Pearson: "raw" and its iou_pred)
    baseline: str  # detection set of the baseline (Pearson: "raw" and its score)
    paper: tuple[float, float] | str | None = None  # the paper's (ours, baseline) in its printed units, or words
    direction: int = 1  # +1: the paper claims ours > baseline


PEARSON, RECALL_09, POSITIVES_09, AP_STEP, AP_FINAL_VS_BEST = (
    "Pearson r with true IoU", "recall at IoU 0.9", "positives with IoU >= 0.9", "smallest AP change per step",
    "AP: final vs regression's best")

_T1, _T3 = TABLE1_ROWS, TABLE3_ROWS


def _paper_ap(table: Mapping[str, Mapping[str, float]], ours: str, base: str, metric: str) -> tuple[float, float]:
    return table[ours][metric], table[base][metric]


def claim_specs(sets: Mapping[str, Any]) -> list[ClaimSpec]:
    """The paper's claims that ``sets`` (:attr:`PipelineOutput.sets` names) can test, in reading order."""
    t2 = table2_rows(sets)
    specs = [
        ClaimSpec("fig2-pearson", "The predicted IoU tracks localization better than the classification score (Fig. 2)",
                  PEARSON, "raw", "raw", (paper.FIG2_PEARSON["iou_pred"], paper.FIG2_PEARSON["classification"])),
        ClaimSpec("fig3-positives", "IoU-guided NMS keeps more well-localized positives than NMS (Fig. 3)",
                  POSITIVES_09, _T1["FPN + IoU-NMS"], _T1["FPN"]),
        ClaimSpec("fig7-recall", "IoU-guided NMS recalls more objects at IoU 0.9 than NMS (Fig. 7)", RECALL_09,
                  _T1["FPN + IoU-NMS"], _T1["FPN"], (paper.FIG7_RECALL_AT_09["IoU-NMS"], paper.FIG7_RECALL_AT_09["NMS"])),
    ]
    for metric in ("AP", "AP90"):
        specs.append(ClaimSpec(f"iou-nms-{metric.lower()}", f"IoU-guided NMS improves {metric} over NMS (Table 1)", metric,
                               _T1["FPN + IoU-NMS"], _T1["FPN"], _paper_ap(paper.TABLE1_NMS, "FPN + IoU-NMS", "FPN", metric)))
    specs.append(ClaimSpec("iou-nms-ap50", "IoU-guided NMS costs some AP50 (Table 1, the paper's trade-off)", "AP50",
                           _T1["FPN + IoU-NMS"], _T1["FPN"], _paper_ap(paper.TABLE1_NMS, "FPN + IoU-NMS", "FPN", "AP50"), -1))
    for metric in ("AP", "AP90"):
        specs.append(ClaimSpec(f"refine-{metric.lower()}", f"Refinement improves {metric} over NMS (Table 2)", metric,
                               t2["FPN + Refinement"], t2["FPN"], _paper_ap(paper.TABLE2_REFINEMENT, "FPN + Refinement", "FPN", metric)))
    if _steps(sets, "nms+refine/") >= 1:
        specs.append(ClaimSpec("fig4-monotonic", "Optimization-based refinement raises AP at every step (Fig. 4)", AP_STEP,
                               "nms+refine/*", "nms+refine/*", "monotonic (Fig. 4a)"))
        if _steps(sets, "nms+regress/") >= 0:
            specs.append(ClaimSpec("fig4-vs-regression", "Optimization-based refinement ends above iterative regression's "
                                   "best AP (Fig. 4)", AP_FINAL_VS_BEST, "nms+refine/*", "nms+regress/*",
                                   "regression peaks at 1-2 steps, then falls (Fig. 4a)"))
    if all(name in sets for name in _T3.values()):
        specs.append(ClaimSpec("joint-ap", "Joint training improves AP over the detector alone (Table 3)", "AP",
                               _T3["ResNet-50 IoU-Net"], _T3["ResNet-50 FPN"],
                               _paper_ap(paper.TABLE3_JOINT, "ResNet-50 IoU-Net", "ResNet-50 FPN", "AP")))
        specs.append(ClaimSpec("joint-refine-ap", "IoU-NMS + refinement improve the jointly trained model's AP (Table 3)", "AP",
                               _T3["ResNet-50 IoU-Net + IoU-NMS + Refine"], _T3["ResNet-50 IoU-Net"],
                               _paper_ap(paper.TABLE3_JOINT, "ResNet-50 IoU-Net + IoU-NMS + Refine", "ResNet-50 IoU-Net", "AP")))
    return specs


def _steps(sets: Mapping[str, Any], prefix: str) -> int:
    return max((int(k[len(prefix):]) for k in sets if k.startswith(prefix)), default=-1)


@dataclass
class ClaimsResult:
    """:func:`paper_claims`' output: the judged claims and Fig. 4's AP per step (fractions)."""

    claims: dict[str, Claim]  # ClaimSpec.key -> judged claim, in claim_specs' order
    fig4: dict[str, list[float]] = field(default_factory=dict)  # "optimization" / "regression" -> AP per step

    def records(self) -> list[dict[str, Any]]:
        """The ``numbers.json`` ``"claims"`` list."""
        return [c.as_dict() for c in self.claims.values()]


class _Evaluations:
    """Per-image COCO evaluations and AP replicates, computed once per detection set."""

    def __init__(self, sets: Mapping[str, Any], coco_gt: COCO, weights: np.ndarray) -> None:
        self.sets, self.coco_gt, self.weights = sets, coco_gt, weights
        self._ap: dict[str, tuple[dict[str, float], dict[str, np.ndarray]]] = {}

    def matches(self, name: str) -> PerImageMatches:
        return per_image_matches(self.coco_gt, self.sets[name])

    def ap(self, name: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Full-set AP per metric and the replicates' AP per metric (float64[B])."""
        if name not in self._ap:
            m = self.matches(name)
            self._ap[name] = ({k: float(v[0]) for k, v in ap_replicates(m).items()}, ap_replicates(m, self.weights))
        return self._ap[name]

    def curve(self, prefix: str, metric: str = "AP") -> tuple[np.ndarray, np.ndarray]:
        """AP per step of the sets ``<prefix>0 .. <prefix>T``: full-set (float64[T+1]) and replicates (float64[B, T+1])."""
        names = [f"{prefix}{t}" for t in range(_steps(self.sets, prefix) + 1)]
        full = np.array([self.ap(n)[0][metric] for n in names])
        return full, np.stack([self.ap(n)[1][metric] for n in names], axis=1)


def _difference(spec: ClaimSpec, ev: _Evaluations, image_ids: np.ndarray) -> Difference:
    sets, coco_gt, weights = ev.sets, ev.coco_gt, ev.weights
    if spec.metric == PEARSON:
        matched = localization_correlation(sets["raw"], coco_gt).matched
        pred = matched["iou_pred"] if "iou_pred" in matched else pd.Series(np.nan, index=matched.index)  # nan: undefined
        matched = matched.assign(iou_pred=pred.astype(np.float64))[pred.notna()]
        return pearson_difference(matched["iou"], matched["iou_pred"], matched["score"], matched["image_id"], image_ids, weights)
    if spec.metric == RECALL_09:
        best = [best_iou_per_ground_truth(sets[name], coco_gt) for name in (spec.ours, spec.baseline)]
        per_image = [image_sums((b["best_iou"] >= 0.9).to_numpy(), b["image_id"], image_ids)[:, 0] for b in best]
        objects = image_sums(np.ones(len(best[0])), best[0]["image_id"], image_ids)[:, 0]
        return ratio_difference(per_image[0], per_image[1], weights, objects)
    if spec.metric == POSITIVES_09:
        counts = []
        for name in (spec.ours, spec.baseline):
            pos = positive_detections(sets[name], coco_gt)
            counts.append(image_sums((pos["iou"] >= 0.9).to_numpy(), pos["image_id"], image_ids)[:, 0])
        return ratio_difference(counts[0], counts[1], weights)
    if spec.metric == AP_STEP:
        full, rep = ev.curve("nms+refine/")
        worst = int(np.argmin(np.diff(full)))
        return difference(full[worst + 1], full[worst], np.diff(rep, axis=1).min(axis=1))
    if spec.metric == AP_FINAL_VS_BEST:
        (opt, opt_rep), (reg, reg_rep) = ev.curve("nms+refine/"), ev.curve("nms+regress/")
        return difference(opt[-1], reg.max(), opt_rep[:, -1] - reg_rep.max(axis=1))
    (ours, ours_rep), (base, base_rep) = ev.ap(spec.ours), ev.ap(spec.baseline)
    return difference(ours[spec.metric], base[spec.metric], ours_rep[spec.metric] - base_rep[spec.metric])


def paper_claims(output: PipelineOutput, coco_gt: COCO, *, replicates: int = REPLICATES, seed: int = 0) -> ClaimsResult:
    """Judge every claim of :func:`claim_specs` that ``output``'s sets allow, one paired bootstrap for all.

    Args:
        output: the pipeline's detection sets (``output.sets``; COCO results, ``bbox`` ``[x, y, w, h]``).
        coco_gt: the validation ground truth; its images are the resampled units.
        replicates, seed: the bootstrap's size and seed (every claim sees the same resampled images).

    Returns:
        :class:`ClaimsResult` with Fig. 4's AP per step (``"optimization"``: ``nms+refine/0..T``;
        ``"regression"``: ``nms+regress/0..R`` when present).
    """
    image_ids = np.asarray(sorted(coco_gt.getImgIds()), dtype=np.int64)
    ev = _Evaluations(output.sets, coco_gt, resample_weights(len(image_ids), replicates, seed))
    claims = {}
    for spec in claim_specs(output.sets):
        d = _difference(spec, ev, image_ids)
        claims[spec.key] = Claim(claim=spec.claim, metric=spec.metric, ours=d.ours, baseline=d.baseline, delta=d.delta,
                                 ci95=d.ci95, verdict=judge(d.ci95, spec.direction))
    fig4 = {"optimization": ev.curve("nms+refine/")[0].tolist()} if _steps(output.sets, "nms+refine/") >= 0 else {}
    if _steps(output.sets, "nms+regress/") >= 0:
        fig4["regression"] = ev.curve("nms+regress/")[0].tolist()
    return ClaimsResult(claims=claims, fig4=fig4)


# --- sentences: the only place the verdict words are written -------------------------------------------

_WORDS = {HOLDS: "**holds here**", DOES_NOT_HOLD: "**does not hold here**", INCONCLUSIVE: "**inconclusive here**"}
_WHY = {HOLDS: "the interval excludes zero on the paper's side", DOES_NOT_HOLD: "the interval excludes zero on the other side",
        INCONCLUSIVE: "the interval includes zero"}


def verdict_words(verdict: str) -> str:
    """The bold verdict phrase of :data:`VERDICTS` (``"**holds here**"`` ...)."""
    if verdict not in _WORDS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return _WORDS[verdict]


def _scale(metric: str) -> tuple[float, int, str]:
    """Display of a metric: factor, decimals, unit of a difference."""
    if metric.startswith("AP") or metric == AP_STEP:
        return 100.0, 1, " AP points"  # fractions shown as the paper's percentages
    if metric == POSITIVES_09:
        return 1.0, 0, " boxes"
    return 1.0, 3, ""


def format_value(metric: str, value: float, *, signed: bool = False) -> str:
    """``value`` of ``metric`` as the report prints it (AP in percent), ``n/a`` when undefined."""
    factor, digits, _ = _scale(metric)
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{factor * value:{'+' if signed else ''}.{digits + (1 if signed else 0)}f}"


def _values(claim: Claim) -> str:
    ours, base = format_value(claim.metric, claim.ours), format_value(claim.metric, claim.baseline)
    if claim.metric == AP_STEP:
        return f"AP {ours} after its weakest step, {base} before it"
    if claim.metric == AP_FINAL_VS_BEST:
        return f"final AP {ours}, iterative regression's best {base}"
    return f"{claim.metric} {ours} vs {base}"


def sentence(claim: Claim | Mapping[str, Any]) -> str:
    """One Markdown sentence: the claim, our two numbers, the difference with its 95% interval, the verdict."""
    claim = claim if isinstance(claim, Claim) else Claim.from_dict(claim)
    lo, hi = (format_value(claim.metric, v, signed=True) for v in claim.ci95)
    unit = _scale(claim.metric)[2]
    return (f"{claim.claim}: {_values(claim)}, difference {format_value(claim.metric, claim.delta, signed=True)}{unit} "
            f"(95% CI {lo} to {hi}; {_WHY[claim.verdict]}): {verdict_words(claim.verdict)}.")


def sentences(claims: Sequence[Claim | Mapping[str, Any]]) -> str:
    """A Markdown bullet list of :func:`sentence` for each claim."""
    return "\n".join(f"* {sentence(c)}" for c in claims)


FIGURE_CLAIMS = {
    "Fig. 2": ("fig2-pearson",), "Fig. 3": ("fig3-positives",), "Fig. 7": ("fig7-recall",),
    "Table 1": ("iou-nms-ap90", "iou-nms-ap", "iou-nms-ap50"), "Table 2": ("refine-ap", "refine-ap90"),
    "Fig. 4": ("fig4-monotonic", "fig4-vs-regression"), "Table 3": ("joint-ap", "joint-refine-ap"),
}
"""The paper's figure or table -> the keys of :func:`claim_specs` it supports, in reading order."""


def verdict_text(result: ClaimsResult, figure: str) -> str:
    """The :func:`sentence` of every claim of ``figure`` (a key of :data:`FIGURE_CLAIMS`) judged in ``result``."""
    return " ".join(sentence(result.claims[key]) for key in FIGURE_CLAIMS[figure] if key in result.claims)


# --- reports/index.md: every claim, one column per dataset ---------------------------------------------

_EVERY_SET = {"raw": 0, **{n: 0 for n in (*TABLE1_ROWS.values(), *TABLE3_ROWS.values())}, "nms+refine/1": 0, "nms+regress/1": 0}
DATASET_ORDER = ("shapes", "neon-trees")  # the lab (exact boxes) first, then real data; others follow by name


def _paper_cell(spec: ClaimSpec) -> str:
    if isinstance(spec.paper, str):
        return spec.paper
    if spec.paper is None:
        return "–"
    digits = 3 if spec.metric in (PEARSON, RECALL_09) else 1
    return f"{spec.paper[0]:.{digits}f} vs {spec.paper[1]:.{digits}f}"


def _cell(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "–"
    c = Claim.from_dict(record)
    lo, hi = (format_value(c.metric, v, signed=True) for v in c.ci95)
    return (f"{format_value(c.metric, c.ours)} vs {format_value(c.metric, c.baseline)}: "
            f"{format_value(c.metric, c.delta, signed=True)} [{lo}, {hi}] {verdict_words(c.verdict)}")


def index_markdown(numbers: Mapping[str, Mapping[str, Any]]) -> str:
    """``reports/index.md``: one row per paper claim, the paper's numbers, one column per dataset.

    Args:
        numbers: dataset name -> its ``numbers.json`` (with a ``"claims"`` list).
    """
    datasets = sorted(numbers, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d))
    by_claim = {d: {r["claim"]: r for r in numbers[d].get("claims", [])} for d in datasets}
    lines = ["# IoU-Net claims across datasets", "",
             "Each cell: ours vs baseline, the difference and its 95% interval, the verdict. " + RULE + " AP in percent; "
             "the paper's numbers are MS-COCO minival with ResNet-50 FPN.", "",
             "| Claim | Metric | Paper | " + " | ".join(datasets) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in datasets) + " |"]
    for spec in claim_specs(_EVERY_SET):
        cells = [_cell(by_claim[d].get(spec.claim)) for d in datasets]
        lines.append(f"| {spec.claim} | {spec.metric} | {_paper_cell(spec)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_index(reports_root: str | Path = "reports") -> Path:
    """Write ``<reports_root>/index.md`` from every ``<reports_root>/<dataset>/numbers.json``; return its path.

    Raises:
        FileNotFoundError: no dataset report under ``reports_root``.
    """
    root = Path(reports_root)
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/numbers.json"))}
    if not found:
        raise FileNotFoundError(f"no <dataset>/numbers.json under {root}; run `python -m workbench reproduce` first")
    path = root / "index.md"
    path.write_text(index_markdown(found))
    return path
