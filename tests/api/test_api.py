"""The REST API over real sockets: a real ApiServer on port 0, a real Catalog and
ManualRegistry, a real aiohttp client. Container endpoints are written straight
into the catalog (the seam the Docker source uses)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate as validate_openapi
from prometheus_client import REGISTRY

from beacon.api import ApiServer, parse_blocking
from beacon.registry import Catalog, Endpoint, Source, State
from beacon.registry.manual import ManualRegistry
from tests.conftest import ContainerFactory
from tests.helpers import eventually, running_app
from tests.helpers import test_config as make_config


@dataclass
class Harness:
    catalog: Catalog
    manual: ManualRegistry
    server: ApiServer
    http: aiohttp.ClientSession

    def container(self, cid: str, service: str, port: int = 80, **kw: Any) -> Endpoint:
        """Put one container endpoint in the catalog, as the Docker source would."""
        ep = Endpoint(
            id=f"{cid}:{port}",
            service=service,
            address="172.17.0.9",
            port=port,
            source=Source("container", container_id=cid, container_name=f"{service}-{cid}"),
            **kw,
        )
        self.catalog.set_source(f"container:{cid}", [ep])
        self.catalog.publish()
        return ep


@asynccontextmanager
async def serve(
    *, docker: object | None = None, health: object | None = None, server_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    config = make_config(docker=False, **overrides)
    catalog = Catalog()
    manual = ManualRegistry(config, catalog, node="test-node")
    server = ApiServer(config, catalog, manual=manual, docker=docker, health=health, heartbeat_interval=0.2,
                       **(server_options or {}))
    await manual.start()
    await server.start()
    try:
        assert server.address is not None and server.address.port > 0
        async with aiohttp.ClientSession(base_url=f"http://{server.address}") as http:
            yield Harness(catalog, manual, server, http)
    finally:
        await server.stop()
        await manual.stop()


@pytest.fixture
async def api() -> AsyncIterator[Harness]:
    async with serve() as h:
        yield h


async def get(h: Harness, path: str, **params: str) -> tuple[int, Any, int]:
    async with h.http.get(path, params=params) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json(), int(resp.headers["X-Beacon-Index"])


async def send(h: Harness, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **(headers or {})}  # as a JSON client sends it
    async with h.http.request(method, path, data=data, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


DB = {"service": "db", "address": "10.0.0.5", "port": 5432}


# -------------------------------------------------------------------- reads
async def test_services_list_with_tags_and_counts(api: Harness) -> None:
    api.container("c1", "web", tags=("blue",))
    api.container("c2", "web", tags=("green",), state=State.CRITICAL)
    api.container("c3", "cache")
    status, body, index = await get(api, "/v1/services")
    assert status == 200
    assert index == api.catalog.snapshot.index
    by_name = {s["name"]: s for s in body}
    assert [s["name"] for s in body] == ["cache", "web"]
    assert by_name["web"]["tags"] == ["blue", "green"]
    assert (by_name["web"]["passing"], by_name["web"]["total"]) == (1, 2)
    assert (by_name["cache"]["passing"], by_name["cache"]["total"]) == (1, 1)


async def test_service_detail_has_the_contract_fields(api: Harness) -> None:
    api.container("c1", "web", tags=("blue",), meta={"v": "2"}, weight=3)
    status, body, _ = await get(api, "/v1/services/web")
    assert status == 200
    assert body["name"] == "web" and body["tags"] == ["blue"]
    (ep,) = body["endpoints"]
    assert {"id", "address", "port", "state", "weight", "tags", "meta", "source"} <= ep.keys()
    assert ep["id"] == "c1:80" and ep["address"] == "172.17.0.9" and ep["port"] == 80
    assert ep["state"] == "passing" and ep["weight"] == 3
    assert ep["tags"] == ["blue"] and ep["meta"] == {"v": "2"}
    assert ep["source"] == {"kind": "container", "container_id": "c1", "container_name": "web-c1"}
    # Service names are DNS labels: case-insensitive.
    assert (await get(api, "/v1/services/WEB"))[1]["name"] == "web"


async def test_unknown_service_is_404_json(api: Harness) -> None:
    status, body, index = await get(api, "/v1/services/nope")
    assert status == 404
    assert body["field"] == "name" and "nope" in body["error"]
    assert index == api.catalog.snapshot.index
    status, body, _ = await get(api, "/v1/services/not_a_label")
    assert status == 404 and body["field"] == "name"
    status, body, _ = await get(api, "/v1/endpoints/nope")
    assert status == 404 and body["field"] == "id"


async def test_endpoint_filters(api: Harness) -> None:
    api.container("c1", "web", tags=("blue",))
    api.container("c2", "web", tags=("green",), state=State.DRAINING)
    api.container("c3", "cache", tags=("blue",), state=State.WARNING)

    async def ids(**params: str) -> list[str]:
        status, body, _ = await get(api, "/v1/endpoints", **params)
        assert status == 200
        return [e["id"] for e in body]

    assert await ids() == ["c3:80", "c1:80", "c2:80"]  # by service name, then id
    assert await ids(service="web") == ["c1:80", "c2:80"]
    assert await ids(tag="blue") == ["c3:80", "c1:80"]
    assert await ids(state="draining") == ["c2:80"]
    assert await ids(state="passing,warning") == ["c3:80", "c1:80"]
    assert await ids(service="web", tag="blue", state="passing") == ["c1:80"]
    assert await ids(service="absent") == []
    status, body, _ = await get(api, "/v1/endpoints/c2:80")
    assert status == 200 and body["state"] == "draining"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "sleeping"}, "state"),
        ({"service": "bad_name"}, "service"),
        ({"index": "-1"}, "index"),
        ({"index": "abc"}, "index"),
        ({"index": "1", "wait": "soon"}, "wait"),
        ({"index": "1", "wait": "10x"}, "wait"),
    ],
)
async def test_bad_query_parameters_are_400(api: Harness, params: dict[str, str], field: str) -> None:
    status, body = 0, None
    async with api.http.get("/v1/endpoints", params=params) as resp:
        status, body = resp.status, await resp.json()
    assert status == 400
    assert body["field"] == field and body["error"]


# --------------------------------------------------------- blocking queries
def test_blocking_query_parameters() -> None:
    assert parse_blocking({}) is None
    assert parse_blocking({"wait": "10s"}) is None  # wait alone is a plain read
    q = parse_blocking({"index": "7", "wait": "30s"}, rand=lambda: 0.0)
    assert q is not None and (q.index, q.wait) == (7, 30.0)
    full_jitter = parse_blocking({"index": "7", "wait": "16s"}, rand=lambda: 1.0)
    assert full_jitter is not None and full_jitter.wait == 17.0  # at most wait/16 extra
    default = parse_blocking({"index": "7"}, rand=lambda: 0.0)
    assert default is not None and default.wait == 300.0  # 5 min, like Consul
    capped = parse_blocking({"index": "7", "wait": "2h"}, rand=lambda: 0.0)
    assert capped is not None and capped.wait == 600.0  # capped at 10 min


async def test_blocking_query_returns_early_on_change(api: Harness) -> None:
    api.container("c1", "web")
    _, _, index = await get(api, "/v1/services/web")
    started = time.monotonic()
    task = asyncio.create_task(get(api, "/v1/services/web", index=str(index), wait="20s"))
    await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)  # it waits
    assert not task.done()
    api.container("c2", "web")
    status, body, new_index = await asyncio.wait_for(task, 5)
    assert status == 200 and new_index > index
    assert [e["id"] for e in body["endpoints"]] == ["c1:80", "c2:80"]
    assert time.monotonic() - started < 5
    assert REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 0


async def test_blocking_query_returns_at_the_wait_with_the_same_index(api: Harness) -> None:
    api.container("c1", "web")
    _, _, index = await get(api, "/v1/services")
    started = time.monotonic()
    status, body, same = await get(api, "/v1/services", index=str(index), wait="300ms")
    elapsed = time.monotonic() - started
    assert status == 200 and same == index
    assert [s["name"] for s in body] == ["web"]
    assert 0.3 <= elapsed < 3


async def test_blocking_on_one_service_ignores_changes_to_others(api: Harness) -> None:
    api.container("c1", "web")
    _, _, index = await get(api, "/v1/endpoints", service="web")
    task = asyncio.create_task(get(api, "/v1/endpoints", service="web", index=str(index), wait="20s"))
    await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)
    api.container("c9", "other")  # the catalog index moves, web does not change
    other_index = api.catalog.publish().index
    assert other_index > index
    api.container("c1", "web", state=State.DRAINING)
    _status, body, new_index = await asyncio.wait_for(task, 5)
    # Had the query woken on the other service's change, it would show web still passing.
    assert new_index > other_index
    assert [e["state"] for e in body] == ["draining"]
    assert new_index == api.catalog.snapshot.index


async def test_index_from_an_earlier_process_answers_at_once(api: Harness) -> None:
    started = time.monotonic()
    status, _, index = await get(api, "/v1/services", index="999999", wait="30s")
    assert status == 200 and index < 999999
    assert time.monotonic() - started < 2


async def test_blocking_query_for_a_missing_service_wakes_when_it_appears(api: Harness) -> None:
    status, _, index = await get(api, "/v1/services/late")
    assert status == 404
    task = asyncio.create_task(get(api, "/v1/services/late", index=str(index), wait="20s"))
    await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)
    assert not task.done()
    api.container("c1", "late")
    status, body, _ = await asyncio.wait_for(task, 5)
    assert status == 200 and body["name"] == "late"


async def test_client_hanging_up_ends_its_blocking_query(api: Harness) -> None:
    _, _, index = await get(api, "/v1/services")
    task = asyncio.create_task(get(api, "/v1/services", index=str(index), wait="60s"))
    await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)
    task.cancel()  # closes the client connection
    await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 0)


async def test_stop_ends_blocking_queries_promptly() -> None:
    async with serve() as h:
        _, _, index = await get(h, "/v1/services")
        task = asyncio.create_task(get(h, "/v1/services", index=str(index), wait="60s"))
        await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)
        started = time.monotonic()
        await h.server.stop()
        status, _, same = await asyncio.wait_for(task, 5)
        assert status == 200 and same == index
        assert time.monotonic() - started < 3


# -------------------------------------------------------------------- watch
async def next_event(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> dict[str, Any]:
    """Read one server-sent event (or one comment) from the stream."""

    async def read() -> dict[str, Any]:
        event: dict[str, Any] = {}
        while True:
            line = (await resp.content.readline()).decode()
            if line == "":
                return {"eof": True}
            line = line.rstrip("\n")
            if line == "":
                if event:
                    return event
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            key, _, value = line.partition(": ")
            event[key] = json.loads(value) if key == "data" else value

    return await asyncio.wait_for(read(), timeout)


async def test_watch_streams_the_state_then_each_change(api: Harness) -> None:
    api.container("c1", "web")
    async with api.http.get("/v1/watch") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await next_event(resp)
        assert first["event"] == "snapshot"
        assert [s["name"] for s in first["data"]["services"]] == ["web"]
        assert int(first["id"]) == first["data"]["index"] == api.catalog.snapshot.index

        status, _ = await send(api, "PUT", "/v1/endpoints/db1", DB)
        assert status == 201
        change = await next_event(resp)
        while "comment" in change:
            change = await next_event(resp)
        assert change["event"] == "change"
        assert [s["name"] for s in change["data"]["services"]] == ["db"]
        assert change["data"]["services"][0]["endpoints"][0]["id"] == "db1"
        assert change["data"]["removed"] == []

        await send(api, "DELETE", "/v1/endpoints/db1")
        change = await next_event(resp)
        while "comment" in change:
            change = await next_event(resp)
        assert change["data"]["services"] == [] and change["data"]["removed"] == ["db"]
        assert int(change["id"]) == api.catalog.snapshot.index


async def test_watch_filter_and_heartbeats(api: Harness) -> None:
    api.container("c1", "web")
    async with api.http.get("/v1/watch", params={"service": "db"}) as resp:
        first = await next_event(resp)
        assert first["event"] == "snapshot" and first["data"]["services"] == []
        api.container("c2", "web")  # not the watched service: no event, only keep-alives
        seen = [await next_event(resp, timeout=3) for _ in range(2)]
        assert all("comment" in e for e in seen), seen
        await send(api, "PUT", "/v1/endpoints/db1", DB)
        event = await next_event(resp)
        while "comment" in event:
            event = await next_event(resp)
        assert [s["name"] for s in event["data"]["services"]] == ["db"]
    async with api.http.get("/v1/watch", params={"service": "bad_name"}) as resp:
        assert resp.status == 400 and (await resp.json())["field"] == "service"


async def test_watch_ends_cleanly_on_shutdown() -> None:
    async with serve() as h, h.http.get("/v1/watch") as resp:
        assert (await next_event(resp))["event"] == "snapshot"
        assert REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 1
        started = time.monotonic()
        await h.server.stop()
        event = await next_event(resp)
        while "comment" in event:
            event = await next_event(resp)
        assert event == {"eof": True}
        assert time.monotonic() - started < 3
        assert REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 0


# ------------------------------------------------------ manual registration
async def test_register_read_replace_deregister(api: Harness) -> None:
    status, ep = await send(api, "PUT", "/v1/endpoints/db1", {**DB, "tags": ["primary"], "meta": {"az": "b"}})
    assert status == 201
    assert ep["id"] == "db1" and ep["state"] == "passing" and ep["source"] == {"kind": "manual"}
    assert ep["node"] == "test-node"
    # Read-your-writes: the registration is in the catalog as soon as the PUT returns.
    status, svc, index = await get(api, "/v1/services/db")
    assert status == 200 and [e["id"] for e in svc["endpoints"]] == ["db1"]
    assert svc["endpoints"][0]["tags"] == ["primary"] and svc["endpoints"][0]["meta"] == {"az": "b"}

    status, _ = await send(api, "PUT", "/v1/endpoints/db1", {**DB, "tags": ["primary"], "meta": {"az": "b"}})
    assert status == 200
    assert api.catalog.snapshot.index == index  # same registration again: nothing republished

    status, ep = await send(api, "PUT", "/v1/endpoints/db1", {**DB, "port": 6432})
    assert status == 200 and ep["port"] == 6432

    status, body = await send(api, "DELETE", "/v1/endpoints/db1")
    assert status == 200 and body == {"id": "db1", "deregistered": True}
    assert (await get(api, "/v1/services/db"))[0] == 404
    status, body = await send(api, "DELETE", "/v1/endpoints/db1")
    assert status == 404 and body["field"] == "id"


async def test_ttl_expiry_critical_then_removed() -> None:
    async with serve(deregister_critical_after=0.6) as h:
        status, ep = await send(h, "PUT", "/v1/endpoints/db1", {**DB, "ttl": "300ms"})
        assert status == 201 and ep["state"] == "critical"  # critical until the first heartbeat
        assert ep["check"] == {"kind": "ttl", "ttl": 0.3}

        status, ep = await send(h, "PUT", "/v1/endpoints/db1/heartbeat")
        assert status == 200 and ep["state"] == "passing"
        status, ep = await send(h, "PUT", "/v1/endpoints/db1/heartbeat?status=warning&output=slow%20disk")
        assert ep["state"] == "warning" and ep["check_status"]["output"] == "slow disk"
        status, ep = await send(h, "PUT", "/v1/endpoints/db1/heartbeat", {"status": "passing", "output": "ok"})
        assert ep["state"] == "passing"

        def state() -> str | None:
            e = h.catalog.snapshot.endpoints.get("db1")
            return e.state.value if e is not None else None

        await eventually(lambda: state() == "critical", timeout=5)
        status, ep, _ = await get(h, "/v1/endpoints/db1")
        assert "ttl expired" in ep["check_status"]["output"]
        await eventually(lambda: state() is None, timeout=5)
        assert (await get(h, "/v1/services/db"))[0] == 404
        status, _body = await send(h, "PUT", "/v1/endpoints/db1/heartbeat")
        assert status == 404


async def test_heartbeat_errors(api: Harness) -> None:
    await send(api, "PUT", "/v1/endpoints/plain", DB)
    status, body = await send(api, "PUT", "/v1/endpoints/plain/heartbeat")
    assert status == 409 and body["field"] == "ttl"
    await send(api, "PUT", "/v1/endpoints/ttl1", {**DB, "ttl": "10s"})
    status, body = await send(api, "PUT", "/v1/endpoints/ttl1/heartbeat", {"status": "great"})
    assert status == 422 and body["field"] == "status"
    status, body = await send(api, "PUT", "/v1/endpoints/ttl1/heartbeat", raw=b"[1]")
    assert status == 422 and body["field"] == "body"
    status, body = await send(api, "PUT", "/v1/endpoints/ttl1/heartbeat", raw=b"{oops")
    assert status == 400 and body["field"] == "body"
    assert api.catalog.snapshot.endpoints["ttl1"].state is State.CRITICAL  # no rejected heartbeat counted
    status, body = await send(api, "PUT", "/v1/endpoints/ghost/heartbeat")
    assert status == 404


async def test_manual_endpoint_with_http_check_starts_critical(api: Harness) -> None:
    status, ep = await send(api, "PUT", "/v1/endpoints/web1", {**DB, "check": {"http": "/health", "interval": "1s"}})
    assert status == 201
    assert ep["state"] == "critical" and ep["check"]["kind"] == "http"


# ---------------------------------------------------------------- security
async def test_writes_need_the_token_when_set() -> None:
    async with serve(api_token="s3cret") as h:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret-and-more"}):
            async with h.http.put("/v1/endpoints/db1", json=DB, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await resp.json())["field"] == "Authorization"
        assert "db1" not in h.catalog.snapshot.endpoints
        good = {"Authorization": "Bearer s3cret"}
        assert (await send(h, "PUT", "/v1/endpoints/db1", DB, headers=good))[0] == 201
        assert (await get(h, "/v1/services/db"))[0] == 200  # reads need no token
        assert (await send(h, "DELETE", "/v1/endpoints/db1"))[0] == 401
        assert (await send(h, "PUT", "/v1/endpoints/db1/heartbeat"))[0] == 401
        assert "db1" in h.catalog.snapshot.endpoints
        assert (await send(h, "DELETE", "/v1/endpoints/db1", headers=good))[0] == 200


async def test_a_non_utf8_authorization_header_is_401_not_500() -> None:
    async with serve(api_token="s3cret") as h:
        assert h.server.address is not None
        reader, writer = await asyncio.open_connection(h.server.address.host, h.server.address.port)
        try:
            body = json.dumps(DB).encode()
            writer.write(
                b"PUT /v1/endpoints/db1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Authorization: Bearer s3cr\xff\xfet\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), head
        assert json.loads(payload)["field"] == "Authorization"
        assert "db1" not in h.catalog.snapshot.endpoints


# --------------------------------------------------------------- bad input
BAD_WRITES: list[tuple[str, bytes, int, str]] = [
    ("db1", b'{"service": "db",', 400, "body"),
    ("db1", b"", 400, "body"),
    ("db1", b'{"service": "db", "address": "10.0.0.5", "port": NaN}', 400, "body"),
    ("db1", b"[" * 5000 + b"]" * 5000, 400, "body"),
    ("db1", b"\xff\xfe", 400, "body"),
    ("db1", b'["db"]', 422, "body"),
    ("db1", json.dumps({"address": "10.0.0.5", "port": 1}).encode(), 422, "service"),
    ("db1", json.dumps({**DB, "service": "Not_A_Label"}).encode(), 422, "service"),
    ("db1", json.dumps({**DB, "port": 0}).encode(), 422, "port"),
    ("db1", json.dumps({**DB, "port": 99999}).encode(), 422, "port"),
    ("db1", json.dumps({**DB, "address": "db.internal"}).encode(), 422, "address"),
    ("db1", json.dumps({**DB, "ttl": "forever"}).encode(), 422, "ttl"),
    ("db1", json.dumps({**DB, "ttl": "0s"}).encode(), 422, "ttl"),
    ("db1", json.dumps({**DB, "ttl": 10**400}).encode(), 422, "ttl"),  # float() overflows
    ("db1", json.dumps({**DB, "check": {"http": "/h", "timeout": 10**400}}).encode(), 422, "check.timeout"),
    ("db1", json.dumps({**DB, "tgas": ["x"]}).encode(), 422, "tgas"),
    ("db1", json.dumps({**DB, "check": {"http": "/h", "interval": "0s"}}).encode(), 422, "check.interval"),
    ("db1", json.dumps({**DB, "id": "db2"}).encode(), 422, "id"),
    ("bad%20id", json.dumps(DB).encode(), 422, "id"),
    ("db1", b"{" + b'"a": "' + b"x" * 70_000 + b'"}', 413, None),  # over the 64 KiB body limit
]


@pytest.mark.parametrize(("eid", "raw", "status", "field"), BAD_WRITES)
async def test_bad_writes_are_rejected_and_change_nothing(
    api: Harness, eid: str, raw: bytes, status: int, field: str | None
) -> None:
    await send(api, "PUT", "/v1/endpoints/db1", {**DB, "ttl": "10s"})
    before = api.catalog.snapshot
    got, body = await send(api, "PUT", f"/v1/endpoints/{eid}", raw=raw)
    assert got == status
    assert set(body) == {"error", "field"} and body["error"] and body["field"] == field
    assert "Traceback" not in body["error"]
    await asyncio.sleep(0.06)  # past the catalog's coalescing window
    assert api.catalog.snapshot is before  # a rejected request changes nothing
    assert api.catalog.snapshot.endpoints["db1"].check is not None


JUNK: list[Any] = [None, True, -1, 0, 1e308, 2**70, 10**400, "", "x" * 300, "🙂", [], {}, [1], {"a": 1}, "10s", "/h"]
FIELDS = ["service", "address", "port", "tags", "meta", "weight", "protocol", "ttl", "check", "id"]
CHECK_FIELDS = ["http", "tcp", "method", "status", "interval", "timeout", "rise", "fall"]


async def test_junk_in_any_field_is_a_4xx_never_a_500(api: Harness) -> None:
    """Every field of a valid registration (and of its check) replaced by every kind of junk."""
    bodies = [{**DB, "tags": ["a"], "meta": {"k": "v"}, field: junk} for field in FIELDS for junk in JUNK]
    bodies += [{**DB, "check": {"http": "/h", field: junk}} for field in CHECK_FIELDS for junk in JUNK]
    seen: set[int] = set()
    for body in bodies:
        status, answer = await send(api, "PUT", "/v1/endpoints/fuzz", body)
        seen.add(status)
        assert status in (200, 201, 422), (body, status, answer)
        if status == 422:
            assert set(answer) == {"error", "field"} and answer["error"] and answer["field"]
    assert {200, 201, 422} <= seen


async def test_container_endpoints_cannot_be_changed_through_the_api(api: Harness) -> None:
    api.container("c1", "web")
    before = api.catalog.snapshot
    for method, path, body in (
        ("PUT", "/v1/endpoints/c1:80", {**DB, "service": "web"}),
        ("DELETE", "/v1/endpoints/c1:80", None),
        ("PUT", "/v1/endpoints/c1:80/heartbeat", None),
    ):
        status, answer = await send(api, method, path, body)
        assert status == 409, (method, path)
        assert "container" in answer["error"] and answer["field"] == "id"
    await asyncio.sleep(0.06)
    assert api.catalog.snapshot is before


async def test_unknown_routes_and_methods_are_json(api: Harness) -> None:
    status, body = await send(api, "GET", "/v2/nothing")
    assert status == 404 and body == {"error": "no route /v2/nothing", "field": None}
    async with api.http.post("/v1/services") as resp:
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
        assert (await resp.json())["error"].startswith("method POST")
    async with api.http.delete("/v1/endpoints/x/heartbeat") as resp:
        assert resp.status == 405 and resp.content_type == "application/json"


async def test_unexpected_errors_become_a_logged_json_500(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenHealth:
        def autoheal_log(self) -> list[object]:
            raise RuntimeError("boom")

    async with serve(health=BrokenHealth()) as h:
        status, body = await send(h, "GET", "/v1/autoheal")
    assert status == 500 and body["error"] == "internal error (logged)"
    assert "boom" not in json.dumps(body)
    assert any("failed: GET /v1/autoheal" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------- misc
def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_openapi_document_is_valid_and_covers_every_route(api: Harness) -> None:
    async with api.http.get("/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.")
    served = {
        (route.resource.canonical, route.method.lower())
        for route in api.server.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"] and op["summary"], (path, method)


class FakeDocker:
    connected = True


async def test_healthz_reports_the_docker_connection() -> None:
    async with serve() as h:
        status, body, _ = await get(h, "/healthz")
        assert status == 200 and body == {"status": "ok", "docker": "disabled"}
    docker = FakeDocker()
    async with serve(docker=docker) as h:
        status, body, _ = await get(h, "/healthz")
        assert status == 200 and body == {"status": "ok", "docker": "connected"}
        docker.connected = False
        status, body, _ = await get(h, "/healthz")
        assert status == 503 and body == {"status": "degraded", "docker": "disconnected"}


async def test_autoheal_log_is_listed() -> None:
    class Health:
        def autoheal_log(self) -> list[dict[str, object]]:
            return [{"container": "web-1", "action": "restarted", "at": 1.0}]

    async with serve(health=Health()) as h:
        status, body, _ = await get(h, "/v1/autoheal")
        assert status == 200 and body == [{"container": "web-1", "action": "restarted", "at": 1.0}]
    async with serve(health=object()) as h:
        assert (await get(h, "/v1/autoheal"))[1] == []


async def test_metrics_endpoint(api: Harness) -> None:
    api.container("c1", "web")
    api.container("c2", "web", state=State.DRAINING)
    await get(api, "/v1/services")
    async with api.http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    lines = set(text.splitlines())
    assert f"beacon_registry_snapshot_index {float(api.catalog.snapshot.index)}" in lines
    assert "beacon_registry_services 1.0" in lines
    assert 'beacon_registry_endpoints{state="draining"} 1.0' in lines
    assert 'beacon_registry_endpoints{state="passing"} 1.0' in lines
    assert any(
        line.startswith('beacon_registry_api_requests_total{method="GET",route="/v1/services",status="200"}')
        for line in lines
    )
    assert "_created" not in text


# ------------------------------------------------ end to end, real Docker
@pytest.mark.docker
async def test_container_lifecycle_through_the_api(run_container: ContainerFactory) -> None:
    """Whole Beacon (Docker source included): a blocking query on a service wakes
    when its container starts, and the endpoint leaves when it is stopped."""
    name = f"bt-api-{uuid.uuid4().hex[:8]}"
    async with running_app(docker=True) as app, aiohttp.ClientSession(base_url=f"http://{app.api.address}") as http:
        await eventually(lambda: getattr(app.docker, "connected", False))
        async with http.get(f"/v1/services/{name}") as resp:
            assert resp.status == 404
            index = resp.headers["X-Beacon-Index"]
        pending = asyncio.create_task(http.get(f"/v1/services/{name}", params={"index": index, "wait": "30s"}))
        await asyncio.sleep(0.1)
        container = await asyncio.to_thread(
            run_container, labels={"beacon.service": name}, ports={"80/tcp": ("127.0.0.1", None)}
        )
        async with await asyncio.wait_for(pending, 20) as resp:
            assert resp.status == 200
            body = await resp.json()
        (ep,) = body["endpoints"]
        assert ep["source"]["kind"] == "container"
        assert container.id.startswith(ep["source"]["container_id"])
        assert ep["address"] == "127.0.0.1" and ep["port"] > 0

        await asyncio.to_thread(container.stop, timeout=5)

        async def gone() -> bool:
            async with http.get(f"/v1/services/{name}") as resp:
                return resp.status == 404

        deadline = time.monotonic() + 20
        while not await gone():
            assert time.monotonic() < deadline, "the stopped container's endpoint stayed in the API"
            await asyncio.sleep(0.1)


# ------------------------------------------------------------- DNS rebinding
async def test_a_write_through_a_foreign_host_name_is_refused() -> None:
    async with serve() as h:
        status, body = await send(h, "PUT", "/v1/endpoints/db1", DB,
                                  headers={"Host": "rebind.attacker.example:8700", "Content-Type": "application/json"})
        assert status == 403 and body["field"] == "Host"
        assert "--api-allowed-hosts" in body["error"]
        assert "db1" not in h.catalog.publish().endpoints
        # Names it may be reached by: localhost, any IP literal (no DNS to rebind), the listed ones.
        for host in ("localhost:8700", "127.0.0.1", "[::1]:8700", "10.1.2.3:8700"):
            status, _ = await send(h, "PUT", "/v1/endpoints/db1", DB,
                                   headers={"Host": host, "Content-Type": "application/json"})
            assert status in (200, 201), host
        # Reads stay open (the catalog is what DNS serves anyway).
        async with h.http.get("/v1/services", headers={"Host": "rebind.attacker.example"}) as resp:
            assert resp.status == 200
    async with serve(api_allowed_hosts=("beacon.internal",)) as h:
        status, _ = await send(h, "PUT", "/v1/endpoints/db1", DB,
                               headers={"Host": "Beacon.Internal:8700", "Content-Type": "application/json"})
        assert status == 201


async def test_a_write_must_be_json() -> None:
    async with serve() as h:
        status, body = await send(h, "PUT", "/v1/endpoints/db1", raw=json.dumps(DB).encode(),
                                  headers={"Content-Type": "text/plain"})
        assert status == 415 and body["field"] == "Content-Type"
        assert "db1" not in h.catalog.publish().endpoints
        status, _ = await send(h, "PUT", "/v1/endpoints/db1", raw=json.dumps(DB).encode(),
                               headers={"Content-Type": "application/json; charset=utf-8"})
        assert status == 201


# ---------------------------------------------------------------- watchers
async def test_watchers_are_capped_with_a_clear_429() -> None:
    async with serve(api_max_watchers=2) as h:
        _, _, index = await get(h, "/v1/services")
        first = await h.http.get("/v1/watch")
        assert (await next_event(first))["event"] == "snapshot"
        blocking = asyncio.create_task(get(h, "/v1/services", index=str(index), wait="30s"))
        await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_blocking_queries") == 1)
        for path, params in (("/v1/watch", {}), ("/v1/services", {"index": str(index), "wait": "30s"})):
            async with h.http.get(path, params=params) as resp:
                assert resp.status == 429
                body = await resp.json()
                assert body["field"] is None and "--api-max-watchers" in body["error"]
                assert resp.headers["Retry-After"]
        # A plain read is not a watcher: always served.
        assert (await get(h, "/v1/services"))[0] == 200
        first.close()
        await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 0)
        async with h.http.get("/v1/watch") as resp:
            assert resp.status == 200
        blocking.cancel()


async def test_one_change_is_serialised_once_for_every_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from beacon.api import watch as watch_module

    calls: list[str] = []
    real = watch_module.sse

    def counting(event: str, index: int, data: object) -> bytes:
        calls.append(event)
        return real(event, index, data)

    monkeypatch.setattr(watch_module, "sse", counting)
    async with serve() as h:
        h.container("c1", "web")
        h.catalog.publish()
        streams = [await h.http.get("/v1/watch") for _ in range(5)]
        for resp in streams:
            assert (await next_event(resp))["event"] == "snapshot"
        assert calls.count("snapshot") == 1  # the same state, encoded once
        h.container("c2", "web")
        for resp in streams:
            event = await next_event(resp)
            while "comment" in event:
                event = await next_event(resp)
            assert [e["id"] for e in event["data"]["services"][0]["endpoints"]] == ["c1:80", "c2:80"]
        assert calls.count("change") == 1
        for resp in streams:
            resp.close()


async def test_a_watcher_that_stops_reading_is_dropped() -> None:
    async with serve(api_watch_write_timeout=0.3) as h:
        assert h.server.address is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (h.server.address.host, h.server.address.port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /v1/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 1)
        # Big changes the client never reads: the server's buffer fills, the write times out.
        tags = tuple(f"tag{i:03d}" for i in range(60))
        dropped = REGISTRY.get_sample_value("beacon_registry_api_watch_dropped_total") or 0.0
        for n in range(2000):  # ~50 KB a change; the socket buffers fill after a few MB
            for i in range(20):
                h.container(f"c{i}", f"svc{i}", tags=tags, meta={"n": str(n), "pad": "x" * 2000})
            h.catalog.publish()
            await asyncio.sleep(0.005)
            if REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 0:
                break
        await eventually(lambda: REGISTRY.get_sample_value("beacon_registry_api_watch_streams") == 0, timeout=5)
        assert REGISTRY.get_sample_value("beacon_registry_api_watch_dropped_total") == dropped + 1
        writer.close()


def test_the_watch_write_timeout_is_a_flag_and_an_env_var() -> None:
    from beacon.config import build_config

    assert build_config({}, {}).api_watch_write_timeout == 10.0
    assert build_config({"api_watch_write_timeout": "500ms"}, {}).api_watch_write_timeout == 0.5
    assert build_config({}, {"BEACON_API_WATCH_WRITE_TIMEOUT": "2s"}).api_watch_write_timeout == 2.0
    with pytest.raises(ValueError, match="--api-watch-write-timeout"):
        build_config({"api_watch_write_timeout": "0s"}, {})


class Flag:
    def __init__(self, connected: bool) -> None:
        self.connected = connected


@pytest.mark.parametrize("docker", [None, True, False])
@pytest.mark.parametrize("store", [None, True, False])
async def test_healthz_and_status_read_one_derivation_of_the_connections(
    docker: bool | None, store: bool | None
) -> None:
    from beacon.api.status import Connections

    docker_obj = None if docker is None else Flag(docker)
    store_obj = None if store is None else Flag(store)
    connections = Connections.of(docker_obj, store_obj)
    docker_word = {None: "disabled", True: "connected", False: "disconnected"}[docker]
    healthy = docker is not False and store is not False
    expected = {"status": "ok" if healthy else "degraded", "docker": docker_word}
    if store is False:
        expected["store"] = "disconnected"
    async with serve(docker=docker_obj, server_options={"store": store_obj}) as h:
        status, body, _ = await get(h, "/healthz")
    assert (status, body) == (200 if healthy else 503, expected)
    assert connections.status_json() == {
        "docker": docker_word,
        "store": {"kind": "memory" if store is None else "etcd", "connected": store is not False},
    }


async def test_status_and_healthz_of_a_running_app_agree() -> None:
    async with running_app(docker=False) as app, aiohttp.ClientSession(f"http://{app.api.address}") as http:
        async with http.get("/v1/status") as resp:
            status = await resp.json()
        async with http.get("/healthz") as resp:
            health = await resp.json()
    assert status["docker"] == health["docker"] == "disabled"
    assert status["store"] == {"kind": "memory", "connected": True} and "store" not in health


# ------------------------------------------------------------------ traffic
def report(**services: tuple[list[int], int]) -> dict[str, Any]:
    """A proxy process's report as `metrics_json()` gives it: per service its latency buckets and 5xx count."""
    # codes: method index * 1000 + status (GET is 1, POST 3), as beacon.proxy.metrics counts them.
    return {"services": {name: {"buckets": buckets, "codes": {"1200": sum(buckets) - errors - errors // 2,
                                                              "1503": errors - errors // 2, "3502": errors // 2}}
                         for name, (buckets, errors) in services.items()}}  # fmt: skip


def test_traffic_window_counts_requests_errors_and_p99_between_samples() -> None:
    from beacon.api.traffic import TrafficWindow

    now = [100.0]
    reports: list[dict[str, Any]] = []
    window = TrafficWindow(lambda: reports, (0.01, 0.1, 1.0), clock=lambda: now[0])
    reports[:] = [report(web=([10, 0, 0, 0], 0), gone=([1, 0, 0, 0], 0))]
    assert window.figures({"web"}) == {"window_seconds": 0, "fields": ["requests", "errors", "p99_seconds"],
                                       "services": {}}  # one sample: no window yet
    # Two processes (a worker and the parent) add up; 100 requests, 99 fast, 1 slow, 4 errors.
    now[0] += 2.0
    reports[:] = [report(web=([60, 0, 1, 0], 3), gone=([5, 0, 0, 0], 0)), report(web=([49, 0, 0, 0], 1))]
    figures = window.figures({"web", "idle"})
    assert figures["window_seconds"] == 2.0
    assert set(figures["services"]) == {"web"}  # not in the catalog: left out; no requests: left out
    requests, errors, p99 = figures["services"]["web"]
    assert (requests, errors) == (100, 4)
    assert 0.0 < p99 <= 0.01  # rank 99 of 100 falls in the first bucket
    # Asked again within a second: the same sample (and the same bytes), no new scrape of the proxy.
    reports[:] = [report(web=([1000, 0, 0, 0], 0))]
    assert window.figures({"web"}) == figures
    assert window.render({"web"}, 7) is window.render({"web"}, 7)
    # A counter that went down was reset (the service left and came back): the newest value is all of it.
    now[0] += 1.0
    reports[:] = [report(web=([3, 0, 0, 2], 0))]
    requests, errors, p99 = window.figures({"web"})["services"]["web"]
    assert (requests, errors, p99) == (5, 0, 1.0)  # past the highest bound: that bound, as Prometheus does


def test_traffic_window_drops_samples_older_than_the_window() -> None:
    from beacon.api.traffic import TrafficWindow

    now = [0.0]
    total = [0]
    window = TrafficWindow(lambda: [report(web=([total[0]], 0))], (), window=10.0, every=1.0, clock=lambda: now[0])
    for _ in range(60):  # a dashboard polling every 2 s for 2 minutes, 10 requests a second
        now[0] += 2.0
        total[0] += 20
        figures = window.figures({"web"})
    assert figures["window_seconds"] == 10.0 and figures["services"]["web"][0] == 100
    assert len(window._samples) <= 7
    now[0] += 60.0  # nobody asked for a minute: the old samples cover no window
    assert window.figures({"web"})["window_seconds"] == 0


async def test_traffic_route_shows_the_proxys_requests_and_5xx_without_a_token() -> None:
    async with running_app(docker=False, api_token="s3cret") as app, aiohttp.ClientSession() as session:
        ep = Endpoint(id="t1", service="web", address="127.0.0.1", port=9, source=Source("manual"))
        app.catalog.set_source("manual:t1", [ep])
        app.catalog.publish()

        async def traffic() -> dict[str, Any]:
            async with session.get(f"http://{app.api.address}/v1/traffic") as resp:
                assert resp.status == 200 and resp.content_type == "application/json"
                assert int(resp.headers["X-Beacon-Index"]) == app.catalog.snapshot.index
                body: dict[str, Any] = await resp.json()
                return body

        assert (await traffic())["services"] == {}
        for _ in range(5):
            async with session.get(f"http://{app.proxy.address}/", headers={"Host": "web.localhost"}) as resp:
                assert resp.status in (502, 503)  # nothing listens on port 9
        deadline = time.monotonic() + 10
        body = await traffic()
        while "web" not in body["services"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            body = await traffic()
        requests, errors, p99 = body["services"]["web"]
        assert (requests, errors) == (5, 5) and p99 is not None and body["window_seconds"] > 0


async def test_healthz_says_starting_until_every_listener_is_up() -> None:
    """The API listens before DNS and the proxy: until those are up, /healthz is no 'ok' (a Docker
    HEALTHCHECK or a load balancer would send traffic to a proxy port that still refuses)."""
    from beacon.app import App

    app = App(make_config(docker=False))
    await app.api.start()  # as App.start does first of the listeners
    try:
        async with aiohttp.ClientSession(f"http://{app.api.address}") as http, http.get("/healthz") as resp:
            assert resp.status == 503 and await resp.json() == {"status": "starting", "docker": "disabled"}
    finally:
        await app.api.stop()
    async with running_app(docker=False) as running, aiohttp.ClientSession(f"http://{running.api.address}") as http:
        async with http.get("/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok", "docker": "disabled"}
