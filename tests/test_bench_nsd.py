"""scripts/bench_nsd.py at toy size, so that it cannot rot: its splits, its decomposition (the
fit stage's), the analytic size it quotes, the schedule simulation its projections come from,
and a whole run of the script."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from neurotask.pipeline.config import FitSection
from neurotask.pipeline.stages.fit import decompose_design, splits_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_nsd  # noqa: E402


def _features(n: int, p: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, p)) * np.linspace(1.0, 0.1, p) + rng.random(p)).astype(np.float32)


def test_nsd_splits_hold_out_the_given_test_set_and_fold_the_rest():
    s = bench_nsd.nsd_splits(200, 30, n_folds=7, seed=4)
    assert s.test.size == 30 and s.train.size == 200
    assert np.intersect1d(s.train, s.test).size == 0
    assert np.array_equal(np.sort(np.concatenate([s.train, s.test])), np.arange(230))
    vals = np.concatenate([f.validation for f in s.folds])
    assert np.array_equal(np.sort(vals), s.train)  # the validation sets partition the training part
    for f in s.folds:
        assert np.array_equal(np.sort(np.concatenate([f.fit, f.validation])), s.train)
    again = bench_nsd.nsd_splits(200, 30, n_folds=7, seed=4)
    assert np.array_equal(again.test, s.test) and np.array_equal(again.folds[3].fit, s.folds[3].fit)


def test_decompose_is_the_fit_stages_decomposition_given_its_splits():
    spec = FitSection(n_folds=5, test_fraction=0.2, test_set="position")  # rows without names
    X = _features(120, 16)
    ours = bench_nsd.decompose(spec, X, splits_for(spec, X.shape[0]))
    stage = decompose_design(spec, X)
    for a, b in zip(list(ours.folds) + [ours.final], list(stage.folds) + [stage.final]):
        assert np.array_equal(a.eval_rows, b.eval_rows)
        assert np.array_equal(a.eigvals, b.eigvals)
        assert np.array_equal(a.proj_eval, b.proj_eval)
    assert np.array_equal(ours.centred, stage.centred)


@pytest.mark.parametrize("form, n, p, cv", [("cross-product", 150, 12, "kfold"),  # p < n_fit, K folds
                                            ("direct", 150, 12, "single_split"),  # no partition of train
                                            ("direct", 60, 80, "kfold")])          # p > n_fit: kernel form
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_analytic_decomposition_size_is_its_nbytes(form, n, p, cv, dtype):
    spec = FitSection(n_folds=4, cv=cv, dtype=dtype, test_set="position")  # rows without names
    splits = splits_for(spec, n)
    dec = bench_nsd.decompose(spec, _features(n, p), splits)
    assert (dec.centred is not None) == (form == "cross-product")
    bases = list(dec.folds) + [dec.final]
    size = bench_nsd.decomposition_bytes(p, splits.train.size, [b.fit_rows.size for b in bases],
                                         [b.eval_rows.size for b in bases], [b.eigvals.size for b in bases],
                                         np.dtype(dtype).itemsize, dec.centred is not None)
    assert size == dec.nbytes


def test_simulated_schedule_on_hand_checked_cases():
    one = [(2.0, [1.0, 1.0, 1.0])]
    assert bench_nsd.simulate_wall(one, 1) == pytest.approx(5.0)  # all in turn
    assert bench_nsd.simulate_wall(one, 3) == pytest.approx(3.0)  # decomposition, then 3 chunks side by side
    assert bench_nsd.simulate_wall(one, 8) == pytest.approx(3.0)  # idle workers do not help
    # Two pairs, two workers: both decompositions 0-2, then pair 0's chunks first (two at 2-3,
    # one at 3-4), pair 1's after them (one at 3-4, two at 4-5).
    two = [(2.0, [1.0, 1.0, 1.0])] * 2
    assert bench_nsd.simulate_wall(two, 2) == pytest.approx(5.0)
    # Pairs in flight limit: with one pair at a time the second decomposition waits for the
    # first pair's last chunk.
    assert bench_nsd.simulate_wall(two, 2, in_flight=1) == pytest.approx(2 * (2.0 + 2.0))
    many = [(3.0, [0.5] * 7 + [0.2])] * 40
    total = sum(d + sum(c) for d, c in many)
    for w in (1, 2, 5, 32, 500):
        wall = bench_nsd.simulate_wall(many, w)
        assert wall >= total / w - 1e-9 and wall >= 3.5 - 1e-9
    assert bench_nsd.simulate_wall(many, 1) == pytest.approx(total)


def test_projection_and_sharing_follow_from_the_costs():
    costs = {"decomposition_cpu_seconds": 10.0, "ridge_cpu_per_voxel": 0.004, "permutation_cpu_per_voxel": 0.001}
    args = types.SimpleNamespace(nsdgeneral=5000, whole_brain=20000, chunk=2000, local_workers=2,
                                 node_cores=4, nodes=[1, 3])
    out = bench_nsd.project(costs, args)
    p = out["nsdgeneral + permutations"]
    assert p["pair_cpu_seconds"] == pytest.approx(10 + 5000 * 0.005)
    assert p["chunks_per_pair"] == 3
    assert p["study_cpu_seconds"] == pytest.approx(8 * 21 * 35.0)
    assert p["decomposition_share"] == pytest.approx(10 / 35)
    assert p["sharing_saving"] == pytest.approx(7 * 10 / (8 * 35))  # 7 of 8 subjects skip it
    assert out["whole_brain"]["pair_cpu_seconds"] == pytest.approx(10 + 20000 * 0.004)
    walls = p["wall_seconds"]
    assert list(walls) == ["this machine", "1 node", "3 nodes"]
    assert walls["this machine"] >= p["study_cpu_seconds"] / 2
    assert walls["3 nodes"] < walls["1 node"] < walls["this machine"]


def test_nsd_training_sets_overlap_only_in_the_shared_images():
    o = bench_nsd.nsd_overlap()
    assert o["max_common_training_images"] == 485
    assert o["training_images"]["subj01"] == 9485 and o["training_images"]["subj04"] == 8694
    assert o["max_common_fraction"] == pytest.approx(485 / 8694)


def test_worker_in_process_measures_a_toy_fit(tmp_path):
    args = types.SimpleNamespace(n_train=150, n_test=30, p=24, voxels=90, chunk=40, n_folds=5, seed=1)
    data = bench_nsd.write_data(tmp_path, args)
    assert data["chunk_voxels"] == [40, 40, 10]
    r = bench_nsd.worker({"dir": str(tmp_path), "dtype": "float32", "n_permutations": 50, "chunks": [0, 2],
                          "threads": 1, "diagnose": 20})
    assert [c["voxels"] for c in r["chunks"]] == [40, 10]
    assert all(c["has_pvalue_perm"] and 0 < c["permutation_cpu_seconds"] < c["cpu_seconds"] for c in r["chunks"])
    assert r["decomposition_bytes"] == r["decomposition_bytes_analytic"] and r["form"] == "cross-product"
    rss = [r["peak_rss_mb_after_decomposition"]] + [c["peak_rss_mb_after"] for c in r["chunks"]]
    assert rss == sorted(rss) and rss[0] > 50  # a high-water mark
    assert r["chunks"][0]["median_r"] > 0.05  # 60% of the voxels carry planted signal
    ph = r["phases"]
    assert ph["voxels"] == 20 and {"fold_terms", "refit"} <= set(ph["cpu_seconds"]) and ph["gflop"]["fold_terms"] > 0
    from neurotask.pipeline.stats import scores
    restored = scores.permutation_test  # the timing wrapper is gone once the worker returns
    assert restored.__name__ == "permutation_test" and restored.__module__ == scores.__name__


@pytest.mark.slow
def test_toy_run_of_the_script(tmp_path):
    out = tmp_path / "nsd.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_nsd.py"), "--n-train", "200", "--n-test", "40",
                           "--p", "32", "--voxels", "150", "--chunk", "60", "--voxels-float64", "60",
                           "--n-permutations", "50", "--repeats", "2", "--nsdgeneral", "1000", "--whole-brain",
                           "9000", "--nodes", "1", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    assert [len(res["runs"][dt]) for dt in ("float32", "float64")] == [2, 2]
    assert res["costs"]["float32"]["voxels_measured"] == 150 and res["costs"]["float64"]["voxels_measured"] == 60
    for dt, c in res["costs"].items():
        assert c["peak_rss_mb"] > 50 and c["decomposition_bytes"] == c["decomposition_bytes_analytic"]
        assert c["fit_voxels_cpu_per_voxel"] > c["ridge_cpu_per_voxel"] > 0
        proj = res["projection"][dt]["whole_brain + permutations"]
        assert proj["pair_cpu_seconds"] == pytest.approx(
            c["decomposition_cpu_seconds"] + 9000 * c["fit_voxels_cpu_per_voxel"], rel=1e-6)
        assert list(proj["wall_seconds"]) == ["this machine", "1 node", "2 nodes"]
    assert "| nsdgeneral + permutations |" in done.stdout and "no decomposition can be shared" in done.stdout
