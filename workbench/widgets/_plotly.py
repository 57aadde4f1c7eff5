"""What the widgets share: their colours and the plotly geometry of boxes, arrows and images.

Okabe-Ito colours (as in :mod:`workbench.analysis`): distinguishable with colour-blindness and on the images.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

GT_COLOR, BOX_COLOR, PATH_COLOR, ARROW_COLOR = "#009E73", "#D55E00", "#56B4E9", "#FFFFFF"
PRED_COLOR, TRUE_COLOR = "#0072B2", "#009E73"


def rectangle(box) -> tuple[list[float], list[float]]:
    """Closed outline ``(xs, ys)`` of ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]


def edge_arrows(box, vector, scale: float = 1.0) -> tuple[list, list, list]:
    """Arrows from the middle of each edge of ``box`` along its own axis, by ``scale * vector``.

    ``vector`` is ``(dx0, dy0, dx1, dy1)``: the left and right edges move horizontally, the top and
    bottom ones vertically. Returns ``(xs, ys, marker_sizes)`` for one scatter trace: segments separated
    by ``None``, an arrow-head marker at each tip only; edges that do not move get no arrow.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    tails = ((x0, cy), (cx, y0), (x1, cy), (cx, y1))
    xs, ys, sizes = [], [], []
    for k, (tx, ty) in enumerate(tails):
        d = scale * float(vector[k])
        if abs(d) < 1e-9:
            continue
        hx, hy = (tx + d, ty) if k in (0, 2) else (tx, ty + d)
        xs += [tx, hx, None]
        ys += [ty, hy, None]
        sizes += [0, 14, 0]
    return xs, ys, sizes


def png_data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an ``(H, W, 3)`` uint8 array: a compact way to send pixels to plotly."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
