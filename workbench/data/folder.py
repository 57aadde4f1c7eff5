"""A prepared dataset folder: the COCO-folder layout every dataset is written in, and how it is written.

Layout (what :func:`workbench.data.get_dataset` reads)::

    <root>/<name>/
        manifest.json            what was generated, with which parameters, and the counts
        annotations/train.json   COCO JSON, ``file_name`` relative to ``images/``
        annotations/val.json
        images/train/*.png
        images/val/*.png

A folder is built in a temporary sibling and renamed into place only when complete, so a killed
preparation never leaves a half dataset behind; ``manifest.json`` records the parameters, so a second
preparation with the same parameters is a no-op and one with different parameters rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import atomic_write, fsync_dir

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def annotation_file(folder: Path, split: str) -> Path:
    """``<folder>/annotations/<split>.json``."""
    return folder / "annotations" / f"{split}.json"


def image_dir(folder: Path) -> Path:
    """``<folder>/images``: the directory COCO ``file_name`` values are relative to."""
    return folder / "images"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when there is none or it cannot be read (an unfinished folder)."""
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_prepared(folder: Path, params: dict[str, Any], splits: tuple[str, ...] = SPLITS) -> bool:
    """True when ``folder`` holds a complete dataset generated with exactly ``params``, with an
    annotation file for each of ``splits``."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("params") != params:
        return False
    return all(annotation_file(folder, s).is_file() for s in splits)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON with sorted keys and no timestamps, so the same data gives the same bytes
    (atomically and fsynced, see :func:`workbench.files.atomic_write`)."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode())


def prepare_atomically(folder: Path, params: dict[str, Any], build: Callable[[Path], dict[str, Any]],
                       splits: tuple[str, ...] = SPLITS) -> Path:
    """Build a dataset folder once: skip if already prepared with ``params``, else build it atomically.

    Args:
        folder: final location, e.g. ``cache/data/shapes-seed0-train1000-val200-128px``.
        params: everything the content depends on; stored in the manifest and compared on the next call.
        build: ``build(tmp_dir) -> summary`` writes annotations and images into ``tmp_dir``; the summary
            (counts, split description) goes into the manifest next to ``params``.
        splits: the splits ``build`` writes (a held-out split such as shapes' ``tune`` has a folder of its own).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    if is_prepared(folder, params, splits):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder is a sibling so the final rename stays on one file system (atomic on POSIX).
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        summary = build(tmp)
        write_json(tmp / MANIFEST, {"params": params, **summary})
        _replace_dir(tmp, folder, params, splits)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace_dir(new: Path, folder: Path, params: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Move ``new`` to ``folder``, replacing an outdated or unfinished ``folder``."""
    if folder.exists():
        if is_prepared(folder, params, splits):
            return  # a concurrent preparation finished first with the same parameters: keep its copy
        # Rename the old folder away first so there is no moment with a mix of old and new files.
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, trash / folder.name)
        os.replace(new, folder)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.replace(new, folder)
        except OSError:
            # Lost a race: another process created ``folder`` since the check above.
            if not is_prepared(folder, params, splits):
                raise
    fsync_dir(folder.parent)  # the rename itself, durable
