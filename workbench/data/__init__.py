"""The data layer: every dataset is a COCO-format folder read by one loader, :class:`CocoDetection`.

    from workbench.data import get_dataset, collate_fn
    train = get_dataset("shapes", "train", seed=0, num_train=1000, num_val=200)   # generated on first use
    val = get_dataset("neon-trees", "val")                                        # prepared on first use
    coco = get_dataset("coco", "val", ann_file=".../instances_val2017.json", img_dir=".../val2017")
    loader = torch.utils.data.DataLoader(train, batch_size=8, collate_fn=collate_fn)

Modules: ``coco`` (the loader), ``validate`` (checks of annotation files), ``folder`` (the prepared
folder layout, written atomically), ``shapes`` (synthetic generator), ``neon`` (NEON tree crowns:
download, convert, tile, split). ``python -m workbench.data prepare neon-trees`` prepares from the shell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .coco import CocoDetection, Target
from .folder import SPLITS, annotation_file, image_dir
from .neon import prepare_neon
from .shapes import TUNE, prepare_shapes, prepare_shapes_tune

__all__ = ["DATASETS", "CocoDetection", "collate_fn", "get_dataset", "prepare_dataset"]

DATASETS = ("neon-trees", "shapes", "coco")


def prepare_dataset(name: str, root: str | Path = "cache/data", **options: Any) -> Path:
    """Prepare ``neon-trees`` or ``shapes`` under ``root`` (a no-op when already there); return its folder.

    ``shapes`` options: ``seed`` (0), ``num_train`` (1000), ``num_val`` (200), ``image_size`` (128).
    ``neon-trees`` takes no options.
    """
    if name == "shapes":
        allowed = {"seed", "num_train", "num_val", "image_size"}
        _check_options(name, options, allowed)
        return prepare_shapes(root, **options)
    if name == "neon-trees":
        _check_options(name, options, set())
        return prepare_neon(root)
    raise ValueError(f"cannot prepare dataset {name!r}: only 'neon-trees' and 'shapes' are generated here")


def get_dataset(name: str, split: str, root: str | Path = "cache/data", **options: Any) -> CocoDetection:
    """Load a dataset split, preparing it first when needed.

    Args:
        name: ``"neon-trees"``, ``"shapes"`` or ``"coco"``.
        split: ``"train"`` or ``"val"`` (for ``"coco"`` only a label: the files are given directly);
            ``shapes`` also has ``"tune"``, held out for choosing inference hyper-parameters
            (:func:`~workbench.data.shapes.prepare_shapes_tune`).
        root: parent folder of prepared datasets (git-ignored ``cache/data`` by default).
        **options: ``transforms`` for :class:`CocoDetection`, plus per dataset:

            - ``shapes``: ``seed``, ``num_train``, ``num_val``, ``image_size`` (see :func:`prepare_dataset`);
              for ``"tune"`` also ``num_tune`` (default 100), and ``num_train``/``num_val`` are accepted
              but do not matter (a models' data config can be pointed at the tune split as it is).
            - ``coco``: ``ann_file`` and ``img_dir`` (required), e.g. MS-COCO 2017 as distributed.

    Returns:
        CocoDetection
    """
    transforms = options.pop("transforms", None)
    if name == "coco":
        missing = [k for k in ("ann_file", "img_dir") if options.get(k) is None]
        if missing:
            raise ValueError(f"get_dataset('coco', ...) needs the options ann_file and img_dir (missing: {missing})")
        _check_options(name, options, {"ann_file", "img_dir"})
        return CocoDetection(options["ann_file"], options["img_dir"], transforms=transforms)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    if name == "shapes" and split == TUNE:
        _check_options(name, options, {"seed", "num_train", "num_val", "image_size", "num_tune"})
        tune_options = {k: v for k, v in options.items() if k in ("seed", "num_tune", "image_size")}
        folder = prepare_shapes_tune(root, **tune_options)
        return CocoDetection(annotation_file(folder, split), image_dir(folder), transforms=transforms)
    if split not in SPLITS:
        extra = [TUNE] if name == "shapes" else []
        raise ValueError(f"unknown split {split!r} for {name!r}; expected one of {[*SPLITS, *extra]}")
    folder = prepare_dataset(name, root, **options)
    return CocoDetection(annotation_file(folder, split), image_dir(folder), transforms=transforms)


def collate_fn(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batch ``(image, target)`` pairs as ``(images, targets)`` lists: images differ in size, as in torchvision."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def _check_options(name: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"dataset {name!r} got unknown option(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
