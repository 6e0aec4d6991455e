"""Fixtures of the cluster tests: a real three-member etcd cluster, relays, unique prefixes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.cluster.etcdtest import EtcdCluster, TcpRelay


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(3)
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster, with every member running again after the test."""
    yield etcd_cluster
    for i, proc in enumerate(etcd_cluster.procs):
        if proc is None or proc.poll() is not None:
            etcd_cluster.start_member(i, wait=False)
    for i in range(etcd_cluster.size):
        etcd_cluster.wait_healthy(i)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (the cluster is shared by the session)."""
    return f"/beacon-test-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def relay(etcd_cluster: EtcdCluster) -> AsyncIterator[TcpRelay]:
    r = TcpRelay(etcd_cluster.client_ports[0])
    await r.start()
    yield r
    await r.stop()
