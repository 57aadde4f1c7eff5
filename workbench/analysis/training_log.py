"""A training run's ``log.jsonl`` (written by :mod:`workbench.train`) as a table and as curves."""

from __future__ import annotations

import json
from pathlib import Path

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
