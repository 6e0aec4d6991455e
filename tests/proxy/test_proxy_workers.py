"""`--proxy-workers N`: processes share the port (SO_REUSEPORT), each fed every snapshot."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import pytest

from beacon.metrics import exposition
from beacon.proxy.wire import snapshot_from_wire, snapshot_to_wire
from beacon.registry import Catalog, State
from tests.helpers import eventually
from tests.proxy.proxytest import backends, ep, ok_responses, proxy_server, put, raw_request


def test_snapshot_wire_round_trip_keeps_what_routing_needs() -> None:
    cat = Catalog()
    put(cat, "m:a", ep("a", 1, "api", weight=3, lb="least_conn", http_hosts=("api.test", "*.api.test"),
                       http_path_prefix="/v1", http_strip_prefix=True))  # fmt: skip
    put(cat, "m:b", ep("b", 2, "api", state=State.DRAINING), ep("c", 3, "web", http_expose=False))
    snap = cat.snapshot
    back = snapshot_from_wire(snapshot_to_wire(snap))
    assert back.index == snap.index
    assert set(back.services) == {"api", "web"}
    assert [e.id for e in back.services["api"].endpoints] == ["a", "b"]
    a = back.endpoints["a"]
    assert (a.weight, a.lb, a.http_hosts, a.http_path_prefix, a.http_strip_prefix) == (
        3, "least_conn", ("api.test", "*.api.test"), "/v1", True)  # fmt: skip
    assert back.endpoints["b"].state is State.DRAINING
    # beacon.http.expose reaches the workers, per endpoint and as the folded setting.
    assert back.endpoints["c"].http_expose is False and back.services["web"].settings.expose is False


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
                per_process = [ok_responses(r) for r in reports]
                if len(reports) == 2 and all(per_process):
                    break
                await asyncio.sleep(0.2)
            assert len(reports) == 2
            assert all(per_process), per_process  # the kernel spread connections over both
            assert sum(per_process) == 60
            text = exposition()[0].decode()
            assert 'beacon_proxy_requests_total{code="200",method="GET",service="web"} 60.0' in text
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


@pytest.mark.parametrize(
    ("ran_for", "expected"),
    [
        # Crash loop: each quick exit doubles the wait, up to the cap.
        ([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        # A run of at least `stable_after` seconds starts over from the base delay.
        ([0.1, 0.1, 0.1, 60.0, 0.1], [0.5, 1.0, 2.0, 0.5, 1.0]),
        ([0.1, 0.1, 59.9], [0.5, 1.0, 2.0]),
    ],
)
def test_restart_backoff_doubles_up_to_a_cap_and_resets_after_a_stable_run(
    ran_for: list[float], expected: list[float]
) -> None:
    from beacon.proxy.server import RestartBackoff

    backoff = RestartBackoff(base=0.5, cap=30.0, stable_after=60.0)
    assert [backoff.next_delay(r) for r in ran_for] == expected


def _exec_counter(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record (the time of) every worker process the proxy creates."""
    real_exec = asyncio.create_subprocess_exec
    spawned: list[float] = []

    async def counting_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        spawned.append(time.monotonic())
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counting_exec)
    return spawned


