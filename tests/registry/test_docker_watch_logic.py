"""The Docker source's event logic against a scripted engine (the client factory seam).

Real-engine behaviour is covered in test_docker_source.py; this file pins the
orderings a real engine cannot be made to produce on demand: an inspect that
is overtaken by the container's death, a stream that ends between two events,
a resync that must publish nothing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import docker.errors
import pytest

from beacon.registry.catalog import Catalog
from beacon.registry.docker import DockerSource, event_action, event_container_id
from beacon.registry.model import State
from tests.clock import FakeClock
from tests.helpers import eventually
from tests.helpers import test_config as make_config  # aliased: pytest would collect test_*

A = "a" * 64
B = "b" * 64


def attrs(cid: str, name: str, *, started: str = "2026-01-01T00:00:00Z", health: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"Running": True, "Paused": False, "Restarting": False, "StartedAt": started}
    if health:
        state["Health"] = {"Status": health}
    return {
        "Id": cid,
        "Name": "/" + name,
        "State": state,
        "Config": {"Labels": {}, "Env": [], "ExposedPorts": {"80/tcp": {}}},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {
            "Ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "30080"}]},
            "Networks": {"bridge": {"IPAddress": "172.17.0.9"}},
        },
    }


def event(cid: str, action: str, **attributes: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": attributes}}


class FakeStream:
    """What `APIClient.events(decode=True)` returns: an iterator, closable from another thread."""

    def __init__(self) -> None:
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.closed = False

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._q.get()
        if item is None:
            raise StopIteration
        return item

    def push(self, item: dict[str, Any]) -> None:
        self._q.put(item)

    def close(self) -> None:
        self.closed = True
        self._q.put(None)


class FakeEngine:
    """The slice of `docker.APIClient` the source uses, scripted by the test."""

    api_version = "1.41"

    def __init__(self) -> None:
        self.running: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.streams: list[FakeStream] = []
        self.refuse = 0  # refuse this many connection attempts
        self.list_error: Exception | None = None  # raised by containers() while set
        self.gate: dict[str, threading.Event] = {}  # hold an inspect of this container
        self.inspecting = threading.Event()
        self.inspected = threading.Event()
        self.lock = threading.Lock()

    # factory for DockerSource(client_factory=...)
    def client(self) -> FakeClient:
        with self.lock:
            if self.refuse > 0:
                self.refuse -= 1
                self.calls.append("refused")
                raise ConnectionError("engine down")
        return FakeClient(self)

    def events(self, decode: bool, filters: dict[str, list[str]]) -> FakeStream:
        assert decode and "container" in filters["type"]
        self.calls.append("events")
        stream = FakeStream()
        self.streams.append(stream)
        return stream

    def containers(self) -> list[dict[str, Any]]:
        self.calls.append("containers")
        if self.list_error is not None:
            raise self.list_error
        return [{"Id": cid} for cid in self.running]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        data = self.running.get(cid)  # read now: a held inspect returns what was true *then*
        gate = self.gate.get(cid)
        if gate is not None:
            self.inspecting.set()
            gate.wait(10)
        try:
            if data is None:
                raise docker.errors.NotFound(f"no such container: {cid}")
            return data
        finally:
            if gate is not None:
                self.inspected.set()


class FakeClient:
    def __init__(self, engine: FakeEngine) -> None:
        self.api = engine

    def close(self) -> None:
        pass


Start = Callable[..., Awaitable[tuple[Catalog, DockerSource]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    sources: list[DockerSource] = []

    async def run(
        engine: FakeEngine, *, source_options: dict[str, Any] | None = None, **overrides: Any
    ) -> tuple[Catalog, DockerSource]:
        cat = Catalog()
        source = DockerSource(
            make_config(**overrides), cat, node="n", client_factory=engine.client,
            backoff_initial=0.01, backoff_max=0.05, **(source_options or {}),
        )
        await source.start()
        sources.append(source)
        return cat, source

    yield run
    for s in sources:
        await s.stop()


def ids(cat: Catalog) -> set[str]:
    return set(cat.snapshot.endpoints)


def state_of(cat: Catalog, eid: str) -> State | None:
    ep = cat.snapshot.endpoints.get(eid)
    return None if ep is None else ep.state


async def test_subscribes_before_listing(start: Start) -> None:
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web")
    cat, source = await start(engine)
    assert engine.calls[:2] == ["events", "containers"]
    assert source.connected
    await eventually(lambda: ids(cat) == {f"{A[:12]}-80"})


async def test_an_overtaken_inspect_never_resurrects_a_dead_container(start: Start) -> None:
    engine = FakeEngine()
    cat, source = await start(engine)
    engine.running[A] = attrs(A, "web")
    engine.gate[A] = threading.Event()
    engine.streams[-1].push(event(A, "start", name="web"))
    await asyncio.to_thread(engine.inspecting.wait, 5)  # the start's inspect is in flight, holding "running"

    del engine.running[A]
    handled = source.events
    engine.streams[-1].push(event(A, "die", exitCode="0"))
    await eventually(lambda: source.events > handled)  # the die was handled
    engine.gate[A].set()  # the stale "running" answer arrives after the die
    await eventually(lambda: source.inspections >= 1)  # ... and was looked at
    assert ids(cat) == set()


async def test_a_held_inspect_is_applied_when_nothing_overtook_it(start: Start) -> None:
    engine = FakeEngine()
    cat, _ = await start(engine)
    engine.running[A] = attrs(A, "web")
    engine.gate[A] = threading.Event()
    engine.streams[-1].push(event(A, "start", name="web"))
    await asyncio.to_thread(engine.inspecting.wait, 5)
    assert ids(cat) == set()
    engine.gate[A].set()
    await eventually(lambda: ids(cat) == {f"{A[:12]}-80"})


async def test_stream_end_reconnects_with_backoff_and_relists(start: Start) -> None:
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web")
    cat, source = await start(engine)
    await eventually(lambda: ids(cat) == {f"{A[:12]}-80"})

    # The stream ends; the engine refuses two reconnects; meanwhile A dies, B starts.
    engine.refuse = 2
    del engine.running[A]
    engine.running[B] = attrs(B, "api")
    engine.streams[-1].close()
    await eventually(lambda: source.sessions == 2, timeout=5)
    assert engine.calls.count("refused") == 2
    assert engine.calls[-2:] == ["events", "containers"]  # subscribe, then list, again
    await eventually(lambda: ids(cat) == {f"{B[:12]}-80"})
    assert source.connected


async def test_sigterm_drains_until_the_container_starts_again(start: Start) -> None:
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web", health="healthy")
    cat, source = await start(engine)
    eid = f"{A[:12]}-80"
    await eventually(lambda: state_of(cat, eid) is State.PASSING)
    stream = engine.streams[-1]

    stream.push(event(A, "kill", signal="1"))  # SIGHUP: a reload, not a stop
    stream.push(event(A, "pause"))
    engine.running[A] = {**attrs(A, "web", health="healthy"), "State": {**attrs(A, "web")["State"], "Paused": True}}
    await eventually(lambda: state_of(cat, eid) is State.CRITICAL)
    engine.running[A] = attrs(A, "web", health="healthy")
    stream.push(event(A, "unpause"))
    await eventually(lambda: state_of(cat, eid) is State.PASSING)

    stream.push(event(A, "kill", signal="15"))
    await eventually(lambda: state_of(cat, eid) is State.DRAINING)
    # A health change while stopping does not undo the drain.
    inspected = source.inspections
    engine.running[A] = attrs(A, "web", health="unhealthy")
    stream.push(event(A, "health_status: unhealthy"))
    await eventually(lambda: source.inspections > inspected)
    assert state_of(cat, eid) is State.DRAINING
    engine.running[A] = attrs(A, "web", health="healthy")
    stream.push(event(A, "health_status: healthy"))
    await eventually(lambda: source.inspections > inspected + 1)
    assert state_of(cat, eid) is State.DRAINING
    # Started again (docker restart): a fresh StartedAt, passing once more.
    engine.running[A] = attrs(A, "web", started="2026-01-01T00:05:00Z", health="healthy")
    stream.push(event(A, "start"))
    await eventually(lambda: state_of(cat, eid) is State.PASSING)


async def test_resync_without_changes_publishes_nothing(start: Start) -> None:
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web")
    engine.running[B] = attrs(B, "api")
    clock = FakeClock()
    cat, source = await start(engine, resync_interval=30.0, source_options={"clock": clock})
    await eventually(lambda: len(ids(cat)) == 2 and clock.sleepers == 1)  # the resync timer waits
    index, syncs = cat.snapshot.index, source.syncs
    await clock.advance(29.9)
    assert source.syncs == syncs  # not before its interval
    await clock.advance(30.0)
    await eventually(lambda: source.syncs == syncs + 1)
    await clock.advance(30.0)
    await eventually(lambda: source.syncs == syncs + 2)
    assert cat.snapshot.index == index
    # A container that vanished without an event is removed by the next resync.
    del engine.running[B]
    await clock.advance(30.0)
    await eventually(lambda: ids(cat) == {f"{A[:12]}-80"})


async def test_unreachable_engine_does_not_block_start(start: Start) -> None:
    engine = FakeEngine()
    engine.refuse = 3
    cat, source = await start(engine)
    assert not source.connected  # start returned after the first failed attempt
    engine.running[A] = attrs(A, "web")
    await eventually(lambda: source.connected and ids(cat) == {f"{A[:12]}-80"}, timeout=5)


@pytest.mark.parametrize(
    ("ev", "cid", "action"),
    [
        ({"Type": "container", "Action": "health_status: healthy", "Actor": {"ID": A}}, A, "health_status"),
        ({"Type": "network", "Action": "connect", "Actor": {"ID": "net", "Attributes": {"container": B}}}, B, "connect"),
        ({"status": "start", "id": A}, A, "start"),
        ({"Type": "network", "Action": "destroy", "Actor": {"ID": "net", "Attributes": {}}}, None, "destroy"),
    ],
)
def test_event_parsing(ev: dict[str, Any], cid: str | None, action: str) -> None:
    assert event_container_id(ev) == cid
    assert event_action(ev) == action


async def test_a_container_the_parser_chokes_on_is_ignored_not_fatal(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The label parser promises never to raise; should a bug break that promise,
    the one container is ignored and the session (and every other container) goes on."""
    from beacon.registry import docker as docker_module

    real = docker_module.container_endpoints

    def parser(attrs: dict[str, Any], options: Any) -> Any:
        if attrs["Id"] == A:
            raise ValueError("invalid literal for int() with base 10: '²'")
        return real(attrs, options)

    monkeypatch.setattr(docker_module, "container_endpoints", parser)
    caplog.set_level(logging.INFO, "beacon.registry.docker")
    engine = FakeEngine()
    engine.running[A] = attrs(A, "bad")  # listed first: it used to end the session before B
    engine.running[B] = attrs(B, "good")
    cat, source = await start(engine)
    await eventually(lambda: ids(cat) == {f"{B[:12]}-80"}, timeout=5)
    assert source.connected and source.sessions == 1
    assert engine.calls.count("events") == 1  # no reconnect loop
    assert any("ignored:" in r.message and A[:12] in r.message and "ValueError" in r.message for r in caplog.records)


