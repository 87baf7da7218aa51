"""What the engine tells whoever watches it run: its phases, their floating-point operations and a
few counts. The engine measures nothing itself; a benchmark passes an observer that does
(``scripts/bench_ridge.py``'s ``Meter`` times each phase and rates its flops).

Phases of :func:`neurotask.pipeline.ridge.ridge_cv`, per voxel batch and fold, in this order:
``fold_terms`` (responses into the eigenbases, the alpha-independent terms), ``locate`` (the
certified search's located optima), ``sweep`` (the exhaustive search's q of every alpha),
``lowrank`` (the certified search's expansion and bounds), ``ties`` (its exact checks), ``refit``
(the test predictions). The flops of a phase are 2 x its multiply-adds in the large products.

Scalars: ``rank`` and ``groups`` (:meth:`Observer.maximum`: the largest total rank and group
count of the certified search's expansions over folds and batches), ``exact_pairs``
(:meth:`Observer.count`: (alpha, voxel) pairs the certified search evaluated exactly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol


class Observer(Protocol):
    """Receives the engine's reports (see the module docstring for the names)."""

    def phase(self, name: str, flops: float) -> AbstractContextManager[object]:
        """A context around one phase's work, of ``flops`` floating-point operations. With an
        observer the engine enters it and leaves it with the device's queued work done."""

    def count(self, name: str, value: float) -> None:
        """Add ``value`` to the count ``name``."""

    def maximum(self, name: str, value: float) -> None:
        """Raise the scalar ``name`` to ``value`` if it is larger."""


class NullObserver:
    """Observes nothing: the default, at no cost (no device synchronisation either)."""

    def phase(self, name: str, flops: float) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def count(self, name: str, value: float) -> None:
        pass

    def maximum(self, name: str, value: float) -> None:
        pass


NULL_OBSERVER = NullObserver()


class _Synchronized:
    """An observer whose phases start and end with the device's queued work done, so that a
    timing observer times the work of the phase (CUDA runs asynchronously)."""

    def __init__(self, observer: Observer, synchronize: Callable[[], None]):
        self.observer, self.synchronize = observer, synchronize

    @contextlib.contextmanager
    def phase(self, name: str, flops: float) -> Iterator[None]:
        self.synchronize()
        with self.observer.phase(name, flops):
            yield
            self.synchronize()

    def count(self, name: str, value: float) -> None:
        self.observer.count(name, value)

    def maximum(self, name: str, value: float) -> None:
        self.observer.maximum(name, value)


def _watching(observer: Observer | None, synchronize: Callable[[], None]) -> Observer:
    """The engine's view of a caller's observer: the null observer for None, else the observer
    with its phases synchronised with the device (``synchronize``: the backend's)."""
    return NULL_OBSERVER if observer is None else _Synchronized(observer, synchronize)
