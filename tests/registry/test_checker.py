"""The health checker against real servers on 127.0.0.1 port 0, with a Catalog the tests fill.

Docker is faked only at its seam (`inspect_container` / `restart_container`)
for the autoheal rules; tests/registry/test_health_docker.py drives real containers.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from beacon.clock import SYSTEM_CLOCK
from beacon.registry import AutohealSpec, Catalog, CheckSpec, CheckStatus, Endpoint, Snapshot, Source, State
from beacon.registry.autoheal import backoff_delay, docker_health
from beacon.registry.checker import HealthChecker, Verdict, classify_http, judge
from beacon.registry.checkspec import OUTPUT_LIMIT
from tests.clock import FakeClock
from tests.helpers import eventually
from tests.helpers import test_config as make_config

P, W, C = State.PASSING, State.WARNING, State.CRITICAL


# ------------------------------------------------------------------ pure core
@pytest.mark.parametrize(
    ("results", "rise", "fall", "states"),
    [
        # Readiness: critical until the first pass, which counts at once (no rise wait).
        ([C, C, P], 2, 3, [C, C, P]),
        ([P], 3, 3, [P]),
        # Fall: a passing endpoint needs `fall` failures in a row.
        ([P, C, C, C], 2, 3, [P, P, P, C]),
        ([P, C, C, P, C, C, P], 2, 3, [P, P, P, P, P, P, P]),  # flapping within the threshold
        # Rise: once down, `rise` passes in a row bring it back.
        ([P, C, P, C, P, P], 2, 1, [P, C, C, C, C, P]),
        ([P, C, P, P, P], 3, 1, [P, C, C, C, P]),
        # 429 is warning: alive (counts as a pass), shown at once.
        ([P, W, P], 2, 3, [P, W, P]),
        ([W], 2, 3, [W]),
        ([P, C, W, W], 2, 1, [P, C, C, W]),
    ],
)
def test_judge_applies_readiness_rise_and_fall(
    results: list[State], rise: int, fall: int, states: list[State]
) -> None:
    verdict: Verdict | None = None
    seen = []
    for result in results:
        verdict = judge(verdict, result, rise, fall)
        seen.append(verdict.state)
    assert seen == states


@pytest.mark.parametrize(
    ("status", "lo", "hi", "state"),
    [(200, 200, 399, P), (302, 200, 399, P), (399, 200, 399, P), (404, 200, 399, C), (500, 200, 399, C),
     (429, 200, 399, W), (204, 200, 200, C), (429, 200, 499, P), (199, 200, 399, C)],
)
def test_classify_http(status: int, lo: int, hi: int, state: State) -> None:
    assert classify_http(status, CheckSpec(kind="http", status_min=lo, status_max=hi)) is state


def test_backoff_doubles_and_is_capped_by_the_window() -> None:
    spec = AutohealSpec(backoff=10.0, window=60.0)
    assert [backoff_delay(spec, n) for n in range(5)] == [0.0, 10.0, 20.0, 40.0, 60.0]


def test_docker_health_reads_the_inspect_document() -> None:
    info = {
        "State": {"Health": {"Status": "unhealthy", "FailingStreak": 4, "Log": [{"Output": "first"}, {"Output": "boom\n"}]}},
        "Config": {"Healthcheck": {"Interval": 2_000_000_000}},
    }
    assert docker_health(info) == ("unhealthy", 4, 2.0, "boom")
    assert docker_health({"State": {}}) == ("", 0, None, "")
    assert docker_health({}) == ("", 0, None, "")


# ------------------------------------------------------------ test plumbing
class Upstream:
    """A real HTTP server whose answers the test controls, counting hits per path."""

    def __init__(self) -> None:
        self.status = 200
        self.body = "ok"
        self.delay = 0.0
        self.script: collections.deque[int] = collections.deque()  # statuses to answer first
        self.hits: collections.Counter[str] = collections.Counter()
        self.active = 0
        self.max_active = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self.script.popleft() if self.script else self.status
            return web.Response(status=status, text=self.body)
        finally:
            self.active -= 1


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    up.port = runner.addresses[0][1]
    yield up
    await runner.cleanup()


def http_check(path: str = "/health", **kw: Any) -> CheckSpec:
    kw.setdefault("interval", 0.1)
    kw.setdefault("timeout", 1.0)
    kw.setdefault("rise", 1)
    kw.setdefault("fall", 1)
    return CheckSpec(kind="http", path=path, **kw)


def endpoint(eid: str, port: int, check: CheckSpec | None, **kw: Any) -> Endpoint:
    source = kw.pop("source", Source("manual"))
    return Endpoint(id=eid, service=kw.pop("service", "web"), address="127.0.0.1", port=port,
                    source=source, check=check, **kw)


@asynccontextmanager
async def running_checker(
    catalog: Catalog, docker: Any = None, clock: FakeClock | None = None, **overrides: Any
) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(make_config(**overrides), catalog, docker=docker, clock=clock or SYSTEM_CLOCK)
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


def state_of(catalog: Catalog, eid: str) -> State | None:
    ep = catalog.snapshot.endpoints.get(eid)
    return ep.state if ep is not None else None


def status_of(catalog: Catalog, eid: str) -> CheckStatus | None:
    ep = catalog.snapshot.endpoints.get(eid)
    return ep.check_status if ep is not None else None


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def tick(clock: FakeClock, seconds: float, times: int = 1) -> None:
    """Advance the fake clock `times` by `seconds`; after each step every probe
    that came due has run to its end (its I/O is real, on loopback)."""
    for _ in range(times):
        await clock.advance(seconds)
        for _ in range(20):  # the woken scheduler pops, takes a slot, starts the probe
            await asyncio.sleep(0)
        await eventually(lambda: metric("beacon_registry_checks_in_flight") == 0, interval=0.002)


async def tick_until(clock: FakeClock, seconds: float, predicate: Callable[[], object], limit: int = 200) -> None:
    for _ in range(limit):
        if predicate():
            return
        await tick(clock, seconds)
    raise AssertionError(f"not reached within {limit} steps of {seconds}s")


# ------------------------------------------------------------------ HTTP checks
async def test_http_pass_makes_a_new_endpoint_ready(upstream: Upstream) -> None:
    catalog = Catalog()
    before = metric("beacon_registry_checks_total", kind="http", result="passing")
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(interval=0.2))])
        catalog.publish()
        assert state_of(catalog, "a") is C  # readiness: no traffic before the first pass
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        status = catalog.snapshot.endpoints["a"].check_status
        assert status is not None
        assert status.output == "HTTP GET /health: 200 OK"
        assert status.consecutive_passes == 1 and status.consecutive_failures == 0
        assert status.last_change > 0 and status.last_checked >= status.last_change
    assert upstream.hits["/health"] >= 1
    assert metric("beacon_registry_checks_total", kind="http", result="passing") > before


async def test_http_error_status_goes_critical_after_fall_with_the_body_as_output(upstream: Upstream) -> None:
    catalog = Catalog()
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(fall=2))])
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        hits = upstream.hits["/health"]
        upstream.status, upstream.body = 503, "database down"
        await eventually(lambda: upstream.hits["/health"] >= hits + 1, timeout=5)
        await eventually(lambda: state_of(catalog, "a") is C, timeout=5)
        status = catalog.snapshot.endpoints["a"].check_status
        assert status is not None
        # One failure was not enough (fall=2): it took at least two probes.
        assert upstream.hits["/health"] >= hits + 2
        assert status.output.startswith("HTTP GET /health: 503 Service Unavailable")
        assert "database down" in status.output
        assert status.consecutive_failures == 2


async def test_http_429_is_warning(upstream: Upstream) -> None:
    catalog = Catalog()
    async with running_checker(catalog):
        upstream.status = 429
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check())])
        await eventually(lambda: state_of(catalog, "a") is W, timeout=5)
        upstream.status = 200
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)


async def test_http_timeout_is_critical(upstream: Upstream) -> None:
    catalog = Catalog()
    upstream.delay = 2.0
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(timeout=0.2, interval=0.5))])
        started = time.monotonic()
        status = await eventually(lambda: status_of(catalog, "a"), timeout=5)
        assert time.monotonic() - started < 1.9  # the probe gave up, it did not wait for the answer
        assert status.state is C
        assert status.output == "HTTP GET /health: timed out after 0.2s"


async def test_output_is_truncated_to_4kb(upstream: Upstream) -> None:
    catalog = Catalog()
    upstream.status, upstream.body = 500, "E" * 50_000
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check())])
        status = await eventually(lambda: status_of(catalog, "a"), timeout=5)
    assert status.state is C
    assert status.output.startswith("HTTP GET /health: 500 Internal Server Error\nEEEE")
    assert len(status.output) <= OUTPUT_LIMIT
    assert status.output.endswith("(truncated)")


async def test_redirects_are_not_followed(upstream: Upstream) -> None:
    catalog = Catalog()
    async with running_checker(catalog):
        upstream.status = 302  # no Location: following it would fail; in range 200-399 it passes
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(method="HEAD"))])
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
    assert catalog.snapshot.endpoints["a"].check_status.output == "HTTP HEAD /health: 302 Found"  # type: ignore[union-attr]


async def test_http_on_a_closed_port_is_critical() -> None:
    catalog = Catalog()
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", free_port(), http_check())])
        status = await eventually(lambda: status_of(catalog, "a"), timeout=5)
    assert status.state is C
    assert status.output.startswith("HTTP GET /health: ")
    assert "connect" in status.output.lower()


# ------------------------------------------------------------------ TCP checks
async def test_tcp_check_open_closed_and_closing_ports() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # keep the connection until the checker closes it
        writer.close()

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # what Docker's userland proxy does when nothing listens behind it

    open_server = await asyncio.start_server(hold, "127.0.0.1", 0)
    closing_server = await asyncio.start_server(slam, "127.0.0.1", 0)
    tcp = CheckSpec(kind="tcp", interval=0.2, timeout=1.0, rise=1, fall=1)
    catalog = Catalog()
    try:
        async with running_checker(catalog):
            catalog.set_source("manual:open", [endpoint("open", open_server.sockets[0].getsockname()[1], tcp)])
            catalog.set_source("manual:closed", [endpoint("closed", free_port(), tcp)])
            catalog.set_source("manual:closing", [endpoint("closing", closing_server.sockets[0].getsockname()[1], tcp)])
            await eventually(
                lambda: all(status_of(catalog, e) for e in ("open", "closed", "closing")),
                timeout=5,
            )
            eps = catalog.snapshot.endpoints
            assert eps["open"].state is P
            assert eps["closed"].state is C
            assert eps["closing"].state is C
            assert "refused" in eps["closed"].check_status.output.lower()  # type: ignore[union-attr]
            assert "closed at once" in eps["closing"].check_status.output  # type: ignore[union-attr]
    finally:
        open_server.close()
        closing_server.close()
        await open_server.wait_closed()
        await closing_server.wait_closed()


# ------------------------------------------------------------------ rise / fall
async def test_flapping_within_thresholds_changes_nothing(upstream: Upstream) -> None:
    catalog = Catalog()
    states: list[State] = []

    def record(snap: Snapshot) -> None:
        ep = snap.endpoints.get("a")
        if ep is not None:
            states.append(ep.state)

    catalog.add_listener(record)
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(rise=2, fall=2, interval=0.05))])
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        states.clear()
        hits = upstream.hits["/health"]
        # fail, pass, fail, pass ...: never two failures in a row.
        upstream.script.extend([500, 200] * 8)
        await eventually(lambda: not upstream.script, timeout=10)
        await asyncio.sleep(0.1)
    assert upstream.hits["/health"] >= hits + 16
    assert states, "the flapping should have published new outputs"
    assert set(states) == {P}


async def test_recovery_needs_rise_passes(upstream: Upstream) -> None:
    catalog = Catalog()
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(rise=3, fall=1, interval=0.05))])
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        upstream.status = 500
        await eventually(lambda: state_of(catalog, "a") is C, timeout=5)
        hits = upstream.hits["/health"]
        upstream.status = 200
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        assert upstream.hits["/health"] >= hits + 3
        status = catalog.snapshot.endpoints["a"].check_status
        assert status is not None and status.consecutive_passes == 3


# ------------------------------------------------------------------ scheduling
async def test_one_check_per_endpoint_however_often_the_catalog_changes(upstream: Upstream) -> None:
    catalog = Catalog()
    interval = 0.25
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check("/a", interval=interval))])
        catalog.set_source("manual:b", [endpoint("b", upstream.port, http_check("/b", interval=interval),
                                                  service="other")])
        await eventually(lambda: state_of(catalog, "a") is P and state_of(catalog, "b") is P, timeout=5)
        start_a, start_b = upstream.hits["/a"], upstream.hits["/b"]
        started = time.monotonic()
        # Churn: other sources come and go, and a's own service is republished.
        for i in range(60):
            catalog.set_source(f"manual:churn{i % 3}", [endpoint(f"c{i}", 1, None, service="web")])
            await asyncio.sleep(0.025)
        elapsed = time.monotonic() - started
    most = elapsed / (interval * 0.9) + 2
    for path, start in (("/a", start_a), ("/b", start_b)):
        runs = upstream.hits[path] - start
        assert 1 <= runs <= most, (path, runs, most)


async def test_steady_endpoint_publishes_no_new_snapshots(upstream: Upstream) -> None:
    catalog = Catalog()
    clock = FakeClock()
    async with running_checker(catalog, clock=clock):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(rise=2, interval=5.0))])
        # Passing, and the pass count has reached rise: nothing visible changes any more.
        await tick_until(clock, 1.0, lambda: (s := status_of(catalog, "a")) and s.consecutive_passes == 2)
        catalog.publish()
        index, hits = catalog.snapshot.index, upstream.hits["/health"]
        await tick(clock, 5.5, times=4)
        catalog.publish()
        assert upstream.hits["/health"] == hits + 4  # still checked, once per interval
        assert catalog.snapshot.index == index  # but nobody was woken


async def test_removed_endpoint_stops_being_checked_and_changed_spec_reschedules(upstream: Upstream) -> None:
    catalog = Catalog()
    clock = FakeClock()
    async with running_checker(catalog, clock=clock):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check("/old", interval=10.0))])
        await tick_until(clock, 1.0, lambda: upstream.hits["/old"] >= 2)
        # A new check spec (new path) replaces the old one.
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check("/new", interval=10.0))])
        catalog.publish()
        await tick_until(clock, 1.0, lambda: upstream.hits["/new"] >= 2)
        old = upstream.hits["/old"]
        # Steps of 1 s: each probe runs within 1 s of its due time, so intervals of
        # 9-11 s (jitter) give at least 3 more probes in 42 s. (Steps of 10.5 s let
        # two draws above 10.5 s run a probe only at 21 s and 42 s: 2 more.)
        await tick(clock, 1.0, times=42)
        assert upstream.hits["/old"] == old  # the old spec is never probed again
        assert upstream.hits["/new"] >= 5
        assert state_of(catalog, "a") is P
        catalog.remove_source("manual:a")
        catalog.publish()
        assert REGISTRY.get_sample_value("beacon_registry_checked_endpoints") == 0
        new = upstream.hits["/new"]
        await tick(clock, 10.5, times=4)
        assert upstream.hits["/new"] == new


async def test_new_address_starts_over_as_not_ready(upstream: Upstream) -> None:
    catalog = Catalog()
    moved_port = free_port()
    seen: list[State] = []

    def record(snap: Snapshot) -> None:
        ep = snap.endpoints.get("a")
        if ep is not None and ep.port == moved_port:
            seen.append(ep.state)

    catalog.add_listener(record)
    async with running_checker(catalog):
        catalog.set_source("manual:a", [endpoint("a", upstream.port, http_check(interval=0.1))])
        await eventually(lambda: state_of(catalog, "a") is P, timeout=5)
        catalog.set_source("manual:a", [endpoint("a", moved_port, http_check(interval=0.1))])
        await eventually(lambda: status_of(catalog, "a"), timeout=5)  # the new address was probed
        await asyncio.sleep(0.3)
    # The old backend's pass said nothing about the new one: never routable.
    assert seen and set(seen) == {C}


async def test_thousands_of_endpoints_with_bounded_concurrency_do_not_stall_the_loop(upstream: Upstream) -> None:
    count, concurrency = 2000, 32
    upstream.delay = 0.02  # each probe holds its slot a little while
    catalog = Catalog()
    lags: list[float] = []
    stop = asyncio.Event()

    async def measure_lag() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    ticker = asyncio.create_task(measure_lag())
    check = http_check(interval=60.0, timeout=10.0)
    started = time.monotonic()
    async with running_checker(catalog, check_concurrency=concurrency) as checker:
        for i in range(count):
            catalog.set_source(f"manual:{i}", [endpoint(f"e{i}", upstream.port, check, service=f"svc{i % 200}")])
        await eventually(
            lambda: sum(1 for e in catalog.snapshot.endpoints.values() if e.state is P) == count,
            timeout=60, interval=0.2,
        )
        elapsed = time.monotonic() - started
        max_in_flight = checker.max_in_flight
    stop.set()
    await ticker
    lags.sort()
    p99 = lags[int(len(lags) * 0.99)]
    print(f"\n{count} endpoints checked in {elapsed:.2f}s; loop lag p99 {p99 * 1000:.1f} ms, "
          f"max {lags[-1] * 1000:.1f} ms; max in flight {max_in_flight}, at the server {upstream.max_active}")
    assert upstream.hits["/health"] == count  # one check each (interval 60 s)
    assert max_in_flight == concurrency  # the bound was reached ...
    assert upstream.max_active <= concurrency  # ... and never exceeded
    assert p99 < 0.25, f"the loop stalled: p99 lag {p99:.3f}s"


# ------------------------------------------------------------------ autoheal (Docker faked at its seam)
class FakeDocker:
    """Stands in for DockerSource's two autoheal methods."""

    def __init__(self, info: dict[str, Any] | None = None) -> None:
        self.info: dict[str, Any] = info or {"State": {"Running": True, "Paused": False}}
        self.restarts: list[tuple[str, float]] = []
        self.inspects = 0
        self.clock: FakeClock | None = None  # whose time a restart records

    async def inspect_container(self, container_id: str) -> Mapping[str, Any] | None:
        self.inspects += 1
        return self.info

    async def restart_container(self, container_id: str, timeout: float = 10) -> None:
        self.restarts.append((container_id, self.clock.now() if self.clock else time.monotonic()))


