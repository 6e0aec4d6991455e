"""The Consul-compatible routes over real sockets: a real Beacon (all components, Docker off) on
port 0, a real aiohttp client. Endpoints are written into the catalog (the Docker source's seam)."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest

from beacon.app import App
from beacon.registry import State
from tests.consul.consultest import container_endpoint, put
from tests.helpers import eventually, running_app


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(docker=False) as beacon:
        yield beacon


@pytest.fixture
async def http(app: App) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.api.address is not None
    async with aiohttp.ClientSession(f"http://{app.api.address}") as session:
        yield session


async def test_reads_carry_consuls_headers(app: App, http: aiohttp.ClientSession) -> None:
    put(app.catalog, container_endpoint("aaa", "web", tags=("prod",)))
    async with http.get("/v1/catalog/services") as resp:
        assert resp.status == 200
        assert await resp.json() == {"web": ["prod"]}
        assert int(resp.headers["X-Consul-Index"]) > 1_000_000_000_000_000  # epoch-based
        assert resp.headers["X-Consul-KnownLeader"] == "true"
        assert resp.headers["X-Consul-LastContact"] == "0"
    async with http.get("/v1/health/service/web", params={"passing": "", "stale": ""}) as resp:
        assert resp.headers["X-Consul-Effective-Consistency"] == "stale"
        assert [e["Service"]["ID"] for e in await resp.json()] == ["aaa-80"]


async def test_errors_are_consuls(http: aiohttp.ClientSession) -> None:
    cases = [
        ("/v1/catalog/services?dc=elsewhere", 500, "No path to datacenter"),
        ("/v1/health/service/web?index=x", 400, "Invalid index"),
        ("/v1/health/service/web?index=1&wait=forever", 400, "Invalid wait time"),
        ("/v1/catalog/services?stale&consistent", 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
    ]
    for path, status, text in cases:
        async with http.get(path) as resp:
            assert (resp.status, await resp.text()) == (status, text), path
    async with http.get("/v1/catalog/services?dc=dc1&near=_agent&ns=default&unknown=1&node-meta=a:b") as resp:
        assert resp.status == 200  # unknown and unsupported parameters are ignored, as Consul does
    async with http.get("/v1/kv/some/key") as resp:
        assert resp.status == 404
        assert "Beacon does not serve /v1/kv/some/key" in await resp.text()
    async with http.put("/v1/catalog/services") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
    async with http.delete("/v1/health/service/web") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
    async with http.get("/v1/catalog/node/nobody") as resp:
        assert (resp.status, await resp.text()) == (200, "null")  # as Consul
    async with http.get("/v1/agent/health/service/name/nothing") as resp:
        assert resp.status == 404


async def test_agent_health_codes_for_load_balancers(app: App, http: aiohttp.ClientSession) -> None:
    put(app.catalog, container_endpoint("aaa", "web", node="test-node"))
    async with http.get("/v1/agent/health/service/name/web?format=text") as resp:
        assert (resp.status, await resp.text()) == (200, "passing")
    put(app.catalog, container_endpoint("bbb", "web", node="test-node", state=State.WARNING))
    async with http.get("/v1/agent/health/service/name/web") as resp:
        assert resp.status == 429
        assert sorted(e["AggregatedStatus"] for e in await resp.json()) == ["passing", "warning"]
    put(app.catalog, container_endpoint("bbb", "web", node="test-node", state=State.DRAINING))
    async with http.get("/v1/agent/health/service/name/web", headers={"Accept": "text/plain"}) as resp:
        assert (resp.status, await resp.text()) == (503, "critical")


async def test_agent_self_and_leader(app: App, http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/agent/self") as resp:
        me = await resp.json()
    assert (me["Config"]["Datacenter"], me["Config"]["NodeName"]) == ("dc1", "test-node")
    async with http.get("/v1/status/leader") as resp:
        assert await resp.json() == str(app.api.address)
    async with http.get("/v1/catalog/nodes") as resp:
        assert [n["Node"] for n in await resp.json()] == ["test-node"]


async def test_blocking_query_wakes_on_its_service_only(app: App, http: aiohttp.ClientSession) -> None:
    put(app.catalog, container_endpoint("aaa", "web"), container_endpoint("bbb", "db", port=5432))
    async with http.get("/v1/health/service/web") as resp:
        index = int(resp.headers["X-Consul-Index"])

    async def watch() -> tuple[float, int, list[str]]:
        async with http.get("/v1/health/service/web", params={"index": str(index), "wait": "20s"}) as resp:
            body = await resp.json()
            return time.monotonic(), int(resp.headers["X-Consul-Index"]), [e["Service"]["ID"] for e in body]

    waiter = asyncio.create_task(watch())
    await eventually(lambda: app.consul.parked == 1)
    put(app.catalog, container_endpoint("bbb", "db", port=5432, state=State.CRITICAL))  # another service
    await asyncio.sleep(0.2)  # give a wrong wake-up the time to happen (none must)
    assert not waiter.done() and app.consul.parked == 1
    changed_at = time.monotonic()
    put(app.catalog, container_endpoint("ccc", "web"))
    woke_at, new_index, ids = await asyncio.wait_for(waiter, 5)
    assert ids == ["aaa-80", "ccc-80"] and new_index > index
    assert woke_at - changed_at < 0.1


async def test_blocking_query_times_out_with_the_same_index(app: App, http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/catalog/services") as resp:
        index = resp.headers["X-Consul-Index"]
    started = time.monotonic()
    async with http.get("/v1/catalog/services", params={"index": index, "wait": "300ms"}) as resp:
        assert resp.headers["X-Consul-Index"] == index
    assert 0.3 <= time.monotonic() - started < 0.3 * 17 / 16 + 0.5


async def test_an_index_from_the_future_is_answered_at_once(http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    async with http.get("/v1/catalog/services", params={"index": str(2**63), "wait": "10s"}) as resp:
        assert resp.status == 200
    assert time.monotonic() - started < 1.0


async def test_clients_that_hang_up_free_their_waiters(app: App) -> None:
    """Many parked queries whose clients go away: every waiter is released, memory comes back."""
    assert app.api.address is not None
    base = f"http://{app.api.address}"

    async def park_and_abandon(count: int) -> None:
        async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0)) as session:
            async with session.get("/v1/catalog/services") as resp:
                index = resp.headers["X-Consul-Index"]
            tasks = [
                asyncio.create_task(session.get(f"/v1/health/service/svc{i % 10}", params={"index": index}))
                for i in range(count)
            ]
            await eventually(lambda: app.consul.parked == count, timeout=20)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await eventually(lambda: app.consul.parked == 0 and app.consul.watched_keys == 0, timeout=10)
        # Waiters go first; under load the server may still be closing the 300
        # connections (~1 MB of live handlers) - measure only after it has.
        await eventually(lambda: app.api.open_connections == 0, timeout=10)

    await park_and_abandon(300)  # warm up (first-use allocations)
    tracemalloc.start()
    try:
        await park_and_abandon(300)
        gc.collect()
        after_one = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            await park_and_abandon(300)
        gc.collect()
        after_four = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # Three more rounds of 300 abandoned queries keep (almost) nothing: the growth is not per query.
    assert after_four - after_one < 200 * 1024, f"{after_four - after_one} bytes kept by 900 abandoned queries"


async def test_shutdown_ends_parked_queries_at_once() -> None:
    async with running_app(docker=False) as beacon:
        assert beacon.api.address is not None
        async with aiohttp.ClientSession(f"http://{beacon.api.address}") as session:
            async with session.get("/v1/catalog/services") as resp:
                index = resp.headers["X-Consul-Index"]
            task = asyncio.create_task(session.get("/v1/catalog/services", params={"index": index}))
            await eventually(lambda: beacon.consul.parked == 1)
            started = time.monotonic()
            await beacon.api.stop()
            resp = await asyncio.wait_for(task, 5)
            resp.release()
            assert time.monotonic() - started < 2.0


def consul_meta(resp: aiohttp.ClientResponse) -> int:
    """What hashicorp/consul/api's parseQueryMeta demands of every read (a missing header fails the call)."""
    index = int(resp.headers["X-Consul-Index"])
    int(resp.headers["X-Consul-LastContact"])
    assert resp.headers["X-Consul-KnownLeader"] in ("true", "false")
    return index


