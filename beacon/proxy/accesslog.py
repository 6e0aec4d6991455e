"""The proxy's access log (`--access-log`): one line per finished request.

Off by default, and then it costs the data path one `is not None` check per
request. On, `record` formats the line on the loop (a few µs) and appends it
to a list; the list is handed to a writer thread once per loop turn (or every
`BATCH_LINES` lines), which writes each batch with one `os.write`. A file is
opened with O_APPEND, so worker processes appending to the same file never
split each other's lines (every write holds whole lines). The loop never
waits on the sink: when more than `MAX_BACKLOG` bytes are waiting for the
writer (a slow disk, a stdout pipe nobody reads), new lines are dropped and
counted in `beacon_proxy_access_log_dropped_total`.

Every field from outside (path, User-Agent, Referer, request id, endpoint id)
is escaped as nginx does: bytes outside printable ASCII, `"` and `\\` become
`\\xHH`, so a line is always one line of ASCII.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beacon.config import Config
    from beacon.proxy.exchange import Exchange

log = logging.getLogger("beacon.proxy")

FORMATS = ("common", "combined", "json")
STDOUT_TARGETS = ("-", "stdout")
BATCH_LINES = 256  # hand a batch to the writer at least this often within one loop turn
MAX_BACKLOG = 8 * 1024 * 1024  # bytes waiting for the writer; above it lines are dropped

_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")  # not printable ASCII, or " or \


def _hex(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match.group()[0]


def escape(raw: bytes) -> str:
    """A field from outside as one safe ASCII string (nginx's `escape=default`)."""
    if _UNSAFE.search(raw) is None:
        return raw.decode("ascii")
    return _UNSAFE.sub(_hex, raw).decode("ascii")


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    """A forwarded request header's value (`Exchange.lines` holds name, ": ", value, CRLF)."""
    for i in range(0, len(lines) - 3, 4):
        if lines[i].lower() == name:
            return lines[i + 2]
    return None


def access_log_format(config: Config) -> str:
    """--access-log-format, else json with --log-format json, else combined."""
    return config.access_log_format or ("json" if config.log_format == "json" else "combined")


class AccessLog:
    """Formats finished exchanges and writes them, batched, from a writer thread."""

    def __init__(self, target: str, fmt: str, loop: asyncio.AbstractEventLoop,
                 wall: Callable[[], float] = time.time, stdout_fd: int = 1,
                 max_backlog: int = MAX_BACKLOG) -> None:  # fmt: skip
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.target = target
        self.format = fmt
        self.loop = loop
        self.dropped = 0  # lines the sink could not keep up with (beacon_proxy_access_log_dropped_total)
        self.wall = wall  # wall-clock seconds of the line's timestamp
        self._stdout_fd = stdout_fd
        self._max_backlog = max_backlog
        self._fd = -1
        self._lines: list[str] = []
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Each counter has one writer: the loop adds to _queued, the thread to
        # _written; the backlog is their difference.
        self._queued = 0
        self._written = 0
        self._stamp_second = -1
        self._stamp = ""
        self._format_line = {"common": self._common, "combined": self._combined, "json": self._json}[fmt]

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the sink (OSError names the file) and start the writer thread."""
        if self.target in STDOUT_TARGETS:
            self._fd = os.dup(self._stdout_fd)  # ours to close; stdout stays open
        else:
            try:
                self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(exc.errno, f"access log {self.target}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._write_loop, name="beacon-access-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is buffered, then end the thread and close the sink."""
        self._hand_off()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("timeout: access log writer still busy after %.1fs; lines may be lost", timeout)
                return  # the daemon thread keeps the fd; closing it under a write would be worse
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------ loop side
    def record(self, ex: Exchange, status: int, sent: int) -> None:
        """Log one finished exchange (`status` as answered, `sent` bytes to the client)."""
        if self._queued - self._written > self._max_backlog:
            self.dropped += 1
            return
        lines = self._lines
        if not lines:
            self.loop.call_soon(self._hand_off)
        lines.append(self._format_line(ex, status, sent))
        if len(lines) >= BATCH_LINES:
            self._hand_off()

    def _hand_off(self) -> None:
        lines = self._lines
        if not lines:
            return
        data = "".join(lines).encode("ascii")
        lines.clear()
        self._queued += len(data)
        self._queue.put(data)

    # ----------------------------------------------------------- formatting
    def _fields(self, ex: Exchange) -> str:
        """Beacon's fields after the nginx ones, key=value (values never hold spaces)."""
        route = ex.route
        state = ex.tried[-1] if ex.tried else None
        endpoint = (
            f"{escape(state.id.encode())} upstream={state.address}:{state.port}" if state else "- upstream=-"
        )
        return (f" rid={escape(ex.reqid) or '-'} service={route.service if route else '-'} endpoint={endpoint}"
                f" duration_ms={(time.perf_counter() - ex.t0) * 1000:.3f} retries={max(0, ex.attempts - 1)}\n")  # fmt: skip

    def _clf_time(self) -> str:
        """`[01/Dec/2026:11:36:20 +0000]`, recomputed once a second."""
        now = int(self.wall())
        if now != self._stamp_second:
            self._stamp_second = now
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))
        return self._stamp

    def _request_line(self, ex: Exchange) -> str:
        return f'"{escape(ex.method) or "-"} {escape(ex.url) or "-"} HTTP/1.{1 if ex.http11 else 0}"'

    def _common(self, ex: Exchange, status: int, sent: int) -> str:
        return (f"{ex.client.peer.decode() or '-'} - - {self._clf_time()} {self._request_line(ex)} "
                f"{status} {sent}{self._fields(ex)}")  # fmt: skip

    def _combined(self, ex: Exchange, status: int, sent: int) -> str:
        referer = _header(ex.lines, b"referer")
        agent = _header(ex.lines, b"user-agent")
        return (f"{ex.client.peer.decode() or '-'} - - {self._clf_time()} {self._request_line(ex)} "
                f'{status} {sent} "{escape(referer) if referer is not None else "-"}" '
                f'"{escape(agent) if agent is not None else "-"}"{self._fields(ex)}')  # fmt: skip

    def _json(self, ex: Exchange, status: int, sent: int) -> str:
        route = ex.route
        state = ex.tried[-1] if ex.tried else None
        referer = _header(ex.lines, b"referer")
        agent = _header(ex.lines, b"user-agent")
        wall = self.wall()
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z",
            "request_id": escape(ex.reqid),
            "client": ex.client.peer.decode(),
            "method": escape(ex.method),
            "path": escape(ex.url),
            "protocol": "HTTP/1.1" if ex.http11 else "HTTP/1.0",
            "status": status,
            "service": route.service if route else None,
            "endpoint": escape(state.id.encode()) if state else None,
            "upstream": f"{state.address}:{state.port}" if state else None,
            "duration_ms": round((time.perf_counter() - ex.t0) * 1000, 3),
            "bytes": sent,
            "retries": max(0, ex.attempts - 1),
            "referer": escape(referer) if referer is not None else None,
            "user_agent": escape(agent) if agent is not None else None,
        }
        return json.dumps(record, separators=(",", ":")) + "\n"

    # ---------------------------------------------------------- writer side
    def _write_loop(self) -> None:
        get = self._queue.get
        while True:
            data = get()
            if data is None:
                return
            batch = [data]
            # Take whatever else is waiting: one write for all of it.
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._write(b"".join(batch))
                    return
                batch.append(more)
            self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            log.warning("failed: access log %s: %s (%d bytes lost)", self.target, exc.strerror, len(view))
        self._written += len(data)


__all__ = ["FORMATS", "STDOUT_TARGETS", "AccessLog", "access_log_format", "escape"]