def _web_2xx(proxy: Any) -> int:
    """2xx responses of service web summed over every report /metrics reads."""
    return sum(ok_responses(r) for r in proxy.metrics_json())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_killed_worker_is_restarted_with_the_current_snapshot_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cat = Catalog()
    spawned = _exec_counter(monkeypatch)
    caplog.set_level(logging.INFO, logger="beacon.proxy")
    request = b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n"
    async with backends("web", "late") as (web, late):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, proxy_workers=3, shutdown_timeout=3.0) as proxy:
            assert proxy.address is not None
            first, other = proxy._workers
            assert first.proc is not None and other.proc is not None
            old_pid, other_pid = first.proc.pid, other.proc.pid
            before = await asyncio.gather(*(raw_request(proxy.address, request) for _ in range(30)))
            assert [r[:12] for r in before] == [b"HTTP/1.1 200"] * 30
            await eventually(lambda: first.metrics is not None and _web_2xx(proxy) == 30)
            os.kill(old_pid, signal.SIGKILL)
            # A service published while the worker is down must reach its replacement.
            await eventually(lambda: first.proc is not None and first.proc.returncode is not None)
            put(cat, "m:late", ep("late1", late.port, "late"))
            await eventually(lambda: first.proc is not None and first.proc.pid != old_pid and first.ready.is_set(),
                             timeout=20)  # fmt: skip
            assert first.proc is not None
            new_pid = first.proc.pid
            assert _pid_alive(new_pid) and not _pid_alive(old_pid)
            assert other.proc is not None and other.proc.pid == other_pid  # the healthy one is left alone
            assert len(spawned) == 3  # two at start, one replacement
            assert any(r.getMessage().startswith("restarted: proxy worker 1 (exit code -9)") for r in caplog.records), [
                r.getMessage() for r in caplog.records]  # fmt: skip
            # SO_REUSEPORT spreads 90 connections over the three processes:
            # every one answers, for the old service and the one added meanwhile.
            for host in ("web.localhost", "late.localhost"):
                req = request.replace(b"web.localhost", host.encode())
                results = await asyncio.gather(*(raw_request(proxy.address, req) for _ in range(45)))
                assert [r[:12] for r in results] == [b"HTTP/1.1 200"] * 45, host
            # The replacement serves its share too (its own metrics report).
            def served_by_replacement() -> int:
                m = first.metrics or {}
                return sum(ok_responses(m, name) for name in m.get("services", {}))

            await eventually(served_by_replacement, timeout=5)
            assert "beacon_proxy_worker_restarts_total 1.0" in exposition()[0].decode()
            # The dead process's counts are kept: the totals never went backwards.
            await eventually(lambda: _web_2xx(proxy) == 75, timeout=5)
            assert 'beacon_proxy_requests_total{code="200",method="GET",service="web"} 75.0' in exposition()[0].decode()
        # Nothing was restarted by the shutdown itself, and every process is gone.
        assert len(spawned) == 3
        assert not _pid_alive(new_pid) and not _pid_alive(other_pid)


async def test_stop_during_a_restart_backoff_restarts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import beacon.proxy.server as server_module

    # A long first delay: the stop surely lands while the restart waits.
    monkeypatch.setattr(server_module, "RESTART_BASE_DELAY", 5.0)
    cat = Catalog()
    spawned = _exec_counter(monkeypatch)
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, proxy_workers=2, shutdown_timeout=3.0) as proxy:
            (worker,) = proxy._workers
            assert worker.proc is not None
            os.kill(worker.proc.pid, signal.SIGKILL)
            await eventually(lambda: worker.proc is not None and worker.proc.returncode is not None)
            started = time.monotonic()
        assert time.monotonic() - started < 4.0  # stop() did not sit out the backoff
        await asyncio.sleep(1.0)
        assert len(spawned) == 1  # only the worker started with the server
        assert worker.restarts == 0


async def test_isolated_the_process_with_the_control_plane_forwards_nothing() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_workers=1, proxy_isolated=True) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        request = b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n"
        results = await asyncio.gather(*(raw_request(proxy.address, request) for _ in range(10)))
        assert [r[:12] for r in results] == [b"HTTP/1.1 200"] * 10
        assert proxy.routes_json()["routes"]  # the API still sees the routing table

        def per_process() -> list[int] | None:
            counts = [ok_responses(r) for r in proxy.metrics_json()]
            return counts if sum(counts) == 10 else None

        counts = await eventually(per_process)
    assert counts[-1] == 0  # the parent's own report (last): it served none of them


