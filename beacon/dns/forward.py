"""Forwarding names that are not ours to upstream resolvers.

Asynchronous and callback-driven: a forwarded UDP query costs a dict slot and
a timer, never a blocked loop, so a slow upstream cannot delay local answers.
Each upstream has one connected UDP socket (the kernel drops datagrams from
any other source); queries get a fresh random ID, and a reply is accepted only
when its ID is pending and its question matches what we sent.

Failover: an upstream that times out, or answers SERVFAIL / REFUSED, is
skipped for that query and the next one is tried; the first upstream to time
out also loses its place as the preferred one, so later queries do not all pay
its timeout. When every upstream failed the client gets SERVFAIL.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from beacon.config import HostPort
from beacon.dns import wire
from beacon.dns.metrics import DnsMetrics

log = logging.getLogger("beacon.dns.forward")

Done = Callable[[bytes], None]

MAX_PENDING = 8192  # per upstream; beyond it new queries get SERVFAIL at once
_READ_BATCH = 64


def parse_resolv_conf(text: str) -> tuple[HostPort, ...]:
    """The `nameserver` lines of a resolv.conf (port 53), in order, invalid ones skipped."""
    out: list[HostPort] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        host = parts[1]
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        hp = HostPort(str(ip) + (host[host.index("%") :] if "%" in host else ""), 53)
        if hp not in out:
            out.append(hp)
    return tuple(out)


def system_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[HostPort, ...]:
    try:
        return parse_resolv_conf(path.read_text())
    except OSError as exc:
        log.warning("failed: reading %s for DNS upstreams: %s", path, exc)
        return ()


def without_self(upstreams: Sequence[HostPort], listeners: Sequence[HostPort]) -> tuple[HostPort, ...]:
    """Drop upstreams that are Beacon's own listeners (forwarding to them would loop)."""

    def is_self(up: HostPort) -> bool:
        try:
            up_ip = ipaddress.ip_address(up.host.split("%", 1)[0])
        except ValueError:
            return False
        for lis in listeners:
            if lis.port != up.port:
                continue
            lis_ip = ipaddress.ip_address(lis.host.split("%", 1)[0])
            if lis_ip == up_ip or (lis_ip.is_unspecified and (up_ip.is_loopback or up_ip.is_unspecified)):
                return True
        return False

    kept = []
    for up in upstreams:
        if is_self(up):
            log.warning("ignored: upstream %s is Beacon's own DNS listener", up)
        else:
            kept.append(up)
    return tuple(kept)


class _Pending:
    __slots__ = ("client_id", "deadline", "done", "payload", "qend", "started", "tried", "upstream")

    def __init__(self, client_id: bytes, payload: bytes, qend: int, done: Done, started: float) -> None:
        self.client_id = client_id
        self.payload = payload  # the query minus its 2-byte ID
        self.qend = qend
        self.done = done
        self.started = started
        self.deadline = 0.0
        self.tried = 0
        self.upstream = 0


class _Upstream:
    __slots__ = ("addr", "label", "pending", "sock")

    def __init__(self, addr: HostPort, sock: socket.socket) -> None:
        self.addr = addr
        self.label = str(addr)
        self.sock = sock
        self.pending: dict[int, _Pending] = {}