async def test_a_failing_resync_replaces_a_silent_events_stream(start: Start) -> None:
    """A half-open events stream (tcp DOCKER_HOST, a partition) never ends by itself;
    the failing resync is the only sign, and it must start a new session."""
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web")
    cat, source = await start(engine, resync_interval=1.0)
    await eventually(lambda: ids(cat) == {f"{A[:12]}-80"})
    silent = engine.streams[-1]
    # Partitioned: the stream stays open but says nothing, and A dies unseen.
    engine.list_error = ConnectionError("connection timed out")
    del engine.running[A]
    await eventually(lambda: not source.connected, timeout=5)
    assert silent.closed
    engine.list_error = None  # the engine is back: subscribe, list, and A is gone
    await eventually(lambda: source.connected and source.sessions == 2, timeout=5)
    await eventually(lambda: ids(cat) == set())


async def test_a_container_that_survives_sigterm_stops_draining_after_its_stop_timeout(start: Start) -> None:
    """SIGTERM without a stop (`docker kill -s TERM`, an app that reloads on TERM):
    once the container outlived its StopTimeout plus a margin, it is not stopping."""
    engine = FakeEngine()
    survivor = attrs(A, "web")
    survivor["Config"]["StopTimeout"] = 0  # docker stop would have killed it at once
    engine.running[A] = survivor
    stopping = attrs(B, "api")
    stopping["Config"]["StopTimeout"] = 30  # still inside its grace period
    engine.running[B] = stopping
    clock = FakeClock()
    cat, source = await start(engine, source_options={"drain_margin": 5.0, "clock": clock})
    ea, eb = f"{A[:12]}-80", f"{B[:12]}-80"
    await eventually(lambda: state_of(cat, ea) is State.PASSING and state_of(cat, eb) is State.PASSING)
    engine.streams[-1].push(event(A, "kill", signal="15"))
    engine.streams[-1].push(event(B, "kill", signal="SIGTERM"))
    await eventually(lambda: state_of(cat, ea) is State.DRAINING and state_of(cat, eb) is State.DRAINING)
    await clock.advance(4.9)  # A's grace is 0 s + 5 s margin: not over yet
    assert state_of(cat, ea) is State.DRAINING
    await clock.advance(0.2)
    await eventually(lambda: state_of(cat, ea) is State.PASSING)
    await clock.advance(29.0)  # B's grace is 30 s + 5 s: still inside it
    await eventually(lambda: source.inspections >= 1)
    assert state_of(cat, eb) is State.DRAINING
    await clock.advance(1.0)
    await eventually(lambda: state_of(cat, eb) is State.PASSING)
    # A later SIGTERM drains it again.
    engine.streams[-1].push(event(A, "kill", signal="15"))
    await eventually(lambda: state_of(cat, ea) is State.DRAINING)


