"""Figure scaffolding shared by the analyses: object-oriented Matplotlib only, no pyplot state.

A :class:`matplotlib.figure.Figure` built directly (not through ``pyplot.figure``) is not registered
with any GUI manager, so analyses can run in tests, scripts and notebooks alike, and a figure that
goes out of scope is freed.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Okabe-Ito colour-blind-safe palette (blue first, then orange, as in the paper's Fig. 3 and 7).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def color(i: int) -> str:
    """The ``i``-th series colour (cycles after eight)."""
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    """The ``i``-th series marker, so series stay distinguishable in grey-scale prints too."""
    return MARKERS[i % len(MARKERS)]


def new_figure(ncols: int = 1, *, panel_size: tuple[float, float] = (5.0, 4.0), nrows: int = 1) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with a ``(nrows, ncols)`` object array of axes."""
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def style_axes(ax: Axes, *, xlabel: str, ylabel: str, title: str | None = None, grid: bool = True) -> None:
    """Labels, optional title and a light grid behind the data."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if grid:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)


def draw_box(ax: Axes, box, **kw) -> None:
    """An unfilled rectangle for ``(x0, y0, x1, y1)`` (``kw``: Matplotlib patch properties)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kw))
