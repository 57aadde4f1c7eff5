"""Command line: ``python -m workbench <command> ...``; one ``add_<command>`` + ``run_<command>`` pair each.

    python -m workbench train --config neon-trees --model detector
    python -m workbench train --config neon-trees --model iou --set optim.lr=0.005 --out runs/try
    python -m workbench train --config shapes --model detector --dry-run     # print config + fingerprint
    torchrun --standalone --nproc_per_node=8 -m workbench train --config coco --model detector

To add a command, write ``add_<name>(subparsers)`` that registers its parser with
``set_defaults(run=run_<name>)``, and list it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_train(sub: argparse._SubParsersAction) -> None:
    from .config import MODEL_KINDS, PRESETS

    p = sub.add_parser("train", help="train a detector, a standalone IoU-Net or the joint model",
                       description="Train one model. Under torchrun, --batch-size is per process: the global "
                                   "batch is batch_size x WORLD_SIZE.")
    p.add_argument("--config", required=True, help=f"preset ({', '.join(PRESETS)}) or a run's config.json")
    p.add_argument("--model", default="detector", help=f"model kind: {', '.join(MODEL_KINDS)} (default detector)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt (same schedule, same final iteration)")
    p.add_argument("--out", help="output folder (config key out_dir)")
    p.add_argument("--iterations", type=int, help="total iterations; warm-up and lr steps keep their fractions of the run")
    p.add_argument("--batch-size", type=int, help="images per process per iteration (config key batch_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="config key device")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.02 --set data.options.num_train=200 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and its fingerprint, train nothing")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import get_config
    from .train import TrainingStopped, train

    flags = {"out_dir": args.out, "batch_size": args.batch_size, "device": args.device}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    config = get_config(args.config, args.model, overrides, iterations=args.iterations)
    if args.dry_run:
        print(json.dumps({"fingerprint": config.fingerprint(), "config": config.to_dict()}, indent=2))
        return 0
    try:
        path = train(config, resume=args.resume)
    except TrainingStopped as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + int(e.signum)
    print(path)
    return 0


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    from .config import PRESETS

    p = sub.add_parser("reproduce", help="train (or reuse), run the paper's pipeline, write reports/<dataset>/",
                       description="The paper's experiments end to end; every stage is cached, so a second run "
                                   "only rewrites the report.")
    p.add_argument("--config", default="neon-trees", help=f"preset ({', '.join(PRESETS)}); default neon-trees")
    p.add_argument("--out", default="", help="report folder (default reports/<config>)")
    p.add_argument("--iterations", type=int, help="training length of every model (schedules rescaled)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate the first N validation images (default all)")
    p.add_argument("--no-joint", action="store_true", help="skip the jointly trained model (Table 3)")
    p.add_argument("--detections", default="", metavar="RESULTS.json",
                   help="another detector's raw detections (COCO results format) to post-process and refine")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config field for every model (repeatable)")
    p.add_argument("--val-set", dest="val_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data field of the evaluated split only, e.g. --val-set "
                        "data.options.ann_file=.../instances_val2017.json (repeatable)")
    p.set_defaults(run=run_reproduce)


def run_reproduce(args: argparse.Namespace) -> int:
    from .pipeline import PipelineSettings
    from .reproduce import ReproduceOptions, reproduce

    kinds = ("detector", "iou", "joint")
    opts = ReproduceOptions(
        preset=args.config, overrides=args.overrides, val_overrides=args.val_overrides, out_dir=args.out, joint=not args.no_joint,
        iterations={k: args.iterations for k in kinds} if args.iterations else {},
        settings=PipelineSettings(max_images=args.max_images), external_detections=args.detections,
    )
    reproduce(opts)
    return 0


def add_tune_step(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune-step", help="choose Algorithm 2's step reading and size on the held-out shapes tune split",
                       description="Refine after NMS with both step readings (width: λ·w·grad, log: λ·w²·grad) over a "
                                   "λ grid on held-out images; write experiments/step_sweep_<config>.{json,md}. Uses "
                                   "the models `reproduce --config <config> --no-joint` trains (trained first if missing).")
    p.add_argument("--config", default="shapes", help="preset with a tune split (shapes); default shapes")
    p.add_argument("--images", type=int, default=100, help="tune images (default 100)")
    p.add_argument("--out", default="experiments", help="output folder (default experiments)")
    p.add_argument("--grid", action="append", default=[], metavar="READING=λ,λ,...",
                   help="λ values of one reading, e.g. --grid width=0.5,1,2 --grid log=0.02,0.05 (default: step_sweep.GRID)")
    p.set_defaults(run=run_tune_step)


def run_tune_step(args: argparse.Namespace) -> int:
    from .analysis.step_sweep import tune_step
    from .reproduce import ReproduceOptions

    if args.config != "shapes":
        raise SystemExit(f"error: --config {args.config!r}: only 'shapes' has a held-out tune split")
    if args.images < 1:
        raise SystemExit(f"error: --images must be >= 1, got {args.images}")
    grid = {}
    for spec in args.grid:
        reading, _, values = spec.partition("=")
        try:
            grid[reading] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"error: --grid {spec!r}: expected READING=λ,λ,... with numbers, e.g. log=0.02,0.05") from None
    _, meta = tune_step(ReproduceOptions(preset=args.config, joint=False), args.images, args.out, **({"grid": grid} if grid else {}))
    print(json.dumps({k: meta[k] for k in ("chosen", "current_default", "chosen_is_current_default")}))
    return 0


COMMANDS = (add_train, add_reproduce, add_tune_step)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="IoU-Net Workbench")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        return args.run(args)
    except ConfigError as e:  # a bad key or value: one line naming it, no traceback
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