async def test_a_network_attach_that_changes_the_address_is_warned(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    engine.running[A] = attrs(A, "web")
    cat, _ = await start(engine, address_mode="internal")
    eid = f"{A[:12]}-80"
    await eventually(lambda: (ep := cat.snapshot.endpoints.get(eid)) is not None and ep.address == "172.17.0.9")
    # `docker network connect app web`: the first network by name is now "app".
    moved = attrs(A, "web")
    moved["NetworkSettings"]["Networks"] = {"bridge": {"IPAddress": "172.17.0.9"}, "app": {"IPAddress": "10.9.0.5"}}
    engine.running[A] = moved
    with caplog.at_level(logging.WARNING, logger="beacon.registry.docker"):
        engine.streams[-1].push({"Type": "network", "Action": "connect", "Actor": {"ID": "n" * 64,
                                 "Attributes": {"container": A, "name": "app"}}})
        await eventually(lambda: cat.snapshot.endpoints[eid].address == "10.9.0.5")
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("moved:")]
    assert warnings == [f"moved: {A[:12]} web endpoint {eid} address 172.17.0.9 -> 10.9.0.5 (network attached "
                        "or detached? pin it with label beacon.network, --network or beacon.address)"]


async def test_a_container_without_published_ports_is_logged_once_at_debug_with_a_hint(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    private = attrs(A, "worker")
    private["NetworkSettings"]["Ports"] = {"80/tcp": None}  # exposed, not published
    engine.running[A] = private
    with caplog.at_level(logging.DEBUG, logger="beacon.registry.docker"):
        cat, source = await start(engine)
        await eventually(lambda: source.syncs >= 1)  # the first list saw it
        for _ in range(2):  # later events about it do not repeat the line
            engine.streams[-1].push(event(A, "start", name="worker"))
        await eventually(lambda: source.inspections >= 2)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("ignored:")]
    assert lines == [("DEBUG", f"ignored: {A[:12]} worker: no published port "
                               "(publish a port or use --address-mode internal)")]
    assert ids(cat) == set()
