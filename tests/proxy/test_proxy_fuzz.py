"""Fuzzing the request side: whatever bytes arrive, in whatever pieces, the proxy
answers with a well-formed HTTP error (or nothing) and never raises.

The transport is the seam: a fake that records writes. Every endpoint is
critical, so a request that parses and routes gets a 503 without any network.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacon.proxy.core import ProxyCore
from beacon.proxy.downstream import ClientConnection
from beacon.registry import Catalog, State
from tests.helpers import test_config
from tests.proxy.proxytest import FakeTransport, ep

ALLOWED = {100, 400, 404, 405, 408, 413, 417, 431, 503}
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def make_core() -> tuple[asyncio.AbstractEventLoop, ProxyCore]:
    loop = asyncio.new_event_loop()
    cat = Catalog()
    cat.set_source("m:web", [ep("w", 9, "web", state=State.CRITICAL, http_hosts=("*.example.com",))])
    core = ProxyCore(test_config(proxy_max_header_size=4096, proxy_max_body_size=1000), loop)
    core.apply(cat.publish())
    return loop, core


LOOP, CORE = make_core()


def feed(pieces: list[bytes]) -> bytes:
    conn = ClientConnection(CORE)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        if transport.closing:
            break
        conn.data_received(piece)
    conn.connection_lost(None)
    assert not CORE.clients
    return b"".join(transport.written)


def statuses(out: bytes) -> Iterator[int]:
    for m in STATUS.finditer(out):
        yield int(m.group(1))


def check(out: bytes) -> None:
    assert b"Traceback" not in out
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:80]
        found = list(statuses(out))
        assert found and set(found) <= ALLOWED, found


METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"G\x00T", b"", b"get"])
TARGETS = st.sampled_from([b"/", b"/a?b=c", b"*", b"http://web.localhost/x", b"https://a.example.com", b"", b"/\r\n",
                           b"/" + b"a" * 5000, b"/%00"])  # fmt: skip
HEADER_NAMES = st.sampled_from([b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
                                b"Upgrade", b"X-Forwarded-For", b"X-Request-Id", b"Cookie", b"X Bad", b"", b"Te",
                                b"X-A\r\nX-B"])  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from([b"web.localhost", b"a.example.com", b"chunked", b"gzip, chunked", b"chunked, gzip", b"5", b"-1",
                     b"99999999999999999999", b"100-continue", b"keep-alive, Upgrade", b"websocket", b"close",
                     b"\x00", b"a\rb", b" x ", b"x" * 5000]),
    st.binary(max_size=20),
)  # fmt: skip
REQUEST = st.builds(
    lambda m, t, hs, body, version: m + b" " + t + b" " + version + b"\r\n"
    + b"".join(n + b": " + v + b"\r\n" for n, v in hs) + b"\r\n" + body,
    METHODS,
    TARGETS,
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
    st.one_of(st.just(b""), st.binary(max_size=50), st.just(b"5\r\nhello\r\n0\r\n\r\n"), st.just(b"z\r\n")),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]),
)  # fmt: skip


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(REQUEST, min_size=1, max_size=3), st.lists(st.integers(min_value=0), max_size=6))
def test_mutated_requests_in_random_pieces_get_clean_answers(requests: list[bytes], cuts: list[int]) -> None:
    data = b"".join(requests)
    check(feed(split(data, cuts)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=4))
def test_random_bytes_get_clean_answers(data: bytes, cuts: list[int]) -> None:
    check(feed(split(data, cuts)))


def test_valid_requests_reach_routing() -> None:
    out = feed([b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n", b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n"])
    assert list(statuses(out)) == [503, 404]
