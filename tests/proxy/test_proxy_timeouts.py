"""Client-side timeouts driven by a clock the test moves: no waiting, and a
timeout that fires early or late fails the test.

The core runs without its timer; `ProxyCore.tick()` is what the timer calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from beacon.proxy.core import ProxyCore
from beacon.proxy.downstream import ClientConnection
from beacon.registry import Catalog, State
from tests.helpers import test_config
from tests.proxy.proxytest import FakeTransport, ManualClock, ep


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_core(loop: asyncio.AbstractEventLoop, clock: ManualClock, **overrides: object) -> ProxyCore:
    cat = Catalog()
    cat.set_source("m:web", [ep("w", 9, "web", state=State.CRITICAL)])
    core = ProxyCore(test_config(**overrides), loop, clock=clock)
    core.apply(cat.publish())
    return core


def open_client(core: ProxyCore) -> tuple[ClientConnection, FakeTransport]:
    conn = ClientConnection(core)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_the_header_timeout_fires_at_its_deadline_and_not_before(loop: asyncio.AbstractEventLoop) -> None:
    clock = ManualClock()
    core = make_core(loop, clock, proxy_header_timeout=10.0)
    conn, transport = open_client(core)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")
    clock.advance(9.9)
    core.tick()
    assert transport.output() == b"" and not transport.closing
    clock.advance(0.2)
    core.tick()
    assert transport.output().startswith(b"HTTP/1.1 408 ") and transport.closing


def test_an_idle_keep_alive_connection_closes_at_the_idle_timeout(loop: asyncio.AbstractEventLoop) -> None:
    clock = ManualClock()
    core = make_core(loop, clock, proxy_idle_timeout=60.0, proxy_header_timeout=10.0)
    conn, transport = open_client(core)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")  # answered at once: 503
    assert transport.output().startswith(b"HTTP/1.1 503 ") and not transport.closing
    clock.advance(59.0)
    core.tick()
    assert not transport.closing  # the header timeout does not apply between requests
    clock.advance(1.5)
    core.tick()
    assert transport.closing
    conn.connection_lost(None)
    assert not core.clients
