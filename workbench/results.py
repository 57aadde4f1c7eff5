"""What notebooks 02-06 read: the run of ``python -m workbench reproduce --config <dataset>``.

    runs = dataset_results(("shapes", "neon-trees"))  # the lab, then real data: name -> PipelineResults
    results = pipeline_results("neon-trees")   # .output (PipelineOutput), .coco_gt, .run_dirs, .ann_file, .img_dir
    images = coco_images(results)              # image id -> ndarray[H, W, 3]

The same options, run folders and pipeline cache as the command (:func:`workbench.reproduce.pipeline_output`),
so a notebook opened after ``make run`` trains and infers nothing. In fast mode (CI) a tiny ``shapes``
run goes under ``<root>/cache/notebooks/fast-shapes/`` instead: a few training iterations on a few
96-px images, the whole pipeline on :data:`FAST_VAL_IMAGES` of them. Its numbers only show that
everything runs; they say nothing about the paper.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from matplotlib.figure import Figure
from pycocotools.coco import COCO

from workbench import reproduce
from workbench.data.images import CocoImages
from workbench.paths import project_root
from workbench.pipeline import PipelineOutput, PipelineSettings

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
    ann_file: Path  # the validation split's COCO file ...
    img_dir: Path  # ... and image folder (for CocoImages)


def reproduce_options(dataset: str = "neon-trees", fast: bool = False, root: str | Path | None = None, *,
                      joint: bool = False) -> reproduce.ReproduceOptions:
    """The options :func:`pipeline_results` runs ``reproduce`` with.

    ``fast=False``: exactly ``python -m workbench reproduce --config <dataset> --no-joint``, as ``make run``
    runs it (relative paths, read from ``root``); ``joint=True`` drops ``--no-joint`` (Table 3 needs the
    joint model, which ``make run RUN_SHAPES= RUN_NEON=`` trains). ``fast=True``: the tiny ``shapes`` run of fast mode (``dataset`` is not used),
    every path absolute under ``<root>/cache/notebooks/fast-shapes``.
    """
    if not fast:
        return reproduce.ReproduceOptions(preset=dataset, joint=joint)
    root = Path(root) if root is not None else project_root()
    base = (root / "cache" / "notebooks" / FAST_NAME).resolve()
    return reproduce.ReproduceOptions(
        preset="shapes", overrides=[f"data.root={(root / 'cache' / 'data').resolve()}", *FAST_OVERRIDES],
        iterations=dict(FAST_ITERATIONS),
        settings=PipelineSettings(score_thresh=0.0, raw_max_detections=300),
        out_dir=str(base / "report"), runs_dir=str(base / "runs"), cache_dir=str(base / "pipeline"),
    )


def pipeline_results(dataset: str = "neon-trees", fast: bool = False, root: str | Path | None = None, *,
                     joint: bool = False, options: reproduce.ReproduceOptions | None = None) -> PipelineResults:
    """The pipeline output of ``python -m workbench reproduce --config <dataset> [--no-joint]``, from its cache.

    Trains what is not trained yet and runs the pipeline only when its cached output is missing
    (:func:`workbench.reproduce.pipeline_output`); otherwise just loads it, after printing
    :func:`missing_cache_message` when the cache is missing. Training progress goes to stdout.

    Args:
        dataset: a preset of :mod:`workbench.config` (``neon-trees``, ``shapes``, ``coco``).
        fast: the tiny ``shapes`` run of fast mode instead (see :func:`reproduce_options`); a first
            call under a ``root`` trains it (~1 min on 2 cores), later calls reuse it.
        joint: with the jointly trained model (Table 3), i.e. without ``--no-joint`` (see :func:`reproduce_options`).
        root: the project folder (default :func:`workbench.paths.project_root`); ``runs/`` and
            ``cache/`` are read and written there, as ``make run`` does from the repository root.
        options: any other ``reproduce`` options instead of ``dataset`` and ``fast`` (e.g. those of
            ``reproduce --config coco --val-set ...``), paths relative to ``root``.
    """
    root = (Path(root) if root is not None else project_root()).resolve()
    opts = options if options is not None else reproduce_options(dataset, fast, root, joint=joint)
    root.mkdir(parents=True, exist_ok=True)  # a fresh $WORKBENCH_ROOT
    with contextlib.chdir(root), contextlib.redirect_stderr(sys.stdout):  # progress bars: ordinary output in a notebook
        if options is None and not fast:
            cache = reproduce.pipeline_cache_path(opts)
            if cache is None or not cache.exists():  # say so before what can take many minutes
                print(missing_cache_message(dataset, root, joint=joint))
        output = reproduce.pipeline_output(opts)
        val_set = reproduce.validation_set(opts)
        return PipelineResults(
            output=output, coco_gt=val_set.coco,
            run_dirs={kind: Path(cfg.out_dir).resolve() for kind, cfg in reproduce.stages(opts).train.items()},
            ann_file=Path(val_set.ann_file).resolve(), img_dir=Path(val_set.img_dir).resolve(),
        )


def missing_cache_message(dataset: str, root: str | Path, *, joint: bool = False) -> str:
    """What a notebook prints when ``dataset`` has no cached run under ``root``: the command that makes one."""
    command = f"python -m workbench reproduce --config {dataset}{'' if joint else ' --no-joint'}"
    make = "`make run RUN_SHAPES= RUN_NEON=`" if joint else "`make run`"
    return (f"No cached pipeline output of {dataset!r} under {root}: `{command}` (or {make}, which reproduces shapes "
            "then neon-trees) creates it. Training and running it now instead, which can take many minutes.")


def dataset_results(datasets: Sequence[str], fast: bool = False, root: str | Path | None = None) -> dict[str, PipelineResults]:
    """:func:`pipeline_results` of each of ``datasets``, in order (e.g. the lab, then real data).

    In fast mode every name gets the one tiny ``shapes`` run (loaded once): a stand-in that shows the
    notebook runs, not what the named dataset does; :func:`run_label` says so in headings.
    """
    if not datasets:
        raise ValueError("datasets must name at least one preset, e.g. ('shapes', 'neon-trees')")
    if fast:
        tiny = pipeline_results(fast=True, root=root)
        return {name: tiny for name in datasets}
    return {name: pipeline_results(name, root=root) for name in datasets}


def run_label(dataset: str, fast: bool) -> str:
    """``dataset``'s name for headings; in fast mode marked as the tiny shapes run standing in for it."""
    return f"{dataset} (fast mode: the tiny shapes run stands in)" if fast else dataset


def coco_images(results: PipelineResults) -> CocoImages:
    """The validation images of ``results``, by image id."""
    return CocoImages(results.ann_file, results.img_dir)


def figure_saver(folder: str | Path | None) -> Callable[[Figure, str], Figure]:
    """``save(fig, name)``: writes ``<folder>/<name>.png`` when ``folder`` is set, else does nothing; returns ``fig``."""

    def save(fig: Figure, name: str) -> Figure:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(folder) / f"{name}.png", dpi=150, bbox_inches="tight")
        return fig

    return save
