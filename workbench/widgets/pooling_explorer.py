"""The pooling explorer: PrRoI Pooling of one bin (paper Eq. 3) and its gradient w.r.t. each edge (Eq. 4), live.

    PoolingExplorer(feature_map, (1.3, 0.8, 4.6, 3.4))
"""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from workbench.analysis.pooling import interpolate_feature_map
from workbench.analysis.pooling_gradient import EDGES, eq4_gradient, pooled_value_and_gradient

from ._plotly import ARROW_COLOR, BOX_COLOR, edge_arrows, rectangle


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
            x, y = rectangle(box)
            ax, ay, sizes = edge_arrows(box, grad, self.arrow_scale)
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
