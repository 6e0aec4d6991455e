"""`--proxy-workers N`: processes share the port (SO_REUSEPORT), each fed every snapshot."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from beacon.metrics import exposition
from beacon.proxy.wire import snapshot_from_wire, snapshot_to_wire
from beacon.registry import Catalog, State
from tests.proxy.proxytest import backends, ep, proxy_server, put, raw_request


def test_snapshot_wire_round_trip_keeps_what_routing_needs() -> None:
    cat = Catalog()
    put(cat, "m:a", ep("a", 1, "api", weight=3, lb="least_conn", http_hosts=("api.test", "*.api.test"),
                       http_path_prefix="/v1", http_strip_prefix=True))  # fmt: skip
    put(cat, "m:b", ep("b", 2, "api", state=State.DRAINING), ep("c", 3, "web"))
    snap = cat.snapshot
    back = snapshot_from_wire(snapshot_to_wire(snap))
    assert back.index == snap.index
    assert set(back.services) == {"api", "web"}
    assert [e.id for e in back.services["api"].endpoints] == ["a", "b"]
    a = back.endpoints["a"]
    assert (a.weight, a.lb, a.http_hosts, a.http_path_prefix, a.http_strip_prefix) == (
        3, "least_conn", ("api.test", "*.api.test"), "/v1", True)  # fmt: skip
    assert back.endpoints["b"].state is State.DRAINING


async def test_two_workers_share_the_port_and_follow_snapshots() -> None:
    cat = Catalog()
    async with backends("web", "late") as (web, late):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, proxy_workers=2, shutdown_timeout=3.0) as proxy:
            assert proxy.address is not None

            async def one(host: str) -> bytes:
                return await raw_request(proxy.address,  # type: ignore[arg-type]
                                         f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())

            results = await asyncio.gather(*(one("web.localhost") for _ in range(60)))
            assert all(r.startswith(b"HTTP/1.1 200") for r in results)
            # A service registered after start is routed by every process.
            put(cat, "m:late", ep("late1", late.port, "late"))
            deadline = time.monotonic() + 5
            while True:
                results = await asyncio.gather(*(one("late.localhost") for _ in range(40)))
                if all(r.startswith(b"HTTP/1.1 200") for r in results) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert all(r.startswith(b"HTTP/1.1 200") for r in results), [r[:20] for r in results]
            # Workers report their metrics to the parent about once a second.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                reports = proxy.metrics_json()
                per_process = [r["services"].get("web", {}).get("classes", [0, 0, 0])[2] for r in reports]
                if len(reports) == 2 and all(per_process):
                    break
                await asyncio.sleep(0.2)
            assert len(reports) == 2
            assert all(per_process), per_process  # the kernel spread connections over both
            assert sum(per_process) == 60
            text = exposition()[0].decode()
            assert 'beacon_proxy_requests_total{code_class="2xx",service="web"} 60.0' in text
    assert len(web.requests) == 60


def test_snapshot_deltas_carry_only_changed_services_and_rebuild_the_same_routing_data() -> None:
    from beacon.proxy.wire import SnapshotDecoder, SnapshotEncoder

    def view(snapshot: object) -> dict[str, list[tuple[object, ...]]]:
        return {name: [(e.id, e.address, e.port, e.state, e.weight, e.http_hosts) for e in svc.endpoints]
                for name, svc in snapshot.services.items()}  # type: ignore[attr-defined]  # fmt: skip

    cat = Catalog()
    enc, dec = SnapshotEncoder(), SnapshotDecoder()
    put(cat, "m:a", ep("a1", 1, "alpha"), ep("a2", 2, "alpha"))
    put(cat, "m:b", ep("b1", 3, "beta", http_hosts=("b.test",)))
    first = dec.decode(enc.encode(cat.snapshot, full=True))
    assert view(first) == view(cat.snapshot)
    put(cat, "m:a", ep("a1", 1, "alpha", state=State.DRAINING), ep("a2", 2, "alpha"))
    delta = enc.encode(cat.snapshot)
    assert b'"beta"' not in delta  # only the changed service crosses the pipe
    second = dec.decode(delta)
    assert view(second) == view(cat.snapshot)
    assert second.services["beta"] is first.services["beta"]  # unchanged: same object, cheap apply
    # An endpoint moving to another service, and a service leaving.
    put(cat, "m:a", ep("a2", 2, "alpha"))
    put(cat, "m:b", ep("a1", 1, "gamma"))
    third = dec.decode(enc.encode(cat.snapshot))
    assert view(third) == view(cat.snapshot)
    assert set(third.endpoints) == {"a1", "a2"} and third.endpoints["a1"].service == "gamma"


async def test_a_worker_gets_changes_published_while_its_process_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalog()
    real_exec = asyncio.create_subprocess_exec

    async def exec_while_a_check_passes(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        # The endpoint's first passing check lands while the worker process is created.
        put(cat, "m:web", ep("web1", web.port))
        return await real_exec(*args, **kwargs)

    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port, state=State.CRITICAL))
        monkeypatch.setattr(asyncio, "create_subprocess_exec", exec_while_a_check_passes)
        async with proxy_server(cat, proxy_workers=2, shutdown_timeout=3.0) as proxy:
            monkeypatch.undo()
            assert proxy.address is not None
            request = b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n"
            # SO_REUSEPORT spreads 40 connections over both processes: a worker
            # that missed the change would answer its share with 503.
            results = await asyncio.gather(*(raw_request(proxy.address, request) for _ in range(40)))
    assert [r[:12] for r in results] == [b"HTTP/1.1 200"] * 40
