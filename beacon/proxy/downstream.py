"""The downstream side: one client connection, its request parser and its
output (see README.md "Data path" for how the pieces fit)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from beacon.proxy.exchange import Exchange
from beacon.proxy.http1 import (
    CRLF,
    IDEMPOTENT,
    LAST_CHUNK,
    REQUEST_HEADERS,
    RQ_CL,
    RQ_CONNECTION,
    RQ_COOKIE,
    RQ_DROP,
    RQ_EXPECT,
    RQ_HOST,
    RQ_REQID,
    RQ_TE,
    RQ_UPGRADE,
    RQ_XFF,
    RQ_XFH,
    RQ_XFP,
    SEP,
    RequestRejected,
    error_response,
    printable,
)  # fmt: skip
from beacon.proxy.metrics import UNROUTED

if TYPE_CHECKING:
    from beacon.proxy.core import ProxyCore
    from beacon.proxy.upstream import UpstreamConnection

log = logging.getLogger("beacon.proxy")

INF = float("inf")
# Body buffered while the upstream connection is being set up (and bytes
# after an upgrade request); above it the client is paused.
PENDING_HIGH_WATER = 256 * 1024
# Client connection modes.
MODE_HTTP, MODE_UPGRADING, MODE_TUNNEL, MODE_CLOSING = range(4)
# Reasons to pause reading from the client (bit flags).
PAUSE_PIPELINE, PAUSE_BUFFER, PAUSE_UPSTREAM = 1, 2, 4


class ClientConnection(asyncio.Protocol):
    """The downstream side: parses requests, answers errors, streams responses."""

    forwarded_proto = b"X-Forwarded-Proto: http\r\n"  # TLS connections (tls/frontend.py) say https
    tls = False

    def __init__(self, core: ProxyCore) -> None:
        # The core decides routing and outcomes; this connection owns its parser,
        # its output buffer, its deadline and the order of its exchanges.
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
        self.held_from = -1  # >= 0: out[held_from:] is a response not to send yet
        self.rejected: RequestRejected | None = None
        self.eof = False
        self.peer = b""
        self.trusted = False
        self.xff_line = b""
        self.forwarded = b""
        # Bytes written to the client, counted only with --access-log (count_sent_bytes).
        self.sent_bytes = 0
        self.logged_bytes = 0

    # ------------------------------------------------------------ lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        core = self.core
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        self.peer = ip.encode()
        self.trusted = core.is_trusted(ip)
        self.xff_line = b"X-Forwarded-For: " + self.peer + CRLF
        self.forwarded = self.xff_line + self.forwarded_proto
        self.deadline = core.now + core.header_timeout
        refused = core.client_opened(self)
        if refused is not None:
            self.mode = MODE_CLOSING
            if refused:
                answer = error_response(503, refused, core.next_request_id(), True)
                self.transport.write(answer)
                if core.access_log is not None:
                    core.access_log.refused(self.peer, len(answer), core.max_connections)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        core = self.core
        core.client_closed(self)
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

    @property
    def closing(self) -> bool:
        return self.mode == MODE_CLOSING

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
                    up.send(data)
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
        heading = self.cur if self.in_head else None  # a head in progress before this chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self.in_head and self.cur is heading:
            # The same head spans the whole chunk: count it all (httptools
            # buffers a header line it has not finished, so this is the bound
            # on that). A head that began inside this chunk is not counted for
            # it - the chunk also held the requests before it - only for the
            # next ones: the bound is then the limit plus one read.
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
            return self.tunnel.pass_eof()
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
                self.buffer(error_response(rejected.status, rejected.message, ex.reqid or b"-", True))
                self.flush()  # before abandon, which logs it (with these bytes)
                core.abandon(ex, rejected.status)
                if ex.stats is not None:
                    ex.stats.observe(rejected.status, time.perf_counter() - ex.t0, ex.method)
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
            ex.host = value  # sent by the core: never filtered, replaced by an absolute-form authority
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
        if not ex.done:
            # Waiting for the response: the upstream's try timeout governs. (An
            # exchange answered already, e.g. a 404, left the idle deadline set.)
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

    def start_tunnel(self, up: UpstreamConnection, rest: bytes) -> bytes:
        """The upstream switched protocols: relay raw bytes from now on.

        `rest` is what the upstream sent after its 101; returns the bytes the
        client sent after its upgrade request (held until now)."""
        self.mode = MODE_TUNNEL
        self.tunnel = up
        self.active = None
        self.deadline = self.core.now + self.core.idle_timeout
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        if rest:
            self.out.append(rest)
        self.flush()
        early = b"".join(self.early)
        self.early.clear()
        self.early_size = 0
        return early

    def relay(self, data: bytes) -> None:
        """Tunnel bytes from the upstream."""
        if not self.transport.is_closing():
            self.transport.write(data)
        self.deadline = self.core.now + self.core.idle_timeout

    def pass_eof(self) -> bool:
        """The tunnel's upstream half-closed: pass it on. False when both
        directions have ended (the connection is closed then)."""
        self.flush()
        transport = self.transport
        if self.eof or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return False
        transport.write_eof()
        return True

    def tunnel_lost(self) -> None:
        """The tunnel's upstream connection is gone."""
        self.tunnel = None
        self.close()

    # ---------------------------------------------------------------- output
    def buffer(self, data: bytes) -> None:
        """Queue response bytes; they go out in one write at the end of the
        current read (`flush`)."""
        self.out.append(data)

    def buffer_chunk(self, data: bytes) -> None:
        self.out += (b"%x\r\n" % len(data), data, CRLF)

    def hold_output(self) -> None:
        """Keep what is buffered from now on until `release_output` (a small
        response, sent whole) or `drop_held_output` (its upstream died)."""
        self.held_from = len(self.out)

    def release_output(self) -> None:
        self.held_from = -1

    def drop_held_output(self) -> bool:
        """Forget the held part of a response; False if nothing was held."""
        if self.held_from < 0:
            return False
        del self.out[self.held_from :]
        self.held_from = -1
        return True

    def flush(self) -> None:
        out = self.out
        if out and self.held_from < 0:
            if not self.transport.is_closing():
                self.transport.write(b"".join(out))
            out.clear()

    def count_sent_bytes(self) -> None:
        """Count what `flush` writes (for the access log). Swapping the bound
        method keeps the plain `flush` free of even a flag check when the
        access log is off; the core calls this once per connection."""
        self.flush = self._flush_counting  # type: ignore[method-assign]

    def _flush_counting(self) -> None:
        out = self.out
        if out and self.held_from < 0:
            if not self.transport.is_closing():
                data = b"".join(out)
                self.sent_bytes += len(data)
                self.transport.write(data)
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
    def is_idle(self) -> bool:
        """Nothing being received, served, queued or tunnelled."""
        return self.active is None and not self.in_head and self.tunnel is None and not self.queue

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
            core = self.core
            if ex is not None:
                core.abandon(ex, 408)
            cut, self.cur = self.cur, None
            self.in_head = False
            reqid = core.next_request_id()
            self.buffer(error_response(408, "request header timeout", reqid, True))
            self.flush()  # before the line is logged (with these bytes)
            if cut is not None:
                cut.reqid = reqid
                if cut.url:  # the method came before it (the parser names it only at the head's end)
                    cut.method = self.parser.get_method()
                core.cut_off(cut, 408)
            self.close()
            return
        if ex is None:
            self.close()  # idle keep-alive
            return
        if not ex.response_started and ex.error is None:
            self.buffer(error_response(408, "request body timeout", ex.reqid or b"-", True))
            self.flush()  # before abandon, which logs it (with these bytes)
            self.core.abandon(ex, 408)
            self.close()
            return
        self.abort()
