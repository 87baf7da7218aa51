"""The Python API (neurotask.open_study): labelled results as xarray, read-only, from a config,
a workdir or a store; clear errors for paths that are not studies; docs/python_api.md run as a
doctest against the small study, so the page cannot drift from what the code prints."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import numpy as np
import pytest

import neurotask
from conftest import ROOT, write_config
from neurotask.pipeline.config import load_config
from neurotask.pipeline.errors import ConfigError, NeurotaskError
from neurotask.storage.lock import driver_lock
from test_status import TASKS, imported  # noqa: F401  (the imported study's config, a fixture)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def test_open_study_from_config_workdir_or_store_gives_labelled_results(imported):
    cfg = load_config(imported)
    for source, with_config in ((imported, True), (str(imported), True), (cfg, True), (cfg.workdir, False),
                                (cfg.store_path, False)):
        study = neurotask.open_study(source)
        assert study.subjects == ["CSI1"] and study.tasks == TASKS
        assert study.paths.store == Path(cfg.store_path).resolve()
        assert (study.config is not None) == with_config
    study = neurotask.open_study(imported)
    assert study.config.path == cfg.path and study.paths.config == cfg.path
    res = study.results("CSI1")
    assert res["r"].dims == ("task", "voxel") and list(res["task"].values) == TASKS
    assert {"roi", "voxel_i", "voxel_j", "voxel_k", "task_label"} <= set(res.coords)
    assert int(res["significant"].sel(task="edge2d").sum()) == 10
    assert res.attrs["imported"] and "source" in res.attrs
    assert study.roi_results("CSI1").sizes["voxel"] == 10
    img = study.volume("CSI1", "r", task="edge2d")
    assert img.shape == (6, 5, 4)
    ijk = np.stack([res[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[tuple(ijk.T)], res["r"].sel(task="edge2d").values)
    assert np.isnan(np.asanyarray(img.dataobj)).sum() == 6 * 5 * 4 - 40


def test_missing_results_and_analysis_name_the_command_that_makes_them(imported):
    study = neurotask.open_study(imported)
    with pytest.raises(neurotask.ResultNotFoundError, match=r"no analysis yet; run `neurotask analyse`"):
        study.analysis()
    with pytest.raises(neurotask.ResultNotFoundError, match=r"no results for subject 'CSI9'.*CSI1.*neurotask fit"):
        study.results("CSI9")
    with pytest.raises(neurotask.ResultNotFoundError, match=r"'r' is per task; pass task="):
        study.volume("CSI1", "r")
    with pytest.raises(neurotask.ResultNotFoundError, match=r"no result 'nope'"):
        study.volume("CSI1", "nope", task="edge2d")


def test_paths_that_are_not_studies_are_clear_errors(tmp_path):
    with pytest.raises(neurotask.StudyNotFoundError, match="no such file or directory"):
        neurotask.open_study(tmp_path / "nowhere")
    with pytest.raises(neurotask.StudyNotFoundError, match=r"not a study: no store.zarr in it"):
        neurotask.open_study(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(neurotask.StudyNotFoundError, match="not a study config"):
        neurotask.open_study(tmp_path / "notes.txt")
    fresh = write_config(tmp_path / "fresh.yaml", {"study": {"name": "f", "workdir": "w", "subjects": ["CSI1"]}})
    with pytest.raises(neurotask.StudyNotFoundError, match=r"has no store yet.*neurotask run --config"):
        neurotask.open_study(fresh)
    (tmp_path / "bad.yaml").write_text("study: {name: x, workdir: w, subjects: [CSI1], colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        neurotask.open_study(tmp_path / "bad.yaml")
    assert issubclass(neurotask.StudyNotFoundError, NeurotaskError)
    assert issubclass(neurotask.ResultNotFoundError, NeurotaskError)


def test_reading_never_writes_and_never_waits_for_the_driver_lock(imported):
    cfg = load_config(imported)
    before = snapshot(cfg.workdir)
    with driver_lock(cfg.workdir, "neurotask fit --config study.yaml"):
        held = snapshot(cfg.workdir)
        study = neurotask.open_study(imported)  # a driver holds the lock: reading goes on
        study.results("CSI1"), study.roi_results("CSI1"), study.volume("CSI1", "r", task="keypoint3d")
        study.status()
        assert snapshot(cfg.workdir) == held
    lock = ".neurotask.lock"
    assert {k: v for k, v in before.items() if k != lock} == {k: v for k, v in snapshot(cfg.workdir).items()
                                                              if k != lock}


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(small_study, monkeypatch):
    """docs/python_api.md, every example, as a doctest in the folder of the small study's config."""
    monkeypatch.chdir(small_study.parent)
    assert small_study.name == "study.yaml"
    result = doctest.testfile(str(ROOT / "docs" / "python_api.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS, raise_on_error=False, verbose=False)
    assert result.attempted >= 15
    assert result.failed == 0, "docs/python_api.md no longer matches what the code prints (see the output above)"


def test_the_readme_documents_the_python_api_with_pictures_of_the_report():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    assert "neurotask.open_study" in section and "docs/python_api.md" in section
    for picture in ("docs/report-demo.png", "docs/report-published.png"):
        assert f"]({picture})" in readme
    assert os.path.isfile(ROOT / "docs" / "python_api.md")
