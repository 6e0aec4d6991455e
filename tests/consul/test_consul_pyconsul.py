"""py-consul, a client we did not write, against a real Beacon on port 0.

py-consul's synchronous client (requests) runs in a thread so the Beacon in this test's event
loop keeps serving while it waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import consul
import consul.exceptions
import pytest

from beacon.app import App
from beacon.registry import State
from tests.consul.consultest import container_endpoint, put
from tests.helpers import eventually, running_app

T = TypeVar("T")
TOKEN = "s3cret-token"


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def client(app: App, token: str | None = None) -> consul.Consul:
    assert app.api.address is not None
    return consul.Consul(host=app.api.address.host, port=app.api.address.port, token=token)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(docker=False) as beacon:
        yield beacon


@pytest.fixture
async def guarded() -> AsyncIterator[App]:
    async with running_app(docker=False, api_token=TOKEN) as beacon:
        yield beacon


async def test_catalog_and_health(app: App) -> None:
    put(
        app.catalog,
        container_endpoint("aaa", "web", tags=("prod",), node="test-node", address="10.1.0.1"),
        container_endpoint("bbb", "web", tags=("canary",), node="test-node", address="10.1.0.2", state=State.CRITICAL),
        container_endpoint("ccc", "web", node="test-node", address="10.1.0.3", state=State.DRAINING),
    )
    c = client(app)
    index, services = await call(c.catalog.services)
    assert services == {"web": ["canary", "prod"]} and int(index) > 0
    _, instances = await call(c.catalog.service, "web")
    assert sorted((i["ServiceID"], i["ServiceAddress"], i["ServicePort"]) for i in instances) == [
        ("aaa-80", "10.1.0.1", 80), ("bbb-80", "10.1.0.2", 80), ("ccc-80", "10.1.0.3", 80)]
    _, tagged = await call(c.catalog.service, "web", tag="canary")
    assert [i["ServiceID"] for i in tagged] == ["bbb-80"]
    _, everyone = await call(c.health.service, "web")
    assert len(everyone) == 3
    _, passing = await call(c.health.service, "web", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["aaa-80"]  # critical and draining are left out
    _, nodes = await call(c.catalog.nodes)
    assert [n["Node"] for n in nodes] == ["test-node"]
    _, node = await call(c.catalog.node, "test-node")
    assert sorted(node["Services"]) == ["aaa-80", "bbb-80", "ccc-80"]
    me = await call(c.agent.self)
    assert me["Config"]["Datacenter"] == "dc1"
    assert await call(c.status.leader) == str(app.api.address)


async def test_blocking_index_round_trip(app: App) -> None:
    put(app.catalog, container_endpoint("aaa", "web"))
    c = client(app)
    index, first = await call(c.health.service, "web")
    started = time.monotonic()
    waiter = asyncio.create_task(call(c.health.service, "web", index=index, wait="20s"))
    await eventually(lambda: app.consul.parked == 1)
    put(app.catalog, container_endpoint("bbb", "web"))
    new_index, second = await asyncio.wait_for(waiter, 10)
    assert int(new_index) > int(index)
    assert [e["Service"]["ID"] for e in second] == ["aaa-80", "bbb-80"] and len(first) == 1
    assert time.monotonic() - started < 5
    # The index that came back blocks in turn: a short wait returns the same index, unchanged.
    same_index, third = await call(c.health.service, "web", index=new_index, wait="200ms")
    assert (same_index, len(third)) == (new_index, 2)


async def test_agent_register_and_deregister(app: App) -> None:
    c = client(app)
    ok = await call(
        c.agent.service.register, "billing", service_id="billing-1", address="10.2.0.9", port=8443,
        tags=["v2"], meta={"team": "pay"}, check=consul.Check.ttl("30s"),
    )
    assert ok is True
    _, entries = await call(c.health.service, "billing")
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["Service"]["ID"], entry["Service"]["Port"], entry["Service"]["Meta"]) == (
        "billing-1", 8443, {"team": "pay"})
    service_check = next(ch for ch in entry["Checks"] if ch["CheckID"] == "service:billing-1")
    assert (service_check["Status"], service_check["Type"]) == ("critical", "ttl")  # until the first heartbeat
    assert await call(c.agent.check.ttl_pass, "service:billing-1", "all good") is True
    _, passing = await call(c.health.service, "billing", passing=True)
    assert [e["Service"]["ID"] for e in passing] == ["billing-1"]
    assert app.catalog.snapshot.endpoints["billing-1"].source.kind == "manual"  # Beacon's manual registration
    assert await call(c.agent.service.deregister, "billing-1") is True
    _, gone = await call(c.catalog.service, "billing")
    assert gone == []


async def test_writes_need_the_token_when_one_is_set(guarded: App) -> None:
    anonymous, wrong, right = client(guarded), client(guarded, "nope"), client(guarded, TOKEN)
    for c in (anonymous, wrong):
        with pytest.raises(consul.exceptions.ACLPermissionDenied):
            await call(c.agent.service.register, "api", service_id="api-1", address="10.3.0.1", port=80)
    assert "api-1" not in guarded.catalog.snapshot.endpoints
    assert await call(right.agent.service.register, "api", service_id="api-1", address="10.3.0.1", port=80)
    assert "api-1" in guarded.catalog.snapshot.endpoints
    with pytest.raises(consul.exceptions.ACLPermissionDenied):
        await call(anonymous.agent.service.deregister, "api-1")
    _, services = await call(anonymous.catalog.services)  # reads stay open, as Beacon's own
    assert "api" in services
    assert await call(right.agent.service.deregister, "api-1")
    assert "api-1" not in guarded.catalog.snapshot.endpoints


async def test_unknown_datacenter_is_consuls_error(app: App) -> None:
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        await call(client(app).catalog.services, dc="dc9")