async def test_prometheus_consul_sd_request_sequence(app: App, http: aiohttp.ClientSession) -> None:
    """The requests Prometheus's Consul SD sends (discovery/consul/consul.go through hashicorp's api client:
    `stale` with an empty value, `wait` in milliseconds, `index` once known, `node-meta` as key:value),
    and the wake-ups it relies on: a new service wakes the catalog watch, a changed one its health watch."""
    put(app.catalog, container_endpoint("aaa", "web", tags=("prod",), meta={"metrics_port": "9100"}))
    async with http.get("/v1/agent/self") as resp:
        assert (await resp.json())["Config"]["Datacenter"] == "dc1"
    async with http.get("/v1/catalog/services?stale=&wait=120000ms&node-meta=rack:r1") as resp:
        services_index = consul_meta(resp)
        assert await resp.json() == {"web": ["prod"]}
    async with http.get("/v1/health/service/web?stale=&wait=120000ms&tag=prod") as resp:
        health_index = consul_meta(resp)
        entry = (await resp.json())[0]
    assert (entry["Service"]["Address"], entry["Service"]["Port"], entry["Node"]["Node"]) == ("10.0.0.5", 80, "node-a")
    assert entry["Service"]["Meta"] == {"metrics_port": "9100"}

    async def blocking(path: str, index: int) -> tuple[float, int]:
        async with http.get(f"{path}?stale=&wait=120000ms&index={index}") as resp:
            return time.monotonic(), consul_meta(resp)

    catalog_watch = asyncio.create_task(blocking("/v1/catalog/services", services_index))
    health_watch = asyncio.create_task(blocking("/v1/health/service/web", health_index))
    await eventually(lambda: app.consul.parked_on("services") == 1 and app.consul.parked_on("svc:web") == 1)

    changed_at = time.monotonic()
    put(app.catalog, container_endpoint("aaa", "web", tags=("prod",), state=State.DRAINING))
    woke_at, new_health = await asyncio.wait_for(health_watch, 5)
    assert new_health > health_index and woke_at - changed_at < 1.0
    assert not catalog_watch.done()  # a health change leaves the service list (and its watchers) alone

    changed_at = time.monotonic()
    put(app.catalog, container_endpoint("bbb", "api"))
    woke_at, new_services = await asyncio.wait_for(catalog_watch, 5)
    assert new_services > services_index and woke_at - changed_at < 1.0
    async with http.get("/v1/health/service/web?stale=&wait=120000ms") as resp:
        checks = (await resp.json())[0]["Checks"]
    assert "_service_maintenance:aaa-80" in [c["CheckID"] for c in checks]  # Prometheus: health="maintenance"


