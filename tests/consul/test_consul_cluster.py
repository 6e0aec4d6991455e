"""The Consul-compatible API in the etcd store mode: two Beacon agents in one process on a real
one-member etcd (manual registrations, no Docker). Each agent answers for the whole cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from beacon.api.consul import store_leader
from beacon.app import App
from tests.cluster.etcdtest import EtcdCluster
from tests.helpers import eventually, test_config


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    cluster = EtcdCluster(1)
    cluster.start()
    yield cluster.url
    cluster.remove()


@asynccontextmanager
async def agent(store: str, prefix: str, node: str) -> AsyncIterator[App]:
    app = App(test_config(store=store, store_prefix=prefix, node=node, lease_ttl=2.0, docker=False))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def url(app: App, path: str) -> str:
    assert app.api.address is not None
    return f"http://{app.api.address}{path}"


async def test_every_agent_answers_for_the_whole_cluster(etcd_url: str) -> None:
    prefix = f"/beacon-consul-{uuid.uuid4().hex[:8]}/"
    async with aiohttp.ClientSession() as http, agent(etcd_url, prefix, "a") as a, agent(etcd_url, prefix, "b") as b:
        async with http.get(url(a, "/v1/health/service/db")) as resp:
            index = resp.headers["X-Consul-Index"]
            assert resp.headers["X-Consul-KnownLeader"] == "true"  # the store is connected
            assert await resp.json() == []
        watch = asyncio.create_task(http.get(url(a, "/v1/health/service/db"), params={"index": index, "wait": "20s"}))
        await eventually(lambda: a.consul.parked_on("svc:db") == 1)
        registration = {"Name": "db", "ID": "db-1", "Address": "10.1.2.3", "Port": 5432, "Tags": ["primary"]}
        async with http.put(url(b, "/v1/agent/service/register"), json=registration) as resp:
            assert resp.status == 200, await resp.text()
        resp = await asyncio.wait_for(watch, 10)  # registered on b, seen by a's watcher
        entries: list[dict[str, Any]] = await resp.json()
        resp.release()
        assert [(e["Node"]["Node"], e["Service"]["ID"], e["Service"]["Address"]) for e in entries] == [
            ("b", "db-1", "10.1.2.3")]
        async with http.get(url(a, "/v1/catalog/nodes")) as resp:
            assert [n["Node"] for n in await resp.json()] == ["a", "b"]
        async with http.get(url(a, "/v1/catalog/node/b")) as resp:
            assert list((await resp.json())["Services"]) == ["db-1"]
        # The agent endpoint is local, as Consul's: a has no instance of db, b has one.
        async with http.get(url(a, "/v1/agent/health/service/name/db")) as resp:
            assert resp.status == 404
        async with http.get(url(b, "/v1/agent/health/service/name/db")) as resp:
            assert resp.status == 200


class FakeStore:
    """The seam: only what store_leader reads."""

    def __init__(self, connected: bool, age: float | None) -> None:
        self.connected = connected
        self.age = age

    def last_sync_age(self) -> float | None:
        return self.age


def test_leader_headers_follow_the_store() -> None:
    assert store_leader(FakeStore(True, 0.25))() == (True, 0.25)
    assert store_leader(FakeStore(False, 12.0))() == (False, 12.0)
    assert store_leader(FakeStore(False, None))() == (False, 0.0)
