"""One loader for every dataset: a COCO-format annotation file plus an image folder.

    ds = CocoDetection("cache/data/shapes-seed0-train1000-val200-128px/annotations/val.json",
                       "cache/data/shapes-seed0-train1000-val200-128px/images")
    image, target = ds[0]          # Tensor[3, H, W] in [0, 1]; {"boxes", "labels", "image_id"}

Labels are contiguous, ``1..num_classes`` in the order of the COCO category ids, with 0 left for the
background (torchvision's detection convention). ``ds.coco`` is the pycocotools index of the same file,
so evaluation (``COCOeval``) runs against exactly what was loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from ..files import content_fingerprint
from .images import decode_image
from .validate import load_json, validate_coco

Target = dict[str, Any]


class CocoDetection(Dataset):
    """A COCO-format detection dataset, validated when constructed.

    Args:
        ann_file: COCO JSON with ``images``, ``annotations`` and ``categories``.
        img_dir: directory that the images' ``file_name`` values are relative to.
        transforms: optional ``transforms(image, target) -> (image, target)`` applied in ``__getitem__``.

    Raises:
        FileNotFoundError: the annotation file, the image directory or an image file is missing.
        ValueError: the file is not JSON or is malformed/inconsistent (see :func:`validate_coco`);
            the message names the file and the record.

    ``__getitem__(i)`` returns ``(image, target)``:

    - image (Tensor[3, H, W], float32): RGB in ``[0, 1]``.
    - target["boxes"] (Tensor[N, 4], float32): ``(x0, y0, x1, y1)`` pixels, clipped to the image.
    - target["labels"] (Tensor[N], int64): contiguous labels in ``1..num_classes``.
    - target["image_id"] (int): the COCO image id.

    Crowd annotations (``iscrowd=1``) and zero-size boxes are left out of the targets (they stay in
    ``coco`` for evaluation, where COCOeval treats crowd regions as "ignore"). Images without
    annotations are kept, with ``boxes`` of shape ``[0, 4]``.

    Attributes:
        coco (pycocotools.coco.COCO): index of the annotation file.
        image_ids (list[int]): COCO image ids, sorted; ``self[i]`` is image ``image_ids[i]``.
        num_classes (int): number of categories, without background.
        class_names (list[str]): ``class_names[label - 1]`` is the name of ``label``.
        label_to_cat_id (dict[int, int]): contiguous label -> COCO category id.
        cat_id_to_label (dict[int, int]): COCO category id -> contiguous label.
    """

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        *,
        transforms: Callable[[Tensor, Target], tuple[Tensor, Target]] | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.transforms = transforms
        data = load_json(self.ann_file)
        degenerate = validate_coco(data, self.ann_file, self.img_dir)
        if degenerate:
            warnings.warn(
                f"{self.ann_file}: {len(degenerate)} annotation(s) with zero width or height left out of the "
                f"targets (ids {degenerate[:5]}{' ...' if len(degenerate) > 5 else ''})",
                stacklevel=2,
            )
        self._skip_ann_ids = set(degenerate)
        self.coco = coco_from_dict(data)

        cat_ids = sorted(self.coco.getCatIds())
        self.label_to_cat_id = {label: cat_id for label, cat_id in enumerate(cat_ids, start=1)}
        self.cat_id_to_label = {cat_id: label for label, cat_id in self.label_to_cat_id.items()}
        self.class_names = [self.coco.cats[c]["name"] for c in cat_ids]
        self.num_classes = len(cat_ids)
        self.image_ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        target = self.target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def load_image(self, image_id: int) -> Tensor:
        """Image ``image_id`` as ``Tensor[3, H, W]`` float32 in ``[0, 1]`` (see :func:`decode_image`).

        Raises:
            ValueError: naming the annotation file, the image id and the image file when the file
                cannot be decoded or its size is not the one the annotation file gives.
        """
        info = self.coco.imgs[image_id]
        path = self.img_dir / info["file_name"]
        try:
            array = decode_image(path)  # (H, W, 3)
        except ValueError as e:
            raise ValueError(f"{self.ann_file}: image id {image_id}: {e}") from None
        if array.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{self.ann_file}: image id {image_id}: {path} is {array.shape[1]}x{array.shape[0]} but the "
                f"annotation file says {info['width']}x{info['height']}"
            )
        return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)

    def fingerprint(self, hash_cache: str | Path | None = None) -> str:
        """16 hex digits naming the content of the annotation file and of every image file it lists.

        Equal fingerprints mean byte-identical data, so results computed from it can be reused;
        see :func:`workbench.files.content_fingerprint` (``hash_cache``: reread only changed files).
        """
        img_dir = str(self.img_dir)
        files = {"annotations": self.ann_file}
        files.update({f"images/{info['file_name']}": os.path.join(img_dir, info["file_name"])
                      for info in self.coco.imgs.values()})
        return content_fingerprint(files, hash_cache)

    def target(self, image_id: int) -> Target:
        """The target dict of image ``image_id``, without loading the image."""
        info = self.coco.imgs[image_id]
        anns = [
            a for a in self.coco.imgToAnns.get(image_id, [])
            if not a.get("iscrowd", 0) and a["id"] not in self._skip_ann_ids
        ]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
        boxes = box_convert(xywh, "xywh", "xyxy")  # (x0, y0, x1, y1)
        # Validation allowed a small overshoot; clip it so every box lies inside its image.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, info["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, info["height"])
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": int(image_id)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.ann_file)!r}, {str(self.img_dir)!r}): "
            f"{len(self)} images, {self.num_classes} classes"
        )


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index of already-parsed JSON (reading the file once, and without its prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
