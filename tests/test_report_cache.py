"""The report cache: a report folder is reused only when its inputs and every file are as recorded; the
pipeline cache: its key names the code the pipeline runs."""

from __future__ import annotations

import json
from pathlib import Path

from workbench import report_cache
from workbench.files import source_digests


def _folder(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "numbers.json").write_text(json.dumps({"AP": 0.4}))
    (out / "report.md").write_text("# report\n")
    (out / "figures").mkdir()
    (out / "figures" / "fig.svg").write_text("<svg/>")
    return out


def test_a_stamped_folder_is_current_until_a_file_or_the_key_changes(tmp_path):
    out = _folder(tmp_path)
    report_cache.stamp(out, "k1")
    assert report_cache.is_current(out, "k1")
    assert not report_cache.is_current(out, "k2")
    (out / "figures" / "fig.svg").write_text("<svg>edited</svg>")
    assert not report_cache.is_current(out, "k1")
    report_cache.stamp(out, "k1")
    (out / "report.md").unlink()
    assert not report_cache.is_current(out, "k1")
    report_cache.stamp(out, "k1")
    (out / "new.md").write_text("added after the stamp")  # not part of the recorded report: no effect
    assert report_cache.is_current(out, "k1")
    (out / report_cache.STAMP).write_text("{not json")
    assert not report_cache.is_current(out, "k1")
    assert not report_cache.is_current(tmp_path / "absent", "k1")


def test_a_folder_without_numbers_is_never_current(tmp_path):
    out = _folder(tmp_path)
    (out / "numbers.json").unlink()
    report_cache.stamp(out, "k1")
    assert not report_cache.is_current(out, "k1")


def test_the_key_names_the_pipeline_output_the_arguments_and_the_input_files(tmp_path):
    extra = tmp_path / "sweep.json"
    extra.write_text("[1]")
    key = report_cache.report_key("shapes-0123", [extra], title="shapes", device="CPU")
    assert key == report_cache.report_key("shapes-0123", [extra], title="shapes", device="CPU")
    assert key != report_cache.report_key("shapes-4567", [extra], title="shapes", device="CPU")
    assert key != report_cache.report_key("shapes-0123", [extra], title="shapes", device="GPU")
    assert key != report_cache.report_key("shapes-0123", [], title="shapes", device="CPU")
    extra.write_text("[2]")
    assert key != report_cache.report_key("shapes-0123", [extra], title="shapes", device="CPU")
    extra.unlink()
    assert key != report_cache.report_key("shapes-0123", [extra], title="shapes", device="CPU")


def test_source_digests_cover_python_and_cuda_sources_outside_the_excluded_folders(tmp_path):
    (tmp_path / "analysis").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "ops.py").write_text("x = 1\n")
    (tmp_path / "analysis" / "plots.py").write_text("y = 2\n")
    (tmp_path / "kernels" / "pool.cu").write_text("// kernel\n")
    (tmp_path / "notes.txt").write_text("not code")
    before = source_digests(tmp_path, exclude=("analysis",))
    assert sorted(before) == ["kernels/pool.cu", "ops.py"]
    assert sorted(source_digests(tmp_path)) == ["analysis/plots.py", "kernels/pool.cu", "ops.py"]
    (tmp_path / "analysis" / "plots.py").write_text("y = 3\n")
    assert source_digests(tmp_path, exclude=("analysis",)) == before
    (tmp_path / "ops.py").write_text("x = 2\n")
    assert source_digests(tmp_path, exclude=("analysis",))["ops.py"] != before["ops.py"]


def test_the_pipeline_cache_key_changes_with_the_code_the_pipeline_runs(monkeypatch):
    from workbench import reproduce
    from workbench.pipeline import PipelineSettings

    def key() -> str:
        return reproduce._pipeline_key([], PipelineSettings(), {"name": "shapes"}, "")

    base = key()
    assert key() == base
    hashed = source_digests(Path(reproduce.__file__).parent, reproduce.PIPELINE_FREE_CODE)
    assert {"refine.py", "pipeline.py", "ops/prroi_pool.py", "kernels/prroi_pool.cu"} <= set(hashed)
    assert not any(name.startswith(("analysis/", "widgets/")) for name in hashed)
    monkeypatch.setattr(reproduce, "source_digests", lambda package, exclude=(): {**hashed, "refine.py": "edited"})
    assert key() != base
