"""The paper's experiments from one command: train (or reuse), run the pipeline, write every figure
and table next to the paper's numbers.

    python -m workbench reproduce --config neon-trees            # the embedded default
    torchrun --nproc_per_node=8 -m workbench reproduce --config coco --set data.options.ann_file=...

Stages, each cached: (1) the detector, the standalone IoU-Net on its frozen backbone and the joint
model are trained, or reused when a finished checkpoint with the same config fingerprint exists;
(2) the pipeline (``workbench.pipeline``) runs over the validation split, cached under
``cache/pipeline/`` by the checkpoints' fingerprints and the settings; (3) the analyses write
``reports/<dataset>/``: figures (PNG and SVG), tables (CSV and Markdown), ``trajectories.npz``
and ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from . import analysis, distributed
from .analysis import paper_numbers as paper
from .config import TrainConfig, apply_overrides, get_config
from .pipeline import PipelineOutput, PipelineSettings, run_pipeline
from .train import build_dataset, build_model, load_checkpoint, train


@dataclass
class ReproduceOptions:
    preset: str = "neon-trees"  # dataset preset of workbench.config (neon-trees | shapes | coco)
    overrides: list[str] = field(default_factory=list)  # "--set key=value" for every training run
    val_overrides: list[str] = field(default_factory=list)  # "key=value" for the evaluated split only (coco: its ann_file, img_dir)
    iterations: dict[str, int] = field(default_factory=dict)  # kind -> run length (schedule rescaled); default the preset's
    settings: PipelineSettings = field(default_factory=PipelineSettings)  # inference hyper-parameters
    out_dir: str = ""  # reports folder; default reports/<preset>
    runs_dir: str = "runs"  # checkpoints go to <runs_dir>/<preset>-<kind>-<fingerprint>
    cache_dir: str = "cache/pipeline"  # cached pipeline outputs
    joint: bool = True  # train and evaluate the joint model (Table 3)
    external_detections: str = ""  # COCO results JSON of another detector, used instead of ours


# ---------------------------------------------------------------------------------------------
# Stage 1: training, reused when cached.


def _config(opts: ReproduceOptions, kind: str, extra: list[str] = ()) -> TrainConfig:
    cfg = get_config(opts.preset, kind, [*opts.overrides, *extra], iterations=opts.iterations.get(kind))
    cfg.out_dir = str(Path(opts.runs_dir) / f"{opts.preset}-{kind}-{cfg.fingerprint()}")
    return cfg


def trained(cfg: TrainConfig) -> Path:
    """The final checkpoint of ``cfg``: reused when finished with the same fingerprint, resumed when
    interrupted, trained otherwise."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        if state["fingerprint"] == cfg.fingerprint() and state["iteration"] >= cfg.iterations:
            print(f"reusing {ckpt} ({cfg.model.kind}, {state['iteration']} iterations)")
            return ckpt
    return train(cfg, resume=True)


def load_model(ckpt_path: Path, device: torch.device) -> torch.nn.Module:
    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    cfg.model.pretrained_backbone = False  # the checkpoint has every weight
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Stage 2: the pipeline, cached by what determines its output.


