"""Local clusters use TLS by default, and a dashboard reachable from other hosts is refused
unless asked for (issue 15)."""

import logging

import pytest
from distributed import Client

from neurotask.cluster import ClusterConfigError, open_client
from neurotask.cluster.options import cluster_options

SMALL = {"kind": "local", "n_workers": 1, "processes": False, "dashboard_address": "127.0.0.1:0"}


def test_local_cluster_uses_tls_and_refuses_plain_clients():
    with open_client(SMALL) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(lambda x: x + 1, 1).result() == 2
        port = address.rsplit(":", 1)[1]
        with pytest.raises((OSError, TimeoutError)):  # no certificate: the handshake fails
            Client(f"tcp://127.0.0.1:{port}", timeout="2s", set_as_default=False)
        with pytest.raises((OSError, TimeoutError, TypeError)):  # TypeError: no TLS context at all
            Client(address, timeout="2s", set_as_default=False)  # tls:// but without the cluster's certificate


def test_tls_false_keeps_plain_tcp():
    with open_client({**SMALL, "tls": False}) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize("address", [":0", "0", "8787", "0.0.0.0:8787", ":8787", "example.com:8787"])
@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_dashboard_off_loopback_is_refused(kind, address, monkeypatch):
    monkeypatch.setattr("socket.getaddrinfo", _fake_resolver)
    with pytest.raises(ClusterConfigError, match="cluster.dashboard_address") as e:
        cluster_options({"kind": kind, "dashboard_address": address})
    assert "dashboard_public" in str(e.value)
    if kind == "local":
        with pytest.raises(ClusterConfigError, match="cluster.dashboard_address"):
            with open_client({"kind": kind, "dashboard_address": address}):
                pass
    assert cluster_options({"kind": kind, "dashboard_address": address, "dashboard_public": True})


def test_dashboard_in_slurm_scheduler_options_is_checked_too():
    with pytest.raises(ClusterConfigError, match="cluster.dashboard_address"):
        cluster_options({"kind": "slurm", "slurm": {"scheduler_options": {"dashboard_address": ":0"}}})


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:8787", "[::1]:8787", None])
def test_loopback_dashboards_are_accepted(address):
    assert cluster_options({"kind": "local", "dashboard_address": address}).dashboard_address == address


def test_printed_dashboard_link_is_the_bound_port(logs):
    with open_client(SMALL) as client:
        port = client.scheduler_info()["services"]["dashboard"]
    lines = [m for m in logs if m.startswith("Dask dashboard:")]
    assert lines == [f"Dask dashboard: http://127.0.0.1:{port}/status"]
    assert port != 0


def _fake_resolver(host, *args, **kwargs):
    """example.com resolves to a public address without the network."""
    import socket

    if host == "example.com":
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
    return _real_getaddrinfo(host, *args, **kwargs)


import socket as _socket  # noqa: E402

_real_getaddrinfo = _socket.getaddrinfo


def test_public_dashboard_from_dask_jobqueue_config_is_refused():
    import dask

    from neurotask.cluster.slurm import start_slurm_cluster

    with dask.config.set({"jobqueue.slurm.scheduler-options": {"dashboard_address": ":8787"}}):
        with pytest.raises(ClusterConfigError, match=r"cluster.dashboard_address ':8787'.*jobqueue.slurm"):
            start_slurm_cluster({"kind": "slurm"})
