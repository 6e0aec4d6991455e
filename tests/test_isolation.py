"""Isolation as a property, measured (issue 10 §1): a flood on one face must
not stall the others.

Same structure as `tests/dns/test_dns_isolation.py` (whose `measure` these
tests reuse): a whole Beacon on this test's event loop (`running_app`), a
1,000-endpoint service, a local HTTP backend behind the proxy, and clients in
threads so the loop does nothing but Beacon's work. While one flood runs, a
thread measures a proxied GET, `/healthz` and a DNS query for a hot name in
turn; p99 of each must stay under 50 ms. Each test also asserts the flood
really happened (gauges, counters, log lines), so a flood that silently did
nothing cannot pass. Everything goes to loopback and every loop is bounded in
count and time.

The floods: watchers (silent and reading `/v1/watch` streams, parked blocking
queries, catalog churn); hostile container labels, through a scripted engine
at the source's `client_factory` seam (45 containers, JSON-decoded like the
SDK does) and through the real engine (3 containers, `@pytest.mark.docker`);
and proxy connections (800 idle keep-alive, one pipelining client).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
from prometheus_client import REGISTRY

from beacon.app import App
from beacon.config import HostPort
from beacon.registry import Endpoint, Source
from beacon.registry.docker import DockerSource
from tests.conftest import ContainerFactory
from tests.dns.dnstest import ep, put
from tests.dns.test_dns_isolation import _stop_after, backend, measure, p99
from tests.helpers import eventually
from tests.helpers import test_config as make_config  # aliased: pytest would collect test_*
from tests.registry.test_docker_watch_logic import FakeEngine, attrs, event

P99_LIMIT = 0.050
FLOOD_SECONDS = 3.0


def metric(name: str, **labels: str) -> float:
    """One sample, collecting only its own family: a whole-registry collect (the
    process collector lists /proc/self/fd, 400+ sockets here) every 20 ms would
    put the test's own sampling on the loop it measures."""
    family = name.removesuffix("_total")
    for m in REGISTRY.restricted_registry([name, family]).collect():
        for sample in m.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


@asynccontextmanager
async def beacon_with_site(port: int, **overrides: Any) -> AsyncIterator[App]:
    """A running Beacon with `big` (1,000 endpoints) and `site` (the local backend)."""
    app = App(make_config(docker=False, **overrides))
    assert app.config.proxy_isolated, "measured in the default topology: forwarding in a worker process"
    await app.start()
    try:
        put(
            app.catalog, "manual:big",
            *[ep(f"b{i}", f"10.{i // 250}.{i % 250}.1", "big", port=8000 + i) for i in range(1000)],
        )  # fmt: skip
        put(app.catalog, "manual:site", Endpoint(id="site", service="site", address="127.0.0.1", port=port, source=Source("manual")))
        # The proxy's worker process learns of `site` through its snapshot pipe:
        # wait until it routes before any flood starts.
        assert app.proxy.address is not None
        await routed(app.proxy.address)
        yield app
    finally:
        await app.stop()


async def routed(proxy: HostPort, timeout: float = 10.0) -> None:
    """Until a proxied GET for site.localhost answers 200 (bounded)."""
    def status() -> int:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": "site.localhost"})
            return conn.getresponse().status
        finally:
            conn.close()

    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        if (last := await asyncio.to_thread(status)) == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"site not routed by the proxy within {timeout}s (last status {last})")


async def measured(app: App, flood_seconds: float = FLOOD_SECONDS) -> dict[str, list[float]]:
    assert app.proxy.address is not None and app.api.address is not None
    return await asyncio.to_thread(measure, app.proxy.address, app.api.address, app.dns.addresses[0], _stop_after(flood_seconds))


def figures_of(during: dict[str, list[float]], what: str) -> dict[str, tuple[float, int]]:
    """p99 in ms and sample count per face, printed before any assertion can stop the test."""
    figures = {k: (round(p99(v) * 1000, 1), len(v)) for k, v in during.items()}
    print(f"\n{what}: p99 ms (samples) during flood: {figures}")
    return figures


