"""Interactive views for the notebooks (ipywidgets + plotly ``FigureWidget``, which needs ``anywidget``).

    from workbench.trajectories import Trajectories
    from workbench.widgets import RefinementStepper, PoolingExplorer, NMSExplorer
    RefinementStepper(Trajectories.load("reports/shapes/trajectories.npz"))   # Algorithm 2, step by step
    PoolingExplorer(feature_map, (1.3, 0.8, 4.6, 3.4))                       # Eq. 3 and Eq. 4 under your fingers
    NMSExplorer(output.sets["raw"], coco_gt, images)                          # which boxes NMS keeps, and why

Each view is a plain object whose callbacks are ordinary methods (``show_step(i)``, ``next_box()``,
``set_order("loss")``, ``set_box(...)``, ``set_threshold(0.6)``), so they can be driven and tested without a browser; the
widgets only call them. A view displays itself (``_repr_mimebundle_``), or use its ``ui`` attribute.
Figures are updated inside ``fig.batch_update()``, so a change reaches the browser as one message.
Within one batch every trace edited gets the same properties: plotly sends a batch as one restyle in
which a property missing for one trace reaches plotly.js as ``undefined`` and resets it there (seen
as a legend entry turning into "trace 4"), while the Python figure still looks right.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.subplots import make_subplots

from workbench.analysis import interpolate_feature_map, match_to_ground_truth
from workbench.notebook_utils import (
    EDGES,
    detections_by_image,
    eq4_gradient,
    explain_suppression,
    pooled_value_and_gradient,
    project_root,
)
from workbench.refine import RUNNING, STOP_REASONS
from workbench.trajectories import Trajectories

# Okabe-Ito colours (as in workbench.analysis): distinguishable with colour-blindness and on the images.
GT_COLOR, BOX_COLOR, PATH_COLOR, ARROW_COLOR = "#009E73", "#D55E00", "#56B4E9", "#FFFFFF"
PRED_COLOR, TRUE_COLOR = "#0072B2", "#009E73"

ARROW_NAME = "next step λ·scale(∇)"
HALO = "halo"  # name of the black lines drawn under outlines (not in the legend)

ORDERS = {"record": "file order", "gain": "largest IoU gain first", "loss": "largest IoU loss first"}
"""Box orders of :meth:`RefinementStepper.set_order`: name -> what the dropdown shows."""


def _rectangle(box) -> tuple[list[float], list[float]]:
    """Closed outline ``(xs, ys)`` of ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]


def _edge_arrows(box, vector, scale: float = 1.0) -> tuple[list, list, list]:
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


