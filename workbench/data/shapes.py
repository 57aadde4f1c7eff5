"""``shapes``: a small synthetic detection dataset, generated deterministically from a seed.

Crowded scenes of rectangles, ellipses and triangles in random colours on textured backgrounds
(colour gradient + smooth blotches + pixel noise). Objects overlap, but each keeps at least
``MIN_VISIBLE`` of its pixels, and its box is the tight box of its *visible* pixels (COCO's convention:
the box of what can be seen). It trains in minutes on a CPU, so every analysis of the workbench can be
tried end to end before running on real data.

    python -m workbench.data prepare shapes --seed 0 --num-train 1000 --num-val 200

Each image is drawn from its own generator seeded with ``(seed, split, index)``, so image ``i`` of a
split does not depend on how many images were asked for, and the same seed gives the same bytes.

A third split, ``tune`` (:func:`prepare_shapes_tune`), is held out for choosing inference
hyper-parameters (e.g. the refinement step, ``workbench.analysis.step_sweep``): same generator, its own
seeds, never trained on nor reported. It lives in a folder of its own, so adding it changed neither the
train/val folder nor anything cached from it: ``get_dataset("shapes", "tune", num_tune=100)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folder import SPLITS, annotation_file, image_dir, prepare_atomically, write_json

VERSION = 1  # bump when the generator changes, so cached folders are rebuilt
TUNE = "tune"  # the held-out split for choosing hyper-parameters (folder of its own, see prepare_shapes_tune)
SEED_SPLITS = (*SPLITS, TUNE)  # a split's position here is its number in every image's seed: train 0, val 1, tune 2
CLASS_NAMES = ("rectangle", "ellipse", "triangle")  # label k is CLASS_NAMES[k - 1]; COCO category id = k

MIN_OBJECTS, MAX_OBJECTS = 2, 12  # objects per image (fewer when placements keep failing)
MIN_SIZE, MAX_SIZE = 0.10, 0.40  # object width/height as a fraction of the image side
MIN_VISIBLE = 0.5  # every object keeps at least this fraction of its pixels uncovered
PLACEMENT_TRIES = 20  # random placements tried per object before giving up on it
MIN_CONTRAST = 0.25  # mean absolute RGB difference from the background under the object
NOISE_STD = 0.03  # pixel noise over the finished image, in [0, 1] intensity units


def folder_name(seed: int, num_train: int, num_val: int, image_size: int) -> str:
    """``shapes-seed0-train1000-val200-128px``: every generation parameter is in the name."""
    return f"shapes-seed{seed}-train{num_train}-val{num_val}-{image_size}px"


def prepare_shapes(
    root: str | Path = "cache/data",
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 128,
) -> Path:
    """Generate the dataset into ``<root>/<folder_name(...)>`` unless it is already there.

    Args:
        root: parent folder of the prepared datasets.
        seed: non-negative integer seed.
        num_train, num_val: number of images per split.
        image_size: side of the square images, at least 32 pixels.

    Returns:
        Path: the dataset folder (``annotations/{train,val}.json``, ``images/``, ``manifest.json``).
    """
    seed, num_train, num_val, image_size = _check_ints(seed=(seed, 0), num_train=(num_train, 0), num_val=(num_val, 0),
                                                       image_size=(image_size, 32))
    params = {"dataset": "shapes", "version": VERSION, "seed": seed, "num_train": num_train,
              "num_val": num_val, "image_size": image_size}
    folder = Path(root) / folder_name(seed, num_train, num_val, image_size)
    counts = {"train": num_train, "val": num_val}

    def build(tmp: Path) -> dict[str, Any]:
        splits = {}
        for split in SPLITS:
            coco = write_split(tmp, split, seed, counts[split], image_size)
            splits[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
        return {"classes": list(CLASS_NAMES), "splits": splits}

    return prepare_atomically(folder, params, build)


def tune_folder_name(seed: int, num_tune: int, image_size: int) -> str:
    """``shapes-seed0-tune100-128px``: the folder of the held-out ``tune`` split."""
    return f"shapes-seed{seed}-{TUNE}{num_tune}-{image_size}px"


def prepare_shapes_tune(root: str | Path = "cache/data", seed: int = 0, num_tune: int = 100, image_size: int = 128) -> Path:
    """Generate the held-out ``tune`` split into ``<root>/<tune_folder_name(...)>`` unless it is already there.

    The same generator and distribution as :func:`prepare_shapes`' train and val; image ``i`` is seeded
    with ``(seed, 2, i)`` where train's are ``(seed, 0, i)`` and val's ``(seed, 1, i)``, so its images are
    other images. For choosing inference hyper-parameters only: nothing trains or reports on it.

    Args:
        root, seed, image_size: as for :func:`prepare_shapes` (use the same seed and size as the models' data).
        num_tune: number of images.

    Returns:
        Path: the folder (``annotations/tune.json``, ``images/tune/``, ``manifest.json``).
    """
    seed, num_tune, image_size = _check_ints(seed=(seed, 0), num_tune=(num_tune, 0), image_size=(image_size, 32))
    params = {"dataset": "shapes", "version": VERSION, "split": TUNE, "seed": seed, "num_tune": num_tune,
              "image_size": image_size}

    def build(tmp: Path) -> dict[str, Any]:
        coco = write_split(tmp, TUNE, seed, num_tune, image_size)
        return {"classes": list(CLASS_NAMES), "splits": {TUNE: {"images": len(coco["images"]), "boxes": len(coco["annotations"])}}}

    return prepare_atomically(Path(root) / tune_folder_name(seed, num_tune, image_size), params, build, splits=(TUNE,))


def _check_ints(**values: tuple[Any, int]) -> list[int]:
    """``name=(value, lowest allowed)`` -> the values as ints; a ValueError names the first bad one."""
    for name, (value, low) in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"shapes: {name} must be an integer >= {low}, got {value!r}")
    return [int(value) for value, _ in values.values()]


def write_split(folder: Path, split: str, seed: int, num_images: int, image_size: int) -> dict[str, Any]:
    """Draw and write the images of one split and its COCO annotation file; return the COCO dict."""
    out = image_dir(folder) / split
    out.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"shapes {split}", unit="img", disable=None):
        rng = np.random.default_rng([seed, SEED_SPLITS.index(split), index])
        scene = draw_scene(rng, image_size)
        file_name = f"{split}/{index:06d}.png"
        Image.fromarray(scene.pixels).save(image_dir(folder) / file_name, compress_level=6)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for (x0, y0, x1, y1), label in zip(scene.boxes, scene.labels):
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASS_NAMES, start=1)]
    coco = {"info": {"description": f"shapes v{VERSION}, seed {seed}, split {split}"},
            "images": images, "annotations": annotations, "categories": categories}
    write_json(annotation_file(folder, split), coco)
    return coco


@dataclass
class Scene:
    """One generated image and its objects."""

    pixels: np.ndarray  # uint8 array[size, size, 3]
    boxes: list[tuple[int, int, int, int]]  # (x0, y0, x1, y1) pixel edges, tight around the visible pixels
    labels: list[int]  # 1-based, see CLASS_NAMES
    owner: np.ndarray  # int array[size, size]: index of the object seen at each pixel, -1 for background


def draw_scene(rng: np.random.Generator, size: int) -> Scene:
    """One image: background, then objects painted back to front."""
    image = draw_background(rng, size)  # (H, W, 3) float in [0, 1]
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the object on top of each pixel, -1 = none
    areas: list[int] = []  # full pixel count of each placed object
    placed: list[tuple[int, int, int, int]] = []  # (x0, y0, x1, y1) of each object's full extent
    labels: list[int] = []
    for _ in range(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)):
        for _ in range(PLACEMENT_TRIES):
            label = int(rng.integers(1, len(CLASS_NAMES) + 1))
            w, h = (rng.uniform(MIN_SIZE, MAX_SIZE, size=2) * size).astype(int)
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            mask = shape_mask(rng, label, w, h)  # (h, w) bool, in the object's own box
            if mask.any() and _keeps_others_visible(owner[y0:y0 + h, x0:x0 + w][mask], owner, areas):
                break
        else:
            continue  # no placement left every earlier object visible enough: draw one object fewer
        k = len(areas)
        color = _contrasting_color(rng, image[y0:y0 + h, x0:x0 + w][mask])
        shade = 1.0 + 0.08 * rng.standard_normal((h, w, 1))  # mild texture so objects are not flat
        image[y0:y0 + h, x0:x0 + w][mask] = (color * shade)[mask]
        owner[y0:y0 + h, x0:x0 + w][mask] = k
        areas.append(int(mask.sum()))
        placed.append((x0, y0, x0 + w, y0 + h))
        labels.append(label)

    image += NOISE_STD * rng.standard_normal(image.shape)
    pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    boxes = [_visible_box(owner, k, placed[k]) for k in range(len(placed))]
    return Scene(pixels, boxes, labels, owner)


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Linear gradient between two colours plus smooth random blotches: ``float array[size, size, 3]``."""
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # (H, W) each, in [0, 1]
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (t.max() - t.min())
    image = c0 + (c1 - c0) * t[..., None]  # (H, W, 3)
    # Blotches: a coarse random grid, upsampled bicubically by PIL (fast and smooth).
    coarse = rng.uniform(0, 255, size=(5, 5, 3)).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return np.clip(image + 0.25 * (blotches - 0.5), 0.0, 1.0)


def shape_mask(rng: np.random.Generator, label: int, w: int, h: int) -> np.ndarray:
    """Pixels covered by a shape filling a ``w x h`` box, as ``bool array[h, w]``; pixel centres are tested."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, (h, w) each
    name = CLASS_NAMES[label - 1]
    if name == "rectangle":
        return np.ones((h, w), dtype=bool)
    if name == "ellipse":
        return ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2 <= 1.0
    if name == "triangle":
        # Apex somewhere on the top edge, base along the bottom edge, then turned so the apex may sit on
        # any of the four sides: the class should not be tied to one pose.
        u, v = xx / w, yy / h  # (h, w) in (0, 1)
        apex = rng.uniform(0.0, 1.0)
        side = int(rng.integers(4))
        if side == 1:
            v = 1.0 - v  # apex at the bottom
        elif side == 2:
            u, v = v, u  # apex on the left
        elif side == 3:
            u, v = v, 1.0 - u  # apex on the right
        # Inside when u lies between the two sides joining (apex, 0) to (0, 1) and (1, 1).
        return (u >= apex * (1.0 - v)) & (u <= apex + (1.0 - apex) * v)
    raise ValueError(f"unknown shape label {label}")


def _keeps_others_visible(covered: np.ndarray, owner: np.ndarray, areas: list[int]) -> bool:
    """Would covering the pixels whose owners are ``covered`` leave every object >= MIN_VISIBLE visible?"""
    if not areas:
        return True
    lost = np.bincount(covered + 1, minlength=len(areas) + 1)[1:]  # pixels each object would lose
    visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:]  # pixels each object has now
    return bool(np.all(visible - lost >= MIN_VISIBLE * np.asarray(areas)))


def _contrasting_color(rng: np.random.Generator, under: np.ndarray, tries: int = 10) -> np.ndarray:
    """A random RGB colour that differs from the mean of ``under`` (the pixels it will cover) enough to see."""
    mean = under.reshape(-1, 3).mean(axis=0)
    color = rng.uniform(0.0, 1.0, size=3)
    for _ in range(tries):
        if np.abs(color - mean).mean() >= MIN_CONTRAST:
            break
        color = rng.uniform(0.0, 1.0, size=3)
    return color


def _visible_box(owner: np.ndarray, k: int, extent: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Tight ``(x0, y0, x1, y1)`` around the pixels object ``k`` still shows (edges, so x1 is exclusive)."""
    x0, y0, x1, y1 = extent
    mine = owner[y0:y1, x0:x1] == k
    cols, rows = np.flatnonzero(mine.any(axis=0)), np.flatnonzero(mine.any(axis=1))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1
