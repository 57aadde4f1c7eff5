"""The refinement stepper: Algorithm 2 replayed one box and one step at a time from a saved record, and
re-run for the box shown when its settings (λ, Ω1, Ω2, T, the step reading) are changed.

    from workbench.trajectories import Trajectories
    record = Trajectories.load("reports/shapes/trajectories.npz")
    RefinementStepper(record, rerun=box_rerun(record, trained_models("shapes")))   # workbench.inference
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.data.images import CocoImages
from workbench.analysis.refinement import record_knobs
from workbench.refine import RUNNING, STEP_SCALINGS, STOP_REASONS
from workbench.trajectories import Trajectories

from ._plotly import ARROW_COLOR, BOX_COLOR, GT_COLOR, PATH_COLOR, PRED_COLOR, TRUE_COLOR, edge_arrows, png_data_uri, rectangle

ARROW_NAME = "next step λ·scale(∇)"
HALO = "halo"  # name of the black lines drawn under outlines (not in the legend)

ORDERS = {"record": "file order", "gain": "largest IoU gain first", "loss": "largest IoU loss first"}
"""Box orders of :meth:`RefinementStepper.set_order`: name -> what the dropdown shows."""
READINGS = {"width": "λ·w·∇ (width)", "log": "λ·w²·∇ (log-scaled)"}
"""Readings of Algorithm 2's step (:data:`workbench.refine.STEP_SCALINGS`) -> what the dropdown shows."""
MAX_ITERATIONS = 20  # the T control's range


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
            (:meth:`workbench.data.images.CocoImages.from_meta`). Where those are not found, the boxes are shown without the image.
        category_names: category id -> name, for the title (default: from ``images`` when it has them).
        order: initial box order, a key of :data:`ORDERS`.
        zoom: show the neighbourhood of the box (its every step and the ground truth, plus a margin)
            rather than the whole image (``zoom=False``: all of it).

        rerun: ``rerun(b, knobs) -> Trajectories``, Algorithm 2 again for record box ``b`` with the settings
            ``knobs`` (:data:`~workbench.analysis.refinement.ALGORITHM2_KNOBS`) as a one-box record, e.g.
            :func:`workbench.inference.box_rerun`. With it the settings controls are shown, starting at the
            record's own settings (:func:`~workbench.analysis.refinement.record_knobs`); without, the record
            is only replayed.

    Controls, each a method too: the step slider (``show_step(i)``; the Play button is ``jslink``-ed to it
    in the browser), previous/next box (``previous_box()``, ``next_box()``, wrapping around), the order
    dropdown (``set_order("loss")`` puts the box that lost most true IoU first), ``show_box(index)``, and
    with ``rerun`` the settings (``set_knobs(step_size=0.2, iterations=8)``; ``reset_knobs()``). ``shown`` is
    the one-box record drawn: the record's box at the record's settings, else ``rerun``'s.
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
        rerun: Callable[[int, dict], Trajectories] | None = None,
    ) -> None:
        if len(trajectories) == 0:
            raise ValueError("the refinement record holds no boxes")
        self.trajectories = trajectories
        self.images = images if images is not None else CocoImages.from_meta(trajectories.meta)
        self.category_names = category_names or getattr(self.images, "category_names", {}) or {}
        self.num_steps = trajectories.boxes.shape[1] - 1  # T of the box shown
        self.rerun = rerun
        self.record_knobs = record_knobs(trajectories.meta) if rerun is not None else {}
        self.knobs = dict(self.record_knobs)
        self.shown: Trajectories | None = None
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
        self.knob_controls = self._build_knob_controls() if rerun is not None else {}
        self.figure = self._build_figure()

        self.slider.observe(lambda change: self._draw_step(change["new"]), names="value")
        self.previous_button.on_click(lambda _: self.previous_box())
        self.next_button.on_click(lambda _: self.next_box())
        self.order_menu.observe(lambda change: self._apply_order(change["new"]), names="value")
        self.ui = W.VBox([
            W.HBox([self.order_menu, self.previous_button, self.next_button]),
            *([self.knob_box] if rerun is not None else []),
            self.box_label,
            W.HBox([self.play, self.slider]),
            self.readout,
            self.figure,
        ])
        self.set_order(order)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    def _build_knob_controls(self) -> dict[str, W.Widget]:
        k, wide = self.knobs, dict(style={"description_width": "initial"}, layout=W.Layout(width="170px"))
        controls = {
            "step_size": W.BoundedFloatText(value=k["step_size"], min=1e-6, max=1e3, step=0.01, description="λ (step size)", **wide),
            "step_scaling": W.Dropdown(options=[(READINGS[r], r) for r in STEP_SCALINGS], value=k["step_scaling"],
                                       description="step", layout=W.Layout(width="230px")),
            "early_stop": W.BoundedFloatText(value=k["early_stop"], min=0.0, max=1.0, step=0.0005, description="Ω1", **wide),
            "degeneration": W.BoundedFloatText(value=k["degeneration"], min=-1.0, max=-1e-6, step=0.005, description="Ω2", **wide),
            "iterations": W.IntSlider(value=k["iterations"], min=1, max=max(MAX_ITERATIONS, k["iterations"]), description="T",
                                      continuous_update=False, layout=W.Layout(width="260px")),
        }
        for name, control in controls.items():
            control.observe(lambda change, name=name: self._knob_changed(name, change["new"]), names="value")
        self.reset_button = W.Button(description="record's settings", tooltip="back to the settings the record was made with")
        self.reset_button.on_click(lambda _: self.reset_knobs())
        self.knob_box = W.HBox([*controls.values(), self.reset_button], layout=W.Layout(flex_flow="row wrap"))
        return controls

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
        t, b = self.shown, 0
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

    def set_knobs(self, **knobs) -> None:
        """Re-run the box shown (and every box shown next) with these Algorithm 2 settings (``step_size``,
        ``early_stop``, ``degeneration``, ``iterations``, ``step_scaling``), others unchanged; needs ``rerun``."""
        if self.rerun is None:
            raise ValueError("this stepper replays a record only: pass rerun= to change its settings")
        unknown = set(knobs) - set(self.knob_controls)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {list(self.knob_controls)}")
        self._applying = True  # one re-run for all of them, not one per control
        try:
            for name, value in knobs.items():
                self.knob_controls[name].value = value
        finally:
            self._applying = False
        self.knobs.update({name: self.knob_controls[name].value for name in knobs})
        self._select(self.position)

    def reset_knobs(self) -> None:
        """Back to the settings the record was made with: the record replayed."""
        self.set_knobs(**self.record_knobs)

    def _knob_changed(self, name: str, value) -> None:
        if getattr(self, "_applying", False):
            return
        self.knobs[name] = value
        self._select(self.position)

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

    def _shown_record(self) -> Trajectories:
        """The current box as a one-box record: the record's own at its settings, else re-run."""
        b = self.box
        if self.rerun is None or self.knobs == self.record_knobs:
            t = self.trajectories
            return Trajectories(**{f.name: getattr(t, f.name)[b : b + 1] for f in fields(t) if f.name != "meta"}, meta=t.meta)
        return self.rerun(b, dict(self.knobs))

    def _select(self, position: int) -> None:
        self.position = position
        self.shown = self._shown_record()
        self.num_steps = self.shown.boxes.shape[1] - 1
        for control in (self.play, self.slider):
            control.max = self.num_steps
        image = self._draw_image()  # a message of its own: no other trace takes ``source``
        with self.figure.batch_update():
            self._draw_box(image)
        self.show_step(0)

    def _build_figure(self) -> go.FigureWidget:
        fig = make_subplots(rows=1, cols=2, column_widths=[0.56, 0.44], horizontal_spacing=0.1,
                            subplot_titles=("image", "IoU per step"))  # annotations[0] becomes the box's title
        fig.add_trace(go.Image(source=png_data_uri(np.zeros((1, 1, 3), np.uint8)), x0=0.5, y0=0.5, name="image",
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
            self.figure.data[self.IMAGE].source = png_data_uri(image) if image is not None else None
        return image

    def _draw_box(self, image: np.ndarray | None) -> None:
        """Everything that stays while the steps of one box are stepped through (one batch: x and y only)."""
        t, b, fig = self.shown, 0, self.figure
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
            bx, by = rectangle(box)
            xs += bx + [None]
            ys += by + [None]
        fig.data[self.PATH].update(x=xs, y=ys)
        gt_x, gt_y = rectangle(t.gt_box[b]) if np.isfinite(t.gt_box[b]).all() else ([], [])
        fig.data[self.GT_HALO].update(x=gt_x, y=gt_y)
        fig.data[self.GT].update(x=gt_x, y=gt_y)
        steps = list(range(self.num_steps + 1))
        fig.layout.xaxis2.range = [-0.3, self.num_steps + 0.3]
        fig.data[self.PREDICTED].update(x=steps, y=t.predicted_iou[b].tolist())
        fig.data[self.TRUE].update(x=steps, y=t.true_iou[b].tolist())
        stop = int(t.stop_step[b])
        stopped_early = int(t.stop_reason[b]) != RUNNING
        fig.data[self.STOPPED].update(x=[stop] if stopped_early else [], y=[float(t.predicted_iou[b, stop])] if stopped_early else [])
        name = self.category_names.get(int(t.category_id[b]), f"category {int(t.category_id[b])}")
        fig.layout.annotations[0].text = f"image {image_id}, {name}: box #{self.box}"
        gain = float(t.gain[b])
        self.box_label.value = (
            f"box {self.position + 1} of {len(self.order)} ({ORDERS[self.order_name]}): record #{self.box}, image {image_id}, "
            f"{name}; true IoU {t.true_iou[b, 0]:.3f} → {t.true_iou[b, -1]:.3f} (<b>{gain:+.3f}</b>)" + self._knob_text()
        )

    def _knob_text(self) -> str:
        if self.rerun is None:
            return ""
        k = self.knobs
        which = "the record's settings" if k == self.record_knobs else "<b>re-run</b> with these settings"
        return (f"<br>{which}: λ = {k['step_size']:g}, step {READINGS[k['step_scaling']]}, Ω1 = {k['early_stop']:g}, "
                f"Ω2 = {k['degeneration']:g}, T = {k['iterations']}")

    def _draw_step_into_figure(self, step: int) -> None:
        t, b, fig = self.shown, 0, self.figure
        box = t.boxes[b, step]
        x, y = rectangle(box)
        vector = t.gradient[b, step] if step < self.num_steps else np.zeros(4)
        ax, ay, sizes = edge_arrows(box, vector)
        # The same properties for both traces (see the module docstring).
        fig.data[self.BOX_HALO].update(x=x, y=y, name=HALO, marker_size=[0] * len(x))
        fig.data[self.BOX].update(x=x, y=y, name=f"box at step {step}", marker_size=[0] * len(x))
        fig.data[self.ARROWS].update(x=ax, y=ay, name=ARROW_NAME, marker_size=sizes)
        fig.layout.shapes[0].update(x0=step, x1=step)

    def _write_readout(self, step: int) -> None:
        t, b = self.shown, 0
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