def check(during: dict[str, list[float]], faces: tuple[str, ...], figures: dict[str, tuple[float, int]]) -> None:
    for face in faces:
        assert len(during[face]) >= 20, (face, figures)
        assert p99(during[face]) < P99_LIMIT, (face, figures)


def request_bytes(api: HostPort, target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {api.host}:{api.port}\r\n\r\n".encode()


# --------------------------------------------------------------- 1. watchers

NON_READERS = 300  # /v1/watch clients that never read, in bursts
BURST = 50
READERS = 50  # /v1/watch clients that read everything
PARKED = 80  # blocking queries on a service that never changes
MAX_WATCHERS = 250  # < READERS + PARKED + NON_READERS: the cap is reached
CHURN = 60  # catalog changes, one every 50 ms
BIG_EVERY = 6  # ... of which every 6th changes the 1,000-endpoint service


class WatchFlood:
    """The client side of the watcher flood, run in one thread (bounded)."""

    def __init__(self, api: HostPort, parked_index: int) -> None:
        self.api = api
        self.parked_index = parked_index
        self.stop = threading.Event()
        self.change_events = [0] * READERS
        self.received = [0] * READERS
        self.statuses: dict[str, int] = {}
        self.socks: list[socket.socket] = []

    def connect(self, target: str, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect: a small window and a small MSS. Loopback's 64 KB MSS
            # lets the kernel autotune Beacon's send buffer to megabytes, which
            # would swallow every event and hide the stalled reader for a while.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        s.connect((self.api.host, self.api.port))
        s.sendall(request_bytes(self.api, target))
        self.socks.append(s)
        return s

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for i in range(READERS):
                s = self.connect("/v1/watch")
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
            for _ in range(PARKED):
                self.connect(f"/v1/services/quiet?index={self.parked_index}&wait=30s")
            silent: list[socket.socket] = []
            deadline = time.monotonic() + FLOOD_SECONDS + 2
            next_burst = time.monotonic() + 0.3
            while time.monotonic() < deadline and not self.stop.is_set():
                if len(silent) < NON_READERS and time.monotonic() >= next_burst:
                    silent += [self.connect("/v1/watch", rcvbuf=4096) for _ in range(BURST)]
                    next_burst += 0.25
                for key, _ in sel.select(0.02):
                    i = key.data
                    with suppress(BlockingIOError):
                        chunk = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                        if not chunk:
                            sel.unregister(key.fileobj)
                            continue
                        self.received[i] += len(chunk)
                        # No joining of chunks (a copy under the GIL the loop shares): an
                        # event split across two reads is missed, the bound below allows it.
                        self.change_events[i] += chunk.count(b"event: change\n")
            for s in silent:  # what each silent client got first: 200 (a stream) or 429 (the cap)
                s.setblocking(False)
                try:
                    head = s.recv(12)
                except BlockingIOError:
                    head = b"(nothing)"
                except ConnectionError:
                    head = b"reset"
                status = head.decode("latin-1")
                self.statuses[status] = self.statuses.get(status, 0) + 1
        finally:
            sel.close()
            for s in self.socks:
                s.close()


async def _churn(app: App) -> int:
    """Register and deregister manual endpoints of `churn`, one change per 50 ms;
    every BIG_EVERY-th change also touches `big`, so that change event carries
    its 1,000 endpoints (~190 KB): more than a silent client's socket holds."""
    changes = 0
    for i in range(CHURN):
        app.manual.register(Endpoint(id=f"churn{i}", service="churn", address="127.0.0.2", port=9000 + i, source=Source("manual")))
        if i >= 3:
            app.manual.deregister(f"churn{i - 3}")
        if i % BIG_EVERY == 0:
            app.manual.register(Endpoint(id="bigx", service="big", address="10.9.9.9", port=7000 + i, source=Source("manual")))
        changes += 1
        await asyncio.sleep(FLOOD_SECONDS / CHURN)  # pacing of a writer, not a wait for a condition
    return changes


async def test_a_watcher_flood_does_not_stall_the_proxy_api_or_dns() -> None:
    dropped_before = metric("beacon_registry_api_watch_dropped_total")
    refused_before = metric("beacon_registry_api_requests_total", route="/v1/watch", method="GET", status="429")
    with backend() as port:
        # A 3 s flood: silent readers must be dropped well within it (the default is 10 s).
        async with beacon_with_site(port, api_watch_write_timeout=0.5, api_max_watchers=MAX_WATCHERS) as app:
            assert app.api.address is not None
            put(app.catalog, "manual:quiet", Endpoint(id="quiet", service="quiet", address="127.0.0.3", port=80, source=Source("manual")))
            await eventually(lambda: "quiet" in app.catalog.snapshot.services)
            conn = http.client.HTTPConnection(app.api.address.host, app.api.address.port, timeout=5)
            await asyncio.to_thread(conn.request, "GET", "/v1/services/quiet")
            resp = await asyncio.to_thread(conn.getresponse)
            parked_index = int(resp.headers["X-Beacon-Index"])
            resp.read()
            conn.close()

            flood = WatchFlood(app.api.address, parked_index)
            peak = {"streams": 0.0, "blocking": 0.0}

            async def watch_gauges() -> None:
                while True:
                    peak["streams"] = max(peak["streams"], metric("beacon_registry_api_watch_streams"))
                    peak["blocking"] = max(peak["blocking"], metric("beacon_registry_api_blocking_queries"))
                    await asyncio.sleep(0.02)  # sampling period of a gauge reader

            sampler = asyncio.ensure_future(watch_gauges())
            flooding = asyncio.ensure_future(asyncio.to_thread(flood.run))
            churning = asyncio.ensure_future(_churn(app))
            try:
                await eventually(lambda: peak["blocking"] >= PARKED and peak["streams"] >= READERS, timeout=5)
                during = await measured(app)
                changes = await churning
            finally:
                flood.stop.set()
                await flooding
                sampler.cancel()
    figures = figures_of(during, "watchers")
    dropped = metric("beacon_registry_api_watch_dropped_total") - dropped_before
    refused = metric("beacon_registry_api_requests_total", route="/v1/watch", method="GET", status="429") - refused_before
    print(f"\nwatchers: peak streams {peak['streams']:.0f}, peak blocking {peak['blocking']:.0f}, "
          f"dropped {dropped:.0f}, refused 429 {refused:.0f}, silent clients' first bytes {flood.statuses}, "
          f"change events per reader min {min(flood.change_events)}, catalog changes {changes}")
    # The flood happened: parked queries and streams held slots, slow readers were dropped,
    # the cap refused some, and every reading watcher kept receiving the churn.
    assert peak["blocking"] >= PARKED
    assert peak["streams"] >= READERS + BURST, peak
    assert dropped >= NON_READERS // 2, dropped
    assert refused >= 1, flood.statuses
    assert min(flood.change_events) >= CHURN // 3, flood.change_events
    check(during, ("proxy", "healthz", "dns"), figures)


# ------------------------------------------------------- 2. hostile labels

HOSTILE = 45  # containers, one every ~65 ms
HOST_NAMES = 50_000


def hostile_attrs(cid: str, i: int) -> dict[str, Any]:
    """An inspect result whose labels are each hostile in one way (rotating)."""
    a = attrs(cid, f"hostile{i}")
    labels: dict[str, str] = {"beacon.service": f"hostile{i}"}
    kind = i % 3
    if kind == 0:  # one label naming 50,000 hosts (~650 KB)
        labels["beacon.http.host"] = ",".join(f"h{j}.example.test" for j in range(HOST_NAMES))
    elif kind == 1:  # hundreds of beacon.* keys with 4 KB+ values
        labels.update({f"beacon.meta.k{j}": "v" * 4100 for j in range(300)})
    else:  # hundreds of keys with short values: the count, not the size
        labels.update({f"beacon.meta.k{j}": "x" for j in range(300)})
        labels["beacon.tags"] = ",".join(f"t{j}" for j in range(20_000))
    a["Config"]["Labels"] = labels
    return a


class JsonEngine(FakeEngine):
    """The scripted engine, but inspect decodes JSON bytes as the SDK does with
    the engine's reply (in the source's worker thread, holding the GIL)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: dict[str, bytes] = {}

    def inspect_container(self, cid: str) -> dict[str, Any]:
        raw = self.raw.get(cid)
        if raw is None:
            return super().inspect_container(cid)
        decoded: dict[str, Any] = json.loads(raw)
        return decoded


def label_flood(engine: JsonEngine, payloads: list[tuple[str, bytes]], stop: threading.Event) -> int:
    """Start each hostile container in turn, killing the one 5 before (bounded)."""
    pushed = 0
    for i, (cid, raw) in enumerate(payloads):
        if stop.is_set():
            break
        engine.raw[cid] = raw
        engine.running[cid] = {}  # the fake lists it; inspect answers from raw
        engine.streams[-1].push(event(cid, "start", name=f"hostile{i}"))
        if i >= 5:
            old = payloads[i - 5][0]
            engine.running.pop(old, None)
            engine.raw.pop(old, None)
            engine.streams[-1].push(event(old, "die", exitCode="0"))
        pushed += 1
        time.sleep(FLOOD_SECONDS / len(payloads))  # pacing of an engine, not a wait for a condition
    return pushed


async def test_a_hostile_label_flood_does_not_stall_the_proxy_api_or_dns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="beacon.registry.docker")
    cids = [hashlib.sha256(b"hostile%d" % i).hexdigest() for i in range(HOSTILE)]  # endpoint ids use 12 chars
    payloads = [(cid, json.dumps(hostile_attrs(cid, i)).encode()) for i, cid in enumerate(cids)]  # built before timing
    engine = JsonEngine()
    with backend() as port:
        async with beacon_with_site(port) as app:
            source = DockerSource(app.config, app.catalog, node=app.node, client_factory=engine.client,
                                  backoff_initial=0.01, backoff_max=0.05)
            await source.start()
            try:
                await eventually(lambda: engine.streams)
                stop = threading.Event()
                flooding = asyncio.ensure_future(asyncio.to_thread(label_flood, engine, payloads, stop))
                try:
                    during = await measured(app)
                finally:
                    stop.set()
                    pushed = await flooding
                await eventually(lambda: source.inspections >= pushed, timeout=10)
            finally:
                await source.stop()
    figures = figures_of(during, "hostile labels")
    invalid = [r.getMessage() for r in caplog.records if r.getMessage().startswith("invalid:")]
    print(f"\nhostile labels: containers {pushed}, inspections {source.inspections}, "
          f"payload {max(len(p) for _, p in payloads) // 1024} KB max, invalid: lines {len(invalid)}")
    assert pushed >= HOSTILE * 3 // 4, pushed
    # The flood was real: every kind of hostility was parsed and reported.
    assert any("beacon.http.host" in m and "longer than" in m for m in invalid), invalid[:5]
    assert any("beacon.meta." in m and "longer than" in m for m in invalid), invalid[:5]
    assert any("beacon.meta." in m and "at most 64" in m for m in invalid), invalid[:5]
    assert any("beacon.tags" in m for m in invalid), invalid[:5]
    assert max(len(m) for m in invalid) < 2000, "a log line carries a hostile value whole"
    check(during, ("proxy", "healthz", "dns"), figures)


# ---------------------------------------------------------- 3. proxy flood

IDLE = 800  # keep-alive proxy connections, each used once, then idle
PIPELINED = 40  # requests per pipelined write
ROUNDS = 60  # pipelined writes at most


def open_idle(proxy: HostPort, socks: list[socket.socket]) -> None:
    """IDLE keep-alive connections to the proxy, each after one real request (caller closes).

    One at a time: the proxy reuses its pooled upstream connection instead of
    opening 800 to a test backend whose listen backlog is 5.
    """
    req = b"GET / HTTP/1.1\r\nHost: site.localhost\r\n\r\n"
    for _ in range(IDLE):
        s = socket.create_connection((proxy.host, proxy.port), timeout=10)
        socks.append(s)
        s.sendall(req)
        got = b""
        while not got.endswith(b"ok\n"):
            chunk = s.recv(4096)
            assert chunk, "proxy closed a keep-alive connection before its answer"
            got += chunk


def pipeliner(proxy: HostPort, stop: threading.Event) -> int:
    """One client pipelining PIPELINED GETs per write, reading all answers (bounded)."""
    answered = 0
    batch = b"GET / HTTP/1.1\r\nHost: site.localhost\r\n\r\n" * PIPELINED
    deadline = time.monotonic() + FLOOD_SECONDS + 2
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        for _ in range(ROUNDS):
            if stop.is_set() or time.monotonic() > deadline:
                break
            s.sendall(batch)
            got = b""
            while got.count(b"ok\n") < PIPELINED:
                chunk = s.recv(1 << 16)
                assert chunk, "proxy closed the pipelining connection"
                got += chunk
            answered += PIPELINED
    return answered


async def test_a_proxy_connection_flood_does_not_stall_the_api_or_dns() -> None:
    with backend() as port:
        async with beacon_with_site(port) as app:
            assert app.proxy.address is not None
            idle: list[socket.socket] = []
            try:
                await asyncio.to_thread(open_idle, app.proxy.address, idle)
                stop = threading.Event()
                flooding = asyncio.ensure_future(asyncio.to_thread(pipeliner, app.proxy.address, stop))
                try:
                    during = await measured(app)
                finally:
                    stop.set()
                    answered = await flooding
                still_open = sum(1 for s in idle if _still_open(s))
            finally:
                for s in idle:
                    s.close()
    figures = figures_of(during, "proxy flood")
    print(f"\nproxy flood: idle keep-alive {len(idle)} ({still_open} open), pipelined answers {answered}")
    assert len(idle) == IDLE and still_open == IDLE, still_open  # idle, not dropped, through the flood
    assert answered >= PIPELINED * 10, answered
    check(during, ("healthz", "dns"), figures)


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""  # data on an idle connection: unexpected, but open
    except BlockingIOError:
        return True  # nothing to read and not closed
    except ConnectionError:
        return False


@pytest.mark.docker
async def test_hostile_labels_on_real_containers_do_not_stall_the_proxy_api_or_dns(
    run_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The same hostility through the real engine: Docker stores the labels,
    the SDK decodes the inspect reply, the real DockerSource applies it."""
    caplog.set_level(logging.INFO, logger="beacon.registry.docker")
    label_sets = [hostile_attrs("x", kind)["Config"]["Labels"] for kind in range(3)]
    started: list[str] = []

    def start_all(stop: threading.Event) -> None:
        for labels in label_sets:
            if stop.is_set():
                break
            # Published on loopback: a container with no port is ignored before its meta labels are read.
            started.append(run_container(labels=labels, ports={"80/tcp": ("127.0.0.1", None)}).id)

    with backend() as port:
        async with beacon_with_site(port) as app:
            source = DockerSource(app.config, app.catalog, node=app.node)
            await source.start()
            try:
                assert source.connected
                stop = threading.Event()
                starting = asyncio.ensure_future(asyncio.to_thread(start_all, stop))
                try:
                    during = await measured(app)
                finally:
                    stop.set()
                    await starting
                figures = figures_of(during, "hostile labels, real engine")
                await eventually(lambda: all(any(m.startswith("invalid:") and cid[:12] in m for m in _messages(caplog)) for cid in started))
            finally:
                await source.stop()
    invalid = [m for m in _messages(caplog) if m.startswith("invalid:")]
    print(f"\nhostile labels, real engine: containers {len(started)}, invalid: lines {len(invalid)}")
    assert len(started) == len(label_sets), started
    assert any("beacon.http.host" in m and "longer than" in m for m in invalid), invalid[:5]
    assert any("beacon.meta." in m and "at most 64" in m for m in invalid), [m[:300] for m in _messages(caplog) if "longer than" not in m][-5:]
    check(during, ("proxy", "healthz", "dns"), figures)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]
