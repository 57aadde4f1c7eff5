"""Eager checks of a COCO detection annotation file, so a bad file fails at construction, not mid-training.

Every error is a ``ValueError`` (``FileNotFoundError`` for missing files) whose message names the file and
the offending record the way a person would look it up, e.g.::

    data/bad.json: annotations[17] (id 523): bbox must be 4 finite numbers [x, y, width, height], got [1, 2, 3]

The checks only read the parsed JSON and stat image files; no image is opened (COCO train2017 has
118k images and 860k boxes, and this still runs in seconds).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

REQUIRED_TOP = ("images", "annotations", "categories")
REQUIRED_IMAGE = ("id", "file_name", "width", "height")
REQUIRED_ANNOTATION = ("id", "image_id", "category_id", "bbox")
REQUIRED_CATEGORY = ("id", "name")

# A box may stick out of its image by this much before it counts as wrong: annotation tools and COCO's
# own polygon-derived boxes overshoot by a fraction of a pixel. Real coordinate bugs (xywh read as xyxy,
# normalized coordinates, the wrong image) overshoot by far more. The larger of the two applies.
OUTSIDE_TOLERANCE_PX = 2.0
OUTSIDE_TOLERANCE_FRACTION = 0.01


def outside_tolerance(size: float) -> float:
    """How far (pixels) a box may extend past an image side of length ``size``."""
    return max(OUTSIDE_TOLERANCE_PX, OUTSIDE_TOLERANCE_FRACTION * size)


def load_json(ann_file: str | Path, what: str = "annotation file") -> Any:
    """Parse ``ann_file``; a clear ``FileNotFoundError`` / ``ValueError`` (naming the file) when that fails."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: {what} not found")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not a valid JSON file ({e})") from e
    return data


def validate_coco(data: Any, ann_file: str | Path, img_dir: str | Path | None = None) -> list[int]:
    """Check a parsed COCO detection file for the mistakes that would silently corrupt training.

    Checked: the top-level keys ``images``, ``annotations``, ``categories`` (lists of objects) and the
    required keys of each record; integer, unique ids; positive image sizes; ``bbox`` as 4 finite numbers
    ``[x, y, width, height]`` with non-negative size that lies inside its image up to
    :func:`outside_tolerance`; ``image_id`` and ``category_id`` that exist; ``iscrowd`` in {0, 1}; and,
    when ``img_dir`` is given, that every image file exists.

    Boxes with zero width or height are not errors: MS-COCO train2017 itself has two (height 0, e.g.
    annotation id 918 of image 200365), and the project must read COCO unchanged. Their ids are returned
    so the loader can leave them out of the targets. Negative sizes are errors.

    Args:
        data: the parsed JSON.
        ann_file: the file it came from, for error messages only.
        img_dir: directory the images' ``file_name`` values are relative to; ``None`` skips the file check.

    Returns:
        list[int]: ids of annotations whose box has zero width or height.
    """
    where = str(ann_file)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: top level must be a JSON object with keys {list(REQUIRED_TOP)}, got {type(data).__name__}")
    for key in REQUIRED_TOP:
        if key not in data:
            raise ValueError(f"{where}: missing top-level key {key!r} (a COCO detection file needs {list(REQUIRED_TOP)})")
        if not isinstance(data[key], list):
            raise ValueError(f"{where}: {key!r} must be a list, got {type(data[key]).__name__}")

    cat_ids = _check_records(where, data["categories"], "categories", REQUIRED_CATEGORY)
    image_ids = _check_records(where, data["images"], "images", REQUIRED_IMAGE)
    _check_records(where, data["annotations"], "annotations", REQUIRED_ANNOTATION)

    images = {}
    for i, img in enumerate(data["images"]):
        for key in ("width", "height"):
            if not _is_number(img[key]) or not img[key] > 0:
                raise ValueError(f"{where}: {_record('images', i, img)}: {key} must be a positive number, got {img[key]!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise ValueError(f"{where}: {_record('images', i, img)}: file_name must be a non-empty string, got {img['file_name']!r}")
        images[img["id"]] = img
    assert len(images) == len(image_ids)

    degenerate = []
    for i, ann in enumerate(data["annotations"]):
        problem = _annotation_problem(ann, images, cat_ids)
        if problem is not None:
            raise ValueError(f"{where}: {_record('annotations', i, ann)}: {problem}")
        if ann["bbox"][2] == 0 or ann["bbox"][3] == 0:
            degenerate.append(ann["id"])

    if img_dir is not None:
        check_image_files(where, data["images"], img_dir)
    return degenerate


def load_results(path: str | Path, image_ids: set[int], cat_ids: set[int]) -> list[dict[str, Any]]:
    """Read and check a COCO results file (another detector's detections); see :func:`validate_results`."""
    results = load_json(path, "detections file")
    validate_results(results, str(path), image_ids, cat_ids)
    return results


def validate_results(results: Any, where: str, image_ids: set[int], cat_ids: set[int]) -> None:
    """Check COCO results records (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``).

    Every record must name a known image and category, have a ``bbox`` of 4 finite numbers with
    width and height > 0 and a finite numeric ``score``. Images without any record are fine (they
    have no detections). ``ValueError`` naming ``where`` and the record otherwise.
    """
    if not isinstance(results, list):
        raise ValueError(f"{where}: must be a JSON list of detections (COCO results format), got {type(results).__name__}")
    for k, r in enumerate(results):
        problem = _result_problem(r, image_ids, cat_ids)
        if problem is not None:
            raise ValueError(f"{where}: detection [{k}]: {problem}")


def _result_problem(r: Any, image_ids: set[int], cat_ids: set[int]) -> str | None:
    if not isinstance(r, dict):
        return f"must be a JSON object with image_id, category_id, bbox, score, got {type(r).__name__}"
    missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in r]
    if missing:
        return f"missing {missing} (COCO results format: image_id, category_id, bbox [x, y, width, height], score)"
    if not _is_int(r["image_id"]) or r["image_id"] not in image_ids:
        return f"image_id {r['image_id']!r} is not an image of the evaluated dataset"
    if not _is_int(r["category_id"]) or r["category_id"] not in cat_ids:
        return f"category_id {r['category_id']!r} is not a category of the dataset"
    bbox = r["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return f"bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}"
    if not (bbox[2] > 0 and bbox[3] > 0):
        return f"bbox width and height must be > 0, got {bbox!r} ([x, y, width, height])"
    if not (_is_number(r["score"]) and math.isfinite(r["score"])):
        return f"score must be a finite number, got {r['score']!r}"
    return None


