"""The upstream side: one connection to an endpoint and its response parser."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from beacon.proxy.balancer import EndpointState, FailureKind
from beacon.proxy.downstream import PAUSE_UPSTREAM
from beacon.proxy.exchange import Exchange
from beacon.proxy.http1 import LAST_CHUNK, UpstreamProtocolError, drop_content_length, filter_response_headers

if TYPE_CHECKING:
    from beacon.proxy.core import ProxyCore
    from beacon.proxy.downstream import ClientConnection
    from beacon.proxy.pool import UpstreamPool

log = logging.getLogger("beacon.proxy")

INF = float("inf")
MAX_RESPONSE_HEAD = 256 * 1024
# Content-Length bodies up to this size are held until complete (retryable).
HOLD_LIMIT = 64 * 1024
# How the response body goes to the client.
BODY_NONE, BODY_RAW, BODY_CHUNKED, BODY_RAW_CLOSE = range(4)


def _content_length(low: bytes) -> int:
    """The Content-Length of a lowercase header block that has one (llhttp
    checked it); -1 when it is too large to matter here."""
    i = low.find(b"\r\ncontent-length:")
    j = low.find(b"\r\n", i + 2)
    value = low[i + 17 : j if j >= 0 else len(low)].strip()
    return int(value) if len(value) <= 9 else -1


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an endpoint, lent by the pool to one
    exchange at a time; it reports the response's outcome to the core."""

    def __init__(self, core: ProxyCore, pool: UpstreamPool, state: EndpointState) -> None:
        self.core = core
        self.pool = pool
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
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        self.pool.opened(self)

    def start(self, ex: Exchange, deadline: float) -> None:
        """Take on an exchange: reset the per-response state and send its request."""
        self.exchange = ex
        ex.upstream = self
        self.eof_body = False
        self.interim = False
        self.finish_after_feed = False
        self.in_head = True
        self.hpart = b""
        self.requests += 1
        self.deadline = deadline
        data = ex.take_pending()
        self.transport.write(ex.head + data if data else ex.head)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def detach(self) -> None:
        """The exchange no longer needs this connection: it is out of sync, drop it."""
        self.exchange = None
        self.abort()

    def close_after_exchange(self) -> None:
        """The exchange is over and this connection is not kept."""
        self.exchange = None
        self.close()

    def idle(self, deadline: float) -> None:
        """Back in the pool: reading again (a FIN must be seen), until `deadline`."""
        self.exchange = None
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.deadline = deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        core = self.core
        self.pool.lost(self)
        if self.tunnel is not None:
            client, self.tunnel = self.tunnel, None
            core.tunnel_ended(self.state)
            client.tunnel_lost()
            return
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if self.eof_body and ex.response_started and not ex.done:
            # A body delimited by the connection's end: this EOF completes it.
            if self.body_mode == BODY_CHUNKED:
                ex.client.buffer(LAST_CHUNK)
            core.response_complete(ex, self, reusable=False)
            ex.client.flush()
            return
        core.upstream_failed(ex, self, FailureKind.RESET, "reset" if exc is None else f"reset ({exc})")

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.tunnel is not None:
            return self.tunnel.pass_eof()
        return False

    def pass_eof(self) -> bool:
        """The tunnel's client half-closed: pass it on. False when both
        directions have ended (the connection is closed then)."""
        if self.eof or self.closed or not self.transport.can_write_eof():
            self.close()
            return False
        self.transport.write_eof()
        return True

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
        """The tunnel's client is gone."""
        if self.tunnel is not None:
            self.tunnel = None
            self.core.tunnel_ended(self.state)
        self.close()

    # ------------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        core = self.core
        if self.tunnel is not None:
            self.tunnel.relay(data)
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
            core.upstream_failed(ex, self, FailureKind.INVALID_RESPONSE, f"invalid response ({exc})")
            ex.client.flush()
            return
        if self.in_head:
            # The head continues in the next chunk: keep what we have of it.
            self.hpart += data[self.head_from :] if not self.hpart else data
            self.head_from = 0
            if len(self.hpart) > MAX_RESPONSE_HEAD:
                self.exchange = None
                self.abort()
                core.upstream_failed(ex, self, FailureKind.RESPONSE_HEAD_TOO_LARGE, "response header too large")
                ex.client.flush()
                return
        if self.finish_after_feed:
            # A response without a body the parser cannot know of (HEAD):
            # done after its header; the next one needs a fresh parser.
            self.finish_after_feed = False
            self.parser = httptools.HttpResponseParser(self)
            core.response_complete(ex, self, reusable=self.keep_alive)
        ex.client.flush()

    def _switch_to_tunnel(self, ex: Exchange, rest: bytes) -> None:
        client = ex.client
        self.exchange = None
        self.tunnel = client
        self.deadline = INF
        self.core.tunnel_started(ex)
        # Bytes the client sent after its upgrade request, held until the 101.
        early = ex.take_pending() + client.start_tunnel(self, rest)
        if early:
            self.transport.write(early)

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
        block, chunked, upgrade_value = filter_response_headers(block, low)
        if status == 101 and (not ex.upgrade or upgrade_value is None):
            raise UpstreamProtocolError("101 Switching Protocols to a request that asked for no upgrade")
        if status == 204 and has_cl:
            block = drop_content_length(block)  # never on a 204 (RFC 9110 §8.6)
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        if ex.is_head or status == 204 or status == 304 or status == 101:
            mode = BODY_NONE
            if ex.is_head:
                self.finish_after_feed = True
                if chunked or (has_cl and _content_length(low) != 0):
                    # It announced a body it must not send: should it send one
                    # anyway, even late, those bytes would become the answer to
                    # the next request on this connection (another client's).
                    # So it is never reused. (nginx's keepalive cache only drops
                    # bytes that arrive while a connection is idle; so do we.)
                    self.keep_alive = False
        elif has_cl:
            mode = BODY_RAW
        else:
            if not chunked:
                self.eof_body = True  # delimited by the upstream closing
            mode = BODY_CHUNKED if ex.http11 else BODY_RAW_CLOSE
        self.body_mode = mode
        if mode == BODY_RAW and 0 <= _content_length(low) <= HOLD_LIMIT:
            # A small body: the client gets the response only once it is
            # complete, so an upstream that dies before its end (a killed
            # backend) leaves nothing sent and the request can be retried.
            ex.client.hold_output()
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
        ex.client.buffer(b"".join(parts))
        ex.response_started = True
        ex.status = status

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        if self.body_mode == BODY_CHUNKED:
            ex.client.buffer_chunk(body)
        elif self.body_mode != BODY_NONE:
            ex.client.buffer(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.finish_after_feed or self.status == 101:
            return
        ex = self.exchange
        assert ex is not None
        if self.body_mode == BODY_CHUNKED:
            ex.client.buffer(LAST_CHUNK)
        ex.client.release_output()
        self.core.response_complete(ex, self, reusable=self.keep_alive and not self.eof_body)