def _png_data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an ``(H, W, 3)`` uint8 array: a compact way to send pixels to plotly."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class CocoImages:
    """Images by COCO image id, read with pycocotools (the index) and PIL (the pixels), cached.

    Args:
        ann_file: COCO JSON whose ``images`` name the files.
        img_dir: the folder ``file_name`` is relative to.

    ``images(image_id)`` returns ``ndarray[H, W, 3]`` uint8; ``category_names`` maps category id -> name.
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path) -> None:
        from workbench.data.coco import coco_from_dict  # pycocotools' COCO, built without its prints

        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        self.coco = coco_from_dict(json.loads(self.ann_file.read_text()))
        self.category_names = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}
        self._load = lru_cache(maxsize=32)(self._read)

    def _read(self, image_id: int) -> np.ndarray:
        info = self.coco.loadImgs([int(image_id)])[0]
        with Image.open(self.img_dir / info["file_name"]) as im:
            return np.asarray(im.convert("RGB"))

    def __call__(self, image_id: int) -> np.ndarray:
        return self._load(int(image_id))

    @classmethod
    def from_meta(cls, meta: dict, search: Iterable[Path] | None = None) -> "CocoImages | None":
        """The images a record's sidecar names (``ann_file``, ``img_dir``), or ``None`` if they are not here.

        Relative paths are tried against each folder of ``search`` (default: the working directory, then
        :func:`workbench.notebook_utils.project_root`).
        """
        if not meta.get("ann_file") or not meta.get("img_dir"):
            return None
        for base in search if search is not None else (Path.cwd(), project_root()):
            ann_file, img_dir = Path(base) / meta["ann_file"], Path(base) / meta["img_dir"]
            if ann_file.is_file() and img_dir.is_dir():
                return cls(ann_file, img_dir)
        return None


class RefinementStepper:
    """Step through the refinement of one box at a time (Algorithm 2), from a saved record.

    Left: the image with the ground truth (green), the box at the current step (orange), its outline at
    every recorded step (blue, dotted) and, as white arrows from each edge, the scaled gradient step
    ``λ·scale(∇IoU, b)`` the next iteration applies. Right: predicted and true IoU per step, the current
    step (grey line) and where the box stopped. A readout under the controls gives the step, both IoUs
    and, once the box has stopped, the reason (Ω1, Ω2 or T).

    Args:
        trajectories: any record, e.g. ``Trajectories.load("reports/<dataset>/trajectories.npz")``.
        images: ``image_id -> ndarray[H, W, 3]``; by default the files the record's sidecar names
            (:meth:`CocoImages.from_meta`). Where those are not found, the boxes are shown without the image.
        category_names: category id -> name, for the title (default: from ``images`` when it has them).
        order: initial box order, a key of :data:`ORDERS`.
        zoom: show the neighbourhood of the box (its every step and the ground truth, plus a margin)
            rather than the whole image (``zoom=False``: all of it).

    Controls, each a method too: the step slider (``show_step(i)``; the Play button is ``jslink``-ed to it
    in the browser), previous/next box (``previous_box()``, ``next_box()``, wrapping around), the order
    dropdown (``set_order("loss")`` puts the box that lost most true IoU first), ``show_box(index)``.
    """

    # Trace indices in ``figure.data``.
    IMAGE, PATH, GT_HALO, GT, BOX_HALO, BOX, ARROWS, PREDICTED, TRUE, STOPPED = range(10)

    def __init__(
        self,
        trajectories: Trajectories,
        images: Callable[[int], np.ndarray] | None = None,
        *,
        category_names: dict[int, str] | None = None,
        order: str = "record",
        zoom: bool = True,
    ) -> None:
        if len(trajectories) == 0:
            raise ValueError("the refinement record holds no boxes")
        self.trajectories = trajectories
        self.images = images if images is not None else CocoImages.from_meta(trajectories.meta)
        self.category_names = category_names or getattr(self.images, "category_names", {}) or {}
        self.num_steps = trajectories.boxes.shape[1] - 1  # T
        self.zoom = zoom
        self.order = np.arange(len(trajectories))
        self.order_name = "record"
        self.position = 0  # index into self.order
        self.step = 0
        self._image_id: int | None = None

        self.play = W.Play(value=0, min=0, max=self.num_steps, interval=900, description="play")
        self.slider = W.IntSlider(value=0, min=0, max=self.num_steps, description="step", continuous_update=True)
        W.jslink((self.play, "value"), (self.slider, "value"))
        self.previous_button = W.Button(description="◀ previous box", tooltip="previous box in this order")
        self.next_button = W.Button(description="next box ▶", tooltip="next box in this order")
        self.order_menu = W.Dropdown(options=[(label, name) for name, label in ORDERS.items()], value="record",
                                     description="order", layout=W.Layout(width="260px"))
        self.box_label = W.HTML()
        self.readout = W.HTML()
        self.figure = self._build_figure()

        self.slider.observe(lambda change: self._draw_step(change["new"]), names="value")
        self.previous_button.on_click(lambda _: self.previous_box())
        self.next_button.on_click(lambda _: self.next_box())
        self.order_menu.observe(lambda change: self._apply_order(change["new"]), names="value")
        self.ui = W.VBox([
            W.HBox([self.order_menu, self.previous_button, self.next_button]),
            self.box_label,
            W.HBox([self.play, self.slider]),
            self.readout,
            self.figure,
        ])
        self.set_order(order)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    # --- what is shown -------------------------------------------------------------------------------

    @property
    def box(self) -> int:
        """Index (in the record) of the box shown."""
        return int(self.order[self.position])

    def box_order(self, name: str) -> np.ndarray:
        """Record indices in the order ``name`` (ties keep record order)."""
        if name not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {name!r}")
        gain = np.nan_to_num(self.trajectories.gain, nan=0.0)
        if name == "gain":
            return np.argsort(-gain, kind="stable")
        if name == "loss":
            return np.argsort(gain, kind="stable")
        return np.arange(len(self.trajectories))

    def stop_text(self, step: int) -> str:
        """What the readout says about stopping at ``step``: empty while the box still moves."""
        t = self.trajectories
        b = self.box
        stop = int(t.stop_step[b])
        if step < stop:
            return ""
        reason = int(t.stop_reason[b])
        if reason == RUNNING:
            return f"stopped: {STOP_REASONS[reason]}"
        delta = float(t.predicted_iou[b, stop] - t.predicted_iou[b, stop - 1]) if stop > 0 else float("nan")
        return f"stopped after step {stop}: {STOP_REASONS[reason]}, Δ predicted IoU {delta:+.4f}"

    # --- callbacks -----------------------------------------------------------------------------------

    def show_step(self, step: int) -> None:
        """Show iteration ``step`` (0 = before refinement) of the current box."""
        step = int(np.clip(step, 0, self.num_steps))
        if self.slider.value != step:
            self.slider.value = step  # its observer draws
        else:
            self._draw_step(step)

    def show_box(self, index: int) -> None:
        """Show the box with record index ``index`` from step 0, keeping the order."""
        if not 0 <= index < len(self.order):
            raise ValueError(f"box index must lie in [0, {len(self.order) - 1}], got {index}")
        self._select(int(np.flatnonzero(self.order == index)[0]))

    def next_box(self) -> None:
        self._select((self.position + 1) % len(self.order))

    def previous_box(self) -> None:
        self._select((self.position - 1) % len(self.order))

    def set_order(self, name: str) -> None:
        """Order the boxes by ``name`` (see :data:`ORDERS`) and show the first one."""
        self.box_order(name)  # validates
        if self.order_menu.value != name:
            self.order_menu.value = name  # its observer applies it
        else:
            self._apply_order(name)

    # --- drawing -------------------------------------------------------------------------------------

    def _apply_order(self, name: str) -> None:
        self.order = self.box_order(name)
        self.order_name = name
        self._select(0)

    def _select(self, position: int) -> None:
        self.position = position
        image = self._draw_image()  # a message of its own: no other trace takes ``source``
        with self.figure.batch_update():
            self._draw_box(image)
        self.show_step(0)

    def _build_figure(self) -> go.FigureWidget:
        fig = make_subplots(rows=1, cols=2, column_widths=[0.56, 0.44], horizontal_spacing=0.1,
                            subplot_titles=("image", "IoU per step"))  # annotations[0] becomes the box's title
        fig.add_trace(go.Image(source=_png_data_uri(np.zeros((1, 1, 3), np.uint8)), x0=0.5, y0=0.5, name="image",
                               hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(name="box at every step", mode="lines", line=dict(color=PATH_COLOR, width=1.5, dash="dot"),
                                 hoverinfo="skip"), row=1, col=1)
        for name, colour in (("ground truth", GT_COLOR), ("box at this step", BOX_COLOR)):
            # A black halo under each outline keeps it visible on any background.
            fig.add_trace(go.Scatter(name=HALO, mode="lines", line=dict(color="black", width=5.5), showlegend=False,
                                     hoverinfo="skip"), row=1, col=1)
            fig.add_trace(go.Scatter(name=name, mode="lines", line=dict(color=colour, width=3)), row=1, col=1)
        fig.add_trace(go.Scatter(name=ARROW_NAME, mode="lines+markers", line=dict(color=ARROW_COLOR, width=2.5),
                                 marker=dict(symbol="arrow", angleref="previous", color=ARROW_COLOR,
                                             line=dict(color="black", width=1.5)), hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(name="predicted IoU", mode="lines+markers", line=dict(color=PRED_COLOR, width=2.5),
                                 marker=dict(symbol="circle", size=8)), row=1, col=2)
        fig.add_trace(go.Scatter(name="true IoU", mode="lines+markers", line=dict(color=TRUE_COLOR, width=2.5, dash="dash"),
                                 marker=dict(symbol="square", size=8)), row=1, col=2)
        fig.add_trace(go.Scatter(name="stopped here", mode="markers", marker=dict(symbol="x", size=14, color="black")),
                      row=1, col=2)
        fig.add_vline(x=0, line=dict(color="grey", width=2), row=1, col=2)  # layout.shapes[0]: the current step
        fig.update_xaxes(title_text="x (pixels)", row=1, col=1, showgrid=False, constrain="domain")
        fig.update_yaxes(title_text="y (pixels)", row=1, col=1, showgrid=False, scaleanchor="x", scaleratio=1, constrain="domain")
        fig.update_xaxes(title_text="step (iteration of Algorithm 2)", row=1, col=2, dtick=1,
                         range=[-0.3, self.num_steps + 0.3])
        fig.update_yaxes(title_text="IoU", row=1, col=2)
        # No fixed width: the figure takes the width of the output area, so nothing is cut off.
        fig.update_layout(autosize=True, height=560, margin=dict(l=60, r=20, t=60, b=40), template="plotly_white",
                          legend=dict(orientation="h", x=0, y=-0.14, yanchor="top", font=dict(size=13)),
                          font=dict(size=13))
        return go.FigureWidget(fig)

    def _draw_image(self) -> np.ndarray | None:
        """Send the current box's image to the figure if it changed; return it (``None`` without images)."""
        image_id = int(self.trajectories.image_id[self.box])
        image = self.images(image_id) if self.images is not None else None
        if image_id != self._image_id:
            self._image_id = image_id
            self.figure.data[self.IMAGE].source = _png_data_uri(image) if image is not None else None
        return image

    def _draw_box(self, image: np.ndarray | None) -> None:
        """Everything that stays while the steps of one box are stepped through (one batch: x and y only)."""
        t, b, fig = self.trajectories, self.box, self.figure
        image_id = int(t.image_id[b])
        corners = t.boxes[b].reshape(-1, 2)  # (2 (T + 1), 2) (x, y)
        if np.isfinite(t.gt_box[b]).all():
            corners = np.concatenate([corners, t.gt_box[b].reshape(-1, 2)])
        lo, hi = corners.min(0), corners.max(0)
        margin = 0.5 * float((hi - lo).max()) + 8.0
        lo, hi = lo - margin, hi + margin
        if image is not None:
            size = np.array(image.shape[1::-1], dtype=np.float64)  # (W, H)
            lo, hi = (np.maximum(lo, 0.0), np.minimum(hi, size)) if self.zoom else (np.zeros(2), size)
        fig.layout.xaxis.range, fig.layout.yaxis.range = [lo[0], hi[0]], [hi[1], lo[1]]
        xs, ys = [], []
        for box in t.boxes[b]:
            bx, by = _rectangle(box)
            xs += bx + [None]
            ys += by + [None]
        fig.data[self.PATH].update(x=xs, y=ys)
        gt_x, gt_y = _rectangle(t.gt_box[b]) if np.isfinite(t.gt_box[b]).all() else ([], [])
        fig.data[self.GT_HALO].update(x=gt_x, y=gt_y)
        fig.data[self.GT].update(x=gt_x, y=gt_y)
        steps = list(range(self.num_steps + 1))
        fig.data[self.PREDICTED].update(x=steps, y=t.predicted_iou[b].tolist())
        fig.data[self.TRUE].update(x=steps, y=t.true_iou[b].tolist())
        stop = int(t.stop_step[b])
        stopped_early = int(t.stop_reason[b]) != RUNNING
        fig.data[self.STOPPED].update(x=[stop] if stopped_early else [], y=[float(t.predicted_iou[b, stop])] if stopped_early else [])
        name = self.category_names.get(int(t.category_id[b]), f"category {int(t.category_id[b])}")
        fig.layout.annotations[0].text = f"image {image_id}, {name}: box #{b}"
        gain = float(t.gain[b])
        self.box_label.value = (
            f"box {self.position + 1} of {len(self.order)} ({ORDERS[self.order_name]}): record #{b}, image {image_id}, "
            f"{name}; true IoU {t.true_iou[b, 0]:.3f} → {t.true_iou[b, -1]:.3f} (<b>{gain:+.3f}</b>)"
        )

    def _draw_step_into_figure(self, step: int) -> None:
        t, b, fig = self.trajectories, self.box, self.figure
        box = t.boxes[b, step]
        x, y = _rectangle(box)
        vector = t.gradient[b, step] if step < self.num_steps else np.zeros(4)
        ax, ay, sizes = _edge_arrows(box, vector)
        # The same properties for both traces (see the module docstring).
        fig.data[self.BOX_HALO].update(x=x, y=y, name=HALO, marker_size=[0] * len(x))
        fig.data[self.BOX].update(x=x, y=y, name=f"box at step {step}", marker_size=[0] * len(x))
        fig.data[self.ARROWS].update(x=ax, y=ay, name=ARROW_NAME, marker_size=sizes)
        fig.layout.shapes[0].update(x0=step, x1=step)

    def _write_readout(self, step: int) -> None:
        t, b = self.trajectories, self.box
        stop = self.stop_text(step)
        self.readout.value = (
            f"<span style='font-size:15px'><b>step {step} of {self.num_steps}</b> &nbsp; "
            f"predicted IoU <b>{t.predicted_iou[b, step]:.3f}</b> &nbsp; true IoU <b>{t.true_iou[b, step]:.3f}</b>"
            + (f" &nbsp; <b>{stop}</b>" if stop else " &nbsp; still moving (white arrows: the next step)")
            + "</span>"
        )

    def _draw_step(self, step: int) -> None:
        self.step = int(step)
        with self.figure.batch_update():
            self._draw_step_into_figure(self.step)
        self._write_readout(self.step)


