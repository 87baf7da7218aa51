"""The Dask dashboard opened while a fit-shaped graph runs (units depending on their pair's
decomposition, as in pipeline.stages.fit): no traceback and no ERROR reaches the terminal or the
log, whichever page is opened, over HTTP and over bokeh's websocket protocol."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

import pytest

from neurotask.cluster import open_client
from neurotask.cluster.dashboard import GroupsPageFilter, quiet_groups_page_failures, raised_in_groups_layout

pytestmark = pytest.mark.slow  # starts a cluster

PAGES = ["/status", "/workers", "/tasks", "/system", "/profile", "/graph", "/groups", "/info/main/workers.html",
         "/individual-progress", "/individual-task-stream", "/individual-groups", "/individual-group-progress",
         "/individual-workers-memory", "/individual-fine-performance-metrics"]
# (no Groups page here: once groups depend on each other its document fails to build, and bokeh's
# client would wait for it forever; those are opened before the fit, above)
SESSIONS = ["/status", "/individual-progress", "/individual-task-stream", "/workers"]


def decompose(x: int) -> list[int]:
    return [x] * 1000


def unit(dec: list[int], chunk: int) -> int:
    time.sleep(0.02)
    return dec[0] + chunk


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_opening_every_dashboard_page_prints_no_traceback(capfd):
    from bokeh.client import pull_session

    seen = _Records()
    watched = [logging.getLogger(n) for n in ("", "tornado", "tornado.application", "bokeh", "distributed",
                                              "distributed.dashboard.components.scheduler", "distributed.utils")]
    notes: list[str] = []
    note = logging.Handler()
    note.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    for lg in watched:
        lg.addHandler(seen)
    logging.getLogger("neurotask.cluster.dashboard").addHandler(note)
    logging.getLogger("neurotask.cluster.dashboard").setLevel(logging.INFO)
    try:
        with open_client({"kind": "local", "n_workers": 1, "dashboard_address": "127.0.0.1:0"}) as client:
            base = client.dashboard_link.rsplit("/", 1)[0]
            # Featurize first (no task depends on another): a Groups page opened now draws, and
            # then re-draws every few hundred ms while the fit's dependent groups appear.
            batches = client.map(unit, [[0]] * 4, range(4), key=[f"featurize-{i}-1" for i in range(4)], pure=False)
            client.gather(batches)
            sessions = [pull_session(url=base + page) for page in ("/groups", "/individual-groups")]
            # Two pairs in flight: decompositions, and units that depend on them (key prefixes as the fit's).
            decs = [client.submit(decompose, i, key=f"decompose-CSI1-task{i}-1") for i in range(2)]
            units = [client.submit(unit, d, c, key=f"fit-CSI1-task{i}-{c}-1", pure=False)
                     for i, d in enumerate(decs) for c in range(20)]
            status = {}
            for page in PAGES:
                try:
                    with urllib.request.urlopen(base + page, timeout=60) as r:
                        status[page] = r.status
                except urllib.error.HTTPError as e:
                    status[page] = e.code
            sessions += [pull_session(url=base + page) for page in SESSIONS]  # live pages, periodic updates
            client.gather(units)
            time.sleep(2.0)
            for s in sessions:
                s.close()
            time.sleep(0.5)
    finally:
        for lg in watched:
            lg.removeHandler(seen)
        logging.getLogger("neurotask.cluster.dashboard").removeHandler(note)
    out, err = capfd.readouterr()
    shown = out + err + "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in seen.records)
    assert "Traceback" not in shown and " ERROR " not in shown and "ERROR -" not in shown, shown[-3000:]
    assert not [r for r in seen.records if r.levelno >= logging.ERROR or r.exc_info], shown[-3000:]
    # every page but Groups renders; Groups is distributed's known failure, said in one line, once
    assert all(code == 200 for page, code in status.items() if "groups" not in page), status
    assert len([n for n in notes if "Groups page cannot be drawn" in n]) <= 1


def test_the_filter_drops_only_failures_of_the_groups_layout():
    filt = quiet_groups_page_failures()
    assert quiet_groups_page_failures() is filt
    assert filt in logging.getLogger("tornado.application").filters

    def record(exc: BaseException | None) -> logging.LogRecord:
        info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, "boom", (), info)

    def raise_in(name: str, filename: str) -> BaseException:
        code = compile("def f():\n    raise KeyError('decompose')\n", filename, "exec")
        scope: dict = {}
        exec(code, scope)
        scope["f"].__code__ = scope["f"].__code__.replace(co_name=name)
        try:
            scope["f"]()
        except KeyError as e:
            return e
        raise AssertionError("not raised")

    fresh = GroupsPageFilter()
    groups = raise_in("update_layout", "/x/site-packages/distributed/dashboard/components/scheduler.py")
    other_component = raise_in("update", "/x/site-packages/distributed/dashboard/components/scheduler.py")
    ours = raise_in("update_layout", "/x/neurotask/pipeline/report/figures.py")
    assert raised_in_groups_layout(groups.__traceback__)
    assert not fresh.filter(record(groups)) and fresh.dropped == 1
    assert fresh.filter(record(other_component)) and fresh.filter(record(ours)) and fresh.filter(record(None))
