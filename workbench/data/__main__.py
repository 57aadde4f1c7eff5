"""Prepare or check datasets from the shell.

    python -m workbench.data prepare neon-trees [--root cache/data]
    python -m workbench.data prepare shapes --seed 0 --num-train 1000 --num-val 200 --image-size 128
    python -m workbench.data check path/to/instances_val2017.json path/to/val2017

``prepare`` is idempotent: a folder already prepared with the same parameters is left alone.
``check`` validates any COCO-format dataset the way the loader does, decodes every image (a truncated
or unreadable file is reported with its path and image id; ``--no-decode`` skips this) and prints its
size; it exits with 1 when an image is bad.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from . import CocoDetection, prepare_dataset
from .folder import read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="prepare neon-trees or shapes into ROOT/<name>")
    prep.add_argument("name", choices=["neon-trees", "shapes"])
    prep.add_argument("--root", default="cache/data", help="parent folder of prepared datasets (default: %(default)s)")
    prep.add_argument("--seed", type=int, help="shapes: generator seed (default 0)")
    prep.add_argument("--num-train", type=int, help="shapes: training images (default 1000)")
    prep.add_argument("--num-val", type=int, help="shapes: validation images (default 200)")
    prep.add_argument("--image-size", type=int, help="shapes: image side in pixels (default 128)")

    check = sub.add_parser("check", help="validate a COCO-format annotation file and its images")
    check.add_argument("ann_file")
    check.add_argument("img_dir")
    check.add_argument("--no-decode", action="store_true", help="only check the annotation file and that image files exist")

    args = parser.parse_args(argv)
    if args.command == "prepare":
        options = {k: getattr(args, k) for k in ("seed", "num_train", "num_val", "image_size")}
        options = {k: v for k, v in options.items() if v is not None}
        if args.name == "neon-trees" and options:
            parser.error(f"neon-trees takes no options, got {sorted(options)}")
        folder = prepare_dataset(args.name, args.root, **options)
        manifest = read_manifest(folder) or {}
        counts = {s: {k: v for k, v in c.items() if not isinstance(v, list)} for s, c in manifest.get("splits", {}).items()}
        print(f"{folder}: {json.dumps(counts)}")
    else:
        ds = CocoDetection(args.ann_file, args.img_dir)
        bad = [] if args.no_decode else _undecodable(ds)
        for problem in bad:
            print(problem, file=sys.stderr)
        if bad:
            print(f"{args.ann_file}: {len(bad)} of {len(ds)} images cannot be used", file=sys.stderr)
            return 1
        boxes = sum(len(ds.target(i)["boxes"]) for i in ds.image_ids)
        print(f"{args.ann_file}: OK, {len(ds)} images{'' if args.no_decode else ' decoded'}, {boxes} boxes "
              f"(crowd excluded), {ds.num_classes} classes")
    return 0


def _undecodable(ds: CocoDetection) -> list[str]:
    """One message per image that cannot be decoded or has the wrong size (each names file and image id)."""
    problems = []
    for image_id in tqdm(ds.image_ids, desc="decoding images", unit="img", disable=len(ds) < 100):
        try:
            ds.load_image(image_id)
        except ValueError as e:
            problems.append(str(e))
    return problems


if __name__ == "__main__":
    sys.exit(main())
