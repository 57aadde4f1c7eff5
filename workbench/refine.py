"""Box refinement: the paper's optimization-based refinement (Algorithm 2) and the iterative
bounding-box regression it is compared with (Sec. 2.2, Fig. 4).

Optimization-based refinement treats the IoU predictor as an objective and climbs its gradient
w.r.t. the box coordinates, which PrRoI Pooling makes continuous. Each step is scaled per axis
by the box's own size (Sec. 3.3), in one of two readings of the paper (``step_scaling``):

* ``"width"``: ``x += λ · w · ∂IoU/∂x``, Algorithm 2's line 6 as written ("scale up ∇x1 with
  width(b)"); a step in pixels then grows only linearly with the box.
* ``"log"``: gradient ascent in the log-scaled coordinates ``(x/w, y/h, log w, log h)`` the paper
  calls it equivalent to: the gradient w.r.t. ``x/w`` is ``w · ∂IoU/∂x`` and a step of ``λ`` times
  it *in those coordinates* moves ``x`` by ``λ · w² · ∂IoU/∂x`` pixels, a step measured in box
  widths, the same fraction of every box whatever its size.

Each box stops on its own: when its predicted IoU no longer changes
(``|new - prev| < omega1``) or when it drops by more than the tolerance (``new - prev < omega2``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops._checks import check_boxes

# Smallest width and height (pixels) a refinement step may leave a box with: a box that shrinks to
# nothing pools to zero features and its step scale (its size) to zero, so it could never recover.
MIN_BOX_SIZE = 1.0

STEP_SCALINGS = ("width", "log")  # readings of Algorithm 2's scale(grad, b); see the module docstring

# Stop reasons recorded per box, in the order Algorithm 2 tests them.
RUNNING, CONVERGED, DEGENERATED = 0, 1, 2
STOP_REASONS = {RUNNING: "T (ran every iteration)", CONVERGED: "Ω1 (converged)", DEGENERATED: "Ω2 (degenerated)"}


@dataclass
class Refinement:
    """What :func:`optimize_boxes` did, step by step, for every box.

    Attributes:
        boxes (Tensor[K, 4]): final boxes ``(x0, y0, x1, y1)``.
        scores (Tensor[K]): predicted IoU of the final boxes.
        trajectory (Tensor[T + 1, K, 4]): boxes before the first step and after each step; a
            stopped box repeats its final coordinates.
        predicted (Tensor[T + 1, K]): predicted IoU of ``trajectory``.
        gradients (Tensor[T, K, 4]): the scaled gradient ``scale(grad, b)`` applied at each step
            (zero once a box has stopped), before :func:`valid_boxes` keeps the box valid.
        stop_step (Tensor[K] int64): number of steps the box took (``T`` if it never stopped).
        stop_reason (Tensor[K] int64): ``RUNNING`` (ran all ``T`` steps), ``CONVERGED`` (Ω1) or
            ``DEGENERATED`` (Ω2); see ``STOP_REASONS``.
    """

    boxes: Tensor
    scores: Tensor
    trajectory: Tensor
    predicted: Tensor
    gradients: Tensor
    stop_step: Tensor
    stop_reason: Tensor

    def select(self, index: Tensor) -> Refinement:
        """The record of the boxes ``index`` (``Int64Tensor[M]``, positions among the ``K`` boxes), in that order."""
        return Refinement(boxes=self.boxes[index], scores=self.scores[index], trajectory=self.trajectory[:, index],
                          predicted=self.predicted[:, index], gradients=self.gradients[:, index],
                          stop_step=self.stop_step[index], stop_reason=self.stop_reason[index])

    @staticmethod
    def cat(parts: Sequence[Refinement]) -> Refinement:
        """The records of several runs with the same number of steps, their boxes one after the other."""
        if not parts:
            raise ValueError("Refinement.cat needs at least one record")
        return Refinement(boxes=torch.cat([p.boxes for p in parts]), scores=torch.cat([p.scores for p in parts]),
                          trajectory=torch.cat([p.trajectory for p in parts], 1),
                          predicted=torch.cat([p.predicted for p in parts], 1),
                          gradients=torch.cat([p.gradients for p in parts], 1),
                          stop_step=torch.cat([p.stop_step for p in parts]),
                          stop_reason=torch.cat([p.stop_reason for p in parts]))


def _score_and_gradient(score_fn: Callable[[Tensor], Tensor], boxes: Tensor, gradient: bool = True
                        ) -> tuple[Tensor, Tensor]:
    """Scores of ``boxes`` and, if ``gradient``, their gradient w.r.t. the boxes (else zeros)."""
    if len(boxes) == 0:  # an image without detections: nothing to score, and no graph to differentiate
        return boxes.new_zeros(0), torch.zeros_like(boxes)
    with torch.enable_grad() if gradient else torch.no_grad():
        b = boxes.detach().requires_grad_(gradient)
        scores = score_fn(b)
        if scores.shape != boxes.shape[:1]:
            raise ValueError(f"score_fn must return one score per box, shape ({len(boxes)},), got {tuple(scores.shape)}")
        if not gradient:
            return scores.detach(), torch.zeros_like(boxes)
        # Boxes are scored independently, so the gradient of the sum is each box's own gradient.
        (grad,) = torch.autograd.grad(scores.sum(), b)
    return scores.detach(), grad


def valid_boxes(boxes: Tensor, image_size: tuple[int, int] | None = None, min_size: float = MIN_BOX_SIZE) -> Tensor:
    """The nearest boxes that are at least ``min_size`` wide and high and, given ``image_size``
    ``(height, width)``, inside the image: what a refinement step may produce.

    A box narrower than ``min_size`` (or inverted) is widened to ``min_size`` about its centre; then
    it is clipped to the image, keeping ``min_size``. Boxes ``Tensor[K, 4]`` ``(x0, y0, x1, y1)``.
    """
    out = []
    for axis, size in ((0, image_size[1] if image_size else None), (1, image_size[0] if image_size else None)):
        lo, hi = boxes[:, axis], boxes[:, axis + 2]
        centre, narrow = (lo + hi) / 2, hi - lo < min_size
        lo = torch.where(narrow, centre - min_size / 2, lo)
        hi = torch.where(narrow, centre + min_size / 2, hi)
        if size is not None:
            lo = lo.clamp(0, size - min_size)
            hi = torch.maximum(hi.clamp(max=size), lo + min_size)
        out.append((lo, hi))
    (x0, x1), (y0, y1) = out
    return torch.stack([x0, y0, x1, y1], dim=1)


def box_size_scale(boxes: Tensor, step_scaling: str = "width") -> Tensor:
    """Per-coordinate step scale of each box (Algorithm 2, line 6; Sec. 3.3): ``Tensor[K, 4]``,
    ``(w, h, w, h)`` for ``step_scaling="width"``, ``(w², h², w², h²)`` for ``"log"``, in pixels."""
    if step_scaling not in STEP_SCALINGS:
        raise ValueError(f"step_scaling must be one of {STEP_SCALINGS}, got {step_scaling!r}")
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    scale = torch.stack([w, h, w, h], dim=1)
    return scale if step_scaling == "width" else scale * scale


def optimize_boxes(
    score_fn: Callable[[Tensor], Tensor],
    boxes: Tensor,
    iterations: int = 5,
    step_size: float = 0.5,
    early_stop: float = 0.001,
    degeneration: float = -0.01,
    image_size: tuple[int, int] | None = None,
    step_scaling: str = "width",
) -> Refinement:
    """Optimization-based bounding-box refinement (Algorithm 2), batched over boxes.

    Args:
        score_fn: maps boxes ``Tensor[K, 4]`` to predicted IoUs ``Tensor[K]``, differentiable
            w.r.t. the boxes and independent across boxes (e.g. an IoU-Net head in eval mode on
            fixed image features). If it has a method ``select(index)`` returning the scorer of
            the boxes at positions ``index`` (``Int64Tensor[M]``) among the ``K`` (e.g.
            :class:`workbench.pipeline.IoUScorer`), boxes that have stopped are not scored again.
        boxes (Tensor[K, 4]): initial boxes ``(x0, y0, x1, y1)`` in the coordinates ``score_fn``
            expects; the paper starts from one step of box regression.
        iterations: ``T``, the maximum number of steps (paper: 5).
        step_size: ``λ`` (paper: 0.5).
        early_stop: ``Ω1 > 0``: a box stops once ``|new - prev| < Ω1`` (paper: 0.001).
        degeneration: ``Ω2 < 0``: a box stops once ``new - prev < Ω2`` (paper: -0.01). As in
            Algorithm 2 the degrading step itself is kept; the box takes no further step.
        image_size: ``(height, width)`` of the image, in the boxes' coordinates: every step's boxes
            are clipped to it. Whether given or not, a step never leaves a box smaller than
            ``MIN_BOX_SIZE`` (see :func:`valid_boxes`), so ``score_fn`` always sees valid boxes.
        step_scaling: ``"width"`` or ``"log"``, the reading of ``scale(grad, b)`` (module docstring).

    Returns:
        Refinement: final boxes and scores plus the full per-step record.
    """
    boxes = check_boxes("boxes", boxes)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if step_scaling not in STEP_SCALINGS:
        raise ValueError(f"step_scaling must be one of {STEP_SCALINGS}, got {step_scaling!r}")
    if not early_stop >= 0:
        raise ValueError(f"early_stop (Ω1) must be >= 0, got {early_stop}")
    if not degeneration < 0:
        raise ValueError(f"degeneration (Ω2) must be < 0, got {degeneration}")

    k = len(boxes)
    boxes = boxes.detach().clone()
    active = torch.ones(k, dtype=torch.bool, device=boxes.device)
    stop_step = torch.full((k,), iterations, dtype=torch.long, device=boxes.device)
    stop_reason = torch.full((k,), RUNNING, dtype=torch.long, device=boxes.device)
    trajectory, predicted, gradients = [boxes.clone()], [], []

    select = getattr(score_fn, "select", None)
    prev, grad = _score_and_gradient(score_fn, boxes)
    predicted.append(prev)
    for step in range(1, iterations + 1):
        update = step_size * box_size_scale(boxes, step_scaling) * grad * active[:, None]
        boxes = torch.where(active[:, None], valid_boxes(boxes + update, image_size), boxes)
        # The new score and its gradient come from one forward/backward: the gradient is the
        # next step's, so each step costs one evaluation; after the last step, or once every box
        # has stopped, the gradient is never used, and then the forward alone (or nothing) runs.
        if active.all() or (select is None and active.any()):
            new, grad = _score_and_gradient(score_fn, boxes, gradient=step < iterations)
        elif active.any():  # score the running boxes only: a stopped box's score is never read again
            running = torch.where(active)[0]
            part, part_grad = _score_and_gradient(select(running), boxes[running], gradient=step < iterations)
            new, grad = prev.index_put((running,), part), torch.zeros_like(boxes).index_put((running,), part_grad)
        else:
            new = prev
        new = torch.where(active, new, prev)
        delta = new - prev
        converged = active & (delta.abs() < early_stop)
        degenerated = active & ~converged & (delta < degeneration)
        stop_reason[converged] = CONVERGED
        stop_reason[degenerated] = DEGENERATED
        stop_step[converged | degenerated] = step
        active &= ~(converged | degenerated)
        trajectory.append(boxes.clone())
        predicted.append(new)
        gradients.append(update)
        prev = new
    return Refinement(
        boxes=boxes,
        scores=prev,
        trajectory=torch.stack(trajectory),
        predicted=torch.stack(predicted),
        gradients=torch.stack(gradients) if gradients else boxes.new_zeros((0, k, 4)),
        stop_step=stop_step,
        stop_reason=stop_reason,
    )


def iterative_regression(regress_fn: Callable[[Tensor], Tensor], boxes: Tensor, iterations: int) -> list[Tensor]:
    """Apply a box regressor to its own output ``iterations`` times (the baseline of Sec. 2.2).

    Args:
        regress_fn: maps boxes ``Tensor[K, 4]`` to regressed boxes ``Tensor[K, 4]`` (e.g. re-pool
            the boxes and apply the detector's class-specific box regressor).
        boxes (Tensor[K, 4]): starting boxes ``(x0, y0, x1, y1)``.
        iterations: number of regression steps.

    Returns:
        list of ``iterations + 1`` tensors ``[K, 4]``: the boxes before and after each step.
    """
    boxes = check_boxes("boxes", boxes)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    steps = [boxes]
    with torch.no_grad():
        for _ in range(iterations):
            steps.append(regress_fn(steps[-1]))
    return steps
