"""Flatmaps with pycortex on its example subject S1 (transform fullhead): the data are drawn
where the signal is, the 2-D colour map shows its three cases with the right hue, and a
subject, transform or volume shape pycortex does not know is a clear error."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

cortex = pytest.importorskip("cortex")  # the 'flatmaps' extra; installed in the test environment

from neurotask.pipeline.errors import ConfigError  # noqa: E402
from neurotask.pipeline.report import flatmaps  # noqa: E402
from neurotask.pipeline.report.page import ReportPage  # noqa: E402


@pytest.fixture(scope="module")
def s1(tmp_path_factory) -> flatmaps.FlatmapTarget:
    """S1 in a private copy of pycortex's example database (pycortex writes its caches there)."""
    shipped = Path(sys.prefix) / "share" / "pycortex" / "db" / "S1"
    if not shipped.is_dir():
        shipped = Path(cortex.database.default_filestore) / "S1"
    store = tmp_path_factory.mktemp("pycortex")
    shutil.copytree(shipped, store / "S1", ignore=shutil.ignore_patterns("cache"))
    return flatmaps.FlatmapTarget.open("S1", "fullhead", store)


def _cortical(target: flatmaps.FlatmapTarget) -> np.ndarray:
    """S1's cortical voxels in the transform's grid, (i, j, k) bool."""
    return target.zyx(cortex.utils.get_cortical_mask("S1", "fullhead", "thick")).astype(bool)


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255


def test_unknown_subject_transform_and_shape_are_config_errors(s1):
    with pytest.raises(ConfigError, match=r"subject 'nobody' is not in the pycortex database .*S1"):
        flatmaps.FlatmapTarget.open("nobody", "fullhead", Path(s1.filestore))
    with pytest.raises(ConfigError, match=r"transform 'nope' is not a transform of pycortex subject S1.*fullhead"):
        flatmaps.FlatmapTarget.open("S1", "nope", Path(s1.filestore))
    assert s1.shape == tuple(cortex.db.get_xfm("S1", "fullhead").shape)[::-1]
    with pytest.raises(ConfigError, match=r"shape \(100, 100, 31\), but CSI1's results have volume_shape \(71, 89, 72\)"):
        s1.check("CSI1", (71, 89, 72))


@pytest.mark.slow  # the first flatmap builds pycortex's cache (about a minute on 2 cores)
def test_flatmap_draws_the_signal_and_the_2d_colour_map_hues(s1, tmp_path):
    mask = _cortical(s1)
    i = np.arange(s1.shape[0])[:, None, None]
    # one hemisphere's lateral part (low i, away from the midline) carries the signal: the
    # other half of the flatmap stays grey
    half = mask & (i < int(0.4 * s1.shape[0]))
    vol = np.where(half, 0.4, np.nan).astype(np.float32)
    fig = flatmaps.flatmap(vol, s1, title="planted", cmap="autumn", vmin=0.0, vmax=0.5, colorbar_label="r")
    px = _pixels(fig)
    fig.savefig(tmp_path / "flat.png")
    flatmaps.close(fig)
    assert (tmp_path / "flat.png").stat().st_size > 10_000
    h, w, _ = px.shape
    body = px[int(0.12 * h):]  # below the title and colour bar
    coloured = (body.max(-1) - body.min(-1)) > 0.4  # curvature is grey, 'autumn' saturated
    left, right = coloured[:, : w // 2].sum(), coloured[:, w // 2:].sum()
    assert max(left, right) > 50_000 and min(left, right) < 0.1 * max(left, right)

    # 2-D colour map: 3D only (red), 2D only (blue), both (white) in three slabs along k
    k = np.arange(s1.shape[2])[None, None, :]
    thirds = np.array_split(np.flatnonzero(mask.any(axis=(0, 1))), 3)
    slab = [mask & np.isin(k, t) for t in thirds]
    r3 = np.full(s1.shape, np.nan, np.float32)
    r2 = np.full(s1.shape, np.nan, np.float32)
    r3[slab[0]], r2[slab[0]] = 0.5, 0.0
    r3[slab[1]], r2[slab[1]] = 0.0, 0.5
    r3[slab[2]], r2[slab[2]] = 0.5, 0.5
    fig = flatmaps.flatmap_contrast(r3, r2, s1, title="contrast", vmax=0.5, labels=("3D", "2D"))
    px = _pixels(fig)
    flatmaps.close(fig)
    body = px[int(0.2 * px.shape[0]):]  # below the colour square
    red = (body[..., 0] > 0.8) & (body[..., 1] < 0.35) & (body[..., 2] < 0.35)
    blue = (body[..., 2] > 0.8) & (body[..., 0] < 0.35)
    white = body.min(-1) > 0.93
    for name, m in (("red", red), ("blue", blue), ("white", white)):
        assert m.sum() > 2000, f"{name}: {m.sum()} pixels"


@pytest.mark.slow
def test_flatmap_figures_added_to_the_page(s1, tmp_path):
    mask = _cortical(s1)
    ijk = np.argwhere(mask)[::7]
    v = len(ijk)
    tasks = ["keypoint3d", "keypoint2d", "class_places"]
    rng = np.random.default_rng(0)
    r = rng.uniform(0.05, 0.4, (3, v))
    sig = np.ones((3, v), dtype=bool)
    ds = xr.Dataset({"noise_ceiling_r": ("voxel", np.full(v, 0.6))})
    from neurotask.pipeline.report.volumes import SubjectMaps

    maps = SubjectMaps("S1", s1.shape, np.eye(4), ijk, mask)
    page = ReportPage(tmp_path, dpi=60)
    flatmaps.flatmap_figures(page, s1, maps, {t: t for t in tasks}, r, sig, tasks, "class_places", ds, "test")
    keys = [f.key for f in page.figures]
    assert keys == ["fig2_flatmap_class_places_S1", "fig3_flatmap_keypoint_S1", "fig4_flatmap_class_places_S1"]
    assert [f.section for f in page.figures] == ["fig2", "fig3", "fig4"]
    assert all((tmp_path / f.files[0]).is_file() for f in page.figures)
    assert "inkscape" in page.figures[0].caption or "overlays drawn" in page.figures[0].caption


def test_report_pycortex_config_errors_name_subject_and_store(s1, tmp_path):
    from conftest import small_config_dict, write_config
    from neurotask.pipeline.config import load_config
    from neurotask.pipeline.report.volumes import MapOptions
    from neurotask.storage import StudyStore

    def options(**pycortex):
        cfg = small_config_dict(tmp_path / "work", report={"pycortex": pycortex})
        cfg = load_config(write_config(tmp_path / "study.yaml", cfg))
        return MapOptions.from_config(cfg, StudyStore(cfg.store_path))

    opts = options(subject="S1", transform="fullhead", filestore=s1.filestore)
    assert opts.pycortex.shape == s1.shape
    with pytest.raises(ConfigError, match=rf"subject 'S2' is not in the pycortex database {re.escape(s1.filestore)}"):
        options(subject="S2", transform="fullhead", filestore=s1.filestore)
    with pytest.raises(ConfigError, match=r"report.pycortex.filestore: no such folder .*nowhere"):
        options(subject="S1", transform="fullhead", filestore=str(tmp_path / "nowhere"))
