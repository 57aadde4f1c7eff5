"""The story a reader gets: ``report.md``, ``numbers.json``, ``reports/index.md`` and the notebooks'
summaries on a constructed pipeline output whose answers are known (tests/test_claims.py builds it).

Would catch: a verdict written without its interval, a report row reading another detection set
("FPN + IoU-NMS" must be the IoU-NMS set), the score standing in for the predicted IoU, swapped
gained / lost counts, a summary sentence that says "holds" where the interval includes zero.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_bootstrap import shapes_val  # noqa: F401 (session fixture)
from tests.test_claims import constructed_sets, good  # noqa: F401 (module fixture)
from tests.test_diagnostics import exact_record, hand_record
from workbench.analysis import ap_per_iteration, ap_table, localization_correlation, monotonicity, positives_per_iou_bin, recall_vs_iou
from workbench.analysis import claims as C
from workbench.analysis import narrative
from workbench.analysis.cocoeval import coco_ap
from workbench.analysis import paper_numbers
from workbench.analysis.experiments import (FIG3_SETS, FIG7_SETS, TABLE1_ROWS, TABLE3_ROWS, refinement_runs, select, table2_rows,
                                           table3_paper_names, table3_rows)
from workbench.pipeline import PipelineOutput
from workbench.reproduce import write_report

ROOT = Path(__file__).resolve().parents[1]
SECONDS = {"detector (backbone + heads)": [0.2, 0.2], "nms": [0.01, 0.01], "IoU-Net (predict IoU)": [0.05, 0.05],
           "iou-nms": [0.02, 0.02], "refinement (iou-nms)": [0.1, 0.1]}


def holds_count(text: str) -> int:
    return text.count(C.verdict_words(C.HOLDS))


@pytest.fixture(scope="module")
def report(good, shapes_val, tmp_path_factory):  # noqa: F811
    sets, _ = good
    out = tmp_path_factory.mktemp("reports") / "shapes"
    output = PipelineOutput(sets=sets, seconds=SECONDS, trajectories=exact_record("width"), image_ids=sorted(shapes_val.getImgIds()))
    numbers = write_report(output, shapes_val, out, "shapes", "CPU (test)", "mobilenet_v2")
    return sets, out, numbers


def test_numbers_json_keeps_its_keys_and_adds_claims_and_fig4(report, shapes_val):  # noqa: F811
    sets, out, numbers = report
    assert json.loads((out / "numbers.json").read_text()) == json.loads(json.dumps(numbers, default=float))
    for key in ("pearson_cls", "pearson_iou_pred", "recall_at_0.9", "table1", "table2", "table3", "claims", "fig4", "diagnostics"):
        assert key in numbers, key
    assert [c["claim"] for c in numbers["claims"]] == [s.claim for s in C.claim_specs(sets)]
    for record in numbers["claims"]:
        assert list(record) == ["claim", "metric", "ours", "baseline", "delta", "ci95", "verdict"]
    assert numbers["fig4"]["optimization"] == pytest.approx([coco_ap(shapes_val, sets[f"nms+refine/{t}"])["AP"] for t in range(4)])
    assert numbers["fig4"]["regression"] == pytest.approx([coco_ap(shapes_val, sets[f"nms+regress/{t}"])["AP"] for t in range(4)])


def test_every_verdict_in_the_report_is_its_intervals(report):
    sets, out, numbers = report
    text = (out / "report.md").read_text()
    specs = {s.claim: s for s in C.claim_specs(sets)}
    for record in numbers["claims"]:
        assert C.judge(record["ci95"], specs[record["claim"]].direction) == record["verdict"]
        # Once in the summary at the top, once in its figure's or table's section.
        assert text.count(C.sentence(record)) == 2, record["claim"]
    assert holds_count(text) == 2 * sum(r["verdict"] == C.HOLDS for r in numbers["claims"])
    assert "does not hold here" not in text or any(r["verdict"] == C.DOES_NOT_HOLD for r in numbers["claims"])


def test_report_rows_read_the_sets_they_name(report, shapes_val):  # noqa: F811
    sets, out, _ = report
    tables = {name: pd.read_csv(out / f"{name}.csv", index_col=0) for name in ("table1_nms", "table2_refinement", "table3_joint")}
    rows = {"table1_nms": TABLE1_ROWS, "table2_refinement": table2_rows(sets), "table3_joint": table3_rows("mobilenet_v2")}
    assert rows["table1_nms"]["FPN + IoU-NMS"] == "iou-nms" and rows["table2_refinement"]["FPN + Refinement"] == "nms+refine/3"
    for name, mapping in rows.items():
        for row, set_name in mapping.items():
            expected = coco_ap(shapes_val, sets[set_name])
            assert tables[name].loc[row, "AP90"] == pytest.approx(expected["AP90"], abs=1e-12), (name, row)
            assert tables[name].loc[row, "AP"] == pytest.approx(expected["AP"], abs=1e-12), (name, row)


def test_table3_rows_name_the_backbone_used_and_keep_the_papers_rows(report):
    _, out, _ = report
    assert table3_paper_names("resnet50") == {row: row for row in TABLE3_ROWS}
    names = table3_paper_names("mobilenet_v2")
    assert list(names.values()) == list(TABLE3_ROWS) and list(table3_rows("mobilenet_v2").values()) == list(TABLE3_ROWS.values())
    assert list(names) == ["MobileNetV2 FPN", "MobileNetV2 IoU-Net", "MobileNetV2 IoU-Net + IoU-NMS",
                           "MobileNetV2 IoU-Net + IoU-NMS + Refine"]
    with pytest.raises(ValueError, match="backbone"):
        table3_paper_names("vgg16")
    report_md = (out / "report.md").read_text()
    table3 = report_md[report_md.index("## Table 3"):report_md.index("## Table 4")]
    assert "ResNet-50 FPN | ours" not in table3
    for ours, theirs in names.items():
        paper_ap = paper_numbers.TABLE3_JOINT[theirs]["AP"]
        assert f"| {ours} | ours |" in table3 and f"| {theirs} | paper | {paper_ap:.1f} |" in table3, ours
        assert table3.index(f"| {ours} | ours |") < table3.index(f"| {theirs} | paper |")


def test_report_diagnostics_and_index(report):
    _, out, numbers = report
    for name in ("diag_calibration", "diag_ranking", "diag_gradient_alignment", "diag_gain_by_size", "diag_stop_reasons"):
        assert (out / f"{name}.png").is_file(), name
    assert numbers["diagnostics"]["ranking_accuracy"]["iou_pred"] > 0.9  # the constructed predictor is nearly exact
    assert abs(numbers["diagnostics"]["ranking_accuracy"]["score"] - 0.5) < 0.1  # the score is random
    assert numbers["diagnostics"]["gradient_cosine_median"] == pytest.approx(1.0)  # the record's predictor is the true IoU
    index = C.write_index(out.parent).read_text()
    assert "| shapes |" in index and holds_count(index) == sum(r["verdict"] == C.HOLDS for r in numbers["claims"])


# ============================================================================= the notebooks' summaries
@pytest.fixture(scope="module")
def inconclusive(shapes_val):  # noqa: F811
    """Every set equal to the NMS set and the score as the predicted IoU: every difference is exactly zero."""
    base = constructed_sets(shapes_val)
    sets = {name: base["nms"] for name in base} | {"raw": [dict(d, iou_pred=d["score"]) for d in base["raw"]]}
    return sets, C.paper_claims(PipelineOutput(sets=sets), shapes_val, replicates=50)


def summaries(sets: dict, verdicts: C.ClaimsResult, coco) -> dict[str, str]:
    corr = localization_correlation(sets["raw"], coco)
    table1 = ap_table(select(sets, TABLE1_ROWS), coco)
    per_iteration = ap_per_iteration(refinement_runs(PipelineOutput(sets=sets)), coco)
    speed = narrative_speed()
    return {
        "03": narrative.describe_confidence(corr, pd.DataFrame(), 10, verdicts),
        "04": narrative.describe_nms(positives_per_iou_bin(select(sets, FIG3_SETS), coco), recall_vs_iou(select(sets, FIG7_SETS), coco),
                                     table1, verdicts),
        "05": narrative.describe_refinement(per_iteration, monotonicity(per_iteration), ap_table(select(sets, table2_rows(sets)), coco),
                                            hand_record(), verdicts),
        "06": narrative.describe_joint_and_speed(ap_table(select(sets, table3_rows("mobilenet_v2")), coco), speed, "CPU", verdicts),
    }


def narrative_speed() -> pd.DataFrame:
    from workbench.analysis import speed_comparison
    return speed_comparison(PipelineOutput(seconds=SECONDS))


def test_summaries_carry_the_judges_sentences(good, shapes_val):  # noqa: F811
    sets, verdicts = good
    text = summaries(sets, verdicts, shapes_val)
    for notebook, figures in {"03": ["Fig. 2"], "04": ["Fig. 3", "Fig. 7", "Table 1"], "05": ["Fig. 4", "Table 2"], "06": ["Table 3"]}.items():
        for figure in figures:
            assert C.verdict_text(verdicts, figure) in text[notebook], (notebook, figure)
    # notebook 05's record line: hand_record has gains +0.1, -0.05, +0.2 on its three matched boxes
    assert "2 gained true IoU, 1 lost it" in text["05"]
    corr = localization_correlation(sets["raw"], shapes_val)
    assert f"{corr.r_iou_pred:.3f} for the predicted IoU" in text["03"] and f"{corr.r_score:.3f} for the classification score" in text["03"]


def test_summaries_never_say_holds_when_every_interval_includes_zero(inconclusive, shapes_val):  # noqa: F811
    sets, verdicts = inconclusive
    assert {c.verdict for c in verdicts.claims.values()} == {C.INCONCLUSIVE}
    for notebook, text in summaries(sets, verdicts, shapes_val).items():
        assert holds_count(text) == 0 and "does not hold" not in text, notebook
        assert C.verdict_words(C.INCONCLUSIVE) in text, notebook


def test_no_verdict_words_outside_the_judge():
    # The bold verdict phrases are written in claims.py only; notebooks, README and every other module
    # get them from there, so no sentence can claim a result its interval does not support.
    phrases = [C.verdict_words(v) for v in C.VERDICTS] + ["holds here", "does not hold here"]
    files = [*ROOT.glob("workbench/**/*.py"), *ROOT.glob("notebooks/*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md"]
    offenders = [str(f.relative_to(ROOT)) for f in files
                 if f.name != "claims.py" and any(phrase in f.read_text() for phrase in phrases)]
    assert not offenders, f"verdict words written outside workbench/analysis/claims.py: {offenders}"
    assert re.search(r"\*\*holds here\*\*", (ROOT / "workbench/analysis/claims.py").read_text())
