"""Config validation and the CLI's handling of user errors: every problem of a file in one
message, each line naming the file and the key; exit 2, no traceback."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SMALL_TASKS, small_config_dict, write_config
from neurotask.pipeline import cli
from neurotask.pipeline.config import json_schema, load_config
from neurotask.pipeline.errors import ConfigError

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCHEMA = ROOT / "configs" / "study.schema.json"


def _run_cli(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _problems(path: Path, **overrides) -> list[str]:
    """The lines of the ConfigError that loading ``path`` raises; each must name the file."""
    with pytest.raises(ConfigError) as e:
        load_config(path, **overrides)
    lines = str(e.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def test_demo_config_is_valid():
    cfg = load_config(cli.DEMO_CONFIG)
    assert len(cfg.tasks) == 21 and cfg.study.subjects == ["CSI1", "CSI2", "CSI3"]
    assert cfg.fit.n_alphas == 100 and cfg.fit.n_folds == 7 and cfg.fit.test_fraction == 0.15
    assert cfg.fit.fingerprint() == {
        "test_set": "auto", "test_fraction": 0.15, "cv": "kfold", "n_folds": 7, "alphas": "paper", "n_alphas": 100, "seed": 2019,
        "dtype": "float32", "zscore_features": True, "n_permutations": 1000, "permutation_seed": 0,
        "backend": "numpy"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_fits_the_schema(path):
    import jsonschema

    load_config(path)
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=study.schema.json\n")
    jsonschema.validate(yaml.safe_load(text), json.loads(SCHEMA.read_text()))


def test_the_schema_file_is_the_models_schema():
    import jsonschema

    schema = json_schema()
    assert json.loads(SCHEMA.read_text()) == schema, (
        "configs/study.schema.json is stale; rewrite it from neurotask.pipeline.config.json_schema()")
    jsonschema.Draft202012Validator.check_schema(schema)
    bad = {"fit": {"n_folds": 1, "n_alpha": 3}, "cluster": {"kind": "local", "threads_per_worker": "x"}}
    errors = {e.json_path for e in jsonschema.Draft202012Validator(schema).iter_errors(bad)}
    assert {"$.fit", "$.fit.n_folds", "$.cluster"} <= errors  # n_alpha is reported on its mapping


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg_dict = small_config_dict("work")
    cfg = load_config(write_config(tmp_path / "sub" / "c.yaml", cfg_dict))
    assert cfg.workdir == (tmp_path / "sub" / "work").resolve()
    assert cfg.store_path == cfg.workdir / "store.zarr"
    assert cfg.data_path(cfg.data.stim_list, "CSI3") == cfg.workdir / "raw/CSI3/CSI03_stim_lists.txt"


def test_the_config_is_immutable(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config_dict(tmp_path / "w")))
    with pytest.raises(ValueError, match="frozen"):
        cfg.fit.n_folds = 3  # type: ignore[misc]


@pytest.mark.parametrize("section, key, value, problem", [
    # wrong types
    ("fit", "n_folds", "seven", "fit.n_folds: expected an integer, got 'seven'"),
    ("fit", "n_folds", 7.0, "fit.n_folds: expected an integer, got 7.0"),
    ("fit", "zscore_features", "yes", "fit.zscore_features: expected true or false, got 'yes'"),
    ("fit", "alphas", "1e3", "fit.alphas: expected 'paper' or a list of positive numbers, got '1e3'"),
    ("study", "subjects", "CSI1", "study.subjects: expected a list, got 'CSI1'"),
    ("study", "tasks", 3, "study.tasks: expected 'all' or a list of task names, got 3"),
    ("data", "sessions", "all", "data.sessions: expected an integer >= 1 or 'auto', got 'all'"),
    ("simulate", "volume_shape", "22x24", "simulate.volume_shape: expected a list, got '22x24'"),
    ("report", "n_slices", True, "report.n_slices: expected an integer, got True"),
    ("cluster", "threads_per_worker", "x", "cluster.threads_per_worker: expected an integer, got 'x'"),
    ("cluster", "memory_limit", "lots", "cluster.memory_limit: expected 'auto', an amount like '4GB'"),
    ("cluster", "processes", 1, "cluster.processes: expected true or false, got 1"),
    # values out of range or not among the choices
    ("fit", "cv", "loo", "fit.cv: expected 'kfold' or 'single_split', got 'loo'"),
    ("fit", "test_fraction", 1.5, "fit.test_fraction must be < 1.0, got 1.5"),
    ("fit", "fdr", 0, "fit.fdr must be > 0.0, got 0"),
    ("fit", "n_folds", 1, "fit.n_folds must be >= 2, got 1"),
    ("fit", "alphas", [1.0, -2.0], "fit.alphas: expected 'paper' or a list of positive numbers, got [1.0, -2.0]"),
    ("fit", "retries", -1, "fit.retries must be >= 0, got -1"),
    ("data", "repeats", "keep", "data.repeats: expected 'exclude' or 'average', got 'keep'"),
    ("data", "chunk_size", 0, "data.chunk_size must be >= 1, got 0"),
    ("data", "trs", [3, 6], "data.trs must be distinct TRs among 1, 2, 3, 4, 5, 34"),
    ("study", "subjects", [], "study.subjects must have at least 1 item(s), got []"),
    ("study", "subjects", ["CSI1", "CSI1"], "study.subjects has duplicates"),
    ("study", "tasks", ["edge2d", "edge4d"], "study.tasks: unknown task(s) edge4d; known: autoencoder"),
    ("simulate", "volume_shape", [16, 4, 16], "simulate.volume_shape[1] must be >= 8, got 4"),
    ("simulate", "volume_shape", [16, 16], "simulate.volume_shape must have at least 3 item(s), got [16, 16]"),
    ("simulate", "n_repeated", 400, "simulate.n_repeated must be in [0, n_images]"),
    ("simulate", "signal_variance", [1.0, 0.5], "simulate.signal_variance must be [low, high] with 0 < low <= high"),
    ("analysis", "n_clusters", 1, "analysis.n_clusters: expected an integer >= 2 or 'auto', got 1"),
    ("analysis", "n_clusters", len(SMALL_TASKS) + 1,
     f"analysis.n_clusters must be <= the number of tasks ({len(SMALL_TASKS)}, study.tasks), got {len(SMALL_TASKS) + 1}"),
    ("analysis", "ci", 1, "analysis.ci must be < 1.0, got 1"),
    ("report", "task", "edge4d", "report.task is not a Taskonomy task: 'edge4d'"),
    ("cluster", "n_workers", 0, "cluster.n_workers must be >= 1, got 0"),
    ("cluster", "kind", "kubernetes", "cluster.kind: expected 'local', 'slurm' or 'address', got 'kubernetes'"),
])
def test_bad_values_name_the_key_and_file(tmp_path, capsys, section, key, value, problem):
    cfg = small_config_dict(tmp_path / "w")
    cfg.setdefault(section, {})[key] = value
    path = write_config(tmp_path / "bad.yaml", cfg)
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    code, _, err = _run_cli(capsys, "fit", "--config", str(path))
    assert code == 2 and err.startswith("neurotask: error:") and "Traceback" not in err
    assert f"{path}: {problem}" in err


@pytest.mark.parametrize("section", ["study", "simulate", "data", "fit", "analysis", "report", "features", "cluster"])
def test_unknown_keys_are_named_in_every_section(tmp_path, section):
    cfg = small_config_dict(tmp_path / "w")
    cfg.setdefault(section, {})["n_alpha"] = 1
    (problem,) = _problems(write_config(tmp_path / "bad.yaml", cfg))
    assert problem.startswith(f"unknown key(s) {section}.n_alpha")
    assert f"; valid keys of '{section}': " in problem


def test_every_problem_of_a_file_is_reported_at_once(tmp_path, capsys):
    cfg = small_config_dict(tmp_path / "w", fit={"n_folds": "seven", "n_alpha": 3}, data={"chunk_size": 0},
                            analysis={"metric": "euclid"},
                            cluster={"threads_per_worker": "x", "memory_limit": "lots"})
    path = write_config(tmp_path / "bad.yaml", cfg)
    problems = _problems(path)
    assert sorted(problems) == sorted([
        "data.chunk_size must be >= 1, got 0",
        "fit.n_folds: expected an integer, got 'seven'",
        "analysis.metric: expected 'cosine', 'pearson' or 'jaccard', got 'euclid'",
        "unknown key(s) fit.n_alpha (did you mean 'n_alphas'?); valid keys of 'fit': test_set, test_fraction, cv, n_folds, "
        "validation_fraction, alphas, n_alphas, seed, dtype, zscore_features, fdr, retries, search, backend, device, "
        "n_permutations, permutation_seed",
        "cluster.threads_per_worker: expected an integer, got 'x'",
        "cluster.memory_limit: expected 'auto', an amount like '4GB', a fraction of the memory like 0.5, "
        "or null (no limit), got 'lots'",
    ])
    code, _, err = _run_cli(capsys, "fit", "--config", str(path))
    assert code == 2 and all(f"{path}: {p}" in err for p in problems)


def test_rules_across_keys_name_the_keys(tmp_path):
    cfg = small_config_dict(tmp_path / "w", data={"voxels": "mask", "betas": "CSI{n}_betas.nii.gz"})
    assert sorted(_problems(write_config(tmp_path / "bad.yaml", cfg))) == [
        "data.betas must contain {session}", "data.voxels is 'mask' but data.voxel_mask is not set"]
    cfg = small_config_dict(tmp_path / "w", simulate={"write_weights": True})
    assert _problems(write_config(tmp_path / "bad.yaml", cfg)) == [
        "simulate.write_weights needs features.weights_dir (where the random encoders go)"]


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write_config(tmp_path / "c.yaml", small_config_dict(tmp_path / "w"))
    assert load_config(path, overrides={"analysis": {"n_clusters": 6}}).analysis.n_clusters == 6
    assert _problems(path, overrides={"analysis": {"n_clusters": 7}}) == [
        "analysis.n_clusters must be <= the number of tasks (6, study.tasks), got 7"]


def test_n_clusters_auto_is_the_default(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config_dict(tmp_path / "w", study={"tasks": ["edge2d"]})))
    assert cfg.analysis.n_clusters == "auto"  # a one-task study is valid; analyse needs 2 tasks


def test_files_that_are_no_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {name: x}\nfitt: {}\n")
    assert _problems(bad) == ["unknown section(s) fitt (did you mean 'fit'?); valid sections: study, data, fit, "
                              "simulate, analysis, report, features, partition, cluster"]
    bad.write_text("- study\n- fit\n")
    assert _problems(bad) == ["the top level must be a mapping of sections, got list"]
    bad.write_text("fit: 3\n")
    assert _problems(bad) == ["fit: expected a mapping, got 3"]
    bad.write_text("study: [unclosed\n")
    code, _, err = _run_cli(capsys, "ingest", "--config", str(bad))
    assert code == 2 and f"{bad}: invalid YAML" in err and "Traceback" not in err
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    code, _, err = _run_cli(capsys, "ingest", "--config", str(bad))
    assert code == 2 and f"{bad}: not a text (UTF-8) file, so not a YAML config" in err
    code, _, err = _run_cli(capsys, "status", "--config", str(tmp_path))
    assert code == 2 and f"{tmp_path}: is a directory, not a config file" in err
    code, _, err = _run_cli(capsys, "status", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in err


def test_cluster_section_errors_are_user_errors(tmp_path, capsys):
    cfg = small_config_dict(tmp_path / "w", cluster={"kind": "local", "n_wrokers": 2})
    path = write_config(tmp_path / "c.yaml", cfg)
    from neurotask.cluster import ClusterConfigError, open_client
    with pytest.raises(ClusterConfigError, match=r"^unknown key\(s\) cluster\.n_wrokers \(did you mean 'n_workers'\?\)"):
        with open_client(cfg["cluster"]):
            pass
    assert _problems(path)[0].startswith("unknown key(s) cluster.n_wrokers (did you mean 'n_workers'?)")
    code, _, err = _run_cli(capsys, "fit", "--config", str(path))
    assert code == 2 and "Traceback" not in err and f"{path}: unknown key(s) cluster.n_wrokers" in err


def test_n_folds_is_bounded_by_a_simulated_studys_images(tmp_path, capsys):
    cfg = small_config_dict(tmp_path / "w", fit={"n_folds": 256})  # 300 images, 45 held out: 255 to train
    path = write_config(tmp_path / "c.yaml", cfg)
    code, _, err = _run_cli(capsys, "ingest", "--config", str(path))
    assert code == 2 and "Traceback" not in err
    assert f"{path}: fit.n_folds must be <= the training images (255" in err and "got 256" in err
    assert not (tmp_path / "w").exists()
    cfg["fit"]["n_folds"] = 255
    load_config(write_config(path, cfg))


def test_describe_differences_names_only_the_differing_keys():
    from neurotask.pipeline.errors import describe_differences

    stored = {"n_folds": 5, "seed": 0, "cv": "kfold", "dtype": "float32", "alphas": [1.0, 2.0]}
    wanted = {"n_folds": 7, "seed": 1, "cv": "kfold", "dtype": "float32", "alphas": [1.0, 2.0],
              "validation_fraction": 0.15}
    assert describe_differences(stored, wanted) == \
        "n_folds: stored 5, config 7; seed: stored 0, config 1; validation_fraction: stored absent, config 0.15"
    assert describe_differences({"cv": "kfold"}, {}) == "cv: stored 'kfold', config absent"
    assert describe_differences(stored, dict(stored)) == ""
