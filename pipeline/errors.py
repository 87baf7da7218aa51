"""Exceptions for errors a user can cause. The CLI prints their message, without a
traceback, and exits non-zero."""

from neurotask.storage import StoreError  # noqa: F401  (raised by the store; also user-facing)


class NeurotaskError(Exception):
    """Base of every user-facing error."""


class ConfigError(NeurotaskError):
    """Invalid configuration: the message names the file and the key."""


class DataError(NeurotaskError):
    """Input data that cannot be used as it is: missing files, wrong shapes, mismatches."""


class FitError(NeurotaskError):
    """Some fit units failed after their retries; the message names them."""


class WorkdirError(NeurotaskError):
    """The study's workdir cannot be written (permissions, not a directory)."""


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe_differences(stored: dict, wanted: dict) -> str:
    """Only the keys whose values differ between ``stored`` parameters and the ``wanted`` ones
    (the config), in the stored order then the config's new keys, e.g.
    ``"n_folds: stored 5, config 7; seed: stored 0, config 1"``; a key missing on one side
    shows as ``absent``. Empty when nothing differs. For refusals that should not make the
    user diff two long dicts by eye."""
    absent = object()
    keys = list(stored) + [k for k in wanted if k not in stored]
    parts = []
    for key in keys:
        a, b = stored.get(key, absent), wanted.get(key, absent)
        if a is not absent and b is not absent and a == b:
            continue
        parts.append(f"{key}: stored {'absent' if a is absent else _shown(a)}, "
                     f"config {'absent' if b is absent else _shown(b)}")
    return "; ".join(parts)
