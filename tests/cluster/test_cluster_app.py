"""Two Beacon agents in one process on a real etcd cluster (manual registrations, no Docker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from beacon.app import App
from beacon.registry.manual import source_key as manual_source_key
from beacon.registry.store import NodeNameTaken
from tests.cluster.etcdtest import EtcdCluster, TcpRelay
from tests.helpers import eventually, test_config


@asynccontextmanager
async def agent(store: str, prefix: str, node: str, **kw: Any) -> AsyncIterator[App]:
    app = App(test_config(store=store, store_prefix=prefix, node=node, lease_ttl=2.0, docker=False, **kw))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def api(app: App) -> str:
    assert app.api.address is not None
    return f"http://{app.api.address}"


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


REG = {"service": "db", "address": "10.1.2.3", "port": 5432, "tags": ["primary"]}


async def test_manual_endpoint_on_b_is_served_by_a_and_survives_b_restart(etcd: EtcdCluster, prefix: str) -> None:
    removed: list[int] = []
    async with aiohttp.ClientSession() as http, agent(etcd.url, prefix, "a") as a:
        async with agent(etcd.url, prefix, "b") as b:
            async with http.put(f"{api(b)}/v1/endpoints/db1", json=REG) as resp:
                assert resp.status in (200, 201), await resp.text()
            await eventually(lambda: "db1" in a.catalog.snapshot.endpoints)
            ep = a.catalog.snapshot.endpoints["db1"]
            assert (ep.node, ep.address, ep.port, ep.tags) == ("b", "10.1.2.3", 5432, ("primary",))
            status, body = await get(http, f"{api(a)}/v1/endpoints/db1")
            assert status == 200 and body["node"] == "b"
            status, nodes = await get(http, f"{api(a)}/v1/nodes")
            by_name = {n["node"]: n for n in nodes["nodes"]}
            assert by_name["a"]["local"] and by_name["b"]["lease"] == "alive" and by_name["b"]["endpoints"] == 1
            assert nodes["store"]["connected"] is True
            a.catalog.add_listener(lambda s: removed.append(s.index) if "db1" not in s.endpoints else None)
        # b stopped cleanly: its endpoint stays (its lease runs on) ...
        async with agent(etcd.url, prefix, "b") as b2:
            # ... and the restarted agent has its registration back from etcd.
            await eventually(lambda: b2.catalog.owner_of("db1") == manual_source_key("db1"))
            assert b2.catalog.snapshot.endpoints["db1"].address == "10.1.2.3"
            await b2.cluster.store.flush(5)  # type: ignore[union-attr]
            async with http.delete(f"{api(b2)}/v1/endpoints/db1") as resp:
                assert resp.status == 200
            await eventually(lambda: "db1" not in a.catalog.snapshot.endpoints)
        assert len(removed) == 1  # gone once, when deregistered: never flapped over the restart
        async with agent(etcd.url, prefix, "b") as b3:
            assert b3.catalog.owner_of("db1") is None  # deregistration is durable too


async def test_same_node_name_twice_is_refused(etcd: EtcdCluster, prefix: str) -> None:
    async with agent(etcd.url, prefix, "web1"):
        with pytest.raises(NodeNameTaken, match="'web1'"):
            async with agent(etcd.url, prefix, "web1"):
                pass


async def test_store_outage_is_degraded_not_dead_and_local_changes_apply(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with aiohttp.ClientSession() as http, agent(etcd.url, prefix, "a") as a, agent(
        f"etcd://{relay.endpoint}", prefix, "b"
    ) as b:
        status, body = await get(http, f"{api(b)}/healthz")
        assert status == 200
        await relay.cut()
        await eventually(lambda: not b.cluster.store.connected, timeout=4)  # type: ignore[union-attr]
        status, body = await get(http, f"{api(b)}/healthz")
        assert status == 503 and body["status"] == "degraded" and body["store"] == "disconnected"
        async with http.get(f"{api(b)}/metrics") as resp:
            text = await resp.text()
        assert "beacon_store_connected 0.0" in text and "beacon_store_last_sync_age_seconds" in text
        # Local changes still apply locally at once ...
        async with http.put(f"{api(b)}/v1/endpoints/db2", json=REG) as resp:
            assert resp.status in (200, 201)
        await eventually(lambda: "db2" in b.catalog.snapshot.endpoints)
        await relay.restore()
        # ... and reach the other node when etcd is back.
        await eventually(lambda: "db2" in a.catalog.snapshot.endpoints, timeout=6)
        await eventually(lambda: b.cluster.store.connected)  # type: ignore[union-attr]
        status, body = await get(http, f"{api(b)}/healthz")
        assert status == 200
