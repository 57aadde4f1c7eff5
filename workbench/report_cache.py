"""Whether a report folder is still what its inputs make, so a cached ``reproduce`` need not write it again.

    key = report_key(pipeline_key="shapes-402e1ab2461e14da", title="shapes", device="CPU (2 cores)", backbone="mobilenet_v2")
    if not is_current(out, key):
        write_report(...)
        stamp(out, key)

A report is a pure function of the pipeline's output (named by its content key: checkpoints,
settings, validation data), of the code that writes it and the libraries it calls, of the few
arguments of :func:`workbench.reproduce.write_report`, and of any other file it reads
(``inputs``). :func:`report_key` hashes all of them; the code counts as the source of every
``workbench`` module, so any edit there writes the reports again. :func:`stamp` records the key
and the sha256 of every file in the folder, written last and atomically; :func:`is_current` is true
only when the key matches and every recorded file is still there with the same bytes, so a report
edited, deleted or half-written by a killed run is written again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from .files import atomic_write, sha256_file, source_digests

STAMP = "report-key.json"
"""File name of the stamp inside a report folder."""

# Libraries whose behaviour shapes a report's numbers and figures.
_LIBRARIES = ("numpy", "pandas", "matplotlib", "pycocotools", "scipy", "torch", "torchvision")
_PACKAGE = Path(__file__).resolve().parent


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def report_key(pipeline_key: str, inputs: Sequence[str | os.PathLike] = (), **arguments: str) -> str:
    """Hex sha256 naming everything a report is made from.

    Args:
        pipeline_key: the pipeline cache's content key (its file name), the report's data.
        inputs: other files the report reads; each counts by its sha256 (``"missing"`` if absent).
        **arguments: the report writer's other arguments (title, device name, backbone), as strings.
    """
    code = source_digests(_PACKAGE)
    files = {os.fspath(p): sha256_file(p) if Path(p).is_file() else "missing" for p in inputs}
    blob = json.dumps([pipeline_key, arguments, code, files, {n: _version(n) for n in _LIBRARIES}], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _report_files(out: Path) -> list[Path]:
    # Lock files and atomic_write's temporaries belong to writers, not to the report.
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name != STAMP and not p.name.endswith((".lock", ".tmp")))


def stamp(out: str | os.PathLike, key: str) -> None:
    """Record that the report in ``out`` was just written from ``key``'s inputs (call after writing it)."""
    out = Path(out)
    files = {str(p.relative_to(out)): sha256_file(p) for p in _report_files(out)}
    with atomic_write(out / STAMP) as f:
        f.write(json.dumps({"key": key, "files": files}, indent=1, sort_keys=True).encode())


def is_current(out: str | os.PathLike, key: str) -> bool:
    """Whether ``out`` holds the report of ``key``'s inputs, every file as :func:`stamp` recorded it."""
    out = Path(out)
    try:
        record = json.loads((out / STAMP).read_text())
        if record["key"] != key or "numbers.json" not in record["files"]:
            return False
        return all(sha256_file(out / name) == digest for name, digest in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing or damaged: the report is written again
        return False
