"""The forwarding data path: asyncio Protocols, httptools parsers, pooled upstreams.

Design for speed (the proxy's hot path; see README.md "Data path"):

- No task and no coroutine per request. A request with a pooled upstream
  connection is parsed, routed, balanced and written upstream inside one
  `data_received` call; the response is parsed and written back inside the
  upstream's `data_received`. Only a new upstream connection (slow path)
  starts a task.
- Everything that depends on the catalog (routes, pools, header bytes) is
  computed once per snapshot in `ProxyCore.apply`.
- Writes are batched: the parser callbacks append to a list and one
  `transport.write` per received chunk sends head and body together.
- Timeouts use one coarse clock and one sweeper tick (`ProxyCore._sweep`)
  instead of a timer per request: the hot path only stores a float deadline.
- Bodies stream with flow control in both directions (pause_reading when the
  other side's write buffer is full), so memory stays bounded for any size.

HTTP parsing is httptools (llhttp); it rejects conflicting Content-Length /
Transfer-Encoding, duplicate Content-Length and bad chunking by itself, which
we answer with 400. Requests are always sent upstream as HTTP/1.1 keep-alive;
bodies are re-framed (Content-Length passes through, chunked is re-chunked,
trailers dropped).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import httptools

from beacon.config import Config
from beacon.proxy.balancer import Ejection, EndpointState, Pool
from beacon.proxy.metrics import UNROUTED, ProxyMetrics, ServiceStats
from beacon.proxy.router import Route, RoutingTable, build_table, strip_prefix
from beacon.registry.model import Endpoint, Service, Snapshot, State, parse_lb

log = logging.getLogger("beacon.proxy")

INF = float("inf")
CRLF = b"\r\n"
SEP = b": "
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_IDLE_PER_ENDPOINT = 256
MAX_RESPONSE_HEAD = 256 * 1024
# Request body kept for a retry after the upstream reset (idempotent requests only).
REPLAY_LIMIT = 64 * 1024
# Body buffered while the upstream connection is being set up; above it the
# client is paused.
PENDING_HIGH_WATER = 256 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
GATEWAY_ERRORS = frozenset({502, 503, 504})
# A client that sent a malformed head may not frame the next one right either.
CLOSING_ERRORS = frozenset({400, 408, 413, 417, 431})

# Request headers that need more than copying (one dict lookup per header).
(
    RQ_HOST, RQ_CONNECTION, RQ_DROP, RQ_TE, RQ_UPGRADE, RQ_EXPECT, RQ_CL,
    RQ_XFF, RQ_XFP, RQ_XFH, RQ_FORWARDED, RQ_REQID, RQ_COOKIE,
) = range(13)  # fmt: skip
REQUEST_HEADERS: dict[bytes, int] = {
    b"host": RQ_HOST,
    b"connection": RQ_CONNECTION,
    b"keep-alive": RQ_DROP,
    b"proxy-connection": RQ_DROP,
    b"te": RQ_DROP,
    b"trailer": RQ_DROP,
    b"transfer-encoding": RQ_TE,
    b"upgrade": RQ_UPGRADE,
    b"expect": RQ_EXPECT,
    b"content-length": RQ_CL,
    b"x-forwarded-for": RQ_XFF,
    b"x-forwarded-proto": RQ_XFP,
    b"x-forwarded-host": RQ_XFH,
    b"forwarded": RQ_FORWARDED,
    b"x-real-ip": RQ_FORWARDED,
    b"x-request-id": RQ_REQID,
    b"cookie": RQ_COOKIE,
}
# Connection tokens that name no extra hop-by-hop header.
PLAIN_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
# A lowercase header block that may hold a hop-by-hop header besides Connection.
RARE_HOP = re.compile(rb"\n[ktup]")
# Response headers that are hop-by-hop (and Content-Length, which decides framing).
HOP_HEADER = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade|content-length)"
    rb":[ \t]*([^\r]*)",
    re.IGNORECASE,
)

# How the response body goes to the client.
BODY_NONE, BODY_RAW, BODY_CHUNKED, BODY_RAW_CLOSE = range(4)
# Client connection modes.
MODE_HTTP, MODE_UPGRADING, MODE_TUNNEL, MODE_CLOSING = range(4)
# Reasons to pause reading from the client (bit flags).
PAUSE_PIPELINE, PAUSE_BUFFER, PAUSE_UPSTREAM = 1, 2, 4

REASONS = {
    200: b"OK", 308: b"Permanent Redirect", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip


class UpstreamProtocolError(Exception):
    """An upstream broke HTTP (answered what was not asked): its connection is dropped."""


class RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing with a client error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_status_lines: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_status_lines) < 512:  # reasons come from upstreams: bound the cache
            _status_lines[key] = line
    return line


def error_response(status: int, message: str, request_id: bytes, close: bool, head_only: bool = False,
                   extra: bytes = b"") -> bytes:
    body = message.encode("utf-8", "replace") + b"\n"
    parts = [
        status_line(status, REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
        b"X-Request-Id: " + request_id + extra + CRLF,  # extra: b"\r\nName: value" lines
        b"Connection: close\r\n" if close else b"",
        CRLF,
        b"" if head_only else body,
    ]
    return b"".join(parts)


def printable(raw: bytes, limit: int = 100) -> str:
    return raw[:limit].decode("ascii", "replace")


class Exchange:
    """One request and its response, from the client's header to the last byte."""

    __slots__ = (
        "attempts", "body_log", "body_log_size", "body_size", "chunked", "cl", "client",
        "close_client", "conn_value", "cookie", "done", "endpoint", "error", "expect", "extra", "head",
        "host", "http11", "idempotent", "is_head", "keep_alive", "last_failure", "lines",
        "method", "pending", "pending_size", "reqid", "request_done", "response_started",
        "route", "set_cookie", "stats", "status", "t0", "tried", "upgrade",
        "upgrade_value", "upstream", "url", "xff", "xfh", "xfp",
    )  # fmt: skip

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.url = b""
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.cl: bytes | None = None
        self.chunked = False
        self.conn_value: bytes | None = None
        self.upgrade_value: bytes | None = None
        self.expect = False
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.xfh: bytes | None = None
        self.reqid = b""
        self.cookie: bytes | None = None
        self.error: tuple[int, str] | None = None
        self.method = b""
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_log: list[bytes] | None = []
        self.body_log_size = 0
        self.body_size = 0
        self.request_done = False
        self.response_started = False
        self.done = False
        self.status = 0
        self.keep_alive = True
        self.http11 = True
        self.close_client = False
        self.is_head = False
        self.idempotent = True
        self.upgrade = False
        self.route: Route | None = None
        self.stats: ServiceStats | None = None
        self.endpoint: EndpointState | None = None
        self.upstream: UpstreamConnection | None = None
        self.tried: list[EndpointState] = []
        self.attempts = 0
        self.last_failure = ""
        self.set_cookie: bytes | None = None
        self.extra = b""  # response header lines (b"\r\nName: value") the TLS hooks add
        self.t0 = time.perf_counter()

    # --------------------------------------------------------- request body
    def push(self, data: bytes) -> None:
        """Queue request bytes (body frames) for the upstream, keeping a replay copy."""
        self.pending.append(data)
        self.pending_size += len(data)
        log_ = self.body_log
        if log_ is not None:
            self.body_log_size += len(data)
            if self.body_log_size > REPLAY_LIMIT:
                self.body_log = None
            else:
                log_.append(data)

    def flush(self) -> None:
        up = self.upstream
        if up is not None and self.pending:
            if not up.closed:
                up.transport.write(b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0


class ClientConnection(asyncio.Protocol):
    """The downstream side: parses requests, answers errors, streams responses."""

    forwarded_proto = b"X-Forwarded-Proto: http\r\n"  # TLS connections (tls/frontend.py) say https
    tls = False

    def __init__(self, core: ProxyCore) -> None:
        self.core = core
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.mode = MODE_HTTP
        self.cur: Exchange | None = None  # being parsed
        self.active: Exchange | None = None  # being served
        self.queue: deque[Exchange] = deque()  # pipelined, waiting
        self.tunnel: UpstreamConnection | None = None
        # Bytes after an upgrade request: the new protocol's, held until a 101.
        self.early: list[bytes] = []
        self.early_size = 0
        self.in_head = False
        self.head_size = 0
        self.head_raw = 0
        self.paused = 0
        self.writing_paused = False
        self.deadline = INF
        self.out: list[bytes] = []
        self.rejected: RequestRejected | None = None
        self.eof = False
        self.peer = b""
        self.trusted = False
        self.xff_line = b""
        self.forwarded = b""

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        core = self.core
        core.clients.add(self)
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        self.peer = ip.encode()
        self.trusted = core.is_trusted(ip)
        self.xff_line = b"X-Forwarded-For: " + self.peer + CRLF
        self.forwarded = self.xff_line + self.forwarded_proto
        self.deadline = core.now + core.header_timeout
        if core.stopping:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        core = self.core
        core.clients.discard(self)
        if core.drained is not None and not core.clients:
            core.drained.set()
        self.mode = MODE_CLOSING
        if self.tunnel is not None:
            up, self.tunnel = self.tunnel, None
            up.end_tunnel()
        for ex in (self.active, *self.queue):
            if ex is not None:
                core.abandon(ex)
        self.active = None
        self.queue.clear()
        self.cur = None

    def close(self) -> None:
        self.mode = MODE_CLOSING
        self.flush()
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.mode = MODE_CLOSING
        self.out.clear()
        self.transport.abort()

    # ----------------------------------------------------------------- input
    def data_received(self, data: bytes) -> None:
        mode = self.mode
        core = self.core
        if mode != MODE_HTTP:
            if mode == MODE_TUNNEL:
                up = self.tunnel
                if up is not None and not up.closed:
                    up.transport.write(data)
                    self.deadline = core.now + core.idle_timeout
            elif mode == MODE_UPGRADING:
                # Not sent before the 101: if the upstream answers otherwise they
                # would reach it as raw HTTP (an unfiltered pipelined request).
                self.early.append(data)
                self.early_size += len(data)
                if self.early_size > PENDING_HIGH_WATER:
                    self.pause(PAUSE_BUFFER)
            return
        if not self.in_head:
            self.deadline = core.now + core.idle_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self.in_head:
            self.head_raw += len(data)
            if self.head_raw > core.max_header_size:
                self._reject(RequestRejected(431, "request header too large"))
                return
        ex = self.active
        if ex is not None and ex.pending:
            if ex.upstream is not None:
                ex.flush()
            elif ex.pending_size > PENDING_HIGH_WATER:
                self.pause(PAUSE_BUFFER)
        if self.out:
            self.flush()

    def eof_received(self) -> bool | None:
        # A client half-close: the request being served still gets its
        # response (then we close); an idle connection just closes.
        self.eof = True
        if self.tunnel is not None:
            up = self.tunnel
            if up.eof or up.closed or not up.transport.can_write_eof():
                up.close()  # both directions ended: the tunnel is over
                return False
            up.transport.write_eof()
            return True
        return self.active is not None

    def _parse_failed(self, exc: Exception) -> None:
        rejected = self.rejected
        if rejected is None:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, RequestRejected):
                log.error("failed: proxy request handling: %r", cause, exc_info=cause)
            rejected = RequestRejected(400, f"malformed request: {exc}")
        self._reject(rejected)

    def _reject(self, rejected: RequestRejected) -> None:
        """Answer a request the parser cannot continue with, then close."""
        self.mode = MODE_CLOSING
        self.in_head = False
        core = self.core
        ex, self.cur = self.cur, None
        if ex is not None and (ex is self.active or ex in self.queue):
            # The request was being served when its body broke (too large, bad chunking).
            if ex is self.active and not ex.response_started and not ex.done:
                core.abandon(ex)
                if ex.stats is not None:
                    ex.stats.observe(rejected.status, time.perf_counter() - ex.t0)
                self.out.append(error_response(rejected.status, rejected.message, ex.reqid or b"-", True))
                self.close()
            else:
                self.abort()
            return
        ex = ex or Exchange(self)
        ex.error = (rejected.status, rejected.message)
        ex.stats = core.metrics.service(UNROUTED)
        ex.reqid = ex.reqid or core.next_request_id()
        ex.close_client = True
        ex.request_done = True
        if self.active is None:
            self.active = ex
            core.serve(ex)
        else:
            self.queue.append(ex)

    # ------------------------------------------------ request parser callbacks
    def on_message_begin(self) -> None:
        self.cur = Exchange(self)
        self.in_head = True
        self.head_size = 0
        self.head_raw = 0
        core = self.core
        self.deadline = core.now + core.header_timeout

    def on_url(self, url: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ex.url += url
        self.head_size += len(url)
        if self.head_size > self.core.max_header_size:
            self.rejected = RequestRejected(431, "request header too large")
            raise self.rejected

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.cur
        assert ex is not None
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.core.max_header_size:
            self.rejected = RequestRejected(431, "request header too large")
            raise self.rejected
        code = REQUEST_HEADERS.get(name.lower())
        if code is None:
            ex.lines += (name, SEP, value, CRLF)
            return
        if code == RQ_HOST:
            if ex.host is not None:
                ex.error = (400, "more than one Host header")
            ex.host = value
            ex.lines += (name, SEP, value, CRLF)
        elif code == RQ_CL:
            ex.cl = value
        elif code == RQ_TE:
            ex.chunked = True  # llhttp rejects anything where chunked is not last
        elif code == RQ_CONNECTION:
            ex.conn_value = value if ex.conn_value is None else ex.conn_value + b"," + value
        elif code == RQ_DROP:
            pass
        elif code == RQ_COOKIE:
            ex.cookie = value if ex.cookie is None else ex.cookie + b"; " + value
            ex.lines += (name, SEP, value, CRLF)
        elif code == RQ_UPGRADE:
            ex.upgrade_value = value
        elif code == RQ_EXPECT:
            if value.strip().lower() == b"100-continue":
                ex.expect = True
            else:
                ex.error = (417, f"unsupported expectation {printable(value)!r}")
        elif code == RQ_REQID:
            if 0 < len(value) <= 200 and value.isascii() and b" " not in value:
                ex.reqid = value
        elif self.trusted:
            if code == RQ_XFF:
                ex.xff = value if ex.xff is None else ex.xff + b", " + value
            elif code == RQ_XFP:
                ex.xfp = value
            elif code == RQ_XFH:
                ex.xfh = value
            else:
                ex.lines += (name, SEP, value, CRLF)
        # Untrusted X-Forwarded-*, Forwarded, X-Real-IP: dropped (spoofing).

    def on_headers_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        self.in_head = False
        parser = self.parser
        core = self.core
        method = ex.method = parser.get_method()
        ex.keep_alive = parser.should_keep_alive()
        ex.http11 = parser.get_http_version() == "1.1"
        ex.is_head = method == b"HEAD"
        ex.idempotent = method in IDEMPOTENT
        ex.reqid = ex.reqid or core.next_request_id()
        core.prepare(ex, parser.should_upgrade())
        if ex.error is not None and (ex.cl not in (None, b"0") or ex.chunked):
            ex.close_client = True  # we will not read the body we refused
        if self.active is None:
            self.active = ex
            core.serve(ex)
        else:
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        assert ex is not None
        ex.body_size += len(body)
        core = self.core
        if core.max_body_size and ex.body_size > core.max_body_size:
            self.rejected = RequestRejected(413, "request body too large")
            raise self.rejected
        if ex.error is not None or ex.done:
            return
        if ex.chunked:
            ex.push(b"%x\r\n" % len(body))
            ex.push(body)
            ex.push(CRLF)
        else:
            ex.push(body)

    def on_message_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        self.cur = None
        ex.request_done = True
        self.deadline = INF
        if ex.chunked and ex.error is None:
            ex.push(LAST_CHUNK)

    # --------------------------------------------------------------- upgrade
    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser saw an Upgrade request: later bytes belong to the new protocol."""
        self.mode = MODE_UPGRADING
        ex = self.active
        if ex is None:
            self.close()  # already answered (an error): nothing will be tunnelled
            return
        # Whatever the answer, the connection ends with this exchange: the bytes
        # after the request belong to the new protocol, never to HTTP.
        ex.close_client = True
        if ex.upgrade_value is None or ex.error is not None:
            return  # behind a pipelined request, or refused
        if rest:
            self.early.append(rest)
            self.early_size += len(rest)

    def start_tunnel(self, up: UpstreamConnection) -> None:
        self.mode = MODE_TUNNEL
        self.tunnel = up
        self.active = None
        self.deadline = self.core.now + self.core.idle_timeout
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()

    # ---------------------------------------------------------------- output
    def flush(self) -> None:
        out = self.out
        if out:
            if not self.transport.is_closing():
                self.transport.write(b"".join(out))
            out.clear()

    def pause(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.mode != MODE_CLOSING:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None:
            up.pause_reading()
        self.deadline = self.core.now + self.core.idle_timeout

    def resume_writing(self) -> None:
        self.writing_paused = False
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None:
            up.resume_reading()
        if self.tunnel is None and self.active is not None:
            self.deadline = INF

    # ------------------------------------------------------------ exchanges
    def exchange_finished(self, ex: Exchange) -> None:
        """The active exchange is over: close, or serve the next request."""
        self.active = None
        if ex.close_client or not ex.keep_alive or self.core.stopping or self.mode == MODE_UPGRADING or self.eof:
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.resume(PAUSE_PIPELINE)
            self.active = nxt
            self.core.serve(nxt)
            return
        if self.mode == MODE_CLOSING:
            self.close()
            return
        if self.paused:
            self.resume(PAUSE_BUFFER | PAUSE_UPSTREAM)
        if not self.in_head:
            self.deadline = self.core.now + self.core.idle_timeout

    def timed_out(self) -> None:
        if self.tunnel is not None:
            log.debug("timeout: idle tunnel from %s", printable(self.peer))
            self.abort()
            return
        ex = self.active
        if self.in_head:
            # Slowloris: the header did not arrive in time.
            if ex is not None:
                self.core.abandon(ex)
            self.out.append(error_response(408, "request header timeout", self.core.next_request_id(), True))
            self.close()
            return
        if ex is None:
            self.close()  # idle keep-alive
            return
        if not ex.response_started and ex.error is None:
            self.core.abandon(ex)
            self.out.append(error_response(408, "request body timeout", ex.reqid or b"-", True))
            self.close()
            return
        self.abort()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an endpoint; pooled between requests."""

    def __init__(self, core: ProxyCore, state: EndpointState) -> None:
        self.core = core
        self.state = state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.tunnel: ClientConnection | None = None
        self.closed = False
        self.eof = False
        self.deadline = INF
        self.reading_paused = False
        self.requests = 0
        # Per response:
        self.rx = b""  # the chunk being parsed
        self.head_from = 0  # where in it the response head starts
        self.hpart = b""  # start of a head that spans chunks
        self.in_head = False  # a response head is expected or incomplete
        self.status = 0
        self.body_mode = BODY_NONE
        self.eof_body = False
        self.interim = False
        self.finish_after_feed = False
        self.response_done = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        self.core.upstreams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        core = self.core
        core.upstreams.discard(self)
        idle = self.state.idle
        if self.exchange is None and self in idle:
            idle.remove(self)
        if self.tunnel is not None:
            client, self.tunnel = self.tunnel, None
            self.state.inflight -= 1
            client.tunnel = None
            client.close()
            return
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self.eof_body and ex.response_started and not ex.done:
            # A body delimited by the connection's end: this EOF completes it.
            self.response_done = True
            if self.body_mode == BODY_CHUNKED:
                ex.client.out.append(LAST_CHUNK)
            core.response_complete(ex, self, reusable=False)
            ex.client.flush()
            return
        core.upstream_failed(ex, self, "reset" if exc is None else f"reset ({exc})")

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.tunnel is not None:
            client = self.tunnel
            client.flush()
            if client.eof or client.transport.is_closing() or not client.transport.can_write_eof():
                client.close()  # both directions ended: the tunnel is over
                return False
            client.transport.write_eof()
            return True
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
            self.deadline = INF  # the client's deadline governs while it is slow

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
            if self.tunnel is None:
                self.deadline = self.core.now + self.core.idle_timeout

    def pause_writing(self) -> None:
        client = self.tunnel or (self.exchange.client if self.exchange is not None else None)
        if client is not None:
            client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        client = self.tunnel or (self.exchange.client if self.exchange is not None else None)
        if client is not None:
            client.resume(PAUSE_UPSTREAM)

    def end_tunnel(self) -> None:
        if self.tunnel is not None:
            self.tunnel = None
            self.state.inflight -= 1
        self.close()

    # ------------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        core = self.core
        if self.tunnel is not None:
            client = self.tunnel
            if not client.transport.is_closing():
                client.transport.write(data)
            client.deadline = core.now + core.idle_timeout
            return
        ex = self.exchange
        if ex is None:
            self.abort()  # bytes nobody asked for: this connection is out of sync
            return
        self.deadline = core.now + core.idle_timeout
        self.rx = data
        if self.in_head and not self.hpart:
            self.head_from = 0  # no pipelining upstream: a head starts a chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switch_to_tunnel(ex, data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, UpstreamProtocolError):
                log.error("failed: proxy response handling: %r", cause, exc_info=cause)
            self.exchange = None
            self.abort()
            core.upstream_failed(ex, self, f"invalid response ({exc})")
            ex.client.flush()
            return
        if self.in_head:
            # The head continues in the next chunk: keep what we have of it.
            self.hpart += data[self.head_from :] if not self.hpart else data
            self.head_from = 0
            if len(self.hpart) > MAX_RESPONSE_HEAD:
                self.exchange = None
                self.abort()
                core.upstream_failed(ex, self, "response header too large")
                ex.client.flush()
                return
        if self.finish_after_feed:
            # A response without a body the parser cannot know of (HEAD):
            # done after its header; the next one needs a fresh parser.
            self.finish_after_feed = False
            self.parser = httptools.HttpResponseParser(self)
            self.response_done = True
            core.response_complete(ex, self, reusable=self.keep_alive)
        ex.client.flush()

    def _switch_to_tunnel(self, ex: Exchange, rest: bytes) -> None:
        client = ex.client
        core = self.core
        self.exchange = None
        self.tunnel = client
        self.deadline = INF
        ex.upstream = None
        ex.done = True
        if ex.stats is not None:
            ex.stats.observe(101, time.perf_counter() - ex.t0)
        if ex.endpoint is not None:
            core.pool_success(ex.endpoint)
        client.start_tunnel(self)
        if rest:
            client.out.append(rest)
        client.flush()
        early = [*ex.pending, *client.early]  # bytes the client sent after its upgrade request
        if early:
            self.transport.write(b"".join(early))
            ex.pending.clear()
            client.early.clear()
            client.early_size = 0

    # --------------------------------------------- response parser callbacks
    # No on_status/on_header: httptools then makes no Python call per header.
    # The head is taken raw from the received bytes (llhttp is strict: CRLF
    # line ends, no folding, so the raw head is exactly what was parsed) and
    # filtered with a few C-level searches. No on_message_begin either: the
    # upstream never pipelines, so a head starts a chunk or follows an interim head.
    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None or not self.in_head:
            raise UpstreamProtocolError("a response nobody asked for")
        if self.hpart:
            buf = self.hpart + self.rx
            start = 0
            base = len(self.hpart)
            self.hpart = b""
        else:
            buf = self.rx
            start = self.head_from
            base = 0
        end = buf.find(b"\r\n\r\n", start)
        first = buf.find(b"\r\n", start)
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue / 103: we answered Expect ourselves
            self.head_from = end + 4 - base  # the final head follows
            return
        self.in_head = False
        block = buf[first:end]  # b"\r\nName: value" per header
        low = block.lower()
        has_cl = b"\r\ncontent-length:" in low
        chunked = False
        upgrade_value: bytes | None = None
        # Fast path: no hop-by-hop header but (at most) one plain Connection
        # header, as nearly every upstream sends. Hop-by-hop names start with
        # k, t, u or p besides "connection"; anything else takes the full path.
        if RARE_HOP.search(low) is not None:
            block, chunked, upgrade_value = filter_hop_headers(block)
        else:
            i = low.find(b"\r\nconnection:")
            if i >= 0:
                j = low.find(b"\r\n", i + 2)
                if j < 0:
                    j = len(low)
                if low[i + 13 : j].strip() in PLAIN_CONNECTION_TOKENS and low.find(b"\r\nconnection:", j) < 0:
                    block = block[:i] + block[j:]
                else:
                    block, chunked, upgrade_value = filter_hop_headers(block)
        if status == 101 and (not ex.upgrade or upgrade_value is None):
            raise UpstreamProtocolError("101 Switching Protocols to a request that asked for no upgrade")
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        if ex.is_head or status == 204 or status == 304 or status == 101:
            mode = BODY_NONE
            if ex.is_head:
                self.finish_after_feed = True
        elif has_cl:
            mode = BODY_RAW
        else:
            if not chunked:
                self.eof_body = True  # delimited by the upstream closing
            mode = BODY_CHUNKED if ex.http11 else BODY_RAW_CLOSE
        self.body_mode = mode
        close = (
            mode == BODY_RAW_CLOSE or ex.close_client or not ex.keep_alive
            or self.core.stopping or (not ex.request_done and status != 101)
        )  # fmt: skip
        if close:
            ex.close_client = True
        if buf.startswith(b"HTTP/1.1 ", start):
            parts = [buf[start:first], block, b"\r\nX-Request-Id: ", ex.reqid]
        else:  # an HTTP/1.0 upstream: we speak 1.1 to the client
            parts = [b"HTTP/1.1", buf[start + 8 : first], block, b"\r\nX-Request-Id: ", ex.reqid]
        if ex.set_cookie is not None:
            parts.append(ex.set_cookie)
        if ex.extra:
            parts.append(ex.extra)
        if status == 101:
            parts.append(b"\r\nConnection: Upgrade\r\nUpgrade: " + (upgrade_value or b""))
        elif mode == BODY_CHUNKED:
            parts.append(b"\r\nTransfer-Encoding: chunked")
        if close and status != 101:
            parts.append(b"\r\nConnection: close")
        elif not ex.http11:
            parts.append(b"\r\nConnection: keep-alive")
        parts.append(b"\r\n\r\n")
        ex.client.out.append(b"".join(parts))
        ex.response_started = True
        ex.status = status

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        if self.body_mode == BODY_CHUNKED:
            ex.client.out += (b"%x\r\n" % len(body), body, CRLF)
        elif self.body_mode != BODY_NONE:
            ex.client.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.finish_after_feed or self.status == 101:
            return
        ex = self.exchange
        assert ex is not None
        self.response_done = True
        if self.body_mode == BODY_CHUNKED:
            ex.client.out.append(LAST_CHUNK)
        self.core.response_complete(ex, self, reusable=self.keep_alive and not self.eof_body)


def filter_hop_headers(block: bytes) -> tuple[bytes, bool, bytes | None]:
    """Remove hop-by-hop headers (and those a Connection header names) from a
    raw header block; returns (block, chunked, upgrade value)."""
    chunked = False
    upgrade_value: bytes | None = None
    named: set[bytes] = set()
    keep: list[bytes] = []
    pos = 0
    for m in HOP_HEADER.finditer(block):
        lname = m.group(1).lower()
        value = m.group(2)
        if lname == b"content-length":
            continue
        if lname == b"transfer-encoding":
            chunked = value.rstrip().lower().endswith(b"chunked")
        elif lname == b"upgrade":
            upgrade_value = value
        elif lname == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")} - PLAIN_CONNECTION_TOKENS
        keep.append(block[pos : m.start()])
        pos = m.end()
    keep.append(block[pos:])
    block = b"".join(keep)
    if named:
        lines = block.split(b"\r\n")
        block = b"\r\n".join(ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in named)
    return block, chunked, upgrade_value


def parse_absolute(url: bytes) -> tuple[bytes | None, bytes]:
    """Split an absolute-form target (http://host/path) into host and path."""
    lower = url[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return None, url
    rest = url[url.find(b"//") + 2 :]
    end = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    host, path = rest[:end], rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return host, path


class ProxyCore:
    """Per-process proxy state: routing table, pools, connections, metrics, timers."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, rng: random.Random | None = None) -> None:
        self.config = config
        self.loop = loop
        self.rng = rng or random.Random()
        self.metrics = ProxyMetrics()
        self.table: RoutingTable = build_table({}, config.proxy_domain)
        self.pools: dict[str, Pool] = {}
        self.states: dict[str, EndpointState] = {}
        self.clients: set[ClientConnection] = set()
        self.upstreams: set[UpstreamConnection] = set()
        self.stopping = False
        self.drained: asyncio.Event | None = None
        self.now = loop.time()
        self.header_timeout = config.proxy_header_timeout
        self.idle_timeout = config.proxy_idle_timeout
        self.try_timeout = config.proxy_try_timeout
        self.connect_timeout = config.proxy_connect_timeout
        self.max_header_size = config.proxy_max_header_size
        self.max_body_size = config.proxy_max_body_size
        self.ejection = Ejection(
            threshold=config.eject_consecutive_failures,
            base_time=config.eject_base_time,
            max_fraction=config.eject_max_percent,
        )
        self._trusted = config.trusted_proxies
        self._trust_cache: dict[str, bool] = {}
        self._route_cache: dict[str, tuple[Service, list[Any]]] = {}
        self._pool_sources: dict[str, Service] = {}
        self._passing: set[str] = set()
        self._conflicts: set[str] = set()
        self._rid_prefix = os.urandom(5).hex().encode() + b"-"
        self._rid = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(0.02, min(1.0, min(self.header_timeout, self.idle_timeout, self.try_timeout) / 4))
        self._last_log: dict[str, float] = {}
        # Set by the TLS frontend: may answer a request before routing (ex.error / ex.extra).
        self.intercept: Callable[[Exchange, bytes, bytes], None] | None = None

    # ------------------------------------------------------------- lifecycle
    def start_timers(self) -> None:
        self._sweep()

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for c in list(self.clients):
            c.abort()
        for u in list(self.upstreams):
            u.abort()

    def begin_drain(self) -> asyncio.Event:
        """Stop taking requests: idle clients close, busy ones close after their response.

        Returns an event set once no client connection is left.
        """
        self.stopping = True
        self.drained = asyncio.Event()
        if not self.clients:
            self.drained.set()
        for c in list(self.clients):
            if c.active is None and not c.in_head and c.tunnel is None and not c.queue:
                c.close()
        return self.drained

    def _sweep(self) -> None:
        # One failing handler must neither stop this tick for the other
        # connections nor end the timer chain (no timeout would fire again).
        try:
            now = self.now = self.loop.time()
            for c in [c for c in self.clients if c.deadline <= now]:
                try:
                    c.timed_out()
                except Exception:
                    log.exception("failed: proxy timeout of a client connection from %s", printable(c.peer))
                    c.deadline = INF
                    c.abort()
            for u in [u for u in self.upstreams if u.deadline <= now]:
                try:
                    self._upstream_timed_out(u)
                except Exception:
                    log.exception("failed: proxy timeout of an upstream connection to %s:%d",
                                  u.state.address, u.state.port)  # fmt: skip
                    u.deadline = INF
                    u.abort()
        finally:
            self._sweeper = self.loop.call_later(self._tick, self._sweep)

    def _upstream_timed_out(self, up: UpstreamConnection) -> None:
        ex = up.exchange
        if up.tunnel is not None:
            up.deadline = INF  # a tunnel's idle time is watched on the client side
            return
        if ex is None:
            up.close()  # idle in the pool too long
            return
        up.exchange = None
        up.abort()
        if ex.response_started:
            log.warning("timeout: upstream %s:%d stalled mid-response", up.state.address, up.state.port)
            self.endpoint_done(ex, failed=True)
            ex.client.abort()
            return
        ex.last_failure = "timeout"
        self.endpoint_done(ex, failed=True)
        self._warn(up.state, f"timeout: upstream {up.state.address}:{up.state.port} sent no response header "
                   f"within {self.try_timeout:g}s (service {up.state.service})")  # fmt: skip
        self._fail(ex, 504, f"upstream of service {up.state.service} timed out")

    # ------------------------------------------------------------- snapshots
    def apply(self, snapshot: Snapshot) -> None:
        """Swap in routes and pools for a new snapshot (established connections stay).

        Called inside the catalog's publish, so it is incremental: only services
        whose Service object changed are rebuilt, and the routing table is
        reused when no route changed.
        """
        now = self.now = self.loop.time()
        table = build_table(snapshot, self.config.proxy_domain, self._route_cache, self.table)
        if table is not self.table:
            conflicts = {c.describe() for c in table.conflicts}
            for text in sorted(conflicts - self._conflicts):
                log.warning("conflict: route %s", text)
            self._conflicts = conflicts
        services = snapshot.services
        old_sources = self._pool_sources
        changed = [name for name, svc in services.items() if old_sources.get(name) is not svc]
        removed = [name for name in old_sources if name not in services]
        if not changed and not removed:
            self.table = table
            return
        pools = dict(self.pools)
        sources = dict(old_sources)
        states = self.states
        endpoints = snapshot.endpoints
        for name in removed:
            pools.pop(name, None)
            self._forget(sources.pop(name), endpoints)
            self.metrics.forget(name)
        for name in changed:
            svc = services[name]
            old = sources.get(name)
            sources[name] = svc
            members: list[EndpointState] = []
            lb: str | None = None
            for ep in svc.endpoints:
                st = states.get(ep.id)
                if st is None or st.address != ep.address or st.port != ep.port:
                    if st is not None:
                        close_idle(st)
                    st = states[ep.id] = EndpointState(ep.id, ep.service, ep.address, ep.port, ep.weight)
                st.weight = max(1, ep.weight)
                st.service = ep.service
                if ep.state is State.PASSING:
                    if ep.id not in self._passing:
                        # Back from critical/draining: an active check vouches for it.
                        st.ejected_until = 0.0
                        st.failures = 0
                        self._passing.add(ep.id)
                    members.append(st)
                else:
                    self._passing.discard(ep.id)
                    close_idle(st)  # draining: no new requests, let the backend go
                if lb is None and ep.lb:
                    lb = ep.lb
            try:
                policy, sticky = parse_lb(lb, self.config.lb)
            except ValueError as exc:
                log.warning("ignored: beacon.lb of service %s: %s", name, exc)
                policy, sticky = self.config.lb, False
            pools[name] = Pool(name, members, policy, sticky, self.ejection, self.rng, now)
            if old is not None:
                self._forget(old, endpoints)
        self.pools = pools
        self._pool_sources = sources
        self.table = table

    def _forget(self, old: Service, endpoints: Mapping[str, Endpoint]) -> None:
        """Drop the state of endpoints of an old Service that left the catalog."""
        for ep in old.endpoints:
            if ep.id not in endpoints:
                st = self.states.pop(ep.id, None)
                if st is not None:
                    close_idle(st)
                self._passing.discard(ep.id)

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
        if url[:1] != b"/":
            if url == b"*":
                url = b"/"
            else:
                abs_host, url = parse_absolute(url)
                if abs_host is None:
                    ex.error = ex.error or (400, "request target must be a path")
                host = abs_host or host
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
        pool = self.pools.get(name)
        if pool is None or not pool.members:
            ex.error = (503, f"service {name} has no healthy endpoint")
            return
        target = strip_prefix(route.prefix, url) if route.strip else url
        cv = ex.conn_value
        if cv is not None and cv.lower() not in PLAIN_CONNECTION_TOKENS:
            # Headers the client's Connection header names are hop-by-hop too.
            named = {t.strip().lower() for t in cv.split(b",")} - PLAIN_CONNECTION_TOKENS
            lines = ex.lines
            ex.lines = [x for i in range(0, len(lines), 4) if lines[i].lower() not in named for x in lines[i : i + 4]]
        parts = [ex.method, b" ", target, b" HTTP/1.1\r\n", *ex.lines]
        if ex.xff is None and ex.xfp is None:
            parts.append(ex.client.forwarded)  # X-Forwarded-For and -Proto of this connection
        else:
            parts.append(ex.client.xff_line if ex.xff is None else
                         b"X-Forwarded-For: " + ex.xff + b", " + ex.client.peer + CRLF)  # fmt: skip
            parts.append(ex.client.forwarded_proto if ex.xfp is None else b"X-Forwarded-Proto: " + ex.xfp + CRLF)
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
            client.out.append(error_response(status, message, ex.reqid or b"-", close, ex.is_head, ex.extra))
            ex.response_started = True
            ex.status = status
            self.finish(ex)
            return
        if ex.expect and not ex.request_done:
            client.out.append(CONTINUE_100)
        self.dispatch(ex)
        client.flush()

    def dispatch(self, ex: Exchange) -> None:
        """Pick an endpoint and send the request: pooled connection now, or connect."""
        route = ex.route
        assert route is not None and ex.stats is not None
        pool = self.pools.get(route.service)
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
                self._fail(ex, 504 if ex.last_failure == "timeout" else 502,
                           f"no endpoint of service {route.service} answered ({ex.last_failure})")  # fmt: skip
            return
        ex.attempts += 1
        stats = ex.stats
        stats.attempts += 1
        if ex.attempts > 1:
            stats.retries += 1
        ex.endpoint = state
        ex.tried.append(state)
        state.inflight += 1
        idle = state.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.attach(ex, conn)
                return
        task = self.loop.create_task(self._connect(ex, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, ex: Exchange, state: EndpointState) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, state), state.address, state.port
                )
        except (OSError, TimeoutError) as exc:
            self.connect_failed(ex, state, exc)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one request take the proxy down
            log.exception("failed: connect to %s:%d", state.address, state.port)
            self.connect_failed(ex, state, exc)
            return
        if ex.done:
            self.release(conn)  # the client left while we connected
            return
        self.attach(ex, conn)
        ex.client.flush()

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        conn.exchange = ex
        conn.response_done = False
        conn.eof_body = False
        conn.interim = False
        conn.finish_after_feed = False
        conn.in_head = True
        conn.hpart = b""
        conn.requests += 1
        conn.deadline = self.now + self.try_timeout
        data = [ex.head, *ex.pending]
        ex.pending.clear()
        ex.pending_size = 0
        conn.transport.write(b"".join(data))
        client = ex.client
        client.resume(PAUSE_BUFFER)
        if client.writing_paused:
            conn.pause_reading()

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection to its endpoint's idle pool (or close it)."""
        conn.exchange = None
        state = conn.state
        if (conn.closed or self.stopping or len(state.idle) >= MAX_IDLE_PER_ENDPOINT
                or self.states.get(state.id) is not state or state.id not in self._passing):  # fmt: skip
            conn.close()
            return
        if conn.reading_paused:
            conn.reading_paused = False
            conn.transport.resume_reading()
        conn.deadline = self.now + self.idle_timeout
        state.idle.append(conn)

    # ------------------------------------------------------------- outcomes
    def pool_success(self, state: EndpointState) -> None:
        state.failures = 0

    def endpoint_done(self, ex: Exchange, failed: bool) -> None:
        state = ex.endpoint
        if state is None:
            return
        ex.endpoint = None
        state.inflight -= 1
        if not failed:
            state.failures = 0
            return
        pool = self.pools.get(state.service)
        if pool is not None and pool.record_failure(state, self.now):
            self.metrics.service(state.service).ejections += 1
            log.warning(
                "ejected: endpoint %s (%s:%d) of service %s for %.0fs after %d failures in a row",
                state.id, state.address, state.port, state.service,
                self.ejection.duration(state.ejections), self.ejection.threshold,
            )  # fmt: skip
        elif pool is None:
            state.failures += 1

    def response_complete(self, ex: Exchange, conn: UpstreamConnection, reusable: bool) -> None:
        state = ex.endpoint
        if state is not None and conn.status not in GATEWAY_ERRORS:
            ex.endpoint = None  # the common case of endpoint_done(), inlined
            state.inflight -= 1
            state.failures = 0
        else:
            self.endpoint_done(ex, failed=True)
        ex.upstream = None
        if reusable and ex.request_done and not ex.upgrade:
            # (an upgrade request answered without a 101: that connection closes)
            self.release(conn)
        else:
            conn.exchange = None
            conn.close()
            if not ex.request_done:
                ex.close_client = True
        if ex.done:
            return
        ex.done = True
        ex.stats.observe(ex.status, time.perf_counter() - ex.t0)  # type: ignore[union-attr]
        client = ex.client
        if client.active is ex:
            client.flush()
            client.exchange_finished(ex)

    def finish(self, ex: Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        if ex.stats is not None:
            ex.stats.observe(ex.status, time.perf_counter() - ex.t0)
        client = ex.client
        if client.active is ex:
            client.flush()
            client.exchange_finished(ex)

    def connect_failed(self, ex: Exchange, state: EndpointState, exc: BaseException) -> None:
        timeout = isinstance(exc, TimeoutError)
        ex.last_failure = "connect timeout" if timeout else "connect failed"
        if timeout:
            ex.last_failure = "timeout"
        self._warn(state, f"failed: connect to {state.address}:{state.port} (service {state.service}): "
                   f"{'timeout' if timeout else exc}")  # fmt: skip
        self.endpoint_done(ex, failed=True)
        if ex.done:
            return
        # Nothing was sent: any request may go to another endpoint.
        if ex.attempts < self.config.proxy_attempts:
            self.dispatch(ex)
            ex.client.flush()
        else:
            self._fail(ex, 504 if timeout else 502, f"no endpoint of service {state.service} answered ({ex.last_failure})")
            ex.client.flush()

    def upstream_failed(self, ex: Exchange, conn: UpstreamConnection, reason: str) -> None:
        """The upstream connection ended or broke before the response ended."""
        ex.upstream = None
        state = conn.state
        self.endpoint_done(ex, failed=True)
        if ex.done:
            return
        if ex.response_started:
            self._warn(state, f"failed: upstream {state.address}:{state.port} broke mid-response: {reason}")
            ex.done = True
            if ex.stats is not None:
                ex.stats.observe(502, time.perf_counter() - ex.t0)
            ex.client.abort()
            return
        ex.last_failure = reason
        self._warn(state, f"failed: upstream {state.address}:{state.port} (service {state.service}): {reason}")
        # Retry only what is safe to send twice: idempotent, and its body
        # (if any) is still complete in the replay buffer.
        if (ex.idempotent and ex.body_log is not None and ex.attempts < self.config.proxy_attempts
                and not ex.upgrade):  # fmt: skip
            ex.pending = list(ex.body_log)
            ex.pending_size = ex.body_log_size
            self.dispatch(ex)
        else:
            self._fail(ex, 502, f"upstream of service {state.service} failed: {reason}")
        ex.client.flush()

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
            client.out.append(error_response(status, message, ex.reqid or b"-", close, ex.is_head))
        self.finish(ex)

    def abandon(self, ex: Exchange) -> None:
        """The client is gone: stop the exchange and free what it holds."""
        if ex.done:
            return
        ex.done = True
        up = ex.upstream
        ex.upstream = None
        if up is not None:
            up.exchange = None
            up.abort()  # mid-request or mid-response: the connection is out of sync
        self.endpoint_done(ex, failed=False)


def close_idle(state: EndpointState) -> None:
    idle, state.idle = state.idle, []
    for conn in idle:
        conn.close()


def cookie_name(service: str) -> bytes:
    return b"beacon_" + service.encode("ascii", "replace").replace(b".", b"_")


def set_cookie_line(service: str, token: bytes) -> bytes:
    """A raw-head Set-Cookie line (leading CRLF) naming the chosen endpoint."""
    return b"\r\nSet-Cookie: " + cookie_name(service) + b"=" + token + b"; Path=/; HttpOnly; SameSite=Lax"


def sticky_cookie(cookie: bytes | None, service: str) -> bytes | None:
    if not cookie:
        return None
    wanted = cookie_name(service) + b"="
    for part in cookie.split(b";"):
        part = part.strip()
        if part.startswith(wanted):
            return part[len(wanted) :]
    return None


ProtocolFactory = Callable[[], asyncio.Protocol]


def client_factory(core: ProxyCore) -> ProtocolFactory:
    return lambda: ClientConnection(core)
