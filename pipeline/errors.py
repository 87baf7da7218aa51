"""Exceptions for errors a user can cause. The CLI prints their message, without a
traceback, and exits non-zero."""

# Raised by the store, also user-facing; describe_differences words the store's refusals.
from neurotask.storage.store import StoreError, describe_differences  # noqa: F401


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
