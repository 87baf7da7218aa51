"""Errors of the cluster package (it imports nothing else of neurotask)."""


class ClusterConfigError(ValueError):
    """The config's ``cluster:`` section is wrong; the message names the option."""
