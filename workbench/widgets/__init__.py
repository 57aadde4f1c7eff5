"""Interactive views for the notebooks (ipywidgets + plotly ``FigureWidget``, which needs ``anywidget``).

    from workbench.trajectories import Trajectories
    from workbench.widgets import RefinementStepper, PoolingExplorer, NMSExplorer
    RefinementStepper(Trajectories.load("reports/shapes/trajectories.npz"))   # Algorithm 2, step by step
    RefinementStepper(record, rerun=box_rerun(record, models))                # ... and re-run with other λ, Ω1, Ω2, T
    PoolingExplorer(feature_map, (1.3, 0.8, 4.6, 3.4))                       # Eq. 3 and Eq. 4 under your fingers
    NMSExplorer(output.sets["raw"], coco_gt, images)                          # which boxes NMS keeps, and why

Each view is a plain object whose callbacks are ordinary methods (``show_step(i)``, ``next_box()``,
``set_order("loss")``, ``set_knobs(step_size=0.2)``, ``set_box(...)``, ``set_threshold(0.6)``), so they can be driven and tested without a browser; the
widgets only call them. A view displays itself (``_repr_mimebundle_``), or use its ``ui`` attribute.
Figures are updated inside ``fig.batch_update()``, so a change reaches the browser as one message.
Within one batch every trace edited gets the same properties: plotly sends a batch as one restyle in
which a property missing for one trace reaches plotly.js as ``undefined`` and resets it there (seen
as a legend entry turning into "trace 4"), while the Python figure still looks right.

One module per widget: ``refinement_stepper`` (Algorithm 2), ``pooling_explorer`` (Eq. 3, Eq. 4),
``nms_explorer`` (NMS, Soft-NMS, IoU-guided NMS: Algorithm 1); ``_plotly`` holds what they share.
"""

from .nms_explorer import NMS_METHOD_LABELS, NMSExplorer
from .pooling_explorer import PoolingExplorer
from .refinement_stepper import ORDERS, RefinementStepper

__all__ = ["NMS_METHOD_LABELS", "ORDERS", "NMSExplorer", "PoolingExplorer", "RefinementStepper"]
