"""The config's ``cluster:`` section as pydantic models, one per kind, and the wording of
configuration errors.

Kinds: ``local`` (:class:`LocalOptions`), ``slurm`` (:class:`SlurmOptions`, whose ``slurm:``
mapping passes through to dask-jobqueue's ``SLURMCluster``) and ``address``
(:class:`AddressOptions`). :func:`cluster_options` validates a mapping into one of them and
raises :class:`ClusterConfigError` listing every problem, each naming its key.

:func:`error_lines` turns a pydantic ``ValidationError`` into those lines; the study config
(``neurotask.pipeline.config``) uses it too, so every configuration error reads the same.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import ipaddress
import socket
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from dask.utils import parse_bytes
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, create_model,
                      TypeAdapter, ValidationError, ValidationInfo, WrapValidator, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from neurotask.cluster.errors import ClusterConfigError

# --------------------------------------------------------------------------- error wording

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
             "model_type": "a mapping", "model_attributes_type": "a mapping"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def expecting(what: str) -> WrapValidator:
    """Report any error of the annotated type as one 'expected <what>' (pydantic would list one
    error per member of a union, under locations named after the member types)."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("expected", "expected {what}", {"what": what}) from None

    return WrapValidator(check)


def broken(*rules: str) -> PydanticCustomError:
    """The error of a validator whose messages name their keys in full (rules across keys);
    a plain ValueError's message is put after the key it was raised for."""
    return PydanticCustomError("rule", "{rule}", {"rule": "\n".join(rules)})


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models_in(arg)]


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (a path of field names from ``model``)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        models = _models_in(field.annotation) if field is not None else []
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


def _line(key: str, error: Any) -> str:
    kind, ctx, got = error["type"], error.get("ctx", {}), _shown(error["input"])
    if kind in _BOUNDS:
        return f"{key} must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {got}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "too_short":
        return f"{key} must have at least {ctx['min_length']} item(s), got {got}"
    if kind == "too_long":
        return f"{key} must have at most {ctx['max_length']} item(s), got {got}"
    if kind == "literal_error":
        return f"{key}: expected {ctx['expected']}, got {got}"
    if kind == "expected":
        return f"{key}: expected {ctx['what']}, got {got}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {got}"
    return f"{key}: {error['msg']}, got {got}"


