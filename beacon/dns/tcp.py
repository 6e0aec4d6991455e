"""DNS over TCP: one protocol per client connection, and the set of open connections that
admits them up to --dns-tcp-max-connections and sweeps the idle ones (--dns-tcp-idle-timeout).

What a query gets is not decided here: each complete message goes to the server's `on_query`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from beacon.dns.logs import Throttle, escape
from beacon.dns.metrics import DnsMetrics

TCP_MAX_WRITE_BUFFER = 1 << 20

OnQuery = Callable[["TcpConnection", bytes], None]  # one length-prefixed message, prefix removed


class TcpConnections:
    """The open DNS/TCP connections: the cap on how many, and one idle sweep for all of them."""

    def __init__(
        self, *, max_connections: int, idle_timeout: float, clock: Callable[[], float],
        metrics: DnsMetrics, throttle: Throttle,
    ) -> None:  # fmt: skip
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.metrics = metrics
        self.throttle = throttle
        self.open: set[TcpConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def admit(self, conn: TcpConnection) -> bool:
        """Admit a new connection, or refuse it (False) at --dns-tcp-max-connections."""
        cap = self.max_connections
        if len(self.open) >= cap:
            self.metrics.drop("tcp_limit")
            self.throttle.log(
                logging.WARNING, "tcp_limit",
                "refused: DNS/TCP connection from %s: %d connections open (--dns-tcp-max-connections)",
                escape(conn.host), cap,
            )  # fmt: skip
            return False
        self.open.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick(), self.sweep)
        return True

    def discard(self, conn: TcpConnection) -> None:
        self.open.discard(conn)

    def _tick(self) -> float:
        return max(0.05, min(1.0, self.idle_timeout / 4))

    def sweep(self) -> None:
        """Close connections that completed no query for --dns-tcp-idle-timeout.

        Progress is a whole query or a reply sent, not a byte: a client that
        dribbles one byte every few seconds is idle. One sweep for all
        connections (not a timer each), driven by the server's clock.
        """
        self._sweeper = None
        deadline = self.clock() - self.idle_timeout
        for conn in list(self.open):
            if not conn.tasks and conn.last_progress <= deadline:
                conn.abort()
        if self.open:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick(), self.sweep)

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class TcpConnection(asyncio.Protocol):
    """One DNS-over-TCP client: 2-byte length-prefixed messages, pipelined."""

    def __init__(self, connections: TcpConnections, on_query: OnQuery) -> None:
        self.connections = connections
        self.on_query = on_query
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.host = ""
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_progress = connections.clock()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else ""
        self.last_progress = self.connections.clock()
        if not self.connections.admit(self):
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                break
            msg = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self.last_progress = self.connections.clock()
            try:
                self.on_query(self, msg)
            except Exception as exc:
                self.connections.throttle.log(
                    logging.ERROR, f"tcp:{type(exc).__name__}", "failed: answering a DNS query over TCP: %s",
                    escape(exc), exc_info=True,
                )  # fmt: skip
                self.abort()
                return
            if self.transport is None or self.transport.is_closing():
                return

    def send(self, reply: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > TCP_MAX_WRITE_BUFFER:
            self.abort()  # the client does not read its answers
            return
        self.last_progress = self.connections.clock()
        t.write(len(reply).to_bytes(2, "big") + reply)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()
        self.connections.discard(self)
        self.transport = None
