"""Input validation shared by the ops: one message format, naming the argument, what was expected and what came."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_shape(name: str, x: Tensor, shape: tuple[int | None, ...], desc: str) -> None:
    """Check ``x.shape`` against ``shape`` where ``None`` matches any size; ``desc`` spells the expected shape."""
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {desc}, got {tuple(x.shape)}")


@np.errstate(over="ignore", invalid="ignore")
def _sum_of(x: Tensor) -> float | None:
    """The float64 sum of a CPU float32/float64 tensor in one NumPy pass; None for other tensors.

    NaN and inf propagate into it, so a finite sum proves every value finite and a non-NaN sum
    proves no NaN; only the converse can fail (overflow, inf - inf), and then the callers look
    element by element. Float32 values cannot overflow a float64 sum.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.is_neg():
        return None
    return float(x.detach().numpy().sum(dtype=np.float64))


def check_finite(name: str, x: Tensor) -> None:
    if not x.numel():
        return
    total = _sum_of(x)
    if (total is None or not math.isfinite(total)) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must contain only finite values (no NaN or inf)")


def check_same_device(**tensors: Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listed}")


def check_same_dtype(**tensors: Tensor) -> None:
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"tensors must share one dtype, got {listed}")


def check_threshold(name: str, value: object, upper: float | None = None) -> float:
    """A real, finite, non-negative number (and ``<= upper`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0.0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value}")
    return value


def check_boxes(name: str, boxes: object) -> Tensor:
    """Boxes ``Tensor[N, 4]`` ``(x0, y0, x1, y1)``: floating point and finite. Inverted boxes are allowed."""
    boxes = check_tensor(name, boxes)
    check_floating(name, boxes)
    check_shape(name, boxes, (None, 4), "[N, 4] (x0, y0, x1, y1)")
    check_finite(name, boxes)
    return boxes


def check_scores(name: str, scores: object, n: int, boxes: Tensor) -> Tensor:
    """Per-box scores ``Tensor[N]`` matching ``boxes`` in length, device and dtype."""
    scores = check_tensor(name, scores)
    check_floating(name, scores)
    check_shape(name, scores, (n,), f"[N] with N = {n} (one per box)")
    check_same_device(boxes=boxes, **{name: scores})
    check_same_dtype(boxes=boxes, **{name: scores})
    if scores.numel():
        total = _sum_of(scores)
        if (total is None or math.isnan(total)) and bool(torch.isnan(scores).any()):
            raise ValueError(f"{name} must not contain NaN")
    return scores
