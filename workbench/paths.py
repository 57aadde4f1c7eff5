"""Where the checkout the notebooks belong to lives: ``reports/``, ``runs/`` and ``cache/`` are under it."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """``$WORKBENCH_ROOT`` if set, else the folder above the installed ``workbench`` package (the
    repository root for the editable install ``make setup`` does).

    Tests point ``$WORKBENCH_ROOT`` at a temporary folder so that what a notebook builds stays out of
    the checkout."""
    env = os.environ.get("WORKBENCH_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]
