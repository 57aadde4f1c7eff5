"""Image files: decoded for training (:func:`decode_image`, read through :mod:`workbench.data.coco`) and,
by COCO image id, for figures and widgets (:class:`CocoImages`)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.paths import project_root

from .validate import load_json

# 16-bit grayscale as PIL opens it (PNG, TIFF): scaled by 65535, where convert("RGB") would clip at 255.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(path: str | Path) -> np.ndarray:
    """Every pixel of the image file ``path``, as RGB ``ndarray[H, W, 3]`` float32 in ``[0, 1]``.

    8-bit images (grey, palette, RGB, RGBA, CMYK, ...) are converted to RGB by PIL and divided by 255;
    16-bit grayscale is divided by 65535 and repeated over the three channels. The whole file is
    decoded here, so a damaged file fails now, naming itself, and not later inside a model.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``: not an image, truncated or corrupt, larger than PIL's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), or a pixel format with no
            defined range (32-bit integer or float).
    """
    try:
        with Image.open(path) as im:
            im.load()  # PIL decodes lazily; a truncated file only fails here
            if im.mode in _SIXTEEN_BIT_MODES:
                grey = np.asarray(im).astype(np.float32) / 65535.0  # (H, W)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if im.mode in ("I", "F"):
                raise ValueError(f"{path}: pixel format {im.mode!r} (32-bit {'integer' if im.mode == 'I' else 'float'}) "
                                 "has no defined range; expected an 8-bit image or 16-bit grayscale")
            return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError, "image file is truncated", bad data
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None


class CocoImages:
    """Images by COCO image id, for display: decoded by :func:`decode_image`, cached.

    Args:
        ann_file: COCO JSON whose ``images`` name the files.
        img_dir: the folder ``file_name`` is relative to.

    ``images(image_id)`` returns ``ndarray[H, W, 3]`` uint8; ``image_info`` maps image id -> its entry of
    ``images`` (``file_name``, ``width``, ``height``); ``category_names`` maps category id -> name.
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        data = load_json(self.ann_file)
        self.image_info = {int(info["id"]): info for info in data.get("images", [])}
        self.category_names = {c["id"]: c["name"] for c in data.get("categories", [])}
        self._load = lru_cache(maxsize=32)(self._read)

    def _read(self, image_id: int) -> np.ndarray:
        if image_id not in self.image_info:
            raise KeyError(f"{self.ann_file} has no image with id {image_id}")
        pixels = decode_image(self.img_dir / self.image_info[image_id]["file_name"])  # (H, W, 3) in [0, 1]
        return np.round(pixels * 255.0).astype(np.uint8)

    def __call__(self, image_id: int) -> np.ndarray:
        return self._load(int(image_id))

    @classmethod
    def from_meta(cls, meta: dict, search: Iterable[Path] | None = None) -> "CocoImages | None":
        """The images a record's sidecar names (``ann_file``, ``img_dir``), or ``None`` if they are not here.

        Relative paths are tried against each folder of ``search`` (default: the working directory, then
        :func:`workbench.paths.project_root`).
        """
        if not meta.get("ann_file") or not meta.get("img_dir"):
            return None
        for base in search if search is not None else (Path.cwd(), project_root()):
            ann_file, img_dir = Path(base) / meta["ann_file"], Path(base) / meta["img_dir"]
            if ann_file.is_file() and img_dir.is_dir():
                return cls(ann_file, img_dir)
        return None
