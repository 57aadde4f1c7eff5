"""The NMS explorer: duplicate removal on one image, which boxes survive each method, and why.

    NMSExplorer(output.sets["raw"], coco_gt, images)
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.analysis.matching import ground_truth_by_image, match_to_ground_truth
from workbench.analysis.suppression import detections_by_image, explain_suppression

from ._plotly import BOX_COLOR, GT_COLOR, png_data_uri, rectangle

KEPT_COLOR, SUPPRESSED_COLOR, NUMBER_COLOR = BOX_COLOR, "#BBBBBB", "#F0E442"  # yellow numbers read on dark and light images
NMS_METHOD_LABELS = {"none": "No-NMS (keep all)", "nms": "NMS (rank by score)", "soft-nms": "Soft-NMS (decay scores)",
                     "iou-nms": "IoU-guided NMS (rank by predicted IoU)"}
"""Methods of :func:`workbench.postprocess.suppress` -> what the method menu of :class:`NMSExplorer` shows."""


def _positions(rows: pd.DataFrame) -> torch.Tensor:
    """The index of ``rows`` (positions in one image's detections) as an int64 tensor for indexing."""
    return torch.as_tensor(rows.index.to_numpy(dtype=np.int64, copy=True))


class NMSExplorer:
    """Duplicate removal on one image: which boxes survive, and why (Table 1, Fig. 3 and 7 box by box).

    Left: the image with the ground truth (green, drawn over the boxes), and exactly the boxes the table
    lists, each labelled with its table number ``#``: orange if it survives, grey dotted if suppressed;
    hovering the dot at a box's top-left corner says what happened to it. Below: the table, the
    ``table_rows`` highest-scored boxes scoring at least the score control's value, plus any box that
    suppressed one of them or gave it its score (so every ``#`` a reason names is drawn too): score,
    predicted IoU, true IoU, and their fate (kept at which rank, or suppressed by which box at what
    overlap). Survivors and reasons are :func:`workbench.analysis.suppression.explain_suppression`'s,
    i.e. :func:`workbench.postprocess.suppress`'s, over all the image's boxes.

    Args:
        detections: raw detections (COCO results before NMS, e.g. ``output.sets["raw"]``); ``iou_pred``
            enables IoU-guided NMS.
        coco_gt: ground truth, for the true IoU and the green boxes (optional).
        images: ``image_id -> ndarray[H, W, 3]`` (e.g. :class:`workbench.data.images.CocoImages`), or ``None`` (boxes only).
        method, iou_threshold: initial method (a key of :data:`NMS_METHOD_LABELS`) and threshold.
        max_detections: the cap after suppression (the pipeline's 100).
        soft_method, soft_sigma, score_threshold: the Soft-NMS settings; the threshold slider sets
            Soft-NMS's linear overlap threshold.
        min_score: initial value of the score control: boxes scoring below it are neither listed nor
            drawn (they still take part in the suppression).
        table_rows: the most boxes listed (and drawn) by score, before their suppressors are added.

    Controls, each a method too: the image menu (``set_image(image_id)``), the method menu
    (``set_method("iou-nms")``), the threshold slider (``set_threshold(0.6)``), the score slider
    (``set_min_score(0.3)``). ``survivors`` holds the positions (in ``detections``) of the boxes that
    survive, in ``suppress``'s output order; ``listed`` the table's rows (positions in the image).
    """

    IMAGE, SUPPRESSED, KEPT, GT, SUPPRESSED_POINTS, KEPT_POINTS, NUMBERS = range(7)  # trace indices in ``figure.data``

    def __init__(self, detections, coco_gt=None, images: Callable[[int], np.ndarray] | None = None, *,
                 method: str = "nms", iou_threshold: float = 0.5, max_detections: int | None = 100,
                 soft_method: str = "linear", soft_sigma: float = 0.5, score_threshold: float = 0.001,
                 min_score: float = 0.0, table_rows: int = 12) -> None:
        self.by_image = detections_by_image(detections)
        if not self.by_image:
            raise ValueError("no detections to explore")
        self.true_iou = match_to_ground_truth(detections, coco_gt)["iou"].to_numpy() if coco_gt is not None else None
        self.images = images
        self.ground_truth = ground_truth_by_image(coco_gt) if coco_gt is not None else {}  # non-crowd objects per image
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
        self.score_slider = W.FloatSlider(value=float(min_score), min=0.0, max=1.0, step=0.01, description="min score",
                                          continuous_update=False, readout_format=".2f")
        self.readout = W.HTML()
        self.table = W.HTML()
        self.figure = self._build_figure()
        self.image_menu.observe(lambda change: self._update(new_image=True), names="value")
        self.method_menu.observe(lambda change: self._update(), names="value")
        self.threshold_slider.observe(lambda change: self._update(), names="value")
        self.score_slider.observe(lambda change: self._update(), names="value")
        self.ui = W.VBox([W.HBox([self.image_menu, self.method_menu]), W.HBox([self.threshold_slider, self.score_slider]),
                          self.readout, self.figure, self.table])
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

    def set_min_score(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"min score must be in [0, 1], got {value}")
        self.score_slider.value = float(value)

    @property
    def listed(self) -> pd.Index:
        """The table's rows, highest score first: positions in this image's detections (the ``#`` column)."""
        e = self.explanation
        top = e[e["score"] >= self.min_score].sort_values("score", ascending=False, kind="stable").head(self.table_rows)
        named = {int(j) for column in ("by", "score_from") if column in top for j in top[column] if j >= 0}
        rows = e.loc[sorted(set(top.index) | named)]  # the boxes a listed reason names are listed too
        return rows.sort_values("score", ascending=False, kind="stable").index

    @property
    def survivors(self) -> np.ndarray:
        """Positions in ``detections`` of the boxes that survive, in ``suppress``'s output order."""
        e = self.explanation
        kept = e[e["kept"]].sort_values("rank")
        return self.by_image[self.image_id]["index"].numpy()[kept.index.to_numpy()]

    # --- drawing -------------------------------------------------------------------------------------

    def _build_figure(self) -> go.FigureWidget:
        fig = go.Figure([
            go.Image(source=png_data_uri(np.zeros((1, 1, 3), np.uint8)), x0=0.5, y0=0.5, name="image", hoverinfo="skip"),
            go.Scatter(name="suppressed", mode="lines", line=dict(color=SUPPRESSED_COLOR, width=1.5, dash="dot"), hoverinfo="skip"),
            go.Scatter(name="survives", mode="lines", line=dict(color=KEPT_COLOR, width=2.5), hoverinfo="skip"),
            go.Scatter(name="ground truth", mode="lines", line=dict(color=GT_COLOR, width=3, dash="dash"), hoverinfo="skip"),
            go.Scatter(name="hover · suppressed", mode="markers", marker=dict(color=SUPPRESSED_COLOR, size=6), showlegend=False,
                       hovertemplate="%{text}<extra></extra>"),
            go.Scatter(name="hover · survives", mode="markers", marker=dict(color=KEPT_COLOR, size=8, line=dict(color="black", width=1)),
                       showlegend=False, hovertemplate="%{text}<extra></extra>"),
            go.Scatter(name="box numbers", mode="text", textposition="top right", showlegend=False, hoverinfo="skip",
                       textfont=dict(color=NUMBER_COLOR, size=13, family="monospace")),
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
        self.min_score = float(self.score_slider.value)
        self.explanation = e = explain_suppression(det, self.method_menu.value, iou_threshold=threshold,
                                                   max_detections=self.max_detections, soft_iou_threshold=threshold, **self.soft)
        shown = e.loc[self.listed]

        def outlines(rows) -> tuple[list, list]:
            xs, ys = [], []
            for box in det["boxes"][_positions(rows)].tolist():
                bx, by = rectangle(box)
                xs += bx + [None]
                ys += by + [None]
            return xs, ys

        kept, gone = shown[shown["kept"]].sort_values("rank"), shown[~shown["kept"]]
        if new_image:
            image = self.images(self.image_id) if self.images is not None else None
            self.figure.data[self.IMAGE].source = png_data_uri(image) if image is not None else None
            gt_x, gt_y = [], []
            if self.image_id in self.ground_truth:
                for box in self.ground_truth[self.image_id].boxes.tolist():
                    bx, by = rectangle(box)
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
            corners = det["boxes"][_positions(shown)].reshape(-1, 4).numpy()
            self.figure.data[self.NUMBERS].update(x=corners[:, 0].tolist(), y=corners[:, 1].tolist(), text=[str(i) for i in shown.index])
        survivors = int(e["kept"].sum())
        hidden = len(e) - len(shown)
        self.readout.value = (
            f"<span style='font-size:15px'><b>{survivors}</b> of {len(e)} boxes survive "
            f"{NMS_METHOD_LABELS[self.method_menu.value]} at IoU threshold {threshold:.2f}"
            + (f" (cap {self.max_detections})" if self.max_detections is not None else "")
            + (f"; drawn and listed: the {len(shown)} boxes below, {hidden} others (score under {self.min_score:.2f}, "
               f"or beyond the {self.table_rows} highest) are not" if hidden else "") + "</span>"
        )
        self.table.value = self._table_html(shown)

    def _table_html(self, top: pd.DataFrame) -> str:
        columns = {"#": top.index, "score": top["score"].round(3)}
        if "iou_pred" in top:
            columns["predicted IoU"] = top["iou_pred"].round(3)
        if self.true_iou is not None:
            columns["true IoU"] = [round(self._true(i), 3) for i in top.index]
        columns["after"] = ["survives" if k else "–" for k in top["kept"]]
        columns["why"] = top["why"]
        frame = pd.DataFrame(columns)
        return (f"<b>the {len(top)} boxes drawn on image {self.image_id}, by score (# = the number on the box)</b>"
                + frame.to_html(index=False, border=0, col_space=70, classes="nms-table"))