def _pipeline_key(checkpoints: list[Path], settings: PipelineSettings, data: dict, external: str) -> str:
    parts = [torch.load(c, map_location="cpu", weights_only=True, mmap=True)["fingerprint"] for c in checkpoints]
    if external:
        parts.append(hashlib.sha256(Path(external).read_bytes()).hexdigest())
    blob = json.dumps([parts, settings.as_dict(), data], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_pipeline(path: Path, compute) -> PipelineOutput | None:
    if path.exists():
        print(f"reusing pipeline output {path}")
        return torch.load(path, weights_only=False)
    out = compute()
    if out is not None:  # rank 0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 3: analyses and the report.


def _save_figure(fig: Figure, out: Path, name: str) -> list[str]:
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", dpi=150, bbox_inches="tight")
    return [f"{name}.png", f"{name}.svg"]


def _save_table(df: pd.DataFrame, out: Path, name: str, markdown: str) -> None:
    df.to_csv(out / f"{name}.csv")
    (out / f"{name}.md").write_text(markdown + "\n")


def _ap_table(rows: dict[str, list[dict]], coco_gt, paper_rows: dict, out: Path, name: str) -> tuple[pd.DataFrame, str]:
    """COCOeval AP table of ``rows`` with the paper's rows beside ours, written as CSV and Markdown."""
    table = analysis.ap_table(rows, coco_gt)
    markdown = analysis.markdown_table(table, paper_rows)
    _save_table(table, out, name, markdown)
    return table, markdown


def _holds(flag: bool) -> str:
    return "**holds here**" if flag else "**does not hold here**"


def write_report(output: PipelineOutput, coco_gt, out: Path, title: str, device: str) -> dict:
    """Every figure and table of the paper from ``output``; returns the headline numbers."""
    out.mkdir(parents=True, exist_ok=True)
    s = output.sets
    T = max(int(k.split("/")[1]) for k in s if k.startswith("iou-nms+refine/"))
    lines = [f"# IoU-Net reproduction: {title}", "",
             f"{len(output.image_ids)} validation images; every number below is ours unless marked *paper* "
             "(MS-COCO minival, ResNet-50 FPN). AP is COCO AP@[.5:.95]; APxx from COCOeval's precision array.", ""]
    numbers: dict = {}

    # Fig. 2: localization vs classification confidence.
    corr = analysis.localization_correlation(s["raw"], coco_gt)
    _save_figure(analysis.plot_localization_correlation(corr), out, "fig2_iou_vs_confidence")
    numbers["pearson_cls"], numbers["pearson_iou_pred"] = corr.r_score, corr.r_iou_pred
    lines += ["## Fig. 2: IoU vs classification confidence and vs predicted IoU", "",
              "![](fig2_iou_vs_confidence.png)", "",
              f"Pearson r with the true IoU, detections with IoU > 0.5 before NMS ({len(corr.matched)} boxes): "
              f"classification score {corr.r_score:.3f} (*paper* {paper.FIG2_PEARSON['classification']}), "
              f"predicted IoU {corr.r_iou_pred:.3f} (*paper* {paper.FIG2_PEARSON['iou_pred']}). "
              f"The claim that the predicted IoU tracks localization better than the classification score "
              f"{_holds(corr.r_iou_pred > corr.r_score)}.", ""]

    # Fig. 3: positives per IoU bin.
    positives = analysis.positives_per_iou_bin({"No-NMS": s["raw"], "NMS": s["nms"], "IoU-NMS": s["iou-nms"]}, coco_gt)
    _save_figure(analysis.plot_positives_per_iou_bin(positives), out, "fig3_positives_per_iou")
    _save_table(positives, out, "fig3_positives_per_iou", positives.to_markdown())
    high = positives.index[-1]
    lines += ["## Fig. 3: positive boxes after NMS, by IoU with the ground truth", "",
              "![](fig3_positives_per_iou.png)", "", positives.to_markdown(), "",
              f"The claim that IoU-guided NMS keeps more well-localized positives than NMS (bin {high}) "
              f"{_holds(positives.loc[high, 'IoU-NMS'] > positives.loc[high, 'NMS'])}.", ""]

    # Fig. 7: recall vs IoU threshold.
    recall = analysis.recall_vs_iou({"No-NMS": s["raw"], "NMS": s["nms"], "Soft-NMS": s["soft-nms"],
                                     "IoU-NMS": s["iou-nms"]}, coco_gt)
    _save_figure(analysis.plot_recall_vs_iou(recall), out, "fig7_recall_vs_iou")
    _save_table(recall, out, "fig7_recall_vs_iou", recall.to_markdown(floatfmt=".3f"))
    r09 = recall.loc[recall.index[abs(recall.index - 0.9) < 1e-9][0]]
    numbers["recall_at_0.9"] = r09.to_dict()
    lines += ["## Fig. 7: recall vs matching IoU threshold", "", "![](fig7_recall_vs_iou.png)", "",
              recall.to_markdown(floatfmt=".3f"), "",
              f"Recall at IoU 0.9: No-NMS {r09['No-NMS']:.3f}, NMS {r09['NMS']:.3f}, IoU-NMS {r09['IoU-NMS']:.3f} "
              f"(*paper* {paper.FIG7_RECALL_AT_09['No-NMS']}, {paper.FIG7_RECALL_AT_09['NMS']}, "
              f"{paper.FIG7_RECALL_AT_09['IoU-NMS']}). IoU-NMS recalling more than NMS at 0.9 "
              f"{_holds(r09['IoU-NMS'] > r09['NMS'])}.", ""]

    # Table 1: NMS variants.
    t1, md1 = _ap_table({"FPN": s["nms"], "FPN + Soft-NMS": s["soft-nms"], "FPN + IoU-NMS": s["iou-nms"]}, coco_gt,
                        paper.TABLE1_NMS, out, "table1_nms")
    numbers["table1"] = t1.to_dict("index")
    lines += ["## Table 1: NMS, Soft-NMS and IoU-guided NMS", "", md1, "",
              f"IoU-NMS improving AP90 over NMS {_holds(t1.loc['FPN + IoU-NMS', 'AP90'] > t1.loc['FPN', 'AP90'])}; "
              f"improving AP {_holds(t1.loc['FPN + IoU-NMS', 'AP'] > t1.loc['FPN', 'AP'])}.", ""]

    # Table 2: refinement.
    t2, md2 = _ap_table({"FPN": s["nms"], "FPN + Refinement": s[f"nms+refine/{T}"]}, coco_gt,
                        paper.TABLE2_REFINEMENT, out, "table2_refinement")
    numbers["table2"] = t2.to_dict("index")
    lines += ["## Table 2: optimization-based refinement", "", md2, "",
              f"Refinement improving AP {_holds(t2.loc['FPN + Refinement', 'AP'] > t2.loc['FPN', 'AP'])}; "
              f"improving AP90 {_holds(t2.loc['FPN + Refinement', 'AP90'] > t2.loc['FPN', 'AP90'])}.", ""]

    # Fig. 4: AP per iteration.
    runs = {"optimization (IoU-Net)": [s[f"nms+refine/{t}"] for t in range(T + 1)]}
    if any(k.startswith("nms+regress/") for k in s):
        R = max(int(k.split("/")[1]) for k in s if k.startswith("nms+regress/"))
        runs["iterative regression"] = [s[f"nms+regress/{t}"] for t in range(R + 1)]
    per_iter = analysis.ap_per_iteration(runs, coco_gt)
    _save_figure(analysis.plot_ap_per_iteration(per_iter, metrics=("AP", "AP90")), out, "fig4_ap_per_iteration")
    mono = analysis.monotonicity(per_iter)
    _save_table(per_iter, out, "fig4_ap_per_iteration", per_iter.to_markdown(floatfmt=".4f"))
    lines += ["## Fig. 4: AP per refinement iteration", "", "![](fig4_ap_per_iteration.png)", "",
              mono.to_markdown(floatfmt=".4f"), "",
              "The paper's claim: iterative regression is non-monotonic, optimization-based refinement "
              f"monotonic. Optimization monotonic here: {_holds(bool(mono.loc['optimization (IoU-Net)', 'monotonic']))}"
              + (f"; regression non-monotonic here: {_holds(not bool(mono.loc['iterative regression', 'monotonic']))}."
                 if "iterative regression" in mono.index else "."), ""]

    # Fig. 6: the three poolings on one bin.
    pooling = analysis.compare_pooling(*analysis.example_feature_map())
    _save_figure(analysis.plot_pooling(pooling), out, "fig6_pooling")
    lines += ["## Fig. 6: RoI Pooling, RoI Align and PrRoI Pooling on one bin", "", "![](fig6_pooling.png)", ""]

    # Table 3: joint training.
    if "joint/nms" in s:
        t3, md3 = _ap_table({"ResNet-50 FPN": s["nms"], "ResNet-50 IoU-Net": s["joint/nms"],
                             "ResNet-50 IoU-Net + IoU-NMS": s["joint/iou-nms"],
                             "ResNet-50 IoU-Net + IoU-NMS + Refine": s["joint/iou-nms+refine"]}, coco_gt,
                            paper.TABLE3_JOINT, out, "table3_joint")
        numbers["table3"] = t3.to_dict("index")
        lines += ["## Table 3: joint training", "",
                  "Row names follow the paper's; here the backbone is the preset's (MobileNetV2-FPN on the "
                  "embedded data).", "", md3, "",
                  f"Joint training improving AP over the detector alone "
                  f"{_holds(t3.loc['ResNet-50 IoU-Net', 'AP'] > t3.loc['ResNet-50 FPN', 'AP'])}; IoU-NMS + refine "
                  f"improving it further {_holds(t3.loc['ResNet-50 IoU-Net + IoU-NMS + Refine', 'AP'] > t3.loc['ResNet-50 IoU-Net', 'AP'])}.", ""]

    # Table 4: time per image.
    stages = {stage: sum(v) / len(v) for stage, v in output.seconds.items()}
    t4 = analysis.timing_table(stages)
    _save_table(t4, out, "table4_timing", t4.to_markdown(floatfmt=".4f"))
    lines += [f"## Table 4: time per image on {device}", "", t4.to_markdown(floatfmt=".4f"), "",
              f"*paper* (Titan X GPU, ResNet-50 FPN, 800 px): FPN {paper.TABLE4_SECONDS_PER_IMAGE['FPN']} s, "
              f"IoU-Net {paper.TABLE4_SECONDS_PER_IMAGE['IoU-Net']} s per image.", ""]

    if output.trajectories is not None:
        output.trajectories.save(out / "trajectories.npz")
        lines += ["## Refinement record", "",
                  f"`trajectories.npz`: {len(output.trajectories)} boxes refined after IoU-NMS, step by step "
                  "(open it with the refinement stepper, `notebooks/05_refinement_stepper.ipynb`).", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, default=float))
    return numbers


