"""Shared pieces of the DNS tests: endpoints, a running server, real clients,
and a scripted upstream resolver (the forwarding seam) built on dnslib."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import dns.asyncquery
import dns.message
import dns.rdatatype
from dnslib import QTYPE, RR, A, DNSRecord
from prometheus_client.registry import CollectorRegistry

from beacon.config import HostPort
from beacon.dns import DnsServer
from beacon.registry import Catalog, Endpoint, Source, State
from tests.helpers import test_config


def ep(
    eid: str,
    address: str,
    service: str = "web",
    *,
    port: int = 80,
    state: State = State.PASSING,
    container: str | None = None,
    **kw: Any,
) -> Endpoint:
    source = Source("container", container_id=eid, container_name=container) if container else Source("manual")
    return Endpoint(id=eid, service=service, address=address, port=port, source=source, state=state, **kw)


def put(catalog: Catalog, key: str, *endpoints: Endpoint) -> None:
    catalog.set_source(key, endpoints)
    catalog.publish()


@asynccontextmanager
async def dns_server(catalog: Catalog | None = None, **overrides: Any) -> AsyncIterator[DnsServer]:
    """A started DnsServer on 127.0.0.1:0 with its own metrics registry."""
    server = DnsServer(test_config(**overrides), catalog or Catalog(), metrics_registry=CollectorRegistry())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _query(
    send: Callable[..., Awaitable[dns.message.Message]],
    server: DnsServer | HostPort,
    name: str,
    rdtype: str,
    timeout: float,
    source: str | None,
    make: dict[str, Any],
) -> dns.message.Message:
    addr = server if isinstance(server, HostPort) else server.addresses[0]
    q = dns.message.make_query(name, rdtype, **make)
    return await send(q, addr.host, port=addr.port, timeout=timeout, source=source)


async def udp(
    server: DnsServer | HostPort,
    name: str,
    rdtype: str = "A",
    *,
    timeout: float = 2.0,
    source: str | None = None,
    **make: Any,
) -> dns.message.Message:
    return await _query(dns.asyncquery.udp, server, name, rdtype, timeout, source, make)


async def tcp(
    server: DnsServer | HostPort,
    name: str,
    rdtype: str = "A",
    *,
    timeout: float = 2.0,
    source: str | None = None,
    **make: Any,
) -> dns.message.Message:
    return await _query(dns.asyncquery.tcp, server, name, rdtype, timeout, source, make)


def addresses(msg: dns.message.Message) -> list[str]:
    """The A/AAAA addresses of the answer section, in order."""
    return [rd.address for rrset in msg.answer for rd in rrset if rrset.rdtype in (1, 28)]


async def raw_udp(addr: HostPort, payload: bytes, *, timeout: float = 0.5) -> bytes | None:
    """Send raw bytes; the reply or None when nothing came back within `timeout`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, payload, (addr.host, addr.port))
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except TimeoutError:
            return None
    finally:
        sock.close()


class FakeUpstream:
    """A scripted upstream resolver on loopback (default 127.0.0.1:0), UDP and TCP:
    the forwarding seam.

    Answers A queries for `records`, NXDOMAIN otherwise; `rcode` forces a
    response code, `many` answers a name with that many A records (a big
    answer), `delay` holds every answer back, `silent` never answers,
    `wrong_question` answers with a different question (a spoof to ignore).
    """

    def __init__(
        self,
        records: dict[str, str] | None = None,
        *,
        many: dict[str, int] | None = None,
        delay: float = 0.0,
        rcode: int | None = None,
        silent: bool = False,
        wrong_question: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.records = {k.rstrip(".").lower(): v for k, v in (records or {}).items()}
        self.many = {k.rstrip(".").lower(): v for k, v in (many or {}).items()}
        self.delay = delay
        self.rcode = rcode
        self.silent = silent
        self.wrong_question = wrong_question
        self.queries: list[tuple[str, str]] = []  # (transport, qname)
        self.address = HostPort(host, port)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, data: bytes, transport: str) -> bytes | None:
        request = DNSRecord.parse(data)
        qname = str(request.q.qname).rstrip(".").lower()
        self.queries.append((transport, qname))
        if self.silent:
            return None
        reply = request.reply(ra=1, aa=0)
        if self.wrong_question:
            reply.questions[0].qname = "spoofed.example"
        if self.rcode is not None:
            reply.header.rcode = self.rcode
        elif qname in self.many:
            for i in range(self.many[qname]):
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=30, rdata=A(f"198.51.{i // 250}.{i % 250 + 1}")))
        elif qname in self.records and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=30, rdata=A(self.records[qname])))
        elif qname not in self.records and qname not in self.many:
            reply.header.rcode = 3
        packed: bytes = reply.pack()
        return packed

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                upstream._udp = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                reply = upstream.answer(data, "udp")
                if reply is not None:
                    loop.call_later(upstream.delay, upstream._send_udp, reply, addr)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    reply = self.answer(await reader.readexactly(size), "tcp")
                    if reply is None:
                        continue
                    await asyncio.sleep(self.delay)
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        for attempt in range(20):  # UDP on a free port, then TCP on the same one
            await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))
            assert self._udp is not None
            port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(handle, self.host, port)
            except OSError:
                self._udp.close()
                if self.port or attempt == 19:
                    raise
                continue
            self.address = HostPort(self.host, port)
            return self
        raise AssertionError("unreachable")

    def _send_udp(self, reply: bytes, addr: Any) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


@asynccontextmanager
async def upstreams(*fakes: FakeUpstream) -> AsyncIterator[tuple[HostPort, ...]]:
    for f in fakes:
        await f.start()
    try:
        yield tuple(f.address for f in fakes)
    finally:
        for f in fakes:
            await f.stop()


def rdtype(name: str) -> int:
    return int(dns.rdatatype.from_text(name))
