"""Retries, passive health, timeouts, slow clients, draining and graceful shutdown."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from beacon.registry import Catalog, State
from tests.helpers import eventually
from tests.proxy.proxytest import (
    ManualClock,
    backends,
    connect,
    ep,
    free_port,
    in_flight,
    open_connections,
    proxy_server,
    put,
    raw_backend,
    raw_request,
    read_response,
    stat,
    url,
)

CLOSE = b"Connection: close\r\n"


async def get(session: aiohttp.ClientSession, target: str, host: str = "web.localhost") -> tuple[int, str]:
    async with session.get(target, headers={"Host": host}) as r:
        return r.status, await r.text()


async def test_a_refused_connect_is_retried_on_another_endpoint() -> None:
    cat = Catalog()
    async with backends("live") as (live,), proxy_server(cat, eject_consecutive_failures=1000) as proxy:
        put(cat, "m:web", ep("dead", free_port()), ep("live", live.port))
        async with aiohttp.ClientSession() as s:
            results = [await get(s, url(proxy)) for _ in range(10)]
        assert all(status == 200 for status, _ in results), results
        retries = stat(proxy, "web", "retries")
        assert retries >= 4  # round robin sent about half to the dead port first
        assert stat(proxy, "web", "attempts") == 10 + retries


async def test_only_dead_endpoints_is_a_502_and_one_of_them_is_never_tried_twice_in_a_row() -> None:
    cat = Catalog()
    async with proxy_server(cat, proxy_attempts=5) as proxy:
        put(cat, "m:one", ep("dead1", free_port(), "one"))
        put(cat, "m:two", ep("dead2", free_port(), "two"), ep("dead3", free_port(), "two"))
        async with aiohttp.ClientSession() as s:
            status, body = await get(s, url(proxy), "one.localhost")
            assert status == 502 and "one" in body
            status, body = await get(s, url(proxy), "two.localhost")
            assert status == 502
        # one endpoint: one attempt (no retry to itself); two: they alternate up to the attempt limit
        assert stat(proxy, "one", "attempts") == 1
        assert stat(proxy, "two", "attempts") == 5


async def test_slow_upstream_is_a_504_after_the_try_timeout() -> None:
    cat = Catalog()
    async with backends("slow") as (slow,), proxy_server(cat, proxy_try_timeout=0.5, proxy_connect_timeout=0.5) as proxy:
        put(cat, "m:web", ep("slow", slow.port))
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            status, body = await get(s, url(proxy, "/slow?s=3"))
            elapsed = time.monotonic() - started
    assert status == 504 and "timed out" in body
    assert 0.4 < elapsed < 2.5


def resetting(counter: list[bytes]) -> object:
    """A raw backend that reads a request and resets the connection without answering."""

    def handler(head: bytes, transport: asyncio.Transport) -> None:
        counter.append(head.split(b"\r\n", 1)[0])
        transport.abort()

    return handler


async def test_idempotent_request_reset_before_any_byte_is_retried() -> None:
    heads: list[bytes] = []
    broken = await raw_backend(resetting(heads))  # type: ignore[arg-type]
    cat = Catalog()
    try:
        async with backends("good") as (good,), proxy_server(cat, eject_consecutive_failures=1000) as proxy:
            put(cat, "m:web", ep("broken", broken.port), ep("good", good.port))
            async with aiohttp.ClientSession() as s:
                results = [await get(s, url(proxy, f"/g{i}")) for i in range(6)]
            assert [status for status, _ in results] == [200] * 6
            assert len(heads) >= 2  # the broken one saw requests and they were retried
            assert len(good.requests) == 6
    finally:
        await broken.stop()


async def test_a_non_idempotent_request_is_never_sent_twice() -> None:
    heads1: list[bytes] = []
    heads2: list[bytes] = []
    b1 = await raw_backend(resetting(heads1))  # type: ignore[arg-type]
    b2 = await raw_backend(resetting(heads2))  # type: ignore[arg-type]
    cat = Catalog()
    try:
        async with proxy_server(cat, proxy_attempts=3, eject_consecutive_failures=1000) as proxy:
            put(cat, "m:web", ep("r1", b1.port), ep("r2", b2.port))
            assert proxy.address is not None
            raw = await raw_request(proxy.address, b"POST /pay HTTP/1.1\r\nHost: web.localhost\r\n"
                                    b"Content-Length: 5\r\n" + CLOSE + b"\r\nhello")  # fmt: skip
            assert raw.startswith(b"HTTP/1.1 502 ")
            assert heads1 + heads2 == [b"POST /pay HTTP/1.1"]  # exactly once, though another endpoint remained
            heads1.clear()
            heads2.clear()
            raw = await raw_request(proxy.address, b"PUT /put HTTP/1.1\r\nHost: web.localhost\r\n"
                                    b"Content-Length: 5\r\n" + CLOSE + b"\r\nhello")  # fmt: skip
            assert raw.startswith(b"HTTP/1.1 502 ")
            # PUT is idempotent: three attempts, alternating, never the same endpoint twice in a row
            assert sorted([len(heads1), len(heads2)]) == [1, 2]
            assert set(heads1 + heads2) == {b"PUT /put HTTP/1.1"}
    finally:
        await b1.stop()
        await b2.stop()


async def test_consecutive_gateway_errors_eject_an_endpoint_which_returns_later() -> None:
    def unavailable(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    bad = await raw_backend(unavailable)
    cat = Catalog()
    clock = ManualClock()
    try:
        # (a short header timeout makes the sweeper, which reads the clock, tick often)
        async with backends("good") as (good,), proxy_server(
            cat, clock, eject_consecutive_failures=3, eject_base_time=30.0, proxy_header_timeout=0.2
        ) as proxy:
            put(cat, "m:web", ep("bad", bad.port, "web"), ep("good", good.port, "web"))
            async with aiohttp.ClientSession() as s:
                statuses = [(await get(s, url(proxy)))[0] for _ in range(20)]
                assert statuses.count(503) == 3  # the upstream's answer passes through...
                assert len(bad.heads) == 3  # ...three times in a row, then it is ejected
                assert len(good.requests) == 17
                assert stat(proxy, "web", "ejections") == 1
                clock.advance(29.0)  # still ejected just before its time is up
                await asyncio.sleep(0.2)  # one sweeper tick: the proxy reads the clock
                for _ in range(4):
                    await get(s, url(proxy))
                assert len(bad.heads) == 3
                clock.advance(1.5)  # back after its ejection time
                for _ in range(40):  # bounded: until a sweeper tick has seen the new time
                    await get(s, url(proxy))
                    if len(bad.heads) > 3:
                        break
                    await asyncio.sleep(0.05)
                assert len(bad.heads) > 3
    finally:
        await bad.stop()


async def test_ejection_never_takes_more_than_the_allowed_share_of_a_pool() -> None:
    cat = Catalog()
    async with backends("b1", "b2") as (b1, b2), proxy_server(
        cat, eject_consecutive_failures=2, eject_max_percent=0.5, eject_base_time=30.0
    ) as proxy:
        put(cat, "m:web", ep("b1", b1.port), ep("b2", b2.port))
        async with aiohttp.ClientSession() as s:
            statuses = {(await get(s, url(proxy, "/status/502")))[0] for _ in range(12)}
        assert statuses == {502}  # the upstream's own 502s pass through
        # both failing, yet one always stays in the pool
        assert len(b1.requests) + len(b2.requests) == 12
        assert min(len(b1.requests), len(b2.requests)) == 2
        assert stat(proxy, "web", "ejections") == 1


async def test_slowloris_header_is_cut_off_by_the_header_timeout() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_header_timeout=0.6) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        reader, writer = await connect(proxy)
        writer.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")
        started = time.monotonic()
        closed_after = None
        for i in range(40):  # a header line every 0.1 s: never complete
            try:
                writer.write(b"X-Drip-%d: x\r\n" % i)
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
            if reader.at_eof() or writer.is_closing():
                break
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.01)
            except TimeoutError:
                continue
            if data.startswith(b"HTTP/1.1 408") or not data:
                closed_after = time.monotonic() - started
                break
        writer.close()
        assert closed_after is not None and closed_after < 2.0
        # An idle connection that never sends anything is closed too.
        idle = await raw_request(proxy.address, b"", timeout=3)
        assert idle == b"" or idle.startswith(b"HTTP/1.1 408")
    assert web.requests == []


async def test_an_idle_keep_alive_client_is_closed_after_the_idle_timeout() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_idle_timeout=0.5) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        reader, writer = await connect(proxy)
        writer.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        await asyncio.wait_for(reader.read(-1), 3)  # the body, then EOF when the proxy closes
        assert time.monotonic() - started < 2.0
        writer.close()


async def test_a_draining_endpoint_finishes_in_flight_requests_but_gets_no_new_ones() -> None:
    cat = Catalog()
    async with backends("old", "new") as (old, new), proxy_server(cat) as proxy:
        put(cat, "m:old", ep("old", old.port))
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(get(s, url(proxy, "/slow?s=1")))
            await asyncio.sleep(0.3)
            put(cat, "m:old", ep("old", old.port, state=State.DRAINING))
            put(cat, "m:new", ep("new", new.port))
            quick = [await get(s, url(proxy)) for _ in range(4)]
            status, body = await in_flight
        assert (status, body) == (200, "slow from old")
        assert all(st == 200 and '"backend": "new"' in b for st, b in quick)


async def test_graceful_shutdown_finishes_in_flight_and_stops_accepting() -> None:
    cat = Catalog()
    async with backends("web") as (web,):
        async with proxy_server(cat, shutdown_timeout=5.0) as proxy:
            put(cat, "m:web", ep("web1", web.port))
            assert proxy.address is not None
            address = proxy.address
            async with aiohttp.ClientSession() as s:
                in_flight = asyncio.ensure_future(get(s, url(proxy, "/slow?s=1")))
                idle_reader, idle_writer = await asyncio.open_connection(address.host, address.port)
                await asyncio.sleep(0.3)
                started = time.monotonic()
                stopping = asyncio.ensure_future(proxy.stop())
                await asyncio.sleep(0.1)
                refused = False
                try:
                    _, w = await asyncio.open_connection(address.host, address.port)
                    w.close()
                except OSError:
                    refused = True
                assert await idle_reader.read(-1) == b""  # an idle connection is closed at once
                idle_writer.close()
                assert await in_flight == (200, "slow from web")
                await stopping
                took = time.monotonic() - started
        assert refused
        assert 0.5 < took < 4.0


async def test_shutdown_is_bounded_by_the_timeout() -> None:
    cat = Catalog()
    async with backends("web") as (web,):
        async with proxy_server(cat, shutdown_timeout=0.5) as proxy:
            put(cat, "m:web", ep("web1", web.port))
            async with aiohttp.ClientSession() as s:
                in_flight = asyncio.ensure_future(get(s, url(proxy, "/slow?s=5")))
                await asyncio.sleep(0.3)
                started = time.monotonic()
                await proxy.stop()
                took = time.monotonic() - started
                try:
                    await in_flight
                    failed = False
                except aiohttp.ClientError:
                    failed = True
        assert failed and took < 1.5


async def test_client_gone_mid_request_frees_the_upstream() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        _, writer = await connect(proxy)
        writer.write(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        await asyncio.sleep(0.2)
        await eventually(lambda: in_flight(proxy, "web") == 1)
        writer.transport.abort()
        await eventually(lambda: in_flight(proxy, "web") == 0 and open_connections(proxy, "client") == 0)
        ok = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n" + CLOSE + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200")


async def test_a_connect_timeout_is_retried_elsewhere_and_alone_is_a_504() -> None:
    import socket

    # A listener whose accept queue is full: the kernel drops further SYNs, so
    # connects hang - a black hole on loopback.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())
    cat = Catalog()
    try:
        async with backends("live") as (live,), proxy_server(
            cat, proxy_connect_timeout=0.3, proxy_try_timeout=2.0, eject_consecutive_failures=1000
        ) as proxy:
            put(cat, "m:web", ep("hole", hole.getsockname()[1]), ep("live", live.port))
            put(cat, "m:lost", ep("hole2", hole.getsockname()[1], "lost"))
            async with aiohttp.ClientSession() as s:
                started = time.monotonic()
                results = [await get(s, url(proxy)) for _ in range(4)]
                assert [st for st, _ in results] == [200] * 4
                assert time.monotonic() - started < 3.0  # at most ~0.3 s lost per black-holed try
                started = time.monotonic()
                status, body = await get(s, url(proxy), "lost.localhost")
                assert status == 504 and "timeout" in body
                assert time.monotonic() - started < 2.0
    finally:
        filler.close()
        hole.close()


async def test_a_failing_timeout_handler_does_not_stop_the_sweeper(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from beacon.proxy import downstream

    original = downstream.ClientConnection.timed_out
    calls: list[object] = []

    def faulty_once(self: downstream.ClientConnection) -> None:
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("injected fault in a timeout handler")
        original(self)

    monkeypatch.setattr(downstream.ClientConnection, "timed_out", faulty_once)
    cat = Catalog()
    async with proxy_server(cat, proxy_header_timeout=0.3) as proxy:
        assert proxy.address is not None
        # The first silent connection's timeout handler raises: that connection
        # is closed anyway, and the sweeper keeps watching the next one.
        first = await raw_request(proxy.address, b"", timeout=3)
        second = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n", timeout=3)
    assert first == b""
    assert second.startswith(b"HTTP/1.1 408 ")
    assert len(calls) >= 2
    assert any(r.getMessage().startswith("failed: proxy timeout") for r in caplog.records)


async def test_a_small_response_cut_off_after_its_head_is_retried_not_truncated() -> None:
    # A backend process killed between writing the head and the body (docker
    # stop kills busybox httpd's per-request children mid-write): the client
    # must get a whole response from another endpoint, not a cut-off one.
    def head_then_reset(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n")
        asyncio.get_running_loop().call_later(0.05, transport.abort)

    dying = await raw_backend(head_then_reset)
    cat = Catalog()
    try:
        async with backends("good") as (good,), proxy_server(cat, eject_consecutive_failures=1000) as proxy:
            put(cat, "m:web", ep("dying", dying.port), ep("good", good.port))
            async with aiohttp.ClientSession() as s:
                results = [await get(s, url(proxy, f"/r{i}")) for i in range(4)]
            assert [status for status, _ in results] == [200] * 4
            assert all('"backend": "good"' in body for _, body in results)
            assert len(dying.heads) >= 1  # it was tried, and its half answer never reached a client
    finally:
        await dying.stop()


async def test_a_try_waiting_on_an_endpoint_that_leaves_the_catalog_is_retried_at_once() -> None:
    # A connection accepted for a backend that is going away (docker-proxy in
    # front of a container being stopped) may never answer: once the endpoint
    # leaves the catalog, its waiting tries go elsewhere instead of waiting
    # out the 30 s try timeout.
    silent = await raw_backend(lambda head, transport: None)
    cat = Catalog()
    try:
        async with backends("good") as (good,), proxy_server(cat, eject_consecutive_failures=1000) as proxy:
            put(cat, "m:silent", ep("silent", silent.port))
            async with aiohttp.ClientSession() as s:
                waiting = asyncio.ensure_future(get(s, url(proxy, "/w")))
                await eventually(lambda: len(silent.heads) == 1)
                put(cat, "m:good", ep("good", good.port))
                cat.remove_source("m:silent")
                cat.publish()
                status, body = await asyncio.wait_for(waiting, 5)
            assert status == 200 and '"backend": "good"' in body
    finally:
        await silent.stop()


async def test_a_slow_client_body_is_a_408_and_never_counts_against_the_endpoint() -> None:
    # POST with Content-Length 100 and a body that trickles: the try timeout
    # runs out while the client is still sending - the client's fault.
    cat = Catalog()
    clock = ManualClock()
    async with backends("web") as (web,), proxy_server(
        cat, clock, proxy_try_timeout=30.0, proxy_header_timeout=0.2, eject_consecutive_failures=1
    ) as proxy:
        put(cat, "m:web", ep("web1", web.port), ep("web2", web.port))
        for _ in range(2):  # one failure would eject either endpoint
            reader, writer = await connect(proxy)
            writer.write(b"POST /upload HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 100\r\n\r\nx")
            await eventually(lambda: in_flight(proxy, "web") == 1)
            for _ in range(7):  # a byte every 5 s (of the proxy's clock): past the 30 s try timeout
                clock.advance(5.0)
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)  # pacing: the proxy reads the byte and ticks before time moves on
            answer = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        assert stat(proxy, "web", "ejections") == 0
        assert in_flight(proxy, "web") == 0
        ok = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n" + CLOSE + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")


async def test_the_connection_cap_refuses_busy_overflow_and_makes_room_from_idle_keep_alive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_max_connections=3) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        busy = [await connect(proxy) for _ in range(3)]
        for _, w in busy:
            w.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")  # a head in progress: not idle
        await eventually(lambda: open_connections(proxy, "client") == 3)
        for _ in range(2):
            refused = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 503 ") and b"too many connections" in refused
        assert sum("proxy connections at the cap" in r.getMessage() for r in caplog.records) == 1  # logged once
        # Idle keep-alive connections make room: the oldest idle one is closed for a new one.
        for r, w in busy:
            w.write(b"\r\n")
            assert (await read_response(r))[0] == 200
        ok = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n" + CLOSE + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ")
        await eventually(lambda: open_connections(proxy, "client") == 2)  # one idle connection was closed
        for _, w in busy:
            w.close()


class _ClosingBackend(asyncio.Protocol):
    """Answers one request per connection with Connection: close (a backend at
    its keepalive_requests limit); records when connections open and requests come."""

    events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("open")

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.events.append("request")
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")  # type: ignore[attr-defined]
            self.transport.close()


async def test_a_connection_the_backend_closes_is_replaced_ahead_of_the_next_request() -> None:
    _ClosingBackend.events = []
    server = await asyncio.get_running_loop().create_server(_ClosingBackend, "127.0.0.1", 0)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:web", ep("web1", server.sockets[0].getsockname()[1]))
            reader, writer = await connect(proxy)
            for _ in range(3):
                writer.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
                assert (await read_response(reader))[2] == b"ok"
                # the replacement is opened before the client asks again
                await eventually(lambda: _ClosingBackend.events[-1] == "open")
            writer.close()
    finally:
        server.close()
    # every request after the first found a connection already open
    assert _ClosingBackend.events[:4] == ["open", "request", "open", "request"]
    assert _ClosingBackend.events.count("request") == 3