def container_endpoint(port: int, check: CheckSpec | None, autoheal: AutohealSpec | None, **kw: Any) -> Endpoint:
    return endpoint("c1-80", port, check, autoheal=autoheal,
                    source=Source("container", container_id="c1" * 32, container_name="app"), **kw)


async def test_autoheal_restarts_after_consecutive_failures_then_stops_at_the_limit(upstream: Upstream) -> None:
    catalog = Catalog()
    docker = FakeDocker()
    upstream.status = 500
    heal = AutohealSpec(after=2, max_restarts=2, window=60.0, backoff=2.0)
    before = metric("beacon_registry_autoheal_restarts_total")
    clock = FakeClock()
    docker.clock = clock
    async with running_checker(catalog, docker=docker, clock=clock) as checker:
        catalog.set_source("container:c1", [container_endpoint(upstream.port, http_check(interval=0.5), heal)])
        await tick_until(clock, 0.5, lambda: len(docker.restarts) == 2)
        await tick_until(clock, 0.5, lambda: any(e["action"] == "limited" for e in checker.autoheal_log()))
        await tick(clock, 0.5, times=20)  # ten more seconds of failures: the limit holds
        entries = checker.autoheal_log()
    assert len(docker.restarts) == 2
    # Backoff: the second restart waited at least `backoff` after the first.
    assert docker.restarts[1][1] - docker.restarts[0][1] >= 2.0
    assert [e["action"] for e in entries] == ["restarted", "restarted", "limited"]
    first = entries[0]
    assert first["container_id"] == "c1" * 32 and first["container_name"] == "app"
    assert first["endpoint_id"] == "c1-80"
    assert "check failed 2 times in a row: HTTP GET /health: 500" in str(first["reason"])
    assert metric("beacon_registry_autoheal_restarts_total") == before + 2


