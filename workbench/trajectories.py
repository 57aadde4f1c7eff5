"""The refinement record a run leaves in ``reports/<dataset>/``: every refined box, step by step.

The analyses and the refinement stepper widget read it back without the model. One ``.npz`` file
holds arrays over ``B`` boxes and ``T`` steps; a JSON sidecar (same name, ``.json``) names the
dataset files so images can be shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .files import atomic_write


@dataclass
class Trajectories:
    """Refinement of ``B`` boxes over ``T`` steps (Algorithm 2), with the truth beside it.

    Boxes are ``(x0, y0, x1, y1)`` in original image pixels.

    Attributes:
        image_id (int64[B]): COCO image id of each box.
        category_id (int64[B]): COCO category id of each box.
        score (float[B]): classification confidence of the box.
        gt_box (float[B, 4]): the matched ground truth (highest IoU at step 0, same category);
            NaN where there is none.
        boxes (float[B, T + 1, 4]): the box before the first step and after each step.
        predicted_iou (float[B, T + 1]): the IoU-Net's prediction at each step.
        true_iou (float[B, T + 1]): IoU with ``gt_box`` at each step (0 where there is none).
        gradient (float[B, T, 4]): the scaled step applied at each step (0 once stopped).
        stop_step (int64[B]): steps taken; ``T`` if the box never stopped early.
        stop_reason (int64[B]): codes of ``workbench.refine.STOP_REASONS``.
        meta (dict): ``dataset``, ``ann_file``, ``img_dir`` and the refinement hyper-parameters.
    """

    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    gt_box: np.ndarray
    boxes: np.ndarray
    predicted_iou: np.ndarray
    true_iou: np.ndarray
    gradient: np.ndarray
    stop_step: np.ndarray
    stop_reason: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def gain(self) -> np.ndarray:
        """Change of true IoU from the first to the last step, per box."""
        return self.true_iou[:, -1] - self.true_iou[:, 0]

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``) and its ``.json`` sidecar atomically."""
        path = Path(path).with_suffix(".npz")
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)
        with atomic_write(path.with_suffix(".json")) as f:
            f.write(json.dumps(self.meta, indent=1, default=str).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trajectories":
        path = Path(path).with_suffix(".npz")
        if not path.is_file():
            raise FileNotFoundError(f"no refinement record at {path}; run `python -m workbench reproduce` first")
        with np.load(path) as data:
            arrays = {f.name: data[f.name] for f in fields(cls) if f.name != "meta"}
        sidecar = path.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return cls(**arrays, meta=meta)