def check_image_files(where: str, images: list[dict[str, Any]], img_dir: str | Path) -> None:
    """``FileNotFoundError`` naming the first image record whose file does not exist under ``img_dir``."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{where}: image directory {img_dir} not found")
    # One directory listing instead of one stat per image: much faster for 100k-image folders.
    listing: dict[Path, set[str]] = {}
    for i, img in enumerate(images):
        path = img_dir / img["file_name"]
        if path.parent not in listing:
            listing[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if path.name not in listing[path.parent]:
            raise FileNotFoundError(f"{where}: {_record('images', i, img)}: image file {path} not found")


def _check_records(where: str, records: list[Any], section: str, required: tuple[str, ...]) -> set[int]:
    """Each record is an object with the ``required`` keys and a unique integer ``id``; returns the ids."""
    ids: dict[int, int] = {}
    required_keys = set(required)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: {section}[{i}]: must be a JSON object, got {type(rec).__name__}")
        if not rec.keys() >= required_keys:
            key = next(k for k in required if k not in rec)
            raise ValueError(f"{where}: {_record(section, i, rec)}: missing key {key!r} (required: {list(required)})")
        rec_id = rec["id"]
        if not _is_int(rec_id):
            raise ValueError(f"{where}: {section}[{i}]: id must be an integer, got {rec_id!r}")
        if rec_id in ids:
            raise ValueError(f"{where}: {_record(section, i, rec)}: duplicate id, already used by {section}[{ids[rec_id]}]")
        ids[rec_id] = i
    return set(ids)


def _annotation_problem(ann: dict[str, Any], images: dict[int, dict[str, Any]], cat_ids: set[int]) -> str | None:
    """What is wrong with one annotation (its keys are known to exist), or ``None``.

    Returns a message rather than raising so the caller adds the file and record name, and the
    record name is only formatted for the one bad record (this runs 860k times on COCO train2017).
    """
    if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
        return f"image_id {ann['image_id']!r} is not the id of any entry in 'images'"
    if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
        return f"category_id {ann['category_id']!r} is not the id of any entry in 'categories'"
    iscrowd = ann.get("iscrowd", 0)
    if not (_is_int(iscrowd) and iscrowd in (0, 1)):
        return f"iscrowd must be 0 or 1, got {iscrowd!r}"

    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return f"bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}"
    x, y, w, h = bbox
    if w < 0 or h < 0:
        return f"bbox width and height must not be negative, got {bbox!r} ([x, y, width, height])"

    img = images[ann["image_id"]]
    W, H = img["width"], img["height"]
    tol_x, tol_y = outside_tolerance(W), outside_tolerance(H)
    # The second line catches a box lying wholly in the tolerance margin: clipped, it would have no area.
    if (x < -tol_x or y < -tol_y or x + w > W + tol_x or y + h > H + tol_y
            or (w > 0 and h > 0 and (x >= W or y >= H or x + w <= 0 or y + h <= 0))):
        return (f"bbox {bbox!r} ([x, y, width, height]) lies outside its image (image id {img['id']}, "
                f"{W}x{H}) by more than the tolerance ({tol_x:g}, {tol_y:g}) px")
    return None


def _record(section: str, i: int, rec: dict[str, Any]) -> str:
    """``annotations[17] (id 523)``: position for a text editor, id for a COCO tool."""
    return f"{section}[{i}] (id {rec['id']!r})" if "id" in rec else f"{section}[{i}]"


def _is_int(v: Any) -> bool:
    # bool is a subclass of int in Python; a true/false id is a mistake, not an id.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