async def test_autoheal_leaves_a_paused_container_alone(upstream: Upstream) -> None:
    catalog = Catalog()
    docker = FakeDocker({"State": {"Running": True, "Paused": True}})
    upstream.status = 500
    async with running_checker(catalog, docker=docker) as checker:
        heal = AutohealSpec(after=1, backoff=0.0)
        catalog.set_source("container:c1", [container_endpoint(upstream.port, http_check(interval=0.05), heal)])
        await eventually(lambda: docker.inspects >= 3, timeout=5)  # it looked, and each time saw the pause
    assert docker.restarts == []  # someone paused it on purpose
    assert checker.autoheal_log() == []


async def test_autoheal_leaves_stopping_and_unlabelled_containers_alone(upstream: Upstream) -> None:
    catalog = Catalog()
    docker = FakeDocker()  # running, not paused: only Beacon's own rules hold it back
    upstream.status = 500
    async with running_checker(catalog, docker=docker) as checker:
        plain = endpoint("c2-80", upstream.port, http_check(interval=0.05),
                         source=Source("container", container_id="c2" * 32, container_name="plain"))
        catalog.set_source("container:c2", [plain])
        # Being stopped (SIGTERM seen): its check fails because it is going away.
        stopping = endpoint("c3-80", upstream.port, http_check(interval=0.05), state=State.DRAINING,
                            autoheal=AutohealSpec(after=1, backoff=0.0),
                            source=Source("container", container_id="c3" * 32, container_name="stopping"))
        catalog.set_source("container:c3", [stopping])
        await eventually(lambda: upstream.hits["/health"] >= 15, timeout=5)
    assert docker.restarts == []
    assert checker.autoheal_log() == []


