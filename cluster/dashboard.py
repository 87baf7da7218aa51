"""The Dask dashboard's one known failure, kept off the terminal.

Opening the dashboard's *Groups* page (``/groups``, ``/individual-groups``) while the fit runs
printed a traceback over the progress bar, from three loggers at once (``tornado.application``:
"Uncaught exception GET /groups", and twice ``distributed.dashboard.components.scheduler``).
The cause is in distributed, not in our use of it: ``TaskGroupGraph.update_layout`` lays the
task groups out in the order ``dask.order.order(dsk={name: 1, ...}, dependencies=...)``
returns, but ``dask.order`` (as installed here, dask 2026.8.0) ignores its ``dependencies``
argument and derives them from ``dsk``, whose values here are plain 1s: it sees no dependencies, so a group may come
before a group it depends on, and ``xs[dep]`` raises ``KeyError`` (our fit's ``fit-*`` units
depend on their pair's ``decompose-*`` task, so the Groups page fails on every fit; upstream:
dask/dask#11451, dask/distributed#5100 and #7511, the same page failing on other graphs). Only
that page fails, and it fails on each visit: the scheduler, the workers, the computation and
every other page are unaffected, so this is harmless to a run.

:func:`quiet_groups_page_failures` installs one filter on those loggers that drops records whose
exception was raised inside ``TaskGroupGraph``'s layout, and says once, in one line, that the
Groups page cannot be drawn. Every other dashboard error still reaches the terminal.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType

logger = logging.getLogger(__name__)

# The loggers the failure reaches: tornado's for the page request, distributed's log_errors for
# the component, bokeh's for each periodic re-draw of a Groups page left open (it opens fine
# before the fit, while no task group depends on another, then fails on every re-draw).
LOGGERS = ("tornado.application", "distributed.dashboard.components.scheduler", "distributed.utils",
           "bokeh.util.tornado", "bokeh.server")
_LAYOUT_FUNCTIONS = frozenset({"update_layout", "tg_graph_doc"})
_COMPONENTS = "distributed/dashboard/components/scheduler.py"


def raised_in_groups_layout(tb: TracebackType | None) -> bool:
    """Whether a traceback passes through the Groups page's layout (distributed's TaskGroupGraph)."""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _LAYOUT_FUNCTIONS and code.co_filename.replace("\\", "/").endswith(_COMPONENTS):
            return True
        tb = tb.tb_next
    return False


def _periodic_callback_exception() -> BaseException | None:
    """The exception bokeh's periodic-callback runner is logging, if that is who logs now.

    A page left open re-draws every few hundred ms; when that fails, ``bokeh.util.tornado``'s
    ``on_done`` logs two records ("Error thrown from periodic callback:" and the formatted
    traceback) without ``exc_info``: the exception is only in that frame's ``ex``."""
    frame = sys._getframe(1)
    for _ in range(30):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "on_done" and code.co_filename.replace("\\", "/").endswith("bokeh/util/tornado.py"):
            ex = frame.f_locals.get("ex")
            return ex if isinstance(ex, BaseException) else None
        frame = frame.f_back
    return None


class GroupsPageFilter(logging.Filter):
    """Drops the Groups page's layout failures; says so once."""

    def __init__(self) -> None:
        super().__init__("neurotask-groups-page")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        tb = exc[2] if exc and exc[0] is not None else None
        if tb is None and record.name.startswith("bokeh"):
            ex = _periodic_callback_exception()
            tb = ex.__traceback__ if ex is not None else None
        if not raised_in_groups_layout(tb):
            return True
        self.dropped += 1
        if self.dropped == 1:
            logger.info("Dask dashboard: its Groups page cannot be drawn (a known distributed/dask bug, "
                        "harmless to the run; the other pages work)")
        return False


_FILTER = GroupsPageFilter()


def quiet_groups_page_failures() -> GroupsPageFilter:
    """Install the filter on :data:`LOGGERS` (once; later calls change nothing). Returns it."""
    for name in LOGGERS:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
    return _FILTER
