"""Fixtures of the cluster tests: a real three-member etcd cluster, relays, unique prefixes."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from docker.models.containers import Container

from tests.cluster.etcdtest import EtcdCluster, TcpRelay
from tests.cluster.hosts import Agent, SecondEngine
from tests.conftest import HTTPD_HOSTNAME, RUN_ID, TEST_LABEL, ContainerFactory


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


# ------------------------------------------------------- two Docker hosts
@pytest.fixture(scope="session")
def engine_b(busybox_image: str) -> Iterator[SecondEngine]:
    engine = SecondEngine(RUN_ID)
    try:
        engine.start(busybox_image)
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def run_b(engine_b: SecondEngine, busybox_image: str) -> Iterator[ContainerFactory]:
    """Start a container on the second engine (removed after the test)."""
    created: list[Container] = []

    def start(**kwargs: Any) -> Container:
        assert engine_b.client is not None
        kwargs.setdefault("command", ["sh", "-c", HTTPD_HOSTNAME])
        kwargs.setdefault("name", f"bt-{RUN_ID}-{uuid.uuid4().hex[:6]}")
        container = engine_b.client.containers.run(
            kwargs.pop("image", busybox_image), detach=True, labels={TEST_LABEL: RUN_ID, **kwargs.pop("labels", {})},
            **kwargs,
        )
        created.append(container)
        return container

    yield start
    for c in created:
        with contextlib.suppress(Exception):
            c.remove(force=True)


@dataclass
class Pair:
    a: Agent
    b: Agent

    def agents(self) -> tuple[Agent, Agent]:
        return self.a, self.b


@pytest.fixture
def pair(etcd: EtcdCluster, engine_b: SecondEngine, prefix: str, docker_client: object) -> Iterator[Pair]:
    """Agent a on the main engine (advertising 127.0.0.1) and b on the second (127.0.0.2)."""
    main_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    a = Agent("a", store=etcd.url, prefix=prefix, docker_host=main_host, advertise_ip="127.0.0.1")
    b = Agent("b", store=etcd.url, prefix=prefix, docker_host=engine_b.host, advertise_ip="127.0.0.2")
    try:
        a.start(wait=False)
        b.start(wait=False)
        a.wait_ready()
        b.wait_ready()
        yield Pair(a, b)
    finally:
        a.remove()
        b.remove()