async def test_autoheal_from_docker_healthcheck() -> None:
    catalog = Catalog()
    info: dict[str, Any] = {
        "State": {"Running": True, "Health": {"Status": "unhealthy", "FailingStreak": 1, "Log": [{"Output": "wget: 404"}]}},
        "Config": {"Healthcheck": {"Interval": 100_000_000}},
    }
    docker = FakeDocker(info)
    heal = AutohealSpec(after=3, backoff=0.0)
    clock = FakeClock()
    async with running_checker(catalog, docker=docker, clock=clock) as checker:
        # No Beacon check: Docker's HEALTHCHECK made the source-side state critical.
        catalog.set_source("container:c1", [container_endpoint(1, None, heal, state=State.CRITICAL)])
        await tick_until(clock, 0.5, lambda: docker.inspects >= 3)
        assert docker.restarts == []  # streak 1 < after 3
        info["State"]["Health"]["FailingStreak"] = 3
        await tick_until(clock, 0.5, lambda: len(docker.restarts) == 1)
        entry = checker.autoheal_log()[0]
        assert entry["action"] == "restarted"
        assert entry["reason"] == "Docker HEALTHCHECK unhealthy, 3 failures in a row: wget: 404"
        # Healthy again: no more inspecting.
        catalog.set_source("container:c1", [container_endpoint(1, None, heal, state=State.PASSING)])
        catalog.publish()
        await tick(clock, 0)  # an inspect already in flight ends
        inspects = docker.inspects
        await tick(clock, 0.5, times=10)  # five healthcheck intervals
        assert docker.inspects == inspects


