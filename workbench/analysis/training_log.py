"""A training run's ``log.jsonl`` (written by :mod:`workbench.train`) as a table and as curves, and the
run's measured speed: what a longer run would cost (:func:`train_longer`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._plotting import color, marker, new_figure, style_axes


def training_log(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``log.jsonl`` (one line per ``log_interval``) as a DataFrame indexed by iteration."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).set_index("iteration")


def plot_training_log(log: pd.DataFrame, *, title: str = "training") -> Figure:
    """Left: every loss of the log against iteration. Right: the learning rate (the warm-up and the step)."""
    fig, axes = new_figure(2, panel_size=(5.0, 3.6))
    parts = [c for c in log.columns if c.startswith("loss_")]
    losses = parts if len(parts) == 1 else ["loss", *parts]  # "loss" is their sum: shown only when there are several
    for k, name in enumerate(losses):
        axes[0, 0].plot(log.index, log[name], color="black" if name == "loss" else color(k), marker=marker(k),
                        markevery=max(1, len(log) // 10), linewidth=2.5 if name == "loss" else 1.5, label=name)
    style_axes(axes[0, 0], xlabel="iteration", ylabel="mean loss over the logging window", title=title)
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].plot(log.index, log["lr"], color=color(3), drawstyle="steps-post")
    style_axes(axes[0, 1], xlabel="iteration", ylabel="learning rate", title="schedule: warm-up, then x0.1 at 3/4")
    return fig


def training_speed(run_dir: str | Path) -> dict:
    """How fast a run trained, from its own ``log.jsonl`` and ``config.json``.

    Each log line gives ``images_per_s`` over the iterations since the previous line; with the run's
    ``batch_size`` (images per iteration of one process) that is seconds per iteration. The median over the
    lines is robust to a slow first window (start-up, a feature cache being filled).

    Returns:
        ``iterations`` (logged so far), ``batch_size``, ``seconds_per_iteration`` (median over windows),
        ``seconds`` (the logged windows' total: the measured training time, checkpoints included).
    """
    log = training_log(run_dir)
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no run config at {config_path}")
    batch = int(json.loads(config_path.read_text())["batch_size"])
    iterations = log.index.to_numpy()
    window = np.diff(iterations, prepend=0)  # iterations in each logged window
    per_iteration = batch / log["images_per_s"].to_numpy(dtype=np.float64)  # seconds per iteration in each window
    return {"iterations": int(iterations[-1]), "batch_size": batch, "seconds_per_iteration": float(np.median(per_iteration)),
            "seconds": float((window * per_iteration).sum())}


def train_longer(run_dirs: dict[str, str | Path], iterations: int) -> pd.DataFrame:
    """What training every run for ``iterations`` iterations would cost, at each run's measured speed
    (:func:`training_speed`): one row per model kind (``run_dirs``: kind -> run folder), with its iterations
    and measured time now and the estimate (median seconds per iteration x ``iterations``), in seconds.
    Estimates hold for the machine and load the runs were trained under."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    rows = {}
    for kind, run_dir in run_dirs.items():
        speed = training_speed(run_dir)
        rows[kind] = {"iterations now": speed["iterations"], "batch size": speed["batch_size"],
                      "seconds per iteration": speed["seconds_per_iteration"], "measured seconds": speed["seconds"],
                      "iterations asked": iterations, "estimated seconds": speed["seconds_per_iteration"] * iterations}
    table = pd.DataFrame(rows).T
    table.loc["all"] = table[["measured seconds", "estimated seconds"]].sum().reindex(table.columns)
    return table
