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

    def __init__(self, tmp: Path) -> None:
        self.notebooks = tmp / "notebooks"
        self.notebooks.mkdir()
        for name in ("01_prroi_pooling.ipynb", "05_refinement_stepper.ipynb"):
            shutil.copy(REPO / "notebooks" / name, self.notebooks / name)
        self.root = tmp / "root"  # WORKBENCH_ROOT: the demo record and its data go here
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
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?token={self.token}"

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
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("lab"))
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
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)

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
    slider = output.locator(".widget-slider").filter(has=page.locator("label", has_text=description))
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(times):
        handle.press(key)


def readout(output) -> str:
    return output.locator(".widget-html").nth(1).inner_text()


def test_refinement_stepper_in_the_browser(lab, browser):
    from workbench.trajectories import Trajectories

    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    run_all(page, lab, "05_refinement_stepper.ipynb")
    assert_no_widget_errors(page)
    output = page.locator(".jp-OutputArea-output").filter(has=page.locator(".js-plotly-plot")).first
    output.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=30_000)

    (record_path,) = lab.root.glob("cache/notebooks/*/trajectories.npz")
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
    output.locator("select").select_option(label="largest IoU loss first")
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
    page.close()


def test_pooling_notebook_in_the_browser(lab, browser):
    from workbench.analysis import example_feature_map
    from workbench.analysis.pooling_gradient import pooled_value_and_gradient

    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    run_all(page, lab, "01_prroi_pooling.ipynb")
    assert_no_widget_errors(page)
    assert page.locator(".jp-NotebookPanel:visible .jp-RenderedImage img").count() == 2  # Fig. 6, the sweep
    output = page.locator(".jp-OutputArea-output").filter(has=page.locator(".js-plotly-plot")).first
    output.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=30_000)

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