async def test_checks_run_without_docker_and_autoheal_is_inert(upstream: Upstream) -> None:
    catalog = Catalog()
    upstream.status = 500
    async with running_checker(catalog, docker=None) as checker:
        ep = container_endpoint(upstream.port, http_check(interval=0.05), AutohealSpec(after=1))
        catalog.set_source("container:c1", [replace(ep)])
        await eventually(lambda: upstream.hits["/health"] >= 3, timeout=5)
        assert state_of(catalog, "c1-80") is C
        assert checker.autoheal_log() == []


async def test_autoheal_history_of_a_destroyed_container_is_freed_once_expired(upstream: Upstream) -> None:
    """A container restarted by autoheal and then destroyed leaves no record behind
    once its restarts no longer count against the window (bounded memory under churn)."""
    catalog = Catalog()
    docker = FakeDocker()
    upstream.status = 500
    cid = "c1" * 32
    heal = AutohealSpec(after=1, max_restarts=3, window=600.0, backoff=0.0)
    clock = FakeClock()
    async with running_checker(catalog, docker=docker, clock=clock) as checker:
        catalog.set_source("container:c1", [container_endpoint(upstream.port, http_check(interval=1.0), heal)])
        await tick_until(clock, 0.5, lambda: len(docker.restarts) >= 1)
        catalog.remove_source("container:c1")  # destroyed while its restart still counts
        catalog.publish()
        assert "c1-80" not in catalog.snapshot.endpoints
        assert cid in checker.autoheal.tracked()  # kept while inside the window: the limit must hold
        await clock.advance(599.0)
        catalog.set_source("manual:a", [endpoint("a", upstream.port, None, service="a")])
        catalog.publish()
        assert cid in checker.autoheal.tracked()  # still inside the window
        await clock.advance(1.5)  # the window passes
        catalog.set_source("manual:b", [endpoint("b", upstream.port, None, service="b")])
        catalog.publish()
        assert cid not in checker.autoheal.tracked()
