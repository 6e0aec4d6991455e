"""One request and its response: the record the client connection, the core
and the upstream connection pass between them (uvicorn's RequestResponseCycle)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beacon.proxy.balancer import EndpointState, FailureKind
    from beacon.proxy.downstream import ClientConnection
    from beacon.proxy.metrics import ServiceStats
    from beacon.proxy.router import Route
    from beacon.proxy.upstream import UpstreamConnection

# Request body kept for a retry after the upstream reset (idempotent requests only).
REPLAY_LIMIT = 64 * 1024


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
        self.last_failure: tuple[FailureKind, str] | None = None  # (kind, detail for the log)
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

    def take_pending(self) -> bytes:
        """The queued request bytes, removed from the queue."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        return data

    def rewind(self) -> bool:
        """Queue the whole body again for a retry; False if it no longer fits the replay buffer."""
        if self.body_log is None:
            return False
        self.pending = list(self.body_log)
        self.pending_size = self.body_log_size
        return True

    def flush(self) -> None:
        """Send queued body bytes to the upstream, if one is attached."""
        up = self.upstream
        if up is not None and self.pending:
            up.send(self.take_pending())