class Forwarder:
    def __init__(self, upstreams: Sequence[HostPort], timeout: float, metrics: DnsMetrics) -> None:
        self.upstreams = tuple(upstreams)
        self.timeout = timeout
        self.metrics = metrics
        self._ups: list[_Upstream] = []
        self._preferred = 0
        self._ids: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Timeouts are found by a sweep, not a timer per query: each upstream's
        # pending dict is in send order, so expired entries are at its front.
        self._tick = max(0.005, min(0.1, timeout / 4))
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for hp in self.upstreams:
            infos = await loop.getaddrinfo(hp.host, hp.port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.connect(sockaddr)
            except OSError:
                sock.close()
                raise
            up = _Upstream(hp, sock)
            self._ups.append(up)
            loop.add_reader(sock.fileno(), self._on_readable, up)
        if self.upstreams:
            log.info("forwarding: names outside the domain to %s", ", ".join(map(str, self.upstreams)))

    async def stop(self) -> None:
        for up in self._ups:
            if self._loop is not None:
                self._loop.remove_reader(up.sock.fileno())
            up.pending.clear()
            up.sock.close()
        self._ups.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # ------------------------------------------------------------------- UDP
    def forward(self, data: bytes, qend: int, done: Done) -> None:
        """Send `data` upstream; `done` gets the reply (client's ID) exactly once."""
        if not self._ups:
            done(wire.question_reply(data, qend, wire.SERVFAIL, ra=False))
            return
        p = _Pending(data[:2], data[2:], qend, done, time.perf_counter())
        self.metrics.forwarded += 1
        self._send(p, self._preferred)

    def _next_id(self, pending: dict[int, _Pending]) -> int:
        while True:
            if not self._ids:
                self._ids = list(struct.unpack("1024H", os.urandom(2048)))
            qid = self._ids.pop()
            if qid not in pending:
                return qid

    def _send(self, p: _Pending, index: int) -> None:
        up = self._ups[index]
        p.upstream = index
        p.tried += 1
        if len(up.pending) >= MAX_PENDING:
            self.metrics.upstream_failure(up.label, "overload")
            self._failover(p)
            return
        qid = self._next_id(up.pending)
        try:
            up.sock.send(qid.to_bytes(2, "big") + p.payload)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOBUFS):
                log.debug("failed: sending to upstream %s: %s", up.label, exc)
            self.metrics.upstream_failure(up.label, "error")
            self._failover(p)
            return
        p.deadline = time.monotonic() + self.timeout
        up.pending[qid] = p
        if self._sweeper is None and self._loop is not None:
            self._sweeper = self._loop.call_later(self._tick, self._sweep)

    def _failover(self, p: _Pending) -> None:
        if p.tried >= len(self._ups):
            self._finish(p, wire.question_reply(p.client_id + p.payload, p.qend, wire.SERVFAIL, ra=True))
            return
        self._send(p, (p.upstream + 1) % len(self._ups))

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for up in self._ups:
            expired = []
            for qid, p in up.pending.items():
                if p.deadline > now:
                    break
                expired.append(qid)
            for qid in expired:
                p = up.pending.pop(qid)
                self.metrics.upstream_failure(up.label, "timeout")
                if self._ups[self._preferred] is up:
                    self._preferred = (self._preferred + 1) % len(self._ups)
                self._failover(p)
        if self._sweeper is None and self._loop is not None and any(up.pending for up in self._ups):
            self._sweeper = self._loop.call_later(self._tick, self._sweep)

    def _on_readable(self, up: _Upstream) -> None:
        recv = up.sock.recv
        for _ in range(_READ_BATCH):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable from a dead upstream: the sweep times it out
                continue
            if len(data) < wire.HEADER_LEN or not data[2] & 0x80:
                continue
            qid = int.from_bytes(data[:2], "big")
            p = up.pending.get(qid)
            if p is None:
                continue
            q_len = p.qend - wire.HEADER_LEN
            if data[4:6] != b"\x00\x01" or data[12 : p.qend].lower() != p.payload[10 : 10 + q_len].lower():
                continue  # not the answer to our question: keep waiting
            del up.pending[qid]
            rcode = data[3] & 0x0F
            if rcode in (wire.SERVFAIL, wire.REFUSED) and p.tried < len(self._ups):
                self.metrics.upstream_failure(up.label, "servfail" if rcode == wire.SERVFAIL else "refused")
                self._failover(p)
                continue
            self._finish(p, p.client_id + data[2:])

    def _finish(self, p: _Pending, reply: bytes) -> None:
        self.metrics.latency["forward"].observe(time.perf_counter() - p.started)
        try:
            p.done(reply)
        except Exception:
            log.exception("failed: delivering a forwarded answer")

    # ------------------------------------------------------------------- TCP
    async def forward_tcp(self, data: bytes, qend: int) -> bytes:
        """Forward over TCP (a client that came over TCP, e.g. after TC): same failover."""
        if not self.upstreams:
            return wire.question_reply(data, qend, wire.SERVFAIL, ra=False)
        started = time.perf_counter()
        self.metrics.forwarded += 1
        n = len(self.upstreams)
        for i in range(n):
            up = self.upstreams[(self._preferred + i) % n]
            try:
                reply = await asyncio.wait_for(self._tcp_once(up, data), self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else "error"
                self.metrics.upstream_failure(str(up), reason)
                continue
            rcode = wire.rcode_of(reply)
            if rcode in (wire.SERVFAIL, wire.REFUSED) and i < n - 1:
                self.metrics.upstream_failure(str(up), "servfail" if rcode == wire.SERVFAIL else "refused")
                continue
            self.metrics.latency["forward"].observe(time.perf_counter() - started)
            return reply
        return wire.question_reply(data, qend, wire.SERVFAIL, ra=True)

    @staticmethod
    async def _tcp_once(up: HostPort, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(up.host, up.port)
        try:
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(size)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        if len(reply) < wire.HEADER_LEN or reply[:2] != data[:2] or not reply[2] & 0x80:
            raise ValueError("upstream reply does not match the query")
        return reply
