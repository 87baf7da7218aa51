"""Config fuzz: every key of a small valid config, walked through the config's JSON schema, is
given (a) a value of a wrong type, (b) an out-of-range value where the schema has bounds or
choices, and (c) a misspelt name. Each case must be refused by `neurotask ingest` (in-process)
with exit 2 and one message on stderr naming the file and the key, no traceback, and nothing
written to the workdir."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import small_config_dict
from neurotask.pipeline import cli
from neurotask.pipeline.config import json_schema

SCHEMA = json_schema()

# Sections the small config lacks, added with their defaults so their keys are fuzzed too.
EXTRA_SECTIONS = {"analysis": {}, "report": {}, "features": {"weights_dir": "weights"}}

# Values of each JSON type, to give a key one its schema does not allow.
WRONG_VALUES: list[tuple[str, Any]] = [("object", {"wrong": 1}), ("number", 3.5), ("string", "zz-wrong"),
                                       ("boolean", True), ("array", [1, 2])]


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _branches(node: dict) -> list[dict]:
    """The alternatives of a schema node (anyOf/oneOf flattened, $refs resolved)."""
    node = _resolve(node)
    for key in ("anyOf", "oneOf"):
        if key in node:
            return [b for sub in node[key] for b in _branches(sub)]
    return [node]


def _types(node: dict) -> set[str]:
    """The JSON types a node allows ("number" includes integers)."""
    out: set[str] = set()
    for b in _branches(node):
        t = b.get("type")
        if t is None and "const" in b:
            t = {str: "string", bool: "boolean", int: "integer", float: "number"}.get(type(b["const"]), "string")
        if t is None and "enum" in b:
            t = "string"
        if t is None:
            out |= {"object", "number", "string", "boolean", "array", "integer", "null"}  # anything
        else:
            out |= set(t) if isinstance(t, list) else {t}
    return out


def wrong_type(node: dict) -> Any | None:
    """A value of a JSON type the node does not allow (3.5 where an integer goes counts), or
    None where it allows anything."""
    allowed = _types(node)
    for json_type, value in WRONG_VALUES:
        if json_type not in allowed:
            return value
    return None


def out_of_range(node: dict) -> Any | None:
    """A value of an allowed type that breaks a bound or a choice, or None where the schema has none."""
    branches = _branches(node)
    for b in branches:
        if b.get("type") in ("integer", "number"):
            # a value outside every numeric branch's bounds
            if "minimum" in b:
                return b["minimum"] - 1
            if "exclusiveMinimum" in b:
                return b["exclusiveMinimum"] if b["type"] == "number" else b["exclusiveMinimum"] - 1
            if "maximum" in b:
                return b["maximum"] + 1
            if "exclusiveMaximum" in b:
                return b["exclusiveMaximum"]
        if "enum" in b or "const" in b:
            if all(x.get("type") == "string" and ("enum" in x or "const" in x) or x.get("type") != "string"
                   for x in branches):
                return "zz-not-a-choice"
        if b.get("type") == "array":
            if b.get("minItems", 0) > 0:
                return []
            if "maxItems" in b:
                item = b.get("items", {})
                return [_sample(item)] * (b["maxItems"] + 1)
            items = _resolve(b.get("items", {}))
            bad_item = out_of_range(items) if items else None
            if bad_item is not None:
                return [bad_item]
    return None


def _sample(node: dict) -> Any:
    b = _branches(node)[0]
    if "default" in node:
        return node["default"]
    return {"integer": 8, "number": 0.5, "string": "x", "boolean": True}.get(b.get("type"), 8)


def typo(key: str, siblings: set[str]) -> str:
    """A misspelling of key (two letters swapped, else a letter doubled) that is no sibling key."""
    for i in range(len(key) - 1):
        if key[i] != key[i + 1]:
            t = key[:i] + key[i + 1] + key[i] + key[i + 2:]
            if t not in siblings:
                return t
    return key + key[-1]


def _section_schema(name: str) -> dict:
    """The section's object schema (optional sections are anyOf [section, null])."""
    return next(b for b in _branches(SCHEMA["properties"][name]) if "properties" in b)


def _cluster_schema(kind: str) -> dict:
    for b in _branches(SCHEMA["properties"]["cluster"]):
        kinds = _resolve(b["properties"]["kind"])
        if kind in (kinds.get("enum") or [kinds.get("const")]):
            return b
    raise KeyError(kind)


CLUSTERS = {
    "local": {"kind": "local", "n_workers": 2, "dashboard_address": "127.0.0.1:0"},
    "slurm": {"kind": "slurm", "slurm": {"cores": 4, "memory": "16GB", "walltime": "01:00:00"}},
    "address": {"kind": "address", "address": "tcp://127.0.0.1:8786"},
}


