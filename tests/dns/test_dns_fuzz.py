"""Fuzzing the packet handler with hypothesis: random bytes and mutated valid
queries never raise, never log a failure, and never stop the server answering.

Two layers: the handler itself (fast, thousands of cases), and a real server
on uvloop in a background thread, fed over UDP and TCP, checked after every
case with a valid query.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Iterator

import dns.message
import dns.query
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacon.dns import DnsServer
from beacon.dns.cache import Forward
from beacon.registry import Catalog, State
from tests.dns.dnstest import ep, put
from tests.helpers import test_config as make_config

NAMES = ["web.service.beacon", "_web._tcp.service.beacon", "v1.web.service.beacon", "beacon",
         "web-1.container.beacon", "1.0.0.10.in-addr.arpa", "0a000001.addr.beacon", "example.com"]  # fmt: skip
TYPES = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "ANY", "TXT", "AXFR"]


def catalog() -> Catalog:
    cat = Catalog()
    put(
        cat, "web",
        ep("w1", "10.0.0.1", container="web-1", tags=("v1",)), ep("w2", "fd00::2", port=81),
        ep("w3", "10.0.0.3", state=State.WARNING),
    )  # fmt: skip
    return cat


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    if draw(st.booleans()):
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    edns = draw(st.sampled_from([-1, 0, 1]))
    q = dns.message.make_query(
        name, draw(st.sampled_from(TYPES)), use_edns=edns, payload=draw(st.integers(0, 65535)),
        id=draw(st.integers(0, 65535)),
    )  # fmt: skip
    return q.to_wire()


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_queries()))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "pointer"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "pointer" and len(data) > 13:
            # a compression pointer aimed anywhere, itself included
            target = draw(st.integers(0, len(data)))
            data[pos : pos + 2] = struct.pack("!H", 0xC000 | (target & 0x3FFF))
    return bytes(data)


packets = st.one_of(st.binary(max_size=600), valid_queries(), mutated_queries())


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    logger = logging.getLogger("beacon")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=packets, tcp=st.booleans())
def test_packet_handler_never_raises(data: bytes, tcp: bool, errors: _Errors) -> None:
    server = DnsServer(make_config(dns_recursors=()), catalog(), metrics_registry=None)
    for _ in range(2):  # a miss, then the case-folded entry it cached
        result = server._miss(data, "127.0.0.1", tcp=tcp)
        assert result is None or isinstance(result, bytes | Forward)
        if isinstance(result, bytes):
            assert len(result) >= 12 and result[:2] == data[:2] and result[2] & 0x80
            if not tcp:
                assert len(result) <= 4096
    assert not errors.records, [r.getMessage() for r in errors.records]


class _ThreadedServer:
    """A DnsServer on its own uvloop in a thread, as `beacon run` runs it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = DnsServer(make_config(dns_recursors=()), catalog(), metrics_registry=None)
        self.loop_errors: list[dict[str, object]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _ThreadedServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[_ThreadedServer]:
    with _ThreadedServer() as srv:
        yield srv


def _still_answers(addr: tuple[str, int], qid: int) -> None:
    query = dns.message.make_query("web.service.beacon", "A", id=qid)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query.to_wire(), addr)
        reply = dns.message.from_wire(s.recv(4096))
    assert reply.id == qid and sorted(rd.address for rd in reply.answer[0]) == ["10.0.0.1", "10.0.0.3"]
    with socket.create_connection(addr, timeout=2) as c:
        dns.query.send_tcp(c, query)
        reply, _ = dns.query.receive_tcp(c)
    assert reply.id == qid and sorted(rd.address for rd in reply.answer[0]) == ["10.0.0.1", "10.0.0.3"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=packets, qid=st.integers(0, 65535))
def test_live_server_survives_anything_over_udp_and_tcp(
    data: bytes, qid: int, live: _ThreadedServer, errors: _Errors
) -> None:
    addr = (live.server.addresses[0].host, live.server.addresses[0].port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, addr)
    with socket.create_connection(addr, timeout=2) as c:
        c.sendall(struct.pack("!H", len(data)) + data)
    _still_answers(addr, qid)
    assert not live.loop_errors, live.loop_errors
    assert not errors.records, [r.getMessage() for r in errors.records]
