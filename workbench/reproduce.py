"""The paper's experiments from one command: train (or reuse), run the pipeline, write every figure
and table next to the paper's numbers.

    python -m workbench reproduce --config neon-trees            # the embedded default
    torchrun --nproc_per_node=8 -m workbench reproduce --config coco --set data.options.ann_file=...

Stages, each cached: (1) the detector, the standalone IoU-Net on its frozen backbone and the joint
model are trained, or reused when a finished checkpoint with the same config and data fingerprint
exists; (2) the pipeline (``workbench.pipeline``) runs over the validation split, cached under
``cache/pipeline/`` by the checkpoints' fingerprints, the settings and the content of the validation
files; (3) the analyses write
``reports/<dataset>/``: figures (PNG and SVG), tables (CSV and Markdown), ``trajectories.npz``
and ``report.md``.

Data count by content (:func:`workbench.files.content_fingerprint`): editing an annotation file or
replacing an image trains and evaluates again. Each run folder, cache file and report folder is
locked while it is written (:func:`workbench.files.locked`), so two runs in one folder do not train
the same model twice: the second waits, then reuses. ``--detections`` is read and checked before
anything is trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torchvision
from matplotlib.figure import Figure

from . import analysis, distributed, report_cache
from .analysis import diagnostics, narrative
from .analysis.claims import RULE, paper_claims, sentences, verdict_text, write_index
from .analysis import paper_numbers as paper
from .analysis.experiments import (FIG3_SETS, FIG7_SETS, TABLE1_ROWS, refinement_runs, select, table2_rows,
                                   table3_paper_names, table3_rows)
from .config import TrainConfig, apply_overrides, get_config
from .data.validate import load_results
from .files import atomic_write, locked, sha256_file, source_digests
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


def data_fingerprint(cfg: TrainConfig, hash_cache: str | os.PathLike | None = None) -> str:
    """What ``cfg``'s data split is, by content: its annotation file and every image file it lists
    (see :meth:`~workbench.data.CocoDetection.fingerprint`); ``""`` for a custom dataset without one."""
    fingerprint = getattr(build_dataset(cfg), "fingerprint", None)
    return fingerprint(hash_cache) if callable(fingerprint) else ""


def _config(opts: ReproduceOptions, kind: str, extra: list[str] = (), seen: dict[str, str] | None = None) -> TrainConfig:
    """``kind``'s config with its run folder; ``seen`` (data section -> fingerprint) spares reading the
    same data again for the next kind (e.g. MS-COCO's 860k annotations)."""
    cfg = get_config(opts.preset, kind, [*opts.overrides, *extra], iterations=opts.iterations.get(kind))
    # The run folder names the config and the data's content, so changed data trains a new model.
    section = json.dumps(cfg.to_dict()["data"], sort_keys=True)
    seen = {} if seen is None else seen
    if section not in seen:
        seen[section] = data_fingerprint(cfg, _hash_cache(opts))
    key = hashlib.sha256(f"{cfg.fingerprint()}/{seen[section]}".encode()).hexdigest()[:16]
    cfg.out_dir = str(Path(opts.runs_dir) / f"{opts.preset}-{kind}-{key}")
    return cfg


def _hash_cache(opts: ReproduceOptions) -> Path:
    return Path(opts.cache_dir) / "file-hashes.json"


def _is_main_process() -> bool:
    # Only one process of a torchrun group takes locks: the others follow it through collectives.
    return int(os.environ.get("RANK", "0")) == 0


def _lock(path: Path, what: str):
    return locked(path.with_name(path.name + ".lock"), what) if _is_main_process() else contextlib.nullcontext()


def trained(cfg: TrainConfig) -> Path:
    """The final checkpoint of ``cfg``: reused when finished with the same fingerprint, resumed when
    interrupted, trained otherwise. The run folder is locked meanwhile, so a second process asking
    for the same run waits for this one and then reuses its checkpoint.

    Raises:
        ValueError: naming the checkpoint when it exists but cannot be read (see :func:`load_checkpoint`).
    """
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    with _lock(Path(cfg.out_dir), f"training {cfg.model.kind} into {cfg.out_dir}"):
        # Under torchrun only rank 0 locks; this collective gives every rank its view from under the
        # lock, so all ranks reuse or all train.
        if distributed.any_rank(distributed.setup("auto"), is_trained(cfg)):
            print(f"reusing {ckpt} ({cfg.model.kind}, {cfg.iterations} iterations)")
            return ckpt
        return train(cfg, resume=True)


def is_trained(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s run is finished: ``<out_dir>/ckpt.pt`` exists, has ``cfg``'s fingerprint and
    all its iterations (what :func:`trained` reuses)."""
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if not ckpt.exists():
        return False
    state = load_checkpoint(ckpt, mmap=True)
    return state["fingerprint"] == cfg.fingerprint() and state["iteration"] >= cfg.iterations


@dataclass(frozen=True)
class Stages:
    """The runs :func:`reproduce` trains and the split it evaluates on."""

    train: dict[str, TrainConfig]  # model kind ("detector", "iou", "joint") -> config; out_dir is the run folder
    val: TrainConfig  # the detector's config on the evaluated split (``build_dataset(stages.val)``)


def stages(opts: ReproduceOptions) -> Stages:
    """The training configs of ``reproduce(opts)``, in training order, and its validation config."""
    seen: dict[str, str] = {}  # every kind trains on the same data: fingerprint it once
    det = _config(opts, "detector", seen=seen)
    # The IoU-Net starts from the detector's final checkpoint, which trained() leaves at <out_dir>/ckpt.pt.
    configs = {"detector": det, "iou": _config(opts, "iou", [f"model.detector_checkpoint={Path(det.out_dir) / 'ckpt.pt'}"],
                                               seen)}
    if opts.joint:
        configs["joint"] = _config(opts, "joint", seen=seen)
    return Stages(train=configs, val=apply_overrides(det, ["data.split=val", *opts.val_overrides]))


def load_model(ckpt_path: Path, device: torch.device) -> torch.nn.Module:
    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    cfg.model.pretrained_backbone = False  # the checkpoint has every weight
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Stage 2: the pipeline, cached by what determines its output.


PIPELINE_FREE_CODE = ("analysis", "widgets")
"""Sub-packages of ``workbench`` the pipeline never runs: editing them keeps the pipeline cache."""


def _pipeline_key(checkpoints: list[Path], settings: PipelineSettings, data: dict, external: str,
                  val_fingerprint: str = "") -> str:
    # A checkpoint's folder name holds its data fingerprint, its own fingerprint the config.
    parts = [[c.parent.name, load_checkpoint(c, mmap=True)["fingerprint"]] for c in checkpoints]
    if external:
        parts.append(sha256_file(external))
    # The code the pipeline runs (all but the analyses and widgets, which only read its output) and
    # the libraries under it: a changed op or stage computes again instead of serving old numbers.
    code = [source_digests(Path(__file__).resolve().parent, exclude=PIPELINE_FREE_CODE),
            torch.__version__, torchvision.__version__]
    blob = json.dumps([parts, settings.as_dict(), data, val_fingerprint, code], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> PipelineOutput | None:
    if not path.exists():
        return None
    try:
        out = torch.load(path, weights_only=False)
    except Exception as e:  # a damaged cache costs a recomputation, never a wrong report
        print(f"{path}: cached pipeline output cannot be read ({type(e).__name__}: {e}); recomputing it", file=sys.stderr)
        return None
    print(f"reusing pipeline output {path}")
    return out


def _cached_pipeline(path: Path, compute) -> PipelineOutput | None:
    """The pipeline output cached at ``path``, computed (under the file's lock) when missing or unreadable."""
    with _lock(path, f"running the pipeline into {path}"):
        out = _read_cache(path)
        # All ranks recompute if one cannot read the cache (the pipeline is a collective).
        if not distributed.any_rank(distributed.setup("auto"), out is None):
            return out
        out = compute()
        if out is not None:  # rank 0
            with atomic_write(path) as f:
                torch.save(out, f)
        return out


def validation_set(opts: ReproduceOptions):
    """The evaluated split of ``reproduce(opts)`` (a :class:`~workbench.data.CocoDetection`: ``.coco``,
    ``.ann_file``, ``.img_dir``)."""
    return build_dataset(stages(opts).val)


def _cache_path(opts: ReproduceOptions, plan: Stages, val) -> Path:
    checkpoints = [Path(cfg.out_dir) / "ckpt.pt" for cfg in plan.train.values()]
    key = _pipeline_key(checkpoints, opts.settings, plan.val.to_dict()["data"], opts.external_detections,
                        val.fingerprint(_hash_cache(opts)) if hasattr(val, "fingerprint") else "")
    return Path(opts.cache_dir) / f"{opts.preset}-{key}.pt"


def pipeline_cache_path(opts: ReproduceOptions) -> Path | None:
    """Where ``reproduce(opts)`` caches its :class:`PipelineOutput`, or ``None`` while a model is untrained.

    Paths in ``opts`` are relative to the working directory, as for :func:`reproduce`."""
    plan = stages(opts)
    if not all(is_trained(cfg) for cfg in plan.train.values()):
        return None
    return _cache_path(opts, plan, build_dataset(plan.val))


def pipeline_output(opts: ReproduceOptions, ctx: distributed.DistContext | None = None) -> PipelineOutput | None:
    """Stages 1 and 2 of ``reproduce(opts)``: the pipeline's output, from its cache when there, else
    training what is not trained yet and running the pipeline (then cached).

    Args:
        ctx: the process group (:func:`workbench.distributed.setup`); default: set up here.

    Returns:
        The output on rank 0, ``None`` on the other ranks of a torchrun group.
    """
    return _run(opts, ctx if ctx is not None else distributed.setup("auto"))[0]


def _run(opts: ReproduceOptions, ctx: distributed.DistContext):
    """Stages 1 and 2: ``(pipeline output or None off rank 0, the evaluated dataset)``."""
    plan = stages(opts)
    # Inputs first: bad data or a bad --detections file fail now, not after hours of training.
    with distributed.main_first(ctx):
        val = build_dataset(plan.val)
    external = None
    if opts.external_detections:
        external = load_results(opts.external_detections, set(val.image_ids), set(val.cat_id_to_label))

    # With another detector's boxes ours is still trained: the IoU-Net starts from its backbone.
    ckpt = {kind: trained(cfg) for kind, cfg in plan.train.items()}
    device = ctx.device

    def compute() -> PipelineOutput | None:
        detector = None if opts.external_detections else load_model(ckpt["detector"], device)
        return run_pipeline(val, detector, load_model(ckpt["iou"], device), opts.settings,
                            joint=load_model(ckpt["joint"], device) if "joint" in ckpt else None,
                            external_detections=external, device=device)

    return _cached_pipeline(_cache_path(opts, plan, val), compute), val


# ---------------------------------------------------------------------------------------------
# Stage 3: analyses and the report.


def _save_figure(fig: Figure, out: Path, name: str) -> list[str]:
    for ext in ("png", "svg"):
        with atomic_write(out / f"{name}.{ext}") as f:
            fig.savefig(f, format=ext, dpi=150, bbox_inches="tight")
    return [f"{name}.png", f"{name}.svg"]


def _save_table(df: pd.DataFrame, out: Path, name: str, markdown: str) -> None:
    with atomic_write(out / f"{name}.csv") as f:
        f.write(df.to_csv().encode())
    with atomic_write(out / f"{name}.md") as f:
        f.write((markdown + "\n").encode())


def _ap_table(rows: dict[str, list[dict]], coco_gt, paper_rows: dict, out: Path, name: str,
              paper_names: dict[str, str] | None = None) -> tuple[pd.DataFrame, str]:
    """COCOeval AP table of ``rows`` with the paper's rows beside ours (``paper_names``: see
    :func:`~workbench.analysis.markdown_table`), written as CSV and Markdown."""
    table = analysis.ap_table(rows, coco_gt)
    markdown = analysis.markdown_table(table, paper_rows, paper_names=paper_names)
    _save_table(table, out, name, markdown)
    return table, markdown


def write_report(output: PipelineOutput, coco_gt, out: Path, title: str, device: str, backbone: str) -> dict:
    """Every figure and table of the paper from ``output``; returns the headline numbers.

    ``backbone`` (``ModelConfig.backbone`` of the runs) names Table 3's rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    s = output.sets
    lines = [f"# IoU-Net reproduction: {title}", "",
             f"{len(output.image_ids)} validation images; every number below is ours unless marked *paper* "
             "(MS-COCO minival, ResNet-50 FPN). AP is COCO AP@[.5:.95]; APxx from COCOeval's precision array.", ""]
    numbers: dict = {}

    # Every verdict below comes from one paired bootstrap over the validation images (analysis.claims).
    verdicts = paper_claims(output, coco_gt)
    numbers["claims"], numbers["fig4"] = verdicts.records(), verdicts.fig4
    lines += ["## The paper's claims on this data", "", RULE, "", sentences(list(verdicts.claims.values())), ""]

    # Fig. 2: localization vs classification confidence.
    corr = analysis.localization_correlation(s["raw"], coco_gt)
    _save_figure(analysis.plot_localization_correlation(corr), out, "fig2_iou_vs_confidence")
    numbers["pearson_cls"], numbers["pearson_iou_pred"] = corr.r_score, corr.r_iou_pred
    lines += ["## Fig. 2: IoU vs classification confidence and vs predicted IoU", "",
              "![](fig2_iou_vs_confidence.png)", "",
              f"Pearson r with the true IoU, detections with IoU > 0.5 before NMS ({len(corr.matched)} boxes): "
              f"classification score {corr.r_score:.3f} (*paper* {paper.FIG2_PEARSON['classification']}), "
              f"predicted IoU {corr.r_iou_pred:.3f} (*paper* {paper.FIG2_PEARSON['iou_pred']}). "
              + verdict_text(verdicts, "Fig. 2"), ""]

    # Fig. 3: positives per IoU bin.
    positives = analysis.positives_per_iou_bin(select(s, FIG3_SETS), coco_gt)
    _save_figure(analysis.plot_positives_per_iou_bin(positives), out, "fig3_positives_per_iou")
    _save_table(positives, out, "fig3_positives_per_iou", positives.to_markdown())
    lines += ["## Fig. 3: positive boxes after NMS, by IoU with the ground truth", "",
              "![](fig3_positives_per_iou.png)", "", positives.to_markdown(), "", verdict_text(verdicts, "Fig. 3"), ""]

    # Fig. 7: recall vs IoU threshold.
    recall = analysis.recall_vs_iou(select(s, FIG7_SETS), coco_gt)
    _save_figure(analysis.plot_recall_vs_iou(recall), out, "fig7_recall_vs_iou")
    _save_table(recall, out, "fig7_recall_vs_iou", recall.to_markdown(floatfmt=".3f"))
    r09 = analysis.recall_at(recall, 0.9)
    numbers["recall_at_0.9"] = r09.to_dict()
    lines += ["## Fig. 7: recall vs matching IoU threshold", "", "![](fig7_recall_vs_iou.png)", "",
              recall.to_markdown(floatfmt=".3f"), "",
              f"Recall at IoU 0.9: No-NMS {r09['No-NMS']:.3f}, NMS {r09['NMS']:.3f}, IoU-NMS {r09['IoU-NMS']:.3f} "
              f"(*paper* {paper.FIG7_RECALL_AT_09['No-NMS']}, {paper.FIG7_RECALL_AT_09['NMS']}, "
              f"{paper.FIG7_RECALL_AT_09['IoU-NMS']}). " + verdict_text(verdicts, "Fig. 7"), ""]

    # Table 1: NMS variants.
    t1, md1 = _ap_table(select(s, TABLE1_ROWS), coco_gt, paper.TABLE1_NMS, out, "table1_nms")
    numbers["table1"] = t1.to_dict("index")
    lines += ["## Table 1: NMS, Soft-NMS and IoU-guided NMS", "", md1, "", verdict_text(verdicts, "Table 1"), ""]

    # Table 2: refinement.
    t2, md2 = _ap_table(select(s, table2_rows(s)), coco_gt, paper.TABLE2_REFINEMENT, out, "table2_refinement")
    numbers["table2"] = t2.to_dict("index")
    lines += ["## Table 2: optimization-based refinement", "", md2, "", verdict_text(verdicts, "Table 2"), ""]

    # Fig. 4: AP per iteration.
    per_iter = analysis.ap_per_iteration(refinement_runs(output), coco_gt)
    _save_figure(analysis.plot_ap_per_iteration(per_iter, metrics=("AP", "AP90")), out, "fig4_ap_per_iteration")
    mono = analysis.monotonicity(per_iter)
    _save_table(per_iter, out, "fig4_ap_per_iteration", per_iter.to_markdown(floatfmt=".4f"))
    lines += ["## Fig. 4: AP per refinement iteration", "", "![](fig4_ap_per_iteration.png)", "",
              mono.to_markdown(floatfmt=".4f"), "", verdict_text(verdicts, "Fig. 4"), ""]

    # Fig. 6: the three poolings on one bin.
    pooling = analysis.compare_pooling(*analysis.example_feature_map())
    _save_figure(analysis.plot_pooling(pooling), out, "fig6_pooling")
    lines += ["## Fig. 6: RoI Pooling, RoI Align and PrRoI Pooling on one bin", "", "![](fig6_pooling.png)", ""]

    # Table 3: joint training.
    if "joint/nms" in s:
        t3, md3 = _ap_table(select(s, table3_rows(backbone)), coco_gt, paper.TABLE3_JOINT, out, "table3_joint",
                            table3_paper_names(backbone))
        numbers["table3"] = t3.to_dict("index")
        lines += ["## Table 3: joint training", "",
                  "Our rows name the backbone this run used; each is followed by the paper's ResNet-50 row it "
                  "stands for.", "", md3, "", verdict_text(verdicts, "Table 3"), ""]

    # Table 4: time per image.
    t4 = analysis.timing_table(analysis.mean_seconds(output))
    _save_table(t4, out, "table4_timing", t4.to_markdown(floatfmt=".4f"))
    speed = analysis.speed_comparison(output)
    lines += [f"## Table 4: time per image on {device}", "", t4.to_markdown(floatfmt=".4f"), "",
              f"*paper* (Titan X GPU, ResNet-50 FPN, 800 px): FPN {paper.TABLE4_SECONDS_PER_IMAGE['FPN']} s, "
              f"IoU-Net {paper.TABLE4_SECONDS_PER_IMAGE['IoU-Net']} s per image.", "",
              speed.to_markdown(floatfmt=".3f"), "", narrative.table4_speed(speed), ""]

    figures, section, numbers["diagnostics"] = diagnostics.report_section(corr.matched, output.trajectories)
    for name, fig in figures.items():
        _save_figure(fig, out, name)
    lines += section

    if output.trajectories is not None:
        output.trajectories.save(out / "trajectories.npz")
        lines += ["## Refinement record", "",
                  f"`trajectories.npz`: {len(output.trajectories)} boxes refined after IoU-NMS, step by step "
                  "(open it with the refinement stepper, `notebooks/05_refinement_stepper.ipynb`).", ""]
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(lines).encode())
    with atomic_write(out / "numbers.json") as f:
        f.write(json.dumps(numbers, indent=1, default=float).encode())
    return numbers


def _report_key(opts: ReproduceOptions, device_name: str, backbone: str) -> str | None:
    """What the report of ``opts`` is made from (:func:`workbench.report_cache.report_key`); ``None``
    while a model is untrained (its pipeline output cannot be named yet)."""
    path = pipeline_cache_path(opts)
    if path is None:
        return None
    return report_cache.report_key(path.name, title=opts.preset, device=device_name, backbone=backbone)


def reproduce(opts: ReproduceOptions) -> Path | None:
    """Run every stage; return the report folder (on rank 0). A report folder already written from the
    same inputs (:mod:`workbench.report_cache`) is kept as it is."""
    start = time.perf_counter()
    ctx = distributed.setup("auto")
    out = Path(opts.out_dir or f"reports/{opts.preset}")
    device = ctx.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    backbone = get_config(opts.preset, "joint", opts.overrides).model.backbone
    with distributed.main_first(ctx):  # naming the pipeline output may prepare the data: one rank first
        key = _report_key(opts, device_name, backbone)
    with _lock(out, f"checking the report {out}"):
        current = key is not None and report_cache.is_current(out, key)
    # Every rank follows the same path: the pipeline is a collective.
    reused = not distributed.any_rank(ctx, not current)
    if reused:
        if ctx.is_main:
            print(f"reusing {out}: written from the same pipeline output, code and settings")
            numbers = json.loads((out / "numbers.json").read_text())
    else:
        output, val = _run(opts, ctx)
        if ctx.is_main:
            with _lock(out, f"writing the report {out}"):
                numbers = write_report(output, val.coco, out, opts.preset, device_name, backbone)
                report_cache.stamp(out, key or _report_key(opts, device_name, backbone))
    if not ctx.is_main:
        distributed.teardown(ctx)
        return None
    # reports/index.md: every claim, one column per dataset reported so far (make run: both datasets).
    with _lock(out.parent / "index.md", "writing the claims index"):
        write_index(out.parent)
    elapsed = time.perf_counter() - start
    print(f"{'kept' if reused else 'wrote'} {out}/report.md in {elapsed:.0f} s")
    print(json.dumps({k: v for k, v in numbers.items() if not k.startswith("table")}, indent=1, default=float))
    distributed.teardown(ctx)
    return out