def _base(workdir: Path, cluster: str = "local") -> dict:
    cfg = small_config_dict(workdir)
    for name, values in EXTRA_SECTIONS.items():
        cfg.setdefault(name, copy.deepcopy(values))
    cfg["cluster"] = copy.deepcopy(CLUSTERS[cluster])
    return cfg


def _at(cfg: dict, where: tuple[str, ...]) -> dict:
    for key in where:
        cfg = cfg.setdefault(key, {})
    return cfg


def _object_schema(node: dict) -> dict | None:
    return next((b for b in _branches(node) if "properties" in b), None)


def _walk(base: dict, label: str, where: tuple[str, ...], schema: dict) -> Iterator[tuple[str, str, dict]]:
    """The cases of one mapping (at ``where`` in the config) and of the mappings inside it."""
    props = schema["properties"]
    for key, node in props.items():
        if where == ("cluster",) and key == "kind":
            continue  # the discriminator: a wrong kind is its own case
        dotted = ".".join((*where, key))
        for what, value in (("type", wrong_type(node)), ("range", out_of_range(node))):
            if value is None:
                continue
            cfg = copy.deepcopy(base)
            _at(cfg, where)[key] = value
            yield f"{label}{dotted}:{what}={value!r}", dotted, cfg
        cfg = copy.deepcopy(base)
        mapping = _at(cfg, where)
        wrong = typo(key, set(props))
        mapping[wrong] = mapping.pop(key, _sample(node))
        yield f"{label}{dotted}:typo={wrong}", ".".join((*where, wrong)), cfg
        inner = _object_schema(node)
        if inner is not None:
            yield from _walk(base, label, (*where, key), inner)


def cases(workdir: Path) -> Iterator[tuple[str, str, dict]]:
    """(id, dotted key the message must name, config) for every fuzz case."""
    base = _base(workdir)
    for name in base:
        if name != "cluster":
            yield from _walk(base, "", (name,), _section_schema(name))
    for kind in CLUSTERS:
        yield from _walk(_base(workdir, kind), f"[{kind}] ", ("cluster",), _cluster_schema(kind))
    # whole sections: a wrong type and a misspelt name
    for name in list(base):
        cfg = copy.deepcopy(base)
        cfg[name] = [1, 2]
        yield f"{name}:type", name, cfg
        cfg = copy.deepcopy(base)
        wrong = typo(name, set(SCHEMA["properties"]))
        cfg[wrong] = cfg.pop(name)
        yield f"{name}:typo={wrong}", wrong, cfg
    cfg = copy.deepcopy(base)
    cfg["cluster"]["kind"] = "zz-no-such-kind"
    yield "cluster.kind:range", "cluster.kind", cfg


def run_case(path: Path, workdir: Path, key: str, cfg: dict, capsys) -> list[str]:
    """The problems of one case (empty when it behaves)."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        code = cli.main(["ingest", "--config", str(path)])
    except BaseException as e:  # noqa: BLE001 - any escape is a failure of the case
        capsys.readouterr()
        return [f"raised {type(e).__name__}: {e}"]
    err = capsys.readouterr().err
    problems = []
    if code != 2:
        problems.append(f"exit {code}")
    if "Traceback" in err:
        problems.append("traceback")
    if str(path) not in err:
        problems.append("file not named")
    if key not in err:
        problems.append(f"key {key} not named")
    if workdir.exists():
        problems.append("workdir created")
    return [f"{p} (stderr: {err.strip()[:300]!r})" for p in problems]


def test_every_key_wrong_type_out_of_range_and_misspelt_is_one_clean_error(tmp_path, capsys):
    workdir = tmp_path / "work"  # must never be created: every case fails on load
    path = tmp_path / "fuzz.yaml"
    t0 = time.perf_counter()
    # the base config itself is valid (else every case would pass for the wrong reason)
    base = _base(workdir)
    from neurotask.pipeline.config import load_config
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    load_config(path)
    failures: dict[str, list[str]] = {}
    n = 0
    for case, key, cfg in cases(workdir):
        n += 1
        problems = run_case(path, workdir, key, cfg, capsys)
        if problems:
            failures[case] = problems
    seconds = time.perf_counter() - t0
    print(f"config fuzz: {n} cases, {len(failures)} failing, {seconds:.1f} s")
    assert n >= 200
    assert not failures, "\n".join(f"{c}: {'; '.join(p)}" for c, p in failures.items())


@pytest.mark.parametrize("kind", ["slurm", "address"])
def test_the_cluster_bases_are_valid(tmp_path, kind):
    """The fuzz's other cluster kinds start from valid options."""
    from neurotask.pipeline.config import load_config

    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path / "work", kind), sort_keys=False))
    load_config(path)
