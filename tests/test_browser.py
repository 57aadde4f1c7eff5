"""The notebooks in a real browser: JupyterLab + headless Debian Chromium (Playwright), fast mode.

A JupyterLab server is started on 127.0.0.1 (free port, token, temporary workspaces and settings,
``--allow-root``) on COPIES of the notebooks, which are run with "Run All Cells". The tests then drive
the widgets as a student would (keyboard on the slider) and read what plotly drew from the DOM. Any
widget that failed to render, and any stderr output, fails the test. Screenshots of the outputs go to
``tests/artifacts/``. Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``); skipped without it.
Never ``playwright install``: the system Chromium is used.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SETTINGS_OVERRIDES = {
    # The "Jupyter news" toast would cover outputs.
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    # Without windowing, outputs below the fold are rendered (and become "visible") too.
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}
WIDGET_ERRORS = ("Error displaying widget", "Loading widget...", "Click to show javascript error")
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


class Lab:
    """A JupyterLab server on copies of the notebooks; ``api(path)`` queries its REST API."""

    def __init__(self, tmp: Path, root: Path) -> None:
        self.notebooks = tmp / "notebooks"
        self.notebooks.mkdir()
        for name in ("01_prroi_pooling.ipynb", "04_nms.ipynb", "05_refinement_stepper.ipynb"):
            shutil.copy(REPO / "notebooks" / name, self.notebooks / name)
        self.root = root  # WORKBENCH_ROOT: the tiny run, the demo record and its data go here
        app_settings = tmp / "app-settings"
        app_settings.mkdir()
        (app_settings / "overrides.json").write_text(json.dumps(SETTINGS_OVERRIDES))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = secrets.token_hex(16)
        env = {**os.environ, "WORKBENCH_FAST": "1", "WORKBENCH_ROOT": str(self.root),
               # Away from the user's Jupyter config, kernels and runtime files: only this environment's.
               "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_DATA_DIR": str(tmp / "data"),
               "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
        self.log = open(tmp / "jupyterlab.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.notebooks}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
             f"--LabApp.user_settings_dir={tmp / 'user-settings'}", f"--LabApp.app_settings_dir={app_settings}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp,
        )
        self.log_path = tmp / "jupyterlab.log"
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("status")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not start:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.3)

    def url(self, notebook: str) -> str:
        # ?reset: a fresh workspace, so the notebooks opened by earlier tests are not restored beside this one.
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def api(self, path: str):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}",
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def kernel_of(self, notebook: str) -> dict | None:
        for session in self.api("sessions"):
            if session.get("path", "").endswith(notebook) and session.get("kernel"):
                return session["kernel"]
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, fast_root):
    server = Lab(tmp_path_factory.mktemp("lab"), fast_root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run_all(page, lab: Lab, notebook: str) -> None:
    """Open ``notebook``, wait for its kernel to be connected and idle, run all cells, wait for the end."""
    page.goto(lab.url(notebook))
    page.locator(".jp-NotebookPanel:visible .jp-Cell").first.wait_for(timeout=60_000)

    def ready():
        kernel = lab.kernel_of(notebook)
        return kernel and kernel.get("connections", 0) >= 1 and kernel.get("execution_state") == "idle"

    wait_until(ready, 60, f"the kernel of {notebook} to connect and go idle")
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    code_cells = page.locator(".jp-NotebookPanel:visible .jp-CodeCell")
    count = code_cells.count()

    def finished():
        prompts = page.locator(".jp-NotebookPanel:visible .jp-CodeCell .jp-InputPrompt").all_text_contents()
        return len(prompts) == count and all(re.fullmatch(r"\s*\[\d+\]:\s*", p) for p in prompts)

    wait_until(finished, 180, f"every cell of {notebook} to run")


def assert_legend_names(output, expected: set[str]) -> None:
    """The legend shows the names the widget gave (plotly.js falls back to "trace N" when a name is lost)."""
    names = set(output.locator(".js-plotly-plot .legendtext").all_text_contents())
    assert not any(re.fullmatch(r"trace \d+", n) for n in names), names
    assert expected <= names, names


def assert_no_widget_errors(page) -> None:
    text = page.locator(".jp-NotebookPanel:visible").inner_text()
    for message in WIDGET_ERRORS:
        assert message not in text, f"the page shows {message!r}"
    assert page.locator(".jupyter-widgets-error-widget").count() == 0, "a widget failed to render"
    stderr = page.locator(f".jp-NotebookPanel:visible {STDERR}")
    assert stderr.count() == 0, f"stderr output: {stderr.all_inner_texts()}"


def plotly_traces(page, output) -> list[dict]:
    """Name, data and the drawn SVG line of every scatter trace of the plotly figure in ``output``.

    ``points`` is the line's path converted back to data coordinates through plotly's own axes, so it
    checks what was drawn, not only what was sent.
    """
    return output.locator(".js-plotly-plot").evaluate(
        """gd => {
            const out = [];
            gd.querySelectorAll('.scatterlayer .trace').forEach(g => {
                const trace = g.__data__[0].trace;
                const xa = gd._fullLayout[trace.xaxis.replace('x', 'xaxis')];
                const ya = gd._fullLayout[trace.yaxis.replace('y', 'yaxis')];
                const path = g.querySelector('path.js-line');
                const d = path ? path.getAttribute('d') : '';
                const nums = (d.match(/-?\\d+(\\.\\d+)?(e-?\\d+)?/g) || []).map(Number);
                const points = [];
                for (let i = 0; i + 1 < nums.length; i += 2) points.push([xa.p2c(nums[i]), ya.p2c(nums[i + 1])]);
                out.push({name: trace.name, x: Array.from(trace.x || []), y: Array.from(trace.y || []), points});
            });
            return out;
        }"""
    )


def find(traces: list[dict], prefix: str) -> dict:
    found = [t for t in traces if (t["name"] or "").startswith(prefix)]
    assert len(found) == 1, [t["name"] for t in traces]
    return found[0]


def assert_draws_box(trace: dict, box, tol: float) -> None:
    x0, y0, x1, y1 = box
    np.testing.assert_allclose(trace["x"], [x0, x1, x1, x0, x0], atol=1e-6)
    np.testing.assert_allclose(trace["y"], [y0, y0, y1, y1, y0], atol=1e-6)
    drawn = np.array(trace["points"])
    assert len(drawn) >= 4, f"nothing drawn for {trace['name']}"
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    for corner in corners:  # every corner is a vertex of the drawn path, to within a pixel
        assert np.abs(drawn - corner).max(axis=1).min() < tol, (corner, drawn)


def press_slider(page, output, description: str, key: str, times: int) -> None:
    label = page.locator("label", has_text=re.compile(rf"^\s*{re.escape(description)}\s*$"))  # "T" is also in "step"
    slider = output.locator(".widget-slider").filter(has=label)
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(times):
        handle.press(key)


def readout(output) -> str:
    return output.locator(".widget-html").nth(1).inner_text()


def first_widget(browser, lab: Lab, notebook: str, height: int = 1000):
    """A page with ``notebook`` run in it (no widget errors, no stderr), and the output of its first plotly widget, drawn."""
    page = browser.new_page(viewport={"width": 1300, "height": height})
    run_all(page, lab, notebook)
    assert_no_widget_errors(page)
    output = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").filter(has=page.locator(".js-plotly-plot")).first
    output.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=30_000)
    return page, output


def test_refinement_stepper_in_the_browser(lab, browser):
    from workbench.trajectories import Trajectories

    page, output = first_widget(browser, lab, "05_refinement_stepper.ipynb")

    (record_path,) = lab.root.glob("cache/notebooks/demo-*/trajectories.npz")
    record = Trajectories.load(record_path)
    label = output.locator(".widget-html").first.inner_text()
    box = int(re.search(r"record #(\d+)", label).group(1))
    num_steps = record.boxes.shape[1] - 1
    pixel = 1.5 * (record.boxes[box, 0, 2] - record.boxes[box, 0, 0]) / 100  # ~1.5 px of the drawn image, in image units

    assert_draws_box(find(plotly_traces(page, output), "box at step"), record.boxes[box, 0], tol=max(pixel, 0.5))
    assert f"step 0 of {num_steps}" in readout(output)

    # Three steps to the right with the keyboard, as a student would.
    press_slider(page, output, "step", "ArrowRight", 3)
    wait_until(lambda: f"step 3 of {num_steps}" in readout(output), 20, "the readout to show step 3")
    text = readout(output)
    assert f"predicted IoU {record.predicted_iou[box, 3]:.3f}" in text
    assert f"true IoU {record.true_iou[box, 3]:.3f}" in text

    def drawn_step_three():
        trace = find(plotly_traces(page, output), "box at step")
        return trace if trace["name"] == "box at step 3" else None

    trace = wait_until(drawn_step_three, 20, "the figure to draw the box at step 3")
    assert_legend_names(output, {"ground truth", "box at step 3", "box at every step", "predicted IoU", "true IoU",
                                 "next step λ·scale(∇)"})
    assert not np.allclose(record.boxes[box, 3], record.boxes[box, 0])  # the check below can tell them apart
    assert_draws_box(trace, record.boxes[box, 3], tol=max(pixel, 0.5))
    ARTIFACTS.mkdir(exist_ok=True)
    output.screenshot(path=str(ARTIFACTS / "refinement_stepper_step3.png"))

    # The worst case is one click away: order by loss, the box that lost most true IoU comes first.
    output.locator(".widget-dropdown").filter(has=page.locator("label", has_text="order")).locator("select").select_option(
        label="largest IoU loss first")
    worst = int(np.argmin(record.gain))
    wait_until(lambda: f"record #{worst}," in output.locator(".widget-html").first.inner_text(), 20, "the worst box")
    wait_until(lambda: find(plotly_traces(page, output), "box at step")["name"] == "box at step 0", 20, "step 0 of the worst box")
    assert_draws_box(find(plotly_traces(page, output), "box at step"), record.boxes[worst, 0], tol=max(pixel, 0.5))
    press_slider(page, output, "step", "End", 1)
    wait_until(lambda: f"step {num_steps} of {num_steps}" in readout(output), 20, "the last step")
    from workbench.refine import STOP_REASONS

    assert STOP_REASONS[int(record.stop_reason[worst])] in readout(output)
    assert_no_widget_errors(page)
    output.screenshot(path=str(ARTIFACTS / "refinement_stepper_worst_box.png"))

    # A longer run with a larger step, set with the controls: the box is refined again, and the figure shows
    # that run (Algorithm 2 called here with the stand-in's predictor), the stop mark on its line.
    import torch

    from workbench.analysis.refinement import record_knobs
    from workbench.ops.boxes import matched_iou
    from workbench.refine import optimize_boxes

    press_slider(page, output, "T", "ArrowRight", 3)
    step_size = output.locator(".widget-text").filter(has=page.locator("label", has_text="λ")).locator("input")
    step_size.fill("2")
    step_size.press("Enter")
    knobs = {**record_knobs(record.meta), "iterations": num_steps + 3, "step_size": 2.0}
    belief = torch.tensor(record.meta["stand_in_belief"], dtype=torch.float64)[worst : worst + 1]
    expected = optimize_boxes(lambda x: matched_iou(x, belief), torch.from_numpy(record.boxes[worst, :1]), **knobs)
    wait_until(lambda: "λ = 2," in output.locator(".widget-html").first.inner_text(), 20, "the re-run with λ = 2")
    wait_until(lambda: f"step 0 of {num_steps + 3}" in readout(output), 20, "the re-run's T")
    predicted = find(plotly_traces(page, output), "predicted IoU")
    assert predicted["x"] == list(range(num_steps + 4))
    np.testing.assert_allclose(predicted["y"], expected.predicted[:, 0].numpy(), atol=1e-9)
    stopped = find(plotly_traces(page, output), "stopped here")
    stop = int(expected.stop_step[0])
    assert stopped["x"] == ([stop] if int(expected.stop_reason[0]) else [])
    if stopped["x"]:
        assert stopped["y"] == [pytest.approx(float(expected.predicted[stop, 0]))]
    # Arrow keys: noUiSlider's End key keeps the range the slider was created with (the record's T).
    press_slider(page, output, "step", "ArrowRight", num_steps + 3)
    wait_until(lambda: f"step {num_steps + 3} of {num_steps + 3}" in readout(output), 20, "the re-run's last step")
    assert_draws_box(find(plotly_traces(page, output), "box at step"), expected.trajectory[-1, 0].numpy(), tol=max(pixel, 0.5))
    assert_legend_names(output, {"ground truth", "box at every step", "predicted IoU", "true IoU"})
    assert_no_widget_errors(page)
    output.screenshot(path=str(ARTIFACTS / "refinement_stepper_rerun.png"))
    page.close()


def test_pooling_notebook_in_the_browser(lab, browser):
    from workbench.analysis import example_feature_map
    from workbench.analysis.pooling_gradient import pooled_value_and_gradient

    page, output = first_widget(browser, lab, "01_prroi_pooling.ipynb")
    assert page.locator(".jp-NotebookPanel:visible .jp-RenderedImage img").count() == 2  # Fig. 6, the sweep

    d, (x0, y0, x1, y1) = example_feature_map()
    value, _ = pooled_value_and_gradient(d, (x0, y0, x1, y1))
    assert f"PrPool = {value:.4f}" in output.locator(".widget-html").first.inner_text()
    press_slider(page, output, "x1", "ArrowRight", 4)  # step 0.05: x1 from 4.6 to 4.8
    moved = (x0, y0, round(x1 + 0.2, 2), y1)
    value, grad = pooled_value_and_gradient(d, moved)
    wait_until(lambda: f"PrPool = {value:.4f}" in output.locator(".widget-html").first.inner_text(), 20,
               "the pooled value of the moved bin")
    assert f"∂/∂x1 = {grad[2]:+.4f}" in output.locator(".widget-html").first.inner_text()
    wait_until(lambda: np.allclose(find(plotly_traces(page, output), "bin")["x"][1], moved[2]), 20, "the bin to move")
    assert_draws_box(find(plotly_traces(page, output), "bin"), moved, tol=0.05)
    assert_legend_names(output, {"bin", "samples d[i, j]", "∂PrPool/∂edge (×10 cells per unit)"})

    assert_no_widget_errors(page)
    ARTIFACTS.mkdir(exist_ok=True)
    output.screenshot(path=str(ARTIFACTS / "pooling_explorer.png"))
    page.close()


def nms_explorer_view(output) -> dict:
    """What the NMS explorer shows: its table (one dict per row, as read), the numbers drawn on the image
    (text and data position of each), and the drawn outlines of the two box traces, in data coordinates."""
    return output.evaluate(
        """el => {
            const gd = el.querySelector('.js-plotly-plot');
            const rows = [];
            const table = el.querySelector('table.nms-table');
            const head = table ? Array.from(table.querySelectorAll('thead th')).map(th => th.innerText.trim()) : [];
            if (table) table.querySelectorAll('tbody tr').forEach(tr => {
                const cells = Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim());
                rows.push(Object.fromEntries(head.map((h, i) => [h, cells[i]])));
            });
            const view = {rows, numbers: [], outlines: {}};
            gd.querySelectorAll('.scatterlayer .trace').forEach(g => {
                const trace = g.__data__[0].trace;
                const xa = gd._fullLayout[trace.xaxis.replace('x', 'xaxis')];
                const ya = gd._fullLayout[trace.yaxis.replace('y', 'yaxis')];
                if (trace.name === 'box numbers') {
                    g.querySelectorAll('.textpoint text').forEach(t => view.numbers.push(
                        [t.textContent, xa.p2c(Number(t.getAttribute('x'))), ya.p2c(Number(t.getAttribute('y')))]));
                    view.number_data = {x: Array.from(trace.x || []), y: Array.from(trace.y || []), text: Array.from(trace.text || [])};
                }
                if (trace.name === 'survives' || trace.name === 'suppressed') {
                    const points = [];  // one path per outline: plotly splits a line at its gaps
                    g.querySelectorAll('path.js-line').forEach(path => {
                        const nums = (path.getAttribute('d').match(/-?\\d+(\\.\\d+)?(e-?\\d+)?/g) || []).map(Number);
                        for (let i = 0; i + 1 < nums.length; i += 2) points.push([xa.p2c(nums[i]), ya.p2c(nums[i + 1])]);
                    });
                    view.outlines[trace.name] = points;
                }
            });
            view.header = table ? table.parentElement.querySelector('b').innerText : '';
            return view;
        }"""
    )


def torchvision_nms_fate(boxes, scores, labels, threshold: float, cap: int) -> tuple[set[int], dict[int, int]]:
    """Survivors of class-wise NMS by ``torchvision.ops.batched_nms`` (capped to the ``cap`` highest scores), and
    for every other box the survivor that removed it: the first kept box (in score order) of its class that
    overlaps it by more than ``threshold``, as greedy NMS decides."""
    import torch
    from torchvision.ops import batched_nms, box_iou

    keep = batched_nms(boxes, scores, labels, threshold)  # by decreasing score
    kept = [int(k) for k in keep]
    removed_by = {}
    iou = box_iou(boxes, boxes)
    for i in range(len(boxes)):
        if i not in kept:
            removed_by[i] = next(k for k in kept if labels[k] == labels[i] and iou[i, k] > threshold)
    return set(kept[:cap]), removed_by


def expected_rows(scores: np.ndarray, removed_by: dict[int, int], min_score: float, rows: int) -> list[int]:
    """The boxes the explorer must list: the ``rows`` highest-scored at ``min_score`` or above, plus the boxes
    that removed any of them, by decreasing score."""
    top = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= min_score][:rows]
    listed = set(top) | {removed_by[i] for i in top if i in removed_by}
    return sorted(listed, key=lambda i: (-scores[i], i))


def test_nms_explorer_in_the_browser(lab, browser):
    import torch

    from workbench.results import pipeline_results

    page, output = first_widget(browser, lab, "04_nms.ipynb", height=1100)
    output.locator("table.nms-table").wait_for(timeout=30_000)

    # The same raw detections the notebook's explorer was given (the fast run the notebook trained, from its cache).
    raw = pipeline_results(fast=True, root=lab.root).output.sets["raw"]
    view = nms_explorer_view(output)
    image_id = int(re.search(r"on image (\d+)", view["header"]).group(1))
    mine = [d for d in raw if d["image_id"] == image_id]  # the table's "#": position among this image's detections
    xywh = np.array([d["bbox"] for d in mine], dtype=np.float64)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    scores = np.array([d["score"] for d in mine], dtype=np.float64)
    labels = torch.tensor([d["category_id"] for d in mine])
    kept, removed_by = torchvision_nms_fate(torch.from_numpy(boxes), torch.from_numpy(scores), labels, 0.5, 100)

    def check(view, min_score: float) -> list[int]:
        numbers = [int(r["#"]) for r in view["rows"]]
        assert numbers == expected_rows(scores, removed_by, min_score, rows=12)
        for row in view["rows"]:
            i = int(row["#"])
            assert float(row["score"]) == pytest.approx(scores[i], abs=6e-4)
            assert float(row["predicted IoU"]) == pytest.approx(mine[i]["iou_pred"], abs=6e-4)
            assert (row["after"] == "survives") == (i in kept), row
            if i not in kept:
                assert row["why"].startswith(f"suppressed by #{removed_by[i]}:"), row
        # Every listed box, and only those, carries its number at its top-left corner, as drawn.
        drawn = sorted((int(text), x, y) for text, x, y in view["numbers"])
        assert [n for n, _, _ in drawn] == sorted(numbers)
        tolerance = 0.02 * float(boxes[:, 2].max())  # about a pixel of the drawn image, in image units
        for n, x, y in drawn:
            assert abs(x - boxes[n, 0]) < tolerance and abs(y - boxes[n, 1]) < tolerance, (n, x, y, boxes[n])
        for trace, rows in (("survives", [i for i in numbers if i in kept]), ("suppressed", [i for i in numbers if i not in kept])):
            points = np.array(view["outlines"].get(trace, [])).reshape(-1, 2)
            for i in rows:
                x0, y0, x1, y1 = boxes[i]
                for corner in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
                    assert np.abs(points - corner).max(axis=1).min() < tolerance, (trace, i, corner)
            assert len(points) <= 5 * len(rows) + 1, f"{trace}: more outlines drawn than listed boxes"
        return numbers

    before = check(view, 0.05)
    assert f"{len(kept)} of {len(mine)} boxes survive" in output.inner_text()

    # Raise the score control with the keyboard: the table must follow, to the rule computed here.
    presses = int(round((float(np.sort(scores)[-4]) - 0.05) / 0.01))  # just below the 4th-highest score
    press_slider(page, output, "min score", "ArrowRight", presses)
    value = 0.05 + 0.01 * presses
    min_score_readout = output.locator(".widget-slider").filter(has=page.locator("label", has_text="min score")).locator(
        ".widget-readout")
    wait_until(lambda: float(min_score_readout.inner_text()) == pytest.approx(value, abs=1e-6), 30, f"the control to read {value:.2f}")

    # Each key press re-draws the explorer, so the table passes through the intermediate scores: wait for the
    # last one's rows (and their numbers in the figure); check() then asserts everything on that view.
    def settled():
        view = nms_explorer_view(output)
        numbers = [int(r["#"]) for r in view["rows"]]
        drawn = sorted(int(text) for text, _, _ in view["numbers"])
        return numbers == expected_rows(scores, removed_by, value, rows=12) and drawn == sorted(numbers)

    wait_until(settled, 30, f"the table and figure at min score {value:.2f}")
    after = check(nms_explorer_view(output), float(min_score_readout.inner_text()))
    assert set(after) < set(before)
    assert_no_widget_errors(page)
    ARTIFACTS.mkdir(exist_ok=True)
    output.screenshot(path=str(ARTIFACTS / "nms_explorer.png"))
    page.close()