def reproduce(opts: ReproduceOptions) -> Path | None:
    """Run every stage; return the report folder (on rank 0)."""
    start = time.perf_counter()
    ctx = distributed.setup("auto")
    out = Path(opts.out_dir or f"reports/{opts.preset}")

    # With another detector's boxes ours is still trained: the IoU-Net starts from its backbone.
    det_cfg = _config(opts, "detector")
    det_ckpt = trained(det_cfg)
    iou_ckpt = trained(_config(opts, "iou", [f"model.detector_checkpoint={det_ckpt}"]))
    joint_ckpt = trained(_config(opts, "joint")) if opts.joint else None

    device = ctx.device
    val_cfg = apply_overrides(det_cfg, ["data.split=val", *opts.val_overrides])
    with distributed.main_first(ctx):
        val = build_dataset(val_cfg)
    checkpoints = [c for c in (det_ckpt, iou_ckpt, joint_ckpt) if c is not None]
    key = _pipeline_key(checkpoints, opts.settings, val_cfg.to_dict()["data"], opts.external_detections)

    def compute() -> PipelineOutput | None:
        detector = None if opts.external_detections else load_model(det_ckpt, device)
        external = json.loads(Path(opts.external_detections).read_text()) if opts.external_detections else None
        return run_pipeline(val, detector, load_model(iou_ckpt, device), opts.settings,
                            joint=load_model(joint_ckpt, device) if joint_ckpt else None,
                            external_detections=external, device=device)

    output = _cached_pipeline(Path(opts.cache_dir) / f"{opts.preset}-{key}.pt", compute)
    if not ctx.is_main:
        distributed.teardown(ctx)
        return None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    numbers = write_report(output, val.coco, out, opts.preset, device_name)
    elapsed = time.perf_counter() - start
    print(f"wrote {out}/report.md in {elapsed:.0f} s")
    print(json.dumps({k: v for k, v in numbers.items() if not k.startswith("table")}, indent=1, default=float))
    distributed.teardown(ctx)
    return out