def test_worker_snapshots_follow_random_changes_with_deltas_and_pools_match_the_parent() -> None:
    # Issue 10 §5: the parent sends what changed; each worker snapshot carries
    # its delta (so the worker's apply is O(changed)) and rebuilds exactly the
    # routing data and pools the parent's own core gets from the catalog.
    import random
    from dataclasses import replace

    from beacon.proxy.core import ProxyCore
    from beacon.proxy.wire import SnapshotDecoder, SnapshotEncoder
    from beacon.registry import Endpoint
    from tests.helpers import test_config

    def view(snapshot: Any) -> dict[str, Any]:
        return {name: ([(e.id, e.service, e.address, e.port, e.protocol, e.state, e.weight, e.lb, e.http_hosts,
                         e.http_path_prefix, e.http_strip_prefix, e.node, e.locality) for e in svc.endpoints],
                       svc.settings.balancing, svc.settings.routes)
                for name, svc in snapshot.services.items()}  # fmt: skip

    def pools(core: ProxyCore) -> dict[str, Any]:
        return {name: (pool.policy, pool.sticky, sorted((m.id, m.weight, m.port) for m in pool.members))
                for name, pool in core.balancer.pools.items()}  # fmt: skip

    rng = random.Random(7)
    loop = asyncio.new_event_loop()
    try:
        parent = ProxyCore(test_config(node="n1"), loop, rng=random.Random(1))
        worker = ProxyCore(test_config(node="n1"), loop, rng=random.Random(1))
        cat = Catalog()
        enc, dec = SnapshotEncoder(), SnapshotDecoder()
        present: dict[str, Endpoint] = {}
        previous = None
        cat_previous = cat.snapshot
        for step in range(300):
            for _ in range(rng.choice((1, 1, 3))):
                eid = f"e{rng.randrange(16)}"
                if eid in present and rng.random() < 0.25:
                    del present[eid]
                    cat.set_source(f"m:{eid}", [])
                    continue
                base = present.get(eid) or ep(eid, 3000 + int(eid[1:]), rng.choice(("a", "b", "c")))
                present[eid] = replace(base, **rng.choice((
                    {"weight": rng.choice((1, 2, 5))}, {"state": rng.choice(list(State))},
                    {"service": rng.choice(("a", "b", "c"))}, {"lb": rng.choice((None, "random+sticky"))},
                    {"http_hosts": rng.choice(((), ("x.test",)))}, {"node": rng.choice(("n1", "n2"))},
                    {"locality": rng.choice((None, "prefer-local"))}, {"port": base.port + 1},
                )))  # fmt: skip
                cat.set_source(f"m:{eid}", [present[eid]])
            snap = cat.publish()
            payload = enc.encode(snap, full=step == 0)
            got = dec.decode(payload)
            assert view(got) == view(snap)
            assert set(got.endpoints) == set(snap.endpoints)
            if previous is not None:
                recorded = got.changed_since(previous)
                assert got.delta is recorded  # carried, not a full diff
                want = snap.changed_since(cat_previous)
                # Everything that differs is named; nothing the catalog did not change is.
                diffed = type(got)(got.index, got.services, got.endpoints).changed_since(previous)
                assert diffed.services_changed <= recorded.services_changed <= want.services_changed
                assert diffed.endpoints_changed <= recorded.endpoints_changed <= want.endpoints_changed
                assert recorded.services_removed == want.services_removed
                assert recorded.endpoints_removed == want.endpoints_removed
            previous, cat_previous = got, snap
            parent.apply(snap)
            worker.apply(got)
            assert pools(worker) == pools(parent)
    finally:
        loop.close()


def test_a_one_endpoint_change_in_a_large_service_sends_one_row() -> None:
    from beacon.proxy.wire import SnapshotDecoder, SnapshotEncoder

    cat = Catalog()
    cat.set_source("m:big", [ep(f"e{i:05d}", 1000 + i % 50000, "big") for i in range(3000)])
    enc, dec = SnapshotEncoder(), SnapshotDecoder()
    dec.decode(enc.encode(cat.publish(), full=True))
    put(cat, "m:one", ep("e-new", 9, "big"))
    payload = enc.encode(cat.snapshot)
    assert len(payload) < 600, payload  # one row and the service's settings, not 3,001 rows
    got = dec.decode(payload)
    assert len(got.services["big"].endpoints) == 3001 and got.delta is not None
    assert got.delta.endpoints_changed == {"e-new"}
