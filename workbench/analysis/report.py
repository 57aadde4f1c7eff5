"""Markdown rendering of result tables, with the paper's numbers on the line below ours.

Markdown rather than ``DataFrame.to_markdown`` because the latter needs the optional ``tabulate``
package; the table here is simple enough to write directly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import pandas as pd


def _is_number(value: object) -> bool:
    # numbers.Real covers numpy scalars (np.int64 is not an int); bool is not a measurement.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: object, digits: int) -> str:
    if value is None or (_is_number(value) and math.isnan(value)):
        return "–"
    if _is_number(value):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    ours: pd.DataFrame,
    paper: Mapping[str, Mapping[str, float]] | None = None,
    *,
    scale: float = 100.0,
    digits: int = 1,
    columns: Sequence[str] | None = None,
    paper_names: Mapping[str, str] | None = None,
) -> str:
    """A Markdown table of ``ours``, each row followed by the paper's row of the same name.

    Args:
        ours: one row per method (index = name), numeric columns, e.g. from :func:`ap_table`.
        paper: row name -> column -> value, in the units the paper prints (e.g.
            :data:`workbench.analysis.paper_numbers.TABLE1_NMS`); rows absent here show ours only.
        scale: multiplies our values before printing (100: fractions -> the paper's percentages).
        digits: decimals printed.
        columns: columns to show, in order (default: all of ``ours``).
        paper_names: our row name -> the paper's row it is compared with, shown under its own name
            (default: the row of the same name).

    Returns:
        str: ``| Method | Source | <columns> |`` with a ``ours`` and, where known, a ``paper`` row per
        method; missing values print as ``–``.
    """
    columns = list(ours.columns if columns is None else columns)
    lines = [
        "| " + " | ".join(["Method", "Source", *columns]) + " |",
        "| " + " | ".join(["---", "---", *["---:"] * len(columns)]) + " |",
    ]
    paper = paper or {}
    for name, row in ours.iterrows():
        values = [row.get(c) * scale if _is_number(row.get(c)) else row.get(c) for c in columns]
        lines.append("| " + " | ".join([str(name), "ours", *(_cell(v, digits) for v in values)]) + " |")
        theirs = (paper_names or {}).get(name, name)
        if theirs in paper:
            lines.append("| " + " | ".join([str(theirs), "paper", *(_cell(paper[theirs].get(c), digits) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"
