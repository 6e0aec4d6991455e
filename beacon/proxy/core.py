"""The forwarding core: routes a parsed request, picks an endpoint, hands the
exchange to an upstream connection, and settles every outcome (see README.md
"Data path" for the design and its costs).

Length (~630 lines): the settling of every outcome (retry, eject, fail over, 408/502/504) is one
state machine; split, each part would have to read the others' fields.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import random
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from beacon.config import Config
from beacon.proxy.accesslog import AccessLog, escape
from beacon.proxy.balancer import (
    NO_CHANGES,
    Balancer,
    Ejection,
    EndpointState,
    FailureKind,
    set_cookie_line,
    sticky_cookie,
)
from beacon.proxy.downstream import PAUSE_BUFFER, ClientConnection
from beacon.proxy.exchange import Exchange
from beacon.proxy.http1 import (
    CONTINUE_100,
    CRLF,
    PLAIN_CONNECTION_TOKENS,
    connection_named,
    drop_named,
    error_response,
    normalise_path,
    parse_absolute,
    printable,
)  # fmt: skip
from beacon.proxy.metrics import UNROUTED, ProxyMetrics
from beacon.proxy.pool import UpstreamPool
from beacon.proxy.router import RouteIndex, RoutingTable, strip_prefix
from beacon.proxy.upstream import UpstreamConnection
from beacon.registry.model import Service, Snapshot

log = logging.getLogger("beacon.proxy")

INF = float("inf")
GATEWAY_ERRORS = frozenset({502, 503, 504})
# A client that sent a malformed head may not frame the next one right either.
CLOSING_ERRORS = frozenset({400, 408, 413, 417, 431})


class ProxyCore:
    """Per-process proxy state: routing table, balancer, pool, client connections, timers.

    Time comes from `clock` (default: the loop's clock); `tick()` checks every
    deadline once and is what the timer runs, so a test with its own clock
    can drive timeouts without waiting.
    """

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.config = config
        self._local_node = config.node or socket.gethostname()  # as App names this node
        self.loop = loop
        self.clock = clock or loop.time
        self.metrics = ProxyMetrics()
        # The index owns the table and updates it in place: `self.table` stays the same object.
        self._routes = RouteIndex(config.proxy_domain, config.proxy_expose_by_default)
        self.table: RoutingTable = self._routes.table
        self.balancer = Balancer(
            Ejection(
                threshold=config.eject_consecutive_failures,
                base_time=config.eject_base_time,
                max_fraction=config.eject_max_percent,
            ),
            rng or random.Random(),
        )
        self.pool = UpstreamPool(self, self.balancer.takes_requests)
        self.clients: set[ClientConnection] = set()
        self.stopping = False
        self._drained: asyncio.Event | None = None
        self.now = self.clock()
        self.header_timeout = config.proxy_header_timeout
        self.idle_timeout = config.proxy_idle_timeout
        self.try_timeout = config.proxy_try_timeout
        self.connect_timeout = config.proxy_connect_timeout
        self.max_header_size = config.proxy_max_header_size
        self.max_body_size = config.proxy_max_body_size
        self.max_connections = config.proxy_max_connections or default_max_connections()
        self._at_cap = False
        self._trusted = config.trusted_proxies
        self._trust_cache: dict[str, bool] = {}
        self._pool_sources: dict[str, Service] = {}
        self._snapshot: Snapshot | None = None  # the last one applied
        self._rid_prefix = os.urandom(5).hex().encode() + b"-"
        self._rid = itertools.count(1)
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(0.02, min(1.0, min(self.header_timeout, self.idle_timeout, self.try_timeout) / 4))
        self._last_log: dict[str, float] = {}
        # Set by the TLS frontend: may answer a request before routing (ex.error / ex.extra).
        self.intercept: Callable[[Exchange, bytes, bytes], None] | None = None
        # --access-log; None when off, and then the data path's only cost is checking that.
        self.access_log = access_log
        self._access_log_failed = False

    # ------------------------------------------------------------- lifecycle
    def start_timers(self) -> None:
        self._sweep()

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for c in list(self.clients):
            c.abort()
        self.pool.close_all()

    def begin_drain(self) -> asyncio.Event:
        """Stop taking requests: idle clients close, busy ones close after their response.

        Returns an event set once no client connection is left.
        """
        self.stopping = True
        self._drained = asyncio.Event()
        if not self.clients:
            self._drained.set()
        for c in list(self.clients):
            if c.is_idle():
                c.close()
        return self._drained

    def report(self) -> dict[str, Any]:
        """This process's metrics as plain data (`ProxyMetrics.to_json`)."""
        report = self.metrics.to_json(len(self.clients), len(self.pool), self.table.conflict_count,
                                      self.balancer.in_flight())  # fmt: skip
        report["access_log_dropped"] = self.access_log.dropped if self.access_log is not None else 0
        return report

    def client_opened(self, client: ClientConnection) -> str | None:
        """A client connected: None to serve it, else why it must be closed at once."""
        if self.stopping:
            self.clients.add(client)
            return ""
        if len(self.clients) >= self.max_connections:
            # Make room from an idle keep-alive connection (as nginx reuses
            # them) before refusing; the scan only happens at the cap.
            idle = next((c for c in self.clients if c.is_idle() and not c.closing), None)
            if idle is None:
                self.metrics.refused_connections += 1
                if not self._at_cap:
                    self._at_cap = True
                    log.warning("refused: proxy connections at the cap (--proxy-max-connections %d); "
                                "new ones get a 503 until some close", self.max_connections)  # fmt: skip
                return "too many connections"
            idle.close()
        self.clients.add(client)
        if self.access_log is not None:
            client.count_sent_bytes()
        return None

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if self._at_cap and len(self.clients) < self.max_connections * 0.9:
            self._at_cap = False  # the next time the cap is hit is logged again
        if self._drained is not None and not self.clients:
            self._drained.set()

    def _sweep(self) -> None:
        try:
            self.tick()
        finally:
            self._sweeper = self.loop.call_later(self._tick, self._sweep)

    def tick(self) -> None:
        """Check every deadline against the clock once."""
        # One failing handler must neither stop this tick for the other
        # connections nor end the timer chain (no timeout would fire again).
        now = self.now = self.clock()
        for c in [c for c in self.clients if c.deadline <= now]:
            try:
                c.timed_out()
            except Exception:
                log.exception("failed: proxy timeout of a client connection from %s", printable(c.peer))
                c.deadline = INF
                c.abort()
        for u in [u for u in self.pool.connections if u.deadline <= now]:
            try:
                self._upstream_timed_out(u)
            except Exception:
                log.exception("failed: proxy timeout of an upstream connection to %s:%d",
                              u.state.address, u.state.port)  # fmt: skip
                u.deadline = INF
                u.abort()

    def _upstream_timed_out(self, up: UpstreamConnection) -> None:
        ex = up.exchange
        if up.tunnel is not None:
            up.deadline = INF  # a tunnel's idle time is watched on the client side
            return
        if ex is None:
            up.close()  # idle in the pool too long
            return
        up.detach()
        if not ex.request_done and not ex.response_started:
            # The client is still sending its body: the wait is its doing, not
            # the endpoint's (a slow or stalled client must not eject it).
            self.endpoint_done(ex, None, neutral=True)
            self._fail(ex, 408, "request body timeout")
            return
        if ex.response_started and not self._unstart(ex):
            log.warning("timeout: upstream %s:%d stalled mid-response", up.state.address, up.state.port)
            self.endpoint_done(ex, FailureKind.STALLED)
            self.abandon(ex, ex.status)  # (logs it with the status the client got a part of)
            ex.client.abort()
            return
        ex.last_failure = (FailureKind.TIMEOUT, "timeout")
        self.endpoint_done(ex, FailureKind.TIMEOUT)
        self._warn(up.state, f"timeout: upstream {up.state.address}:{up.state.port} sent no response header "
                   f"within {self.try_timeout:g}s (service {up.state.service})")  # fmt: skip
        self._fail(ex, 504, f"upstream of service {up.state.service} timed out")

    # ------------------------------------------------------------- snapshots
    def apply(self, snapshot: Snapshot) -> None:
        """Swap in routes and pools for a new snapshot (established connections stay).

        Called inside the catalog's publish, so it is incremental: only the
        services `snapshot.changed_since` the last one names are looked at: the
        route index touches only their routes, the balancer only their pools.
        """
        now = self.now = self.clock()
        previous, self._snapshot = self._snapshot, snapshot
        delta = snapshot.changed_since(previous) if previous is not None else None
        for conflict in self._routes.update(snapshot, delta) or ():
            log.warning("conflict: route %s", conflict.describe())
        services = snapshot.services
        old_sources = self._pool_sources
        if delta is None:
            changed = list(services)
            removed = [name for name in old_sources if name not in services]
        else:
            changed = [name for name in delta.services_changed if old_sources.get(name) is not services.get(name)]
            removed = [name for name in delta.services_removed if name in old_sources]
        if not changed and not removed:
            return
        sources = old_sources  # updated in place: a copy would cost O(services) per snapshot
        balancer, pool = self.balancer, self.pool
        endpoints = snapshot.endpoints
        retired: list[EndpointState] = []
        # The endpoints the delta names, by service: each pool is updated per
        # endpoint, O(what changed), not rebuilt from every endpoint.
        by_service = balancer.changes_by_service(delta, endpoints) if delta is not None else None
        for name in removed:
            balancer.remove_service(name)
            retired += balancer.forget(sources.pop(name), endpoints)
            self.metrics.forget(name)
        for name in changed:
            svc = services[name]
            old = sources.get(name)
            sources[name] = svc
            # beacon.lb, folded by the catalog (the first valid one; the label parser warned of bad ones).
            balancing = svc.balancing
            policy = (balancing.policy if balancing is not None else None) or self.config.lb
            sticky = balancing.sticky if balancing is not None else False
            # Cluster hook: beacon.lb.locality=prefer-local prefers this node's endpoints.
            if by_service is None or old is None:
                retired += balancer.update_service(svc, policy, sticky, now, local_node=self._local_node)
                if old is not None:
                    retired += balancer.forget(old, endpoints)
            else:
                eps, gone, moved = by_service.get(name, NO_CHANGES)
                retired += balancer.update_endpoints(svc, eps, gone, policy, sticky, now, self._local_node, moved)
        for st in retired:
            pool.retire(st)
            self.metrics.forget_endpoint(st.service, st.id, endpoints)  # its counters go when it leaves
            if balancer.states.get(st.id) is not st:
                # The endpoint left the catalog (or moved): a try still waiting
                # for its answer may wait forever (a connection docker-proxy
                # accepted for a container going away). Send it elsewhere now.
                # (A draining endpoint keeps its in-flight requests.)
                for conn in pool.waiting_on(st):
                    ex = conn.exchange
                    assert ex is not None
                    conn.detach()
                    self.upstream_failed(ex, conn, FailureKind.RESET, "endpoint left the catalog")

    # --------------------------------------------------------------- helpers
    def is_trusted(self, ip: str) -> bool:
        if not self._trusted or not ip:
            return False
        hit = self._trust_cache.get(ip)
        if hit is None:
            try:
                addr = ipaddress.ip_address(ip)
                hit = any(addr in net for net in self._trusted)
            except ValueError:
                hit = False
            if len(self._trust_cache) > 10000:
                self._trust_cache.clear()
            self._trust_cache[ip] = hit
        return hit

    def next_request_id(self) -> bytes:
        return self._rid_prefix + b"%x" % next(self._rid)

    def _warn(self, state: EndpointState, message: str) -> None:
        """Log an upstream problem at most once per second per endpoint (no floods)."""
        last = self._last_log.get(state.id, -INF)
        if self.now - last >= 1.0:
            self._last_log[state.id] = self.now
            if len(self._last_log) > 10000:
                self._last_log.clear()
            log.warning("%s", message)

    # --------------------------------------------------------------- routing
    def prepare(self, ex: Exchange, upgrade: bool) -> None:
        """Route a parsed request head and build the bytes to send upstream."""
        url = ex.url
        host = ex.host
        if ex.method == b"CONNECT":
            ex.error = ex.error or (405, "CONNECT is not supported by this reverse proxy")
        elif ex.method == b"TRACE":
            # It would echo the request back, cookies and credentials included
            # (cross-site tracing); nginx answers 405 too.
            ex.error = ex.error or (405, "TRACE is not supported by this reverse proxy")
        if url[:1] != b"/":
            if url == b"*":
                url = b"/"
            else:
                abs_host, url = parse_absolute(url)
                if abs_host is None:
                    ex.error = ex.error or (400, "request target must be a path")
                host = abs_host or host
        url = normalise_path(url)  # before routing: /api/../admin is /admin (and is forwarded so)
        if host is None:
            if ex.http11:
                ex.error = ex.error or (400, "missing Host header")
            host = b""
        if ex.cl is not None and self.max_body_size and int(ex.cl) > self.max_body_size:
            ex.error = ex.error or (413, f"request body larger than {self.max_body_size} bytes")
        if self.intercept is not None and ex.error is None:
            self.intercept(ex, host, url)  # TLS: ACME challenge, https redirect, HSTS
        if ex.error is not None:
            ex.stats = self.metrics.service(UNROUTED)
            return
        route = self.table.resolve(host, url)
        if route is None:
            ex.stats = self.metrics.service(UNROUTED)
            ex.error = (404, f"no route for host {printable(host)!r}")
            return
        ex.route = route
        name = route.service
        ex.stats = self.metrics.service(name)
        pool = self.balancer.pools.get(name)
        if pool is None or not pool.members:
            ex.error = (503, f"service {name} has no healthy endpoint")
            return
        target = strip_prefix(route.prefix, url) if route.strip else url
        cv = ex.conn_value
        if cv is not None and cv.lower() not in PLAIN_CONNECTION_TOKENS:
            # Headers the client's Connection header names are hop-by-hop too.
            ex.lines = drop_named(ex.lines, connection_named(cv))
        client = ex.client
        # Host: the one the request was routed by (an absolute-form target's
        # authority replaces the header, RFC 9112 §3.2.2); never hop-by-hop.
        parts = [ex.method, b" ", target, b" HTTP/1.1\r\n"]
        if host:
            parts += (b"Host: ", host, CRLF)
        parts += ex.lines
        if ex.xff is None and ex.xfp is None:
            parts.append(client.forwarded)  # X-Forwarded-For and -Proto of this connection
        else:
            parts.append(client.xff_line if ex.xff is None else
                         b"X-Forwarded-For: " + ex.xff + b", " + client.peer + CRLF)  # fmt: skip
            parts.append(client.forwarded_proto if ex.xfp is None else b"X-Forwarded-Proto: " + ex.xfp + CRLF)
        parts += (b"X-Forwarded-Host: ", host if ex.xfh is None else ex.xfh, b"\r\nX-Request-Id: ", ex.reqid, CRLF)
        if upgrade and ex.upgrade_value is not None:
            ex.upgrade = True
            parts.append(b"Connection: Upgrade\r\nUpgrade: " + ex.upgrade_value + CRLF)
        elif ex.cl is not None:
            parts.append(b"Content-Length: " + ex.cl + CRLF)
        elif ex.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(CRLF)
        ex.head = b"".join(parts)

    def serve(self, ex: Exchange) -> None:
        """Serve an exchange that just became the client's active one."""
        client = ex.client
        if ex.error is not None:
            status, message = ex.error
            # Answered at its header: keep the connection only if no body follows.
            body_pending = not ex.request_done and (ex.chunked or ex.cl not in (None, b"0"))
            close = ex.close_client or not ex.keep_alive or self.stopping or body_pending or status in CLOSING_ERRORS
            ex.close_client = close
            client.buffer(error_response(status, message, ex.reqid or b"-", close, ex.is_head, ex.extra))
            ex.response_started = True
            ex.status = status
            self.finish(ex)
            return
        if ex.expect and not ex.request_done:
            client.buffer(CONTINUE_100)
        self.dispatch(ex)
        client.flush()

    def dispatch(self, ex: Exchange) -> None:
        """Pick an endpoint and send the request: pooled connection now, or connect."""
        route = ex.route
        assert route is not None and ex.stats is not None
        pool = self.balancer.pools.get(route.service)
        now = self.now
        state: EndpointState | None = None
        if pool is not None:
            if ex.attempts == 0:
                if pool.sticky:
                    token = sticky_cookie(ex.cookie, route.service)
                    state = pool.pick_sticky(token, now) if token else None
                    if state is None:
                        state = pool.pick(now)
                        if state is not None:
                            ex.set_cookie = set_cookie_line(route.service, state.token)
                else:
                    state = pool.pick(now)
            else:
                state = pool.pick_retry(now, ex.tried, ex.tried[-1] if ex.tried else None)
                if state is not None and ex.set_cookie is not None:
                    ex.set_cookie = set_cookie_line(route.service, state.token)
        if state is None:
            if ex.attempts == 0:
                self._fail(ex, 503, f"service {route.service} has no healthy endpoint")
            else:
                kind = ex.last_failure[0] if ex.last_failure is not None else FailureKind.CONNECT_FAILED
                self._fail(ex, 504 if kind.timed_out else 502,
                           f"no endpoint of service {route.service} answered ({kind.value})")  # fmt: skip
            return
        ex.attempts += 1
        ex.stats.attempt(state.id, ex.attempts > 1)
        ex.endpoint = state
        ex.tried.append(state)
        self.balancer.take(state)
        self.pool.acquire(ex, state)

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """The pool lends `conn` to `ex`: the request goes out now."""
        conn.start(ex, self.now + self.try_timeout)
        client = ex.client
        client.resume(PAUSE_BUFFER)
        if client.writing_paused:
            conn.pause_reading()

    # ------------------------------------------------------------- outcomes
    def endpoint_done(self, ex: Exchange, failure: FailureKind | None, neutral: bool = False) -> None:
        """The exchange's try is over: tell the balancer how it went (`neutral`:
        it says nothing about the endpoint, e.g. the client went away)."""
        state = ex.endpoint
        if state is None:
            return
        ex.endpoint = None
        balancer = self.balancer
        balancer.drop(state)
        if neutral:
            return
        if failure is None:
            balancer.success(state)
            return
        self.metrics.failed(state.service, state.id, failure.name.lower())
        if balancer.failure(state, failure, self.now):
            self.metrics.ejected(state.service, state.id)
            log.warning(
                "ejected: endpoint %s (%s:%d) of service %s for %.0fs after %d failures in a row",
                state.id, state.address, state.port, state.service,
                balancer.ejection.duration(state.ejections), balancer.ejection.threshold,
            )  # fmt: skip

    def tunnel_started(self, ex: Exchange) -> None:
        """A 101: the exchange is over, its endpoint stays in use until the tunnel ends."""
        ex.upstream = None
        ex.done = True
        if ex.stats is not None:
            ex.stats.observe(101, time.perf_counter() - ex.t0, ex.method)
        if self.access_log is not None:
            self.log_access(ex, 101)
        if ex.endpoint is not None:
            self.balancer.success(ex.endpoint)

    def tunnel_ended(self, state: EndpointState) -> None:
        self.balancer.drop(state)

    def response_complete(self, ex: Exchange, conn: UpstreamConnection, reusable: bool) -> None:
        self.endpoint_done(ex, FailureKind.GATEWAY_ERROR if conn.status in GATEWAY_ERRORS else None)
        ex.upstream = None
        if reusable and ex.request_done and not ex.upgrade:
            # (an upgrade request answered without a 101: that connection closes)
            self.pool.release(conn)
        else:
            conn.close_after_exchange()
            if not ex.request_done:
                ex.close_client = True
            elif not conn.keep_alive:
                self.pool.connect_ahead(conn.state)  # the upstream ended it: replace it before it is needed
        self.finish(ex)

    def finish(self, ex: Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        if ex.stats is not None:
            ex.stats.observe(ex.status, time.perf_counter() - ex.t0, ex.method)
        client = ex.client
        if client.active is ex:
            client.flush()
            if self.access_log is not None:
                self.log_access(ex, ex.status)
            client.exchange_finished(ex)
        elif self.access_log is not None:
            self.log_access(ex, ex.status)

    def cut_off(self, ex: Exchange, status: int) -> None:
        """A request answered `status` before its head was whole (a header
        timeout): counted as unrouted and logged, as a 400 for a malformed one is."""
        ex.done = True
        ex.status = status
        ex.stats = self.metrics.service(UNROUTED)
        ex.stats.observe(status, time.perf_counter() - ex.t0, ex.method)
        if self.access_log is not None:
            self.log_access(ex, status)

    def log_access(self, ex: Exchange, status: int) -> None:
        """Write the access log line of a finished exchange (only with --access-log)."""
        assert self.access_log is not None
        client = ex.client
        sent = client.sent_bytes - client.logged_bytes  # responses are sent in order: the rest is this one's
        client.logged_bytes = client.sent_bytes
        try:
            self.access_log.record(ex, status, sent)
        except Exception:  # a logging bug must not fail the request; said once, not per request
            if not self._access_log_failed:
                self._access_log_failed = True
                log.exception("failed: access log line of request %s", escape(ex.reqid, 256))

    def connect_failed(self, ex: Exchange, state: EndpointState, exc: BaseException) -> None:
        timeout = isinstance(exc, TimeoutError)
        kind = FailureKind.CONNECT_TIMEOUT if timeout else FailureKind.CONNECT_FAILED
        ex.last_failure = (kind, kind.value)
        self._warn(state, f"failed: connect to {state.address}:{state.port} (service {state.service}): "
                   f"{'timeout' if timeout else exc}")  # fmt: skip
        self.endpoint_done(ex, kind)
        if ex.done:
            return
        # Nothing was sent: any request may go to another endpoint.
        if ex.attempts < self.config.proxy_attempts:
            self.dispatch(ex)
        else:
            self._fail(ex, 504 if timeout else 502, f"no endpoint of service {state.service} answered ({kind.value})")
        ex.client.flush()

    def upstream_failed(self, ex: Exchange, conn: UpstreamConnection, kind: FailureKind, detail: str) -> None:
        """The upstream connection ended or broke before the response ended."""
        ex.upstream = None
        state = conn.state
        self.endpoint_done(ex, kind)
        if ex.done:
            return
        if ex.response_started and not self._unstart(ex):
            self._warn(state, f"failed: upstream {state.address}:{state.port} broke mid-response: {detail}")
            ex.done = True
            if ex.stats is not None:
                ex.stats.observe(502, time.perf_counter() - ex.t0, ex.method)
            if self.access_log is not None:
                self.log_access(ex, ex.status or 502)  # the upstream's status, truncated
            ex.client.abort()
            return
        ex.last_failure = (kind, detail)
        self._warn(state, f"failed: upstream {state.address}:{state.port} (service {state.service}): {detail}")
        # Retry only what is safe to send twice: idempotent, and its body
        # (if any) is still complete in the replay buffer.
        if ex.idempotent and ex.attempts < self.config.proxy_attempts and not ex.upgrade and ex.rewind():
            self.dispatch(ex)
        else:
            self._fail(ex, 502, f"upstream of service {state.service} failed: {detail}")
        ex.client.flush()

    def _unstart(self, ex: Exchange) -> bool:
        """Take back a response the client has not seen any byte of (a held
        small response); True if the exchange may get another answer."""
        if not ex.client.drop_held_output():
            return False
        ex.response_started = False
        ex.status = 0
        return True

    def _fail(self, ex: Exchange, status: int, message: str) -> None:
        """Answer an exchange with a proxy error (nothing of a response was sent yet)."""
        if ex.done:
            return
        client = ex.client
        close = ex.close_client or not ex.keep_alive or self.stopping or not ex.request_done or ex.upgrade
        ex.close_client = close
        ex.status = status
        ex.response_started = True
        if client.active is ex:
            client.buffer(error_response(status, message, ex.reqid or b"-", close, ex.is_head))
        self.finish(ex)

    def abandon(self, ex: Exchange, status: int = 499) -> None:
        """The client is gone (or is answered `status` and closed): stop the
        exchange and free what it holds. 499 is nginx's "client closed request"."""
        if ex.done:
            return
        ex.done = True
        if self.access_log is not None:
            self.log_access(ex, status)
        up = ex.upstream
        ex.upstream = None
        if up is not None:
            up.detach()  # mid-request or mid-response: the connection is out of sync
        self.endpoint_done(ex, None, neutral=True)


# File descriptors left to everything but proxied connections: the API, DNS,
# the Docker socket, health checks (a check failing with EMFILE would pull a
# healthy endpoint), logs.
FD_RESERVE_MIN = 256


def default_max_connections() -> int:
    """Client connections that fit the open-file limit, each with an upstream
    connection, after a reserve for the control plane; at most 10,000."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    reserve = max(FD_RESERVE_MIN, soft // 8)
    return max(16, min(10_000, (soft - reserve) // 2))


def client_factory(core: ProxyCore) -> Callable[[], asyncio.Protocol]:
    return lambda: ClientConnection(core)