def error_lines(error: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per problem of ``error`` (raised validating ``model``), each naming its key,
    dotted from ``prefix``: what was expected and what was given. Unknown keys are listed per
    mapping with the valid ones."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for e in error.errors(include_url=False):
        loc = ((prefix,) if prefix else ()) + tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(_dotted(loc))
        elif e["type"] == "rule":
            lines += e["ctx"]["rule"].splitlines()
        elif e["type"] == "value_error":
            lines.append(f"{_dotted(loc)} {e['ctx']['error']}")
        else:
            lines.append(_line(_dotted(loc), e))
    for parent, keys in unknown.items():
        valid = _keys_at(model, parent[1:] if prefix else parent)
        close = [m for k in keys for m in difflib.get_close_matches(k.rsplit(".", 1)[-1], valid, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        what = f"key(s) {', '.join(keys)}{hint}; valid keys of '{_dotted(parent)}'" if parent else \
            f"section(s) {', '.join(keys)}{hint}; valid sections"
        lines.append(f"unknown {what}: {', '.join(valid)}")
    return lines


# --------------------------------------------------------------------------- the dashboard


def _dashboard_host(address: str) -> str:
    """The host part of a dashboard address as distributed reads it: '' (every interface) for
    ':8787', '8787' or '0'."""
    text = address.split("://", 1)[-1]
    if text.isdigit():  # a bare port: distributed binds every interface
        return ""
    if text.startswith("["):  # [::1]:8787
        return text[1:].split("]", 1)[0]
    host, sep, port = text.rpartition(":")
    return host if sep else text


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP) resolves only to loopback addresses. '' and
    0.0.0.0 mean every interface, so they are not."""
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False  # unresolvable: refuse, rather than guess where it binds
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def dashboard_problem(address: str | None, public: bool) -> str | None:
    """Why a dashboard address is refused, or None: one reachable from other hosts needs
    ``dashboard_public``, since the dashboard has no authentication and shows (and can profile)
    everything the cluster runs."""
    if address is None or public:
        return None
    host = _dashboard_host(str(address))
    if is_loopback(host):
        return None
    where = "every interface" if host in ("", "0.0.0.0", "::", "*") else f"{host!r}, not a loopback address"
    return (f"cluster.dashboard_address {address!r} binds the dashboard to {where}; use "
            "127.0.0.1:<port> (reach it through an SSH tunnel), or set cluster.dashboard_public: true "
            "to expose it on purpose")


def check_dashboard(address: str | None, public: bool) -> None:
    """:func:`dashboard_problem` as a validation error (in the model validators)."""
    problem = dashboard_problem(address, public)
    if problem:
        raise broken(problem)


# --------------------------------------------------------------------------- the section


class _Options(BaseModel):
    # strict: YAML gives typed values, and "4" or true where a number goes is a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _memory_limit(value: str | float | None) -> str | float | None:
    """What distributed reads as a worker memory limit (the field's message says what)."""
    if isinstance(value, str) and value != "auto":
        parse_bytes(value)  # ValueError for what it cannot read
    elif isinstance(value, (int, float)) and value < 0:
        raise ValueError("negative")
    return value


class LocalOptions(_Options):
    """kind ``local``: a ``distributed.LocalCluster`` on 127.0.0.1."""

    kind: Literal["local"] = "local"
    n_workers: Annotated[int, Field(ge=1)] | None = None  # None: one worker process per core, at most 4
    threads_per_worker: Annotated[int, Field(ge=1)] = 1
    processes: bool = True
    memory_limit: Annotated[
        str | int | float | None, AfterValidator(_memory_limit),
        expecting("'auto', an amount like '4GB', a fraction of the memory like 0.5, or null (no limit)"),
    ] = "auto"
    dashboard_address: str | None = "127.0.0.1:8787"  # None: no dashboard
    dashboard_public: bool = False  # true: allow a dashboard_address reachable from other hosts
    # TLS with a temporary certificate (other local users cannot use the scheduler's port);
    # false keeps plain tcp://, for debugging only
    tls: bool = True

    @model_validator(mode="after")
    def _dashboard_on_loopback(self) -> LocalOptions:
        check_dashboard(self.dashboard_address, self.dashboard_public)
        return self


class AddressOptions(_Options):
    """kind ``address``: an existing scheduler, e.g. ``tcp://127.0.0.1:8786`` or ``tls://...``
    (then with the client's certificate files)."""

    kind: Literal["address"]
    address: str
    tls_ca_file: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None


# SLURMCluster keywords that cluster.slurm sets itself, with where the user sets them instead.
_RESERVED = {
    "security": "use cluster.tls (true: temporary certificates; false: no TLS)",
    "protocol": "follows cluster.tls (tls:// or tcp://)",
    "dashboard_address": "use cluster.dashboard_address",
    "host": "use scheduler_options: {host: ...} or cluster.interface",
    "n_workers": "use cluster.minimum_jobs / cluster.maximum_jobs (adaptive scaling)",
    "asynchronous": "not configurable",
    "loop": "not configurable",
    "job_cls": "not configurable",
    "scheduler_cls": "not configurable from a config file",
    "scheduler": "not configurable",
}

# Names dask-jobqueue still accepts but has renamed.
_DEPRECATED = {
    "project": "account",
    "extra": "worker_extra_args",
    "env_extra": "job_script_prologue",
    "job_extra": "job_extra_directives",
    "header_skip": "job_directives_skip",
}


@functools.cache
def accepted_options() -> frozenset[str]:
    """Every keyword ``SLURMCluster`` accepts for its cluster or its jobs, minus ours."""
    from dask_jobqueue import SLURMCluster  # only slurm sections need it
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob

    names: set[str] = set()
    for fn in (JobQueueCluster.__init__, SLURMCluster.__init__, SLURMJob.__init__, Job.__init__):
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    names.discard("self")
    return frozenset(names - set(_RESERVED) - set(_DEPRECATED))


def _positive_bytes(value: str | int) -> str | int:
    """An amount dask-jobqueue can read (the field's message says what)."""
    if parse_bytes(value) <= 0:
        raise ValueError("not positive")
    return value


_Count = Annotated[int, Field(ge=1), expecting("a positive integer")]
# A bare string would be split into characters by dask-jobqueue.
_Lines = Annotated[list[str], expecting("a list of strings")]


class _SlurmKeywordsBase(BaseModel):
    """``cluster.slurm``: ``dask_jobqueue.SLURMCluster`` keyword arguments, passed through as
    given, so Dask's jobqueue config (``jobqueue.slurm.*``) fills in what is left out. Names are
    checked against SLURMCluster's signature; the values of the known ones are typed (None
    means "from Dask's config", as in dask-jobqueue), any other is passed as it is."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    cores: _Count | None = None
    processes: _Count | None = None
    job_cpu: _Count | None = None
    memory: Annotated[str | int, AfterValidator(_positive_bytes),
                      expecting("a positive amount of memory like '4GB'")] | None = None
    job_extra_directives: _Lines | None = None
    worker_extra_args: _Lines | None = None
    job_script_prologue: _Lines | None = None
    job_directives_skip: _Lines | None = None
    scheduler_options: Annotated[dict[str, Any],
                                 expecting("a mapping of distributed.Scheduler keyword arguments")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise broken(f"cluster.slurm: expected a mapping of SLURMCluster options, got {_shown(value)}")
        problems = []
        for key in value:
            # Each problem names its dotted key, like every other config message.
            if key in _RESERVED:
                problems.append(f"cluster.slurm.{key}: set by neurotask ({_RESERVED[key]})")
            elif key in _DEPRECATED:
                problems.append(f"cluster.slurm.{key}: deprecated in dask-jobqueue; use {_DEPRECATED[key]!r}")
            elif key not in accepted_options():
                close = difflib.get_close_matches(str(key), accepted_options(), n=1)
                problems.append(f"cluster.slurm.{key}: unknown option"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
        if problems:
            raise broken("; ".join(problems) + ". cluster.slurm options are SLURMCluster keyword "
                         "arguments: " + ", ".join(sorted(accepted_options())))
        return value

    def given(self) -> dict[str, Any]:
        """The options as written (only those), for ``SLURMCluster(**...)``."""
        return self.model_dump(exclude_unset=True)


# The SLURMCluster options whose values are strings (walltime too: quote it in YAML, where
# 00:30:00 unquoted is a number), declared as fields so that the JSON schema lists them.
_STRING_OPTIONS = ("queue", "account", "walltime", "job_mem", "interface", "local_directory", "log_directory",
                   "shared_temp_directory", "python", "shebang", "job_name", "config_name", "name",
                   "worker_command")
SlurmKeywords = create_model("SlurmKeywords", __base__=_SlurmKeywordsBase, __doc__=_SlurmKeywordsBase.__doc__,
                             **{key: (str | None, None) for key in _STRING_OPTIONS})


class SlurmOptions(_Options):
    """kind ``slurm``: Dask workers as SLURM jobs (``neurotask.cluster.slurm``)."""

    kind: Literal["slurm"] = "slurm"
    tls: bool = True
    minimum_jobs: NonNegativeInt = 1  # worker jobs kept while idle
    maximum_jobs: NonNegativeInt = 4
    dashboard_address: str = "127.0.0.1:0"  # localhost: reach it through an SSH tunnel
    dashboard_public: bool = False  # true: allow a dashboard_address reachable from other hosts
    interface: str | None = None  # network interface of the scheduler and workers, e.g. ib0
    slurm: SlurmKeywords = Field(default_factory=SlurmKeywords)

    @field_validator("maximum_jobs")
    @classmethod
    def _enough_jobs(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("minimum_jobs")
        if low is not None and value < max(1, low):
            raise ValueError(f"must be >= 1 and >= cluster.minimum_jobs ({low}), got {value}")
        return value

    @field_validator("slurm", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _set_once(self) -> SlurmOptions:
        problems = []
        if self.interface is not None and "interface" in self.slurm.given():
            problems.append("cluster.interface and cluster.slurm.interface are both set; keep one")
        if "dashboard_address" in self.model_fields_set and "dashboard_address" in (self.slurm.scheduler_options or {}):
            problems.append("cluster.dashboard_address and cluster.slurm.scheduler_options.dashboard_address "
                            "are both set; keep one")
        if problems:
            raise broken(*problems)
        sched_dashboard = (self.slurm.scheduler_options or {}).get("dashboard_address", self.dashboard_address)
        check_dashboard(sched_dashboard, self.dashboard_public)
        return self


ClusterOptions = LocalOptions | SlurmOptions | AddressOptions
_KINDS: dict[str, type[BaseModel]] = {"local": LocalOptions, "slurm": SlurmOptions, "address": AddressOptions}


def cluster_options(section: Mapping[str, Any] | None) -> ClusterOptions:
    """The ``cluster:`` section validated (absent or without ``kind``: local).

    Raises ClusterConfigError with one line per problem, each naming its key."""
    section = {"kind": "local"} if section is None else section
    if not isinstance(section, Mapping):
        raise ClusterConfigError(f"cluster: expected a mapping, got {_shown(section)}")
    kind = section.get("kind", "local")
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ClusterConfigError(f"cluster.kind: expected 'local', 'slurm' or 'address', got {_shown(kind)}")
    try:
        return model.model_validate(dict(section))
    except ValidationError as e:
        raise ClusterConfigError(*error_lines(e, model, prefix="cluster")) from None


def json_schema() -> dict[str, Any]:
    """JSON schema of the ``cluster:`` section (any of the kinds)."""
    return TypeAdapter(ClusterOptions).json_schema()