class PoolingExplorer:
    """PrRoI Pooling of one bin (Eq. 3) and its gradient w.r.t. each edge (Eq. 4), live.

    A heat map of the continuous feature map ``f`` (Eq. 2) with its samples ``d[i, j]``, the bin (orange)
    whose edges four sliders move, and white arrows from each edge showing ``d PrPool / d edge`` (the
    direction in which moving that edge raises the pooled value; length ``arrow_scale`` cells per unit).
    The readout gives the pooled value, the four derivatives, and how far Eq. 4 is from autograd.

    Args:
        feature_map (ndarray[H, W]): samples ``d[i, j]`` at ``(x = j, y = i)``.
        bin_box: initial ``(x0, y0, x1, y1)`` in cells.
        arrow_scale: arrow length in cells per unit of derivative.

    ``set_box((x0, y0, x1, y1))`` moves all four sliders at once (one redraw).
    """

    def __init__(self, feature_map: np.ndarray, bin_box, *, arrow_scale: float = 10.0, pixels_per_cell: int = 12) -> None:
        self.feature_map = np.asarray(feature_map, dtype=np.float64)
        self.arrow_scale = float(arrow_scale)
        height, width = self.feature_map.shape
        self.sliders = {
            edge: W.FloatSlider(value=float(v), min=0.0, max=float((width if edge[0] == "x" else height) - 1), step=0.05,
                                description=edge, continuous_update=True, readout_format=".2f")
            for edge, v in zip(EDGES, bin_box)
        }
        self.readout = W.HTML()
        self._holding = False
        x = -0.5 + (np.arange(width * pixels_per_cell) + 0.5) / pixels_per_cell
        y = -0.5 + (np.arange(height * pixels_per_cell) + 0.5) / pixels_per_cell
        jj, ii = np.meshgrid(np.arange(width), np.arange(height))
        fig = go.Figure([
            go.Heatmap(x=x, y=y, z=interpolate_feature_map(self.feature_map, x, y), colorscale="Viridis", name="f(x, y)",
                       colorbar=dict(title=dict(text="f(x, y)", side="right")), hovertemplate="x=%{x:.2f} y=%{y:.2f} f=%{z:.3f}<extra></extra>"),
            go.Scatter(x=jj.ravel(), y=ii.ravel(), mode="markers", name="samples d[i, j]",
                       marker=dict(color="white", size=5, line=dict(color="black", width=1))),
            go.Scatter(mode="lines", name="bin", line=dict(color=BOX_COLOR, width=3)),
            go.Scatter(mode="lines+markers", name=f"∂PrPool/∂edge (×{self.arrow_scale:g} cells per unit)",
                       line=dict(color=ARROW_COLOR, width=2.5),
                       marker=dict(symbol="arrow", angleref="previous", color=ARROW_COLOR, line=dict(color="black", width=1))),
        ])
        fig.update_xaxes(title_text="x (feature-map cells)", range=[-0.5, width - 0.5], dtick=1, showgrid=False, constrain="domain")
        fig.update_yaxes(title_text="y (feature-map cells)", range=[height - 0.5, -0.5], dtick=1, showgrid=False,
                         scaleanchor="x", scaleratio=1, constrain="domain")
        fig.update_layout(autosize=True, height=520, margin=dict(l=60, r=20, t=40, b=40), font=dict(size=13),
                          legend=dict(orientation="h", x=0, y=-0.15, yanchor="top", bgcolor="rgba(255,255,255,0.9)"),
                          title=dict(text="PrRoI Pooling of one bin: move its edges"))
        self.figure = go.FigureWidget(fig)
        for slider in self.sliders.values():
            slider.observe(lambda _: self._update(), names="value")
        self.ui = W.VBox([W.HBox([self.sliders["x0"], self.sliders["x1"]]), W.HBox([self.sliders["y0"], self.sliders["y1"]]),
                          self.readout, self.figure])
        self._update()

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The bin the sliders show, ``(x0, y0, x1, y1)``."""
        return tuple(float(self.sliders[e].value) for e in EDGES)  # type: ignore[return-value]

    def set_box(self, bin_box) -> None:
        """Move all four edges, then redraw once."""
        self._holding = True
        try:
            for edge, v in zip(EDGES, bin_box):
                self.sliders[edge].value = float(v)
        finally:
            self._holding = False
        self._update()

    def _update(self) -> None:
        if self._holding:
            return
        box = self.box
        value, grad = pooled_value_and_gradient(self.feature_map, box)
        empty = not (box[2] > box[0] and box[3] > box[1])
        with self.figure.batch_update():
            x, y = _rectangle(box)
            ax, ay, sizes = _edge_arrows(box, grad, self.arrow_scale)
            self.figure.data[2].update(x=x, y=y, marker_size=[0] * len(x))  # same properties in one batch
            self.figure.data[3].update(x=ax, y=ay, marker_size=sizes)
        if empty:
            self.readout.value = "<b>empty bin</b> (x1 ≤ x0 or y1 ≤ y0): PrRoI Pooling gives 0 and no gradient"
            return
        eq4 = eq4_gradient(self.feature_map, box)
        derivs = " &nbsp; ".join(f"∂/∂{e} = <b>{g:+.4f}</b>" for e, g in zip(EDGES, grad))
        self.readout.value = (
            f"<span style='font-size:15px'>PrPool = <b>{value:.4f}</b> &nbsp; {derivs}<br>"
            f"Eq. 4 vs autograd: largest difference {np.abs(eq4 - grad).max():.1e}</span>"
        )


KEPT_COLOR, SUPPRESSED_COLOR = BOX_COLOR, "#BBBBBB"
NMS_METHOD_LABELS = {"none": "No-NMS (keep all)", "nms": "NMS (rank by score)", "soft-nms": "Soft-NMS (decay scores)",
                     "iou-nms": "IoU-guided NMS (rank by predicted IoU)"}
"""Methods of :func:`workbench.postprocess.suppress` -> what the method menu of :class:`NMSExplorer` shows."""


def _positions(rows: pd.DataFrame) -> torch.Tensor:
    """The index of ``rows`` (positions in one image's detections) as an int64 tensor for indexing."""
    return torch.as_tensor(rows.index.to_numpy(dtype=np.int64, copy=True))


class NMSExplorer:
    """Duplicate removal on one image: which boxes survive, and why (Table 1, Fig. 3 and 7 box by box).

    Left: the image with the ground truth (green), the boxes that survive (orange) and those suppressed
    (grey, dotted); hovering the dot at a box's top-left corner says what happened to it. Below: the
    highest-scored boxes in a table: score, predicted IoU, true IoU, and their fate (kept at which rank,
    or suppressed by which box at what overlap). Survivors and reasons are
    :func:`workbench.notebook_utils.explain_suppression`'s, i.e. :func:`workbench.postprocess.suppress`'s.

    Args:
        detections: raw detections (COCO results before NMS, e.g. ``output.sets["raw"]``); ``iou_pred``
            enables IoU-guided NMS.
        coco_gt: ground truth, for the true IoU and the green boxes (optional).
        images: ``image_id -> ndarray[H, W, 3]`` (e.g. :class:`CocoImages`), or ``None`` (boxes only).
        method, iou_threshold: initial method (a key of :data:`NMS_METHOD_LABELS`) and threshold.
        max_detections: the cap after suppression (the pipeline's 100).
        soft_method, soft_sigma, score_threshold: the Soft-NMS settings; the threshold slider sets
            Soft-NMS's linear overlap threshold.
        min_score: boxes scoring below it are not drawn (they still take part).
        table_rows: boxes listed in the table, highest score first.

    Controls, each a method too: the image menu (``set_image(image_id)``), the method menu
    (``set_method("iou-nms")``), the threshold slider (``set_threshold(0.6)``). ``survivors`` holds the
    positions (in ``detections``) of the boxes that survive, in ``suppress``'s output order.
    """

    IMAGE, GT, SUPPRESSED, KEPT, SUPPRESSED_POINTS, KEPT_POINTS = range(6)  # trace indices in ``figure.data``

    def __init__(self, detections, coco_gt=None, images: Callable[[int], np.ndarray] | None = None, *,
                 method: str = "nms", iou_threshold: float = 0.5, max_detections: int | None = 100,
                 soft_method: str = "linear", soft_sigma: float = 0.5, score_threshold: float = 0.001,
                 min_score: float = 0.0, table_rows: int = 12) -> None:
        self.by_image = detections_by_image(detections)
        if not self.by_image:
            raise ValueError("no detections to explore")
        self.true_iou = match_to_ground_truth(detections, coco_gt)["iou"].to_numpy() if coco_gt is not None else None
        self.coco_gt, self.images = coco_gt, images
        self.max_detections, self.min_score, self.table_rows = max_detections, float(min_score), int(table_rows)
        self.soft = dict(soft_method=soft_method, soft_sigma=soft_sigma, score_threshold=score_threshold)
        has_pred = all("ious" in d for d in self.by_image.values())
        methods = [m for m in NMS_METHOD_LABELS if has_pred or m != "iou-nms"]
        if method not in methods:
            raise ValueError(f"method must be one of {methods}, got {method!r}")
        self.image_id = next(iter(self.by_image))
        self.explanation = None

        self.image_menu = W.Dropdown(options=[(f"image {i} ({len(d['boxes'])} boxes)", i) for i, d in self.by_image.items()],
                                     value=self.image_id, description="image", layout=W.Layout(width="300px"))
        self.method_menu = W.Dropdown(options=[(NMS_METHOD_LABELS[m], m) for m in methods], value=method, description="method",
                                      layout=W.Layout(width="380px"))
        self.threshold_slider = W.FloatSlider(value=iou_threshold, min=0.05, max=0.95, step=0.05, description="IoU thr.",
                                              continuous_update=False, readout_format=".2f")
        self.readout = W.HTML()
        self.table = W.HTML()
        self.figure = self._build_figure()
        self.image_menu.observe(lambda change: self._update(new_image=True), names="value")
        self.method_menu.observe(lambda change: self._update(), names="value")
        self.threshold_slider.observe(lambda change: self._update(), names="value")
        self.ui = W.VBox([W.HBox([self.image_menu, self.method_menu, self.threshold_slider]), self.readout, self.figure, self.table])
        self._update(new_image=True)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    # --- callbacks -----------------------------------------------------------------------------------

    def set_image(self, image_id: int) -> None:
        if int(image_id) not in self.by_image:
            raise ValueError(f"image {image_id} has no detections")
        self.image_menu.value = int(image_id)  # its observer redraws

    def set_method(self, method: str) -> None:
        self.method_menu.value = method

    def set_threshold(self, value: float) -> None:
        self.threshold_slider.value = float(value)

    @property
    def survivors(self) -> np.ndarray:
        """Positions in ``detections`` of the boxes that survive, in ``suppress``'s output order."""
        e = self.explanation
        kept = e[e["kept"]].sort_values("rank")
        return self.by_image[self.image_id]["index"].numpy()[kept.index.to_numpy()]

    # --- drawing -------------------------------------------------------------------------------------

    def _build_figure(self) -> go.FigureWidget:
        fig = go.Figure([
            go.Image(source=_png_data_uri(np.zeros((1, 1, 3), np.uint8)), x0=0.5, y0=0.5, name="image", hoverinfo="skip"),
            go.Scatter(name="ground truth", mode="lines", line=dict(color=GT_COLOR, width=3), hoverinfo="skip"),
            go.Scatter(name="suppressed", mode="lines", line=dict(color=SUPPRESSED_COLOR, width=1, dash="dot"), hoverinfo="skip"),
            go.Scatter(name="survives", mode="lines", line=dict(color=KEPT_COLOR, width=2.5), hoverinfo="skip"),
            go.Scatter(name="hover · suppressed", mode="markers", marker=dict(color=SUPPRESSED_COLOR, size=6), showlegend=False,
                       hovertemplate="%{text}<extra></extra>"),
            go.Scatter(name="hover · survives", mode="markers", marker=dict(color=KEPT_COLOR, size=8, line=dict(color="black", width=1)),
                       showlegend=False, hovertemplate="%{text}<extra></extra>"),
        ])
        fig.update_xaxes(title_text="x (pixels)", showgrid=False, constrain="domain")
        fig.update_yaxes(title_text="y (pixels)", showgrid=False, scaleanchor="x", scaleratio=1, constrain="domain", autorange="reversed")
        fig.update_layout(autosize=True, height=560, margin=dict(l=60, r=20, t=40, b=40), template="plotly_white", font=dict(size=13),
                          legend=dict(orientation="h", x=0, y=-0.12, yanchor="top"))
        return go.FigureWidget(fig)

    def _hover(self, i: int) -> str:
        e = self.explanation.loc[i]
        pred = f", predicted IoU {e['iou_pred']:.3f}" if "iou_pred" in e else ""
        true = f", true IoU {self._true(i):.3f}" if self.true_iou is not None else ""
        return f"#{i}: score {e['score']:.3f}{pred}{true}<br>{e['why']}"

    def _true(self, i: int) -> float:
        return float(self.true_iou[int(self.by_image[self.image_id]["index"][i])])

    def _update(self, new_image: bool = False) -> None:
        self.image_id = int(self.image_menu.value)
        det = self.by_image[self.image_id]
        threshold = float(self.threshold_slider.value)
        self.explanation = e = explain_suppression(det, self.method_menu.value, iou_threshold=threshold,
                                                   max_detections=self.max_detections, soft_iou_threshold=threshold, **self.soft)
        shown = e[e["score"] >= self.min_score]

        def outlines(rows) -> tuple[list, list]:
            xs, ys = [], []
            for box in det["boxes"][_positions(rows)].tolist():
                bx, by = _rectangle(box)
                xs += bx + [None]
                ys += by + [None]
            return xs, ys

        kept, gone = shown[shown["kept"]].sort_values("rank"), shown[~shown["kept"]]
        if new_image:
            image = self.images(self.image_id) if self.images is not None else None
            self.figure.data[self.IMAGE].source = _png_data_uri(image) if image is not None else None
            gt_x, gt_y = [], []
            if self.coco_gt is not None:
                for a in self.coco_gt.imgToAnns.get(self.image_id, []):
                    x, y, w, h = a["bbox"]
                    bx, by = _rectangle((x, y, x + w, y + h))
                    gt_x += bx + [None]
                    gt_y += by + [None]
            with self.figure.batch_update():
                self.figure.data[self.GT].update(x=gt_x, y=gt_y)
                if image is None:
                    corners = det["boxes"].numpy()
                    self.figure.layout.xaxis.range = [corners[:, 0].min() - 5, corners[:, 2].max() + 5]
                    self.figure.layout.yaxis.range = [corners[:, 3].max() + 5, corners[:, 1].min() - 5]
                else:
                    self.figure.layout.xaxis.range = [0, image.shape[1]]
                    self.figure.layout.yaxis.range = [image.shape[0], 0]
        with self.figure.batch_update():  # the same properties for the traces of one batch (module docstring)
            for trace, rows in ((self.SUPPRESSED, gone), (self.KEPT, kept)):
                x, y = outlines(rows)
                self.figure.data[trace].update(x=x, y=y, text=[""] * len(x))
            for trace, rows in ((self.SUPPRESSED_POINTS, gone), (self.KEPT_POINTS, kept)):
                corners = det["boxes"][_positions(rows)].reshape(-1, 4).numpy()
                self.figure.data[trace].update(x=corners[:, 0].tolist(), y=corners[:, 1].tolist(),
                                               text=[self._hover(i) for i in rows.index])
        survivors = int(e["kept"].sum())
        hidden = len(e) - len(shown)
        self.readout.value = (
            f"<span style='font-size:15px'><b>{survivors}</b> of {len(e)} boxes survive "
            f"{NMS_METHOD_LABELS[self.method_menu.value]} at IoU threshold {threshold:.2f}"
            + (f" (cap {self.max_detections})" if self.max_detections is not None else "")
            + (f"; {hidden} boxes scoring below {self.min_score:g} are not drawn" if hidden else "") + "</span>"
        )
        self.table.value = self._table_html(e)

    def _table_html(self, e) -> str:
        top = e.sort_values("score", ascending=False, kind="stable").head(self.table_rows)
        columns = {"#": top.index, "score": top["score"].round(3)}
        if "iou_pred" in top:
            columns["predicted IoU"] = top["iou_pred"].round(3)
        if self.true_iou is not None:
            columns["true IoU"] = [round(self._true(i), 3) for i in top.index]
        columns["after"] = ["survives" if k else "–" for k in top["kept"]]
        columns["why"] = top["why"]
        frame = pd.DataFrame(columns)
        return (f"<b>the {len(top)} highest-scored boxes of image {self.image_id}</b>"
                + frame.to_html(index=False, border=0, col_space=70, classes="nms-table"))
