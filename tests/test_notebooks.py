"""The notebooks: committed clean, paired with their scripts, shaped alike, and running in fast mode.

Fast mode: the kernel gets ``WORKBENCH_FAST=1``, which each notebook's tagged ``parameters`` cell reads;
``WORKBENCH_ROOT`` points at a temporary folder shared by the tests that need the tiny run (``fast_root``), so
what a notebook builds (the tiny run, the demo record, a small dataset) is built once and stays out of the checkout. Also here: the analyses notebook 01 and the stepper demo call
(``workbench.analysis.pooling_gradient``, ``workbench.analysis.refinement``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from workbench.analysis import compare_pooling, example_feature_map
from workbench.analysis.pooling_gradient import (
    eq4_gradient,
    finite_difference_gradient,
    gradient_table,
    pooled_value_and_gradient,
    pooling_sweep,
)
from workbench.analysis.refinement import demo_trajectories, refinement_summary
from workbench.ops import box_iou
from workbench.trajectories import Trajectories

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOK_FILES]


def test_there_are_notebooks():
    assert {"01_prroi_pooling", "05_refinement_stepper"} <= set(IDS)


# --- committed without outputs or widget state ----------------------------------------------------


def unstripped(nb: dict) -> list[str]:
    """What a committed notebook must not carry (empty when clean)."""
    problems = []
    if "widgets" in nb.get("metadata", {}):
        problems.append("notebook metadata holds widget state")
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has an execution count")
        extra = set(cell.get("metadata", {})) - {"tags"}
        if extra:
            problems.append(f"cell {i} has metadata {sorted(extra)}")
    return problems


def test_the_checker_finds_outputs_and_widget_state():
    nb = json.loads(NOTEBOOK_FILES[0].read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]
    code["execution_count"] = 3
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    assert len(unstripped(nb)) == 3


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_committed_without_outputs_or_widget_state(path):
    assert unstripped(json.loads(path.read_text())) == []


def test_nbstripout_verify_passes():
    # What CI can check: the git filter itself lives in .git/config, so only --verify is portable.
    result = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOK_FILES)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nbstripout_verify_catches_an_executed_notebook(tmp_path):
    nb = json.loads(NOTEBOOK_FILES[0].read_text())
    next(c for c in nb["cells"] if c["cell_type"] == "code")["execution_count"] = 1
    dirty = tmp_path / "dirty.ipynb"
    dirty.write_text(json.dumps(nb))
    result = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", str(dirty)], capture_output=True, text=True)
    assert result.returncode != 0


def test_gitattributes_routes_notebooks_through_nbstripout():
    attributes = (NOTEBOOKS.parent / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attributes


# --- paired with a py:percent script -----------------------------------------------------------------


def cells_of(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source.strip(), list(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_notebook_and_paired_script_agree(path):
    script = path.with_suffix(".py")
    assert script.is_file(), f"{path.name} has no paired {script.name} (run `jupytext --sync {path}`)"
    assert "format_name: percent" in script.read_text()
    from_script, from_notebook = cells_of(jupytext.read(script)), cells_of(jupytext.read(path))
    assert len(from_script) == len(from_notebook)
    for i, (a, b) in enumerate(zip(from_script, from_notebook)):
        assert a == b, f"cell {i} differs between {script.name} and {path.name}"


# --- shaped alike: claim, parameters, ..., what the data shows --------------------------------------


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "What the paper claims" in nb.cells[0].source
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert tagged == [first_code], "exactly one tagged parameters cell, the first code cell"
    parameters = nb.cells[first_code].source
    assert ("DATASET =" in parameters or "DATASETS =" in parameters) and "FAST =" in parameters and "WORKBENCH_FAST" in parameters
    shows = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## What the data here shows" in c.source]
    assert len(shows) == 1 and nb.cells[-1].cell_type == "markdown"
    assert nb.metadata.kernelspec.name == "python3"


# --- running in fast mode ----------------------------------------------------------------------------


def execute(path: Path, root: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run a copy of ``path`` in fast mode; also assert (in an extra last cell) that fast mode was on."""
    monkeypatch.setenv("WORKBENCH_FAST", "1")
    monkeypatch.setenv("WORKBENCH_ROOT", str(root))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(root / "jupyter-data"))  # no user kernelspec can replace this environment's
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("assert FAST is True, 'the parameters cell did not read WORKBENCH_FAST'"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_notebook_runs_in_fast_mode(path, fast_root, monkeypatch):
    nb = execute(path, fast_root, monkeypatch)
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"cell {i}: {output.get('ename')}: {output.get('evalue')}"
            assert not (output.output_type == "stream" and output.name == "stderr"), f"cell {i} wrote to stderr: {output.text}"
    widgets = [o for c in nb.cells for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    if path.stem == "01_prroi_pooling":
        assert len(widgets) == 1 and len(figures) == 2  # the explorer; Fig. 6 and the sweep
    if path.stem == "05_refinement_stepper":
        assert len(widgets) == 1
        # Fast mode wrote the stand-in record under WORKBENCH_ROOT, not into the checkout.
        assert len(list(fast_root.glob("cache/notebooks/demo-*/trajectories.npz"))) == 1


# --- the helpers the notebooks call --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_eq4_autograd_and_finite_differences_agree_on_random_bins(seed):
    d, _ = example_feature_map()
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0.0, 4.0), rng.uniform(0.0, 2.5)
    box = (x0, y0, x0 + rng.uniform(0.3, 3.0), y0 + rng.uniform(0.3, 2.5))
    _, autograd = pooled_value_and_gradient(d, box)
    np.testing.assert_allclose(eq4_gradient(d, box), autograd, atol=1e-12)
    np.testing.assert_allclose(finite_difference_gradient(d, box), autograd, atol=1e-6)
    table = gradient_table(d, box)
    assert list(table.index) == ["d/dx0", "d/dy0", "d/dx1", "d/dy1"] and table.shape == (4, 3)


def test_eq4_line_integral_by_hand():
    # A constant map f = c away from the border: PrPool = c, and moving any edge changes nothing.
    d = np.full((8, 8), 2.0)
    value, grad = pooled_value_and_gradient(d, (2.0, 2.0, 5.0, 4.0))
    assert value == pytest.approx(2.0)
    np.testing.assert_allclose(eq4_gradient(d, (2.0, 2.0, 5.0, 4.0)), 0.0, atol=1e-12)
    # f = x (d[i, j] = j): PrPool = mean x = (x0 + x1) / 2, so d/dx0 = d/dx1 = 1/2 and d/dy = 0.
    ramp = np.tile(np.arange(8.0), (8, 1))
    np.testing.assert_allclose(eq4_gradient(ramp, (2.0, 2.0, 5.0, 4.0)), [0.5, 0.0, 0.5, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="x0 < x1"):
        eq4_gradient(ramp, (3.0, 2.0, 3.0, 4.0))


def test_pooling_sweep_is_compare_pooling_at_each_position():
    d, bin_box = example_feature_map()
    sweep = pooling_sweep(d, bin_box, "x1", [-0.5, 0.0, 0.25])
    np.testing.assert_allclose(sweep.index, [bin_box[2] - 0.5, bin_box[2], bin_box[2] + 0.25])
    r = compare_pooling(d, (bin_box[0], bin_box[1], bin_box[2] + 0.25, bin_box[3]))
    assert list(sweep.iloc[2]) == [r.roi_pool, r.roi_align, r.prroi_pool]
    with pytest.raises(ValueError, match="edge must be one of"):
        pooling_sweep(d, bin_box, "w")


def test_demo_record_is_a_consistent_refinement(tmp_path):
    path = demo_trajectories(tmp_path, num_images=3)
    t = Trajectories.load(path)
    assert "STAND-IN" in t.meta["predictor"] and Path(t.meta["ann_file"]).is_file()
    num_steps = t.boxes.shape[1] - 1
    for k in range(len(t)):
        iou = box_iou(torch.from_numpy(t.boxes[k]), torch.from_numpy(t.gt_box[k : k + 1]))[:, 0].numpy()
        np.testing.assert_allclose(t.true_iou[k], iou, atol=1e-12)
        np.testing.assert_allclose(t.boxes[k, :-1] + t.gradient[k], t.boxes[k, 1:], atol=1e-9)
        stop = int(t.stop_step[k])
        assert (t.gradient[k, stop:] == 0).all() and stop <= num_steps
    table = refinement_summary(t)
    assert table.loc["all boxes", "boxes"] == len(t)
    assert table.loc["all boxes", "gained IoU"] + table.loc["all boxes", "lost IoU"] <= len(t)
    assert table.loc["all boxes", "mean gain"] == pytest.approx(round(float(t.gain.mean()), 3))
    # Deterministic: the same arguments give the same record.
    again = Trajectories.load(demo_trajectories(tmp_path / "again", num_images=3))
    np.testing.assert_array_equal(again.boxes, t.boxes)
    assert t.meta["iterations"] == 5