async def test_filter_narrows_answers_and_a_bad_one_is_consuls_400(app: App, http: aiohttp.ClientSession) -> None:
    put(app.catalog, container_endpoint("aaa", "web", tags=("prod",), meta={"env": "live"}),
        container_endpoint("bbb", "web", tags=("canary",)), container_endpoint("ccc", "db", port=5432))
    async with http.get("/v1/health/service/web", params={"filter": '"prod" in Service.Tags'}) as resp:
        assert [e["Service"]["ID"] for e in await resp.json()] == ["aaa-80"]
    async with http.get("/v1/catalog/service/web", params={"filter": "ServiceMeta.env == live"}) as resp:
        assert [e["ServiceID"] for e in await resp.json()] == ["aaa-80"]
    async with http.get("/v1/catalog/services", params={"filter": "ServicePort == 5432"}) as resp:
        assert await resp.json() == {"db": []}
    async with http.get("/v1/catalog/nodes", params={"filter": 'Node == "nobody"'}) as resp:
        assert await resp.json() == []
    started = time.monotonic()
    async with http.get("/v1/health/service/web", params={"filter": "Service.Port ==", "index": "1", "wait": "10s"}) as resp:
        assert resp.status == 400
        assert (await resp.text()).startswith("Failed to create boolean expression evaluator: ")
    assert time.monotonic() - started < 1.0  # refused at once, not after the wait


async def test_parked_queries_are_capped(app: App, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("beacon.api.consul.routes.MAX_PARKED", 2)
    async with http.get("/v1/catalog/services") as resp:
        index = resp.headers["X-Consul-Index"]
    parked = [asyncio.create_task(http.get("/v1/catalog/services", params={"index": index, "wait": "20s"}))
              for _ in range(2)]
    await eventually(lambda: app.consul.parked == 2)
    async with http.get("/v1/catalog/services", params={"index": index, "wait": "20s"}) as resp:
        assert resp.status == 429 and "Too many blocking queries" in await resp.text()
    put(app.catalog, container_endpoint("aaa", "web"))
    for response in await asyncio.gather(*parked):
        assert response.status == 200
        response.release()
