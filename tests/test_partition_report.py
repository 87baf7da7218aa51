"""The variance partition's ROI summary (analysis stage) and its report figures, on a small
store of imported-style results with synthetic ``partition/<analysis>/<subject>`` groups in the
stored format: one ROI with planted unique 3D variance (LHPPA), one with planted shared variance
(LHLOC), one with none (LHEarlyVis)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from neurotask.pipeline.config import load_config
from neurotask.pipeline.stages.analyse import partition_summary_group, run_analysis
from neurotask.pipeline.stages.report import write_report
from neurotask.pipeline.stats import partition as part_stats
from neurotask.pipeline.stats import partition_summary as ps
from neurotask.pipeline.tasks import task_info
from neurotask.storage import StudyStore, results_group
from neurotask.storage.schema import results_template, strings, voxel_coords, with_values

SUBJECTS = ["S1", "S2"]
TASKS = ["keypoint3d", "keypoint2d", "edge3d", "edge2d"]
SHAPE = (8, 8, 6)
N_ROI = 40  # voxels per ROI
ROIS = ["LHEarlyVis", "LHPPA", "LHLOC"]
# planted test R² of the fits on 3D alone, 2D alone and both, per ROI
PLANTED = {"LHEarlyVis": (0.0, 0.0, 0.0), "LHPPA": (0.30, 0.05, 0.32), "LHLOC": (0.20, 0.20, 0.22)}


def _voxels() -> tuple[np.ndarray, list[str]]:
    ijk = np.argwhere(np.ones(SHAPE, bool))[: N_ROI * len(ROIS) + 20]
    return ijk, [r for r in ROIS for _ in range(N_ROI)] + [""] * 20


def _results(subject: str, rng: np.random.Generator, ijk: np.ndarray, roi: list[str]) -> xr.Dataset:
    v = len(roi)
    template = results_template(TASKS, [task_info(t).label for t in TASKS], voxel_coords(ijk, roi),
                                permutation=False, ceiling=True,
                                attrs={"subject": subject, "imported": True, "source": "test",
                                       "volume_shape": list(SHAPE), "affine": np.diag([2.0, 2, 2, 1]).tolist()})
    r2_3d = np.array([PLANTED[x][0] if x else 0.0 for x in roi])
    r2_2d = np.array([PLANTED[x][1] if x else 0.0 for x in roi])
    r = np.stack([np.sqrt(r2_3d), np.sqrt(r2_2d), np.sqrt(r2_3d) * 0.8, np.sqrt(r2_2d) * 0.8])
    r = r + rng.normal(0, 0.03, r.shape)
    p = np.where(r > 0.15, 1e-6, 0.5)
    ceiling = rng.uniform(0.02, 0.6, v)
    return with_values(template, {"r": r, "r2": r ** 2, "pvalue": p, "qvalue": p, "significant": p < 0.01,
                                  "noise_ceiling_r2": ceiling, "noise_ceiling_r": np.sqrt(ceiling),
                                  "ncsnr": np.ones(v)})


def _partition(subject: str, rng: np.random.Generator, results: xr.Dataset) -> xr.Dataset:
    """``partition/keypoint/<subject>`` in the stored format (groups 3D: keypoint3d, 2D: keypoint2d)."""
    groups = {"3D": ["keypoint3d"], "2D": ["keypoint2d"]}
    names = list(groups)
    sets = part_stats.subsets(names)
    roi = [str(x) for x in results["roi"].values]
    v = len(roi)
    r2 = {}
    for i, key in enumerate(sets):
        base = np.array([PLANTED[x][i] if x else 0.0 for x in roi])
        r2[key] = (base + rng.normal(0, 0.02, v)).astype(np.float32)
    regions = part_stats.regions(r2, names)
    unique = np.stack([regions[(g,)] for g in names])
    pvalue = np.where(unique > 0.1, 1e-3, 0.6)
    spaces = [s for g in names for s in groups[g]]
    set_names = [part_stats.set_name(k) for k in sets]
    coords = {c: results.coords[c].variable for c in ("voxel", "voxel_i", "voxel_j", "voxel_k", "roi")}
    nan_ss = np.full((len(sets), len(spaces), v), np.nan, np.float32)
    ds = xr.Dataset(
        {"r2": (("set", "voxel"), np.stack([r2[k] for k in sets])),
         "r": (("set", "voxel"), np.sqrt(np.clip(np.stack([r2[k] for k in sets]), 0, None)).astype(np.float32)),
         "alpha": (("set", "voxel"), np.full((len(sets), v), 10.0, np.float32)),
         "region_r2": (("region", "voxel"), np.stack([regions[k] for k in sets]).astype(np.float32)),
         "unique_r2": (("group", "voxel"), unique.astype(np.float32)),
         "unique_pvalue": (("group", "voxel"), pvalue),
         "unique_qvalue": (("group", "voxel"), pvalue.astype(np.float32)),
         "unique_significant": (("group", "voxel"), pvalue < 0.05),
         "banded_r2": (("set", "voxel"), np.full((len(sets), v), np.nan, np.float32)),
         "banded_split_r2": (("set", "space", "voxel"), nan_ss),
         "banded_alpha": (("set", "space", "voxel"), nan_ss.copy())},
        coords={"set": strings(set_names), "region": strings(set_names), "group": strings(names),
                "space": strings(spaces), **coords},
        attrs={"analysis": "keypoint", "groups": json.dumps(groups), "fit_params": json.dumps({"n_permutations": 100})})
    return ds


def _study(tmp_path: Path, *, with_partition: bool = True) -> Path:
    cfg = {"study": {"name": "partition-test", "workdir": str(tmp_path / "work"), "subjects": SUBJECTS,
                     "tasks": TASKS},
           "analysis": {"n_clusters": 2, "n_permutations": 50, "n_bootstrap": 200},
           "report": {"n_slices": 4, "dpi": 80}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = StudyStore(load_config(path).store_path)
    store.create()
    rng = np.random.default_rng(3)
    ijk, roi = _voxels()
    for s in SUBJECTS:
        res = _results(s, rng, ijk, roi)
        store.write_dataset(results_group(s), res)
        if with_partition:
            store.write_dataset(f"partition/keypoint/{s}", _partition(s, rng, res))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    path = _study(tmp_path_factory.mktemp("partition"))
    cfg = load_config(path)
    run_analysis(cfg)
    write_report(cfg)
    return path


# --------------------------------------------------------------------------- pure functions


def test_roi_means_and_their_bootstrap_interval():
    rng = np.random.default_rng(0)
    region = rng.normal(0.1, 0.05, (3, 60))
    region[1, 5] = np.nan  # left out of its ROI, in every region
    index = np.repeat([0, 1, -1], 20)
    out = ps.roi_region_means(region, index, 3, n_bootstrap=500, seed=1)
    keep0 = np.arange(20)
    keep1 = np.arange(20, 40)
    assert out["n_voxels"].tolist() == [19, 20, 0]
    np.testing.assert_allclose(out["mean"][:, 0], region[:, np.setdiff1d(keep0, [5])].mean(axis=1))
    np.testing.assert_allclose(out["mean"][:, 1], region[:, keep1].mean(axis=1))
    assert np.isnan(out["mean"][:, 2]).all()
    lo, hi = out["ci"][..., 0], out["ci"][..., 1]
    assert (lo[:, :2] < out["mean"][:, :2]).all() and (out["mean"][:, :2] < hi[:, :2]).all()
    # about 2 SEM either side of the mean
    sem = region[:, keep1].std(axis=1, ddof=1) / np.sqrt(20)
    np.testing.assert_allclose((hi - lo)[:, 1] / (2 * 1.96 * sem), 1.0, atol=0.25)


def test_normalised_regions_are_a_ratio_of_means_over_voxels_above_the_floor():
    region = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, -0.1, 0.1, 0.2]])
    ceiling = np.array([0.5, 0.01, 0.4, np.nan])
    out = ps.roi_normalized_means(region, ceiling, np.zeros(4, np.int64), 1, floor=0.05, n_bootstrap=50)
    assert out["n_voxels"].tolist() == [2]
    np.testing.assert_allclose(out["mean"][:, 0], region[:, [0, 2]].mean(axis=1) / 0.45)


def test_fraction_and_contrast_per_roi():
    index = np.array([0, 0, 0, 1, 1, -1])
    mask = np.array([[True, False, True, True, True, True]])
    np.testing.assert_allclose(ps.roi_fraction(mask, index, 2), [[2 / 3, 1.0]])
    c = ps.roi_contrast(np.array([0.5, 0.1, 0.3, 0.2, 0.4, 0.9]), np.array([0.2, 0.3, 0.1, 0.1, 0.1, 0.0]),
                        np.array([True, True, False, True, True, True]), index, 2)
    assert c["n_voxels"].tolist() == [2, 2] and c["n_wins"].tolist() == [1, 2]
    np.testing.assert_allclose(c["mean_difference"], [(0.3 - 0.2) / 2, (0.1 + 0.3) / 2])


# --------------------------------------------------------------------------- stages


@pytest.mark.slow
def test_summary_equals_a_direct_computation_and_finds_the_planted_rois(study):
    cfg = load_config(study)
    store = StudyStore(cfg.store_path)
    summary = store.read_dataset(partition_summary_group("keypoint"))
    assert [str(x) for x in summary["subject"].values] == SUBJECTS
    per = []
    for s in SUBJECTS:
        part = store.read_dataset(f"partition/keypoint/{s}")
        res = store.results(s)
        roi = np.array([str(x) for x in part["roi"].values])
        sig = res["pvalue"].sel(task=["keypoint3d", "keypoint2d"]).values < 0.01  # BH at 0.05 keeps every 1e-6
        r = res["r"].sel(task=["keypoint3d", "keypoint2d"]).values
        for name in ROIS:
            sel = roi == name
            for region in ("3D", "2D", "3D+2D"):
                got = float(summary["region_mean"].sel(subject=s, region=region, roi=name))
                assert got == pytest.approx(float(part["region_r2"].sel(region=region).values[sel].mean()), abs=1e-6)
                c = res["noise_ceiling_r2"].values[sel]
                keep = c > ps.CEILING_FLOOR
                want = part["region_r2"].sel(region=region).values[sel][keep].mean() / c[keep].mean()
                assert float(summary["region_mean_normalized"].sel(subject=s, region=region, roi=name)) == \
                    pytest.approx(float(want), rel=1e-5)
                lo, hi = summary["region_ci"].sel(subject=s, region=region, roi=name).values
                assert lo <= got <= hi
            frac = part["unique_significant"].sel(group="3D").values[sel].mean()
            assert float(summary["fraction_unique_significant"].sel(subject=s, group="3D", roi=name)) == \
                pytest.approx(float(frac))
            either = sig[0][sel] | sig[1][sel]
            wins = (r[0][sel] - r[1][sel] > 0)[either]
            assert int(summary["contrast_n_voxels"].sel(subject=s, roi=name)) == int(either.sum())
            if either.any():
                assert float(summary["contrast_fraction_wins"].sel(subject=s, roi=name)) == pytest.approx(wins.mean())
        per.append(summary["region_mean"].sel(subject=s))
    np.testing.assert_allclose(summary["region_mean_mean"].values, np.mean([p.values for p in per], axis=0), rtol=1e-6)
    mean = summary["region_mean_mean"]
    rois = [str(x) for x in summary["roi"].values]
    assert rois[int(np.argmax(mean.sel(region="3D").values))] == "LHPPA"
    assert rois[int(np.argmax(mean.sel(region="3D+2D").values))] == "LHLOC"
    assert float(mean.sel(region="3D", roi="LHPPA")) == pytest.approx(0.32 - 0.05, abs=0.01)
    assert float(mean.sel(region="3D+2D", roi="LHLOC")) == pytest.approx(0.2 + 0.2 - 0.22, abs=0.01)
    # a rerun on the same inputs keeps the stored summary
    created = summary.attrs["created"]
    run_analysis(cfg)
    assert store.read_dataset(partition_summary_group("keypoint")).attrs["created"] == created


@pytest.mark.slow
def test_the_page_holds_the_partition_figures(study):
    cfg = load_config(study)
    report = cfg.workdir / "report"
    text = (report / "index.html").read_text()
    store = StudyStore(cfg.store_path)
    keys = ["partition_keypoint_bars", "partition_keypoint_bars_normalized", "partition_keypoint_contrast"]
    for s in SUBJECTS:
        part = store.read_dataset(f"partition/keypoint/{s}")
        for g in ("3D", "2D"):
            drawn = bool((part["unique_significant"].sel(group=g) & (part["unique_r2"].sel(group=g) > 0)).any())
            key = f"partition_keypoint_unique_{g}_{s}"
            if drawn:
                keys.append(key)
            else:  # nothing to draw: said on the page instead
                assert f"id='{key}'" not in text
                assert f"{s}: no voxel with significant positive unique {g} variance" in text
    assert "partition_keypoint_unique_3D_S1" in keys and "partition_keypoint_unique_3D_S2" in keys
    for key in keys:
        assert f"id='{key}'" in text, key
        assert (report / "figures" / f"{key}.png").is_file()
    assert "Variance partition" in text and "SEM over subjects" in text
    assert (report / "nifti" / "S1" / "partition_keypoint_unique_3D.nii.gz").is_file()


@pytest.mark.slow
def test_a_store_without_partition_gets_no_partition_output(tmp_path):
    cfg = load_config(_study(tmp_path, with_partition=False))
    run_analysis(cfg)
    index = write_report(cfg)
    store = StudyStore(cfg.store_path)
    assert not [m for m in store.members("analysis") if m.startswith("partition_")]
    text = index.read_text()
    assert "id='partition_" not in text and "Variance partition" not in text


@pytest.mark.slow
def test_the_partition_section_in_chromium(study, tmp_path):
    """The page with the partition section loads cleanly in headless Chromium (every check of
    test_report_browser), and scripts/screenshot_report captures the section."""
    import subprocess
    import sys

    from browser import Browser, ensure_chromium
    from test_report_browser import ROOT, check_report

    ensure_chromium(ROOT)
    report = load_config(study).workdir / "report"
    with Browser(tmp_path / "profile") as b:
        found = check_report(b, report, tmp_path / "copied", ["partition", "fig1", "fig2"])
    assert found.sections.index("partition") > found.sections.index("fig1")
    shot = tmp_path / "partition.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report"), str(report / "index.html"),
                           str(shot), "--element", "partition", "--height", "900"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    with Image.open(shot) as im:
        assert im.height == 900 and len(np.unique(np.asarray(im.convert("L")))) > 20  # a picture, not a blank page


def _three_group_partition(rng: np.random.Generator) -> xr.Dataset:
    """A partition of three groups (seven regions) over 60 voxels in two ROIs, in the stored layout
    (only the variables the summary reads)."""
    groups = {"3D": ["keypoint3d", "edge3d"], "2D": ["keypoint2d", "edge2d"], "semantic": ["class_object"]}
    names = list(groups)
    sets = part_stats.subsets(names)
    v = 60
    r2 = {k: rng.normal(0.05 * len(k), 0.02, v) for k in sets}
    regions = part_stats.regions(r2, names)
    ijk, roi = np.argwhere(np.ones((4, 4, 4), bool))[:v], ["LHPPA"] * 30 + ["RHPPA"] * 30
    unique = np.stack([regions[(g,)] for g in names])
    return xr.Dataset(
        {"region_r2": (("region", "voxel"), np.stack([regions[k] for k in sets]).astype(np.float32)),
         "unique_r2": (("group", "voxel"), unique.astype(np.float32)),
         "unique_significant": (("group", "voxel"), unique > 0.05)},
        coords={"region": strings([part_stats.set_name(k) for k in sets]), "group": strings(names),
                **voxel_coords(ijk, roi)},
        attrs={"analysis": "clusters", "groups": json.dumps(groups)})


def test_three_groups_one_subject_without_a_ceiling_and_no_contrast():
    from neurotask.pipeline.report.partition import figure_region_bars, region_styles
    from neurotask.pipeline.stages.analyse import contrast_spaces

    rng = np.random.default_rng(5)
    parts = {"S1": _three_group_partition(rng), "S2": _three_group_partition(rng)}
    rois = ["LHPPA", "RHPPA"]
    per = {"S1": ps.subject_summary(parts["S1"], rois, rng.uniform(0.1, 0.5, 60), n_bootstrap=100),
           "S2": ps.subject_summary(parts["S2"], rois, None, n_bootstrap=100)}
    summary = ps.study_summary(per)
    summary.attrs.update(parts["S1"].attrs)
    assert summary.sizes["region"] == 7 and [str(x) for x in summary["region"].values][-1] == "3D+2D+semantic"
    # S2 has no ceiling: its normalised values are missing, the mean is S1's alone
    assert np.isnan(summary["region_mean_normalized"].sel(subject="S2").values).all()
    np.testing.assert_allclose(summary["region_mean_normalized_mean"].values,
                               summary["region_mean_normalized"].sel(subject="S1").values)
    np.testing.assert_allclose(summary["region_mean_mean"].values,
                               (per["S1"]["region_mean"].values + per["S2"]["region_mean"].values) / 2)
    styles = region_styles([str(x) for x in summary["region"].values], ["3D", "2D", "semantic"])
    assert styles["3D"]["hatch"] is None and styles["3D+2D"]["hatch"] and styles["3D+2D+semantic"]["hatch"]
    pairs = {(styles[k]["color"], styles[k]["edge"]) for k in ("3D+2D", "3D+semantic", "2D+semantic")}
    assert len(pairs) == 3  # each shared pair drawn differently
    assert styles["3D+2D"]["color"] == styles["3D"]["color"] and styles["3D+2D"]["edge"] == styles["2D"]["color"]
    for normalized in (False, True):
        fig = figure_region_bars(summary, normalized=normalized)
        bars = [p for p in fig.axes[0].patches]
        assert len(bars) == 7 * 2  # every region in both ROIs
    # groups of several spaces: no separate fits to contrast
    results = xr.Dataset(coords={"task": ["keypoint3d", "keypoint2d"]})
    assert contrast_spaces(parts["S1"], results) is None
    pair = xr.Dataset(attrs={"groups": json.dumps({"2D": ["keypoint2d"], "3D": ["keypoint3d"]})})
    assert contrast_spaces(pair, results) == ("keypoint3d", "keypoint2d")  # the 3D task first, as in Figure 3
