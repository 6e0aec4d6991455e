"""The DNS transports: UDP and TCP listeners, the answer cache, forwarding.

The cache's entries and bounds live in cache.py, TCP connection handling in tcp.py;
this module owns them and the paths between them.

The hot path is a cache of packed answers keyed on the query bytes minus the
2-byte ID. On each new snapshot the catalog listener (in the loop thread, so
no query sees a half-updated table) drops every entry that may differ under
the new snapshot: the positive answers of services whose `Service` object
changed (the catalog reuses unchanged ones), and every answer that is not
attributed to one service (negative answers, containers, PTR, ...). What is
left is exactly what the new snapshot would answer. A UDP hit is: read a
datagram, one dict lookup, patch the ID, `sendto`. Reads are batched per
readiness event (raw non-blocking socket + `add_reader`), which is what lets
one Python thread keep up with dnsmasq. Answers whose RRset may rotate keep
a few pre-packed rotations that are handed out in turn.

A miss parses the query with dnslib, resolves it against the zone
(`beacon.dns.resolver`, pure) and packs it; a name that is not ours goes to the
forwarder, and the "forward this" decision is cached too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dnslib import DNSRecord
from prometheus_client.registry import REGISTRY, CollectorRegistry

from beacon.config import Config, HostPort
from beacon.dns import cache as answer_cache
from beacon.dns import metrics as dns_metrics
from beacon.dns import wire
from beacon.dns.allow import AllowList, list_docker_subnets
from beacon.dns.cache import AnswerCache, CachedAnswer, Forward, ViewCaches
from beacon.dns.forward import Forwarder, system_upstreams, without_self
from beacon.dns.logs import Throttle, escape
from beacon.dns.metrics import INVALID_QTYPE, DnsMetrics
from beacon.dns.resolver import (
    View,
    Zone,
    ZoneSettings,
    pack,
    resolve,
    rotation,
    rotation_count,
    size_at_least,
    truncated,
)
from beacon.dns.tcp import TcpConnection, TcpConnections
from beacon.registry.catalog import Catalog
from beacon.registry.model import Snapshot

log = logging.getLogger("beacon.dns")

MAX_ROTATIONS = 16  # pre-packed orders per answer: every endpoint of a small pool comes first in turn
UDP_READ_BATCH = 256  # datagrams per readiness event before yielding to the loop
TCP_MAX_INFLIGHT = 64  # forwarded queries pipelined on one connection
_RECV_SIZE = wire.MAX_QUERY_LEN + 1  # one more: a datagram this long is oversized

_Miss = Forward | bytes | None  # forward it, send these bytes, or drop it

MAX_VIEWS = 64  # distinct (loopback, subnets) combinations; a host has a few networks
MAX_SOURCES = 4096  # source address -> view map; cleared when full (spoofed sources)


class DnsServer:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        resolv_conf: Path = Path("/etc/resolv.conf"),
        metrics_registry: CollectorRegistry | None = REGISTRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.catalog = catalog
        self.addresses: list[HostPort] = []
        self.metrics = DnsMetrics()
        self._resolv_conf = resolv_conf
        self._registry = metrics_registry
        self._snapshot: Snapshot = catalog.snapshot
        self._zone: Zone | None = None
        self._settings = ZoneSettings()
        self._views: dict[View, ViewCaches] = {}
        # Source address -> its view's caches (the UDP hot path reads the
        # first, one dict lookup). Rebuilt lazily after each snapshot, since
        # the subnets that tell views apart may change.
        self._udp_by_source: dict[str, dict[bytes, CachedAnswer]] = {}
        self._source_caches: dict[str, ViewCaches] = {}
        self._udp: list[socket.socket] = []
        self._tcp_servers: list[asyncio.Server] = []
        self._throttle = Throttle(log, clock=clock)
        self._tcp = TcpConnections(
            max_connections=config.dns_tcp_max_connections, idle_timeout=config.dns_tcp_idle_timeout,
            clock=clock, metrics=self.metrics, throttle=self._throttle,
        )  # fmt: skip
        self._refused_sources = Throttle(log, interval=float("inf"), clock=clock)  # once per source
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwarder = Forwarder((), config.dns_recursor_timeout, self.metrics)
        self._allow = AllowList(())
        self._unlisten: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            for hp in self.config.dns_listen:
                udp, server, bound = await self._bind(hp)
                self._udp.append(udp)
                self._tcp_servers.append(server)
                self.addresses.append(bound)
            await self._start_forwarding()
        except BaseException:
            await self.stop()
            raise
        cfg = self.config
        self._settings = ZoneSettings(
            domain=cfg.dns_domain,
            ttl=cfg.dns_ttl,
            negative_ttl=cfg.dns_negative_ttl,
            only_passing=cfg.dns_only_passing,
            ns_addresses=tuple(a.host for a in self.addresses if a.host not in ("0.0.0.0", "::")),
            recursion_available=self._forwarder.enabled,
        )
        self._on_snapshot(self.catalog.snapshot)
        self._unlisten = self.catalog.add_listener(self._on_snapshot)
        self.metrics.live_hits = self._live_hits
        self.metrics.cache_entries = lambda: sum(len(c.entries) for c in self._all_caches())
        if self._registry is not None:
            dns_metrics.register(self.metrics, self._registry)
        for sock in self._udp:
            self._loop.add_reader(sock.fileno(), self._on_udp_readable, sock)
        for a in self.addresses:
            log.info("listening: dns udp+tcp on %s (domain %s)", a, cfg.dns_domain)

    async def _start_forwarding(self) -> None:
        cfg = self.config
        upstreams = system_upstreams(self._resolv_conf) if cfg.dns_recursors is None else cfg.dns_recursors
        upstreams = without_self(upstreams, self.addresses)
        self._forwarder = Forwarder(upstreams, cfg.dns_recursor_timeout, self.metrics)
        await self._forwarder.start()
        if not upstreams:
            log.info("refusing: names outside %s (no upstream resolvers)", cfg.dns_domain)
        if cfg.dns_allow is not None:
            self._allow = AllowList(cfg.dns_allow)
        elif cfg.docker:
            docker_host = cfg.docker_host
            self._allow = AllowList((), discover=lambda: list_docker_subnets(docker_host))
            beyond_loopback = any(not _is_loopback(a.host) for a in self.addresses)
            if upstreams and beyond_loopback:
                await self._allow.refresh()  # only worth a Docker call when others can reach us

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for sock in self._udp:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        for server in self._tcp_servers:
            server.close()
        self._tcp.close_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._tcp_servers:
            await server.wait_closed()
        self._tcp_servers.clear()
        await self._forwarder.stop()
        for cache in self._all_caches():
            cache.fold(self.metrics.count)
            cache.clear()
        dns_metrics.unregister(self.metrics)
        if self.addresses:
            log.info("stopped: dns on %s", ", ".join(map(str, self.addresses)))

    async def _bind(self, hp: HostPort) -> tuple[socket.socket, asyncio.Server, HostPort]:
        """UDP first, then TCP on the same port; with port 0 retry when TCP's is taken."""
        assert self._loop is not None
        infos = await self._loop.getaddrinfo(hp.host, hp.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        attempts = 20 if hp.port == 0 else 1
        for attempt in range(attempts):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                udp.setblocking(False)
                try:  # room for bursts; the kernel caps it at net.core.rmem_max
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
                except OSError:
                    pass
                udp.bind(sockaddr)
                bound_host, port = udp.getsockname()[:2]
                tcp = socket.socket(family, socket.SOCK_STREAM)
                try:
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    tcp.bind((sockaddr[0], port, *sockaddr[2:]))
                    tcp.listen(1024)
                    tcp.setblocking(False)
                except OSError as exc:
                    tcp.close()
                    if exc.errno == errno.EADDRINUSE and attempt < attempts - 1:
                        udp.close()
                        continue
                    raise
            except BaseException:
                udp.close()
                raise
            server = await self._loop.create_server(lambda: TcpConnection(self._tcp, self._tcp_query), sock=tcp)
            return udp, server, HostPort(bound_host, port)
        raise OSError(errno.EADDRINUSE, f"no free port pair for DNS on {hp.host}")

    # -------------------------------------------------------------- snapshots
    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # Runs in the loop thread between two reads: the cache is never seen
        # half-pruned. The zone is rebuilt on the first miss.
        # The zone's keys are lowercased names.
        changed = {name.lower() for name in snapshot.changed_since(self._snapshot).services_touched}
        self._snapshot = snapshot
        self._zone = None
        for cache in self._all_caches():
            cache.prune(changed, self.metrics.count)
        self._udp_by_source.clear()  # in place: the UDP read loop holds it
        self._source_caches.clear()
        # A reverse name becomes ours when an endpoint takes its address.
        for vc in self._views.values():
            vc.fwd = {}

    def _live_hits(self) -> Iterator[tuple[int, int, int]]:
        for cache in self._all_caches():
            for e in list(cache.entries.values()):
                yield e.qtype, e.rcode, e.hits

    def _all_caches(self) -> list[AnswerCache]:
        return [c for vc in list(self._views.values()) for c in (vc.udp, vc.tcp)]

    def _caches_of(self, source: str) -> ViewCaches:
        """The caches of the view of a querier at `source` (computed once per snapshot)."""
        found = self._source_caches.get(source)
        if found is not None:
            return found
        view = self.zone.view_of(source)
        found = self._views.get(view)
        if found is None:
            if len(self._views) >= MAX_VIEWS:
                for cache in self._all_caches():
                    cache.fold(self.metrics.count)
                self._views.clear()
                self._udp_by_source.clear()
                self._source_caches.clear()
            found = self._views[view] = ViewCaches(view)
        if len(self._source_caches) >= MAX_SOURCES:
            self._udp_by_source.clear()
            self._source_caches.clear()
        self._source_caches[source] = found
        self._udp_by_source[source] = found.udp.entries
        return found

    @property
    def _cache(self) -> AnswerCache:
        """The UDP cache of the host's own view (what loopback clients use)."""
        return self._caches_of("127.0.0.1").udp

    @property
    def _tcp_cache(self) -> AnswerCache:
        return self._caches_of("127.0.0.1").tcp

    @property
    def zone(self) -> Zone:
        zone = self._zone
        if zone is None:
            zone = self._zone = Zone(self._snapshot, self._settings)
        return zone

    # --------------------------------------------------------------------- UDP
    def _on_udp_readable(self, sock: socket.socket) -> None:
        recv = sock.recvfrom
        send = sock.sendto
        by_source = self._udp_by_source
        perf = time.perf_counter
        started = perf()
        n = 0
        slow = 0.0
        slow_n = 0
        while n < UDP_READ_BATCH:
            try:
                data, addr = recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. an ICMP error queued on the socket: skip it
                n += 1
                continue
            n += 1
            entries = by_source.get(addr[0])
            if entries is None:  # first query from this source since the snapshot
                entries = self._caches_of(addr[0]).udp.entries
            entry = entries.get(data[2:])
            if entry is not None:
                entry.hits += 1
                try:
                    send(data[:2] + entry.next(), addr)
                except OSError:
                    self.metrics.drop("send_error")
                continue
            t0 = perf()
            if self._udp_miss(sock, data, addr):
                self.metrics.latency["resolve"].observe(perf() - t0)
            slow += perf() - t0
            slow_n += 1
        hits = n - slow_n
        if hits > 0:
            self.metrics.latency["cache"].observe(max(0.0, perf() - started - slow) / hits, hits)

    def _udp_miss(self, sock: socket.socket, data: bytes, addr: Any) -> bool:
        """Answer a query the exact-bytes lookup did not find. True when answered locally."""
        found = self._miss(data, addr[0], tcp=False)
        if found is None:
            return False
        if isinstance(found, Forward):
            self._forward_udp(sock, data, addr, found)
            return False
        try:
            sock.sendto(found, addr)
        except OSError:
            self.metrics.drop("send_error")
        return True

    def _forward_udp(self, sock: socket.socket, data: bytes, addr: Any, fwd: Forward) -> None:
        def done(reply: bytes) -> None:
            self.metrics.count(fwd.qtype, wire.rcode_of(reply))
            if len(reply) > wire.MIN_UDP_PAYLOAD:
                # An upstream may answer far more than this client accepts
                # (it asked us, not them): never relay it oversize.
                limit, edns = wire.udp_limit(data, fwd.qend)
                if len(reply) > limit:
                    reply = wire.truncate_reply(reply, fwd.qend, edns=edns)
            try:
                sock.sendto(reply, addr)
            except OSError:
                self.metrics.drop("send_error")

        if not self._forwarder.enabled:
            done(wire.question_reply(data, fwd.qend, wire.REFUSED, ra=False))
        elif self._allow.allows(addr[0]):
            self._forwarder.forward(data, fwd.qend, done)
        elif self._allow.can_refresh():
            self._spawn(self._forward_after_refresh(data, addr[0], fwd, done))
        else:
            self._refused(str(addr[0]))
            done(wire.question_reply(data, fwd.qend, wire.REFUSED, ra=True))

    async def _forward_after_refresh(
        self, data: bytes, host: str, fwd: Forward, done: Callable[[bytes], None]
    ) -> None:
        await self._allow.refresh()
        if self._allow.allows(host):
            self._forwarder.forward(data, fwd.qend, done)
        else:
            self._refused(host)
            done(wire.question_reply(data, fwd.qend, wire.REFUSED, ra=True))

    def _refused(self, host: str) -> None:
        """Log a source refused forwarding, once: often a NATed container the operator meant to allow."""
        self._refused_sources.log(
            logging.WARNING, host,
            "refused: forwarding names outside %s for %s (not loopback, not in --dns-allow%s); "
            "to allow it set --dns-allow %s (containers reaching the host's address may arrive NATed from it)",
            self.config.dns_domain, escape(host),
            "" if self.config.dns_allow is not None else " nor a Docker network",
            escape(host) + ("/128" if ":" in host else "/32"),
        )  # fmt: skip

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ shared miss
    def _miss(self, data: bytes, source: str, *, tcp: bool) -> _Miss:
        """The reply to a query whose exact bytes are not cached: from the entry
        of its case-folded key (resolved and packed on a real miss), with the
        question's own case put back; or a forward decision; None: drop it."""
        if len(data) < wire.HEADER_LEN:
            self.metrics.drop("short")
            return None
        if wire.is_response(data):
            self.metrics.drop("response")
            return None
        if len(data) > wire.MAX_QUERY_LEN:
            return self._invalid(data)
        folded = wire.case_folded(data)
        key, nend = folded if folded is not None else (data[2:], 0)
        caches = self._caches_of(source)
        cache = caches.tcp if tcp else caches.udp
        entry = cache.entries.get(key)
        if entry is None:
            fwd = caches.fwd.get(key)
            if fwd is not None:
                return fwd
            found = self._resolve(data, key, caches, tcp=tcp)
            if not isinstance(found, CachedAnswer):
                return found
            entry = found
        entry.hits += 1
        reply = data[:2] + entry.next()
        if nend and reply[12:nend] != data[12:nend] and reply[12:nend].lower() == key[10 : nend - 2]:
            # 0x20 clients check that the reply's question matches theirs byte
            # for byte; answer owners are pointers to it, so they follow.
            reply = reply[:12] + data[12:nend] + reply[nend:]
        return reply

    def _resolve(self, data: bytes, key: bytes, caches: ViewCaches, *, tcp: bool) -> CachedAnswer | _Miss:
        """Parse, resolve and pack one query (its case-folded form); cache what can be cached."""
        cache = caches.tcp if tcp else caches.udp
        try:
            request = DNSRecord.parse(data[:2] + key)
        except Exception:  # dnslib raises several types for malformed input
            return self._invalid(data)
        try:
            answer = resolve(request, self.zone, caches.view)
            if answer is None:
                qend = wire.question_end(data)
                if qend is None:
                    return self._invalid(data)
                fwd = Forward(qend, wire.qtype_at(data, qend))
                # Read through the module: the answer cache's one bound covers these decisions too.
                if len(caches.fwd) >= answer_cache.MAX_CACHE_ENTRIES:
                    caches.fwd.clear()  # random names cannot grow it without bound
                caches.fwd[key] = fwd
                return fwd
            limit = 65535 if tcp else answer.udp_limit
            count = rotation_count(answer, MAX_ROTATIONS)
            # Pack only what is sent: an answer that cannot fit is not packed
            # at all, one that fits packs its first order now, the others
            # when they are first handed out.
            first = b""
            if size_at_least(answer) <= limit:
                first = pack(rotation(answer, 0, count))[2:]
            if not first or len(first) + 2 > limit:
                first = pack(truncated(answer))[2:]
                count = 1
        except Exception as exc:  # a bug of ours; logged, throttled: a client may repeat it at will
            self._throttle.log(
                logging.ERROR, f"resolve:{type(exc).__name__}",
                "failed: answering a DNS query (%d bytes, name %s): %s",
                len(data), escape(data[12:wire.question_end(data) or 12 + 80]), escape(exc),
                exc_info=True,
            )  # fmt: skip
            reply = wire.header_reply(data, wire.SERVFAIL)
            self.metrics.count(INVALID_QTYPE, wire.SERVFAIL)
            return reply
        qtype = request.questions[0].qtype if request.questions else INVALID_QTYPE
        entry = CachedAnswer(answer, first, count, limit, qtype, answer.reply.header.rcode)
        if cache.full(entry):
            cache.fold(self.metrics.count)
            cache.clear()
            caches.fwd.clear()
        cache.add(key, entry, answer.service)
        return entry

    def _invalid(self, data: bytes) -> bytes | None:
        reply = wire.header_reply(data, wire.FORMERR)
        if reply is None:
            self.metrics.drop("response")
        else:
            self.metrics.count(INVALID_QTYPE, wire.FORMERR)
        return reply

    # --------------------------------------------------------------------- TCP
    def _tcp_query(self, conn: TcpConnection, msg: bytes) -> None:
        entry = self._caches_of(conn.host).tcp.entries.get(msg[2:])
        if entry is not None:
            entry.hits += 1
            conn.send(msg[:2] + entry.next())
            return
        found = self._miss(msg, conn.host, tcp=True)
        if found is None:
            conn.abort()  # not a query on a stream: nothing sensible to answer
        elif isinstance(found, Forward):
            self._forward_tcp(conn, msg, found)
        else:
            conn.send(found)

    def _forward_tcp(self, conn: TcpConnection, msg: bytes, fwd: Forward) -> None:
        if not self._forwarder.enabled:
            self.metrics.count(fwd.qtype, wire.REFUSED)
            conn.send(wire.question_reply(msg, fwd.qend, wire.REFUSED, ra=False))
            return
        if len(conn.tasks) >= TCP_MAX_INFLIGHT:
            self.metrics.count(fwd.qtype, wire.SERVFAIL)
            conn.send(wire.question_reply(msg, fwd.qend, wire.SERVFAIL, ra=True))
            return

        async def run() -> None:
            if not self._allow.allows(conn.host) and self._allow.can_refresh():
                await self._allow.refresh()
            if self._allow.allows(conn.host):
                reply = await self._forwarder.forward_tcp(msg, fwd.qend)
            else:
                self._refused(conn.host)
                reply = wire.question_reply(msg, fwd.qend, wire.REFUSED, ra=True)
            self.metrics.count(fwd.qtype, wire.rcode_of(reply))
            conn.send(reply)

        task = asyncio.ensure_future(run())
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


__all__ = ["DnsServer"]
