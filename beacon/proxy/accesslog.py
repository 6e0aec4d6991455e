"""The proxy's access log (`--access-log`): one line per finished request.

Off by default, and then it costs the data path one `is not None` check per
request. On, `record` formats the line on the loop (a few µs) and appends it
to a list, written with one `write(2)` per loop turn (or every `BATCH_LINES`
lines), as nginx writes its buffered access log from its event loop. A file
is opened with O_APPEND, so worker processes appending to the same file never
split each other's lines (every write holds whole lines). A stdout that is a
pipe or a terminal is opened again as its own non-blocking file description
(stdout itself stays as it is), and a socket (journald) is written with
MSG_DONTWAIT, so the loop never waits for a reader: what the sink does not
take waits for it to become writable, and beyond `MAX_BACKLOG` bytes new lines
are dropped and counted in `beacon_proxy_access_log_dropped_total`. Pipe
writes are cut at line ends to at most PIPE_BUF bytes, which the kernel
writes whole, so workers sharing a pipe do not split each other's lines
either (a line is at most a few KiB: long fields are cut, see `MAX_FIELD`).

A thread was tried first and dropped: under load the loop thread keeps the
GIL, and the writer got it only every 80 ms or so - it fell behind at a
rate the loop alone writes easily.

Every field from outside (path, User-Agent, Referer, request id, endpoint id)
is escaped as nginx does: bytes outside printable ASCII, `"` and `\\` become
`\\xHH`, so a line is always one line of ASCII.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from beacon.config import Config
    from beacon.proxy.exchange import Exchange

log = logging.getLogger("beacon.proxy")

FORMATS = ("common", "combined", "json")
STDOUT_TARGETS = ("-", "stdout")
BATCH_LINES = 256  # write at least this often within one loop turn
WRITE_CHUNK = 1024 * 1024  # most bytes in one write to a file or socket
MAX_BACKLOG = 8 * 1024 * 1024  # bytes the sink has not taken yet; above it lines are dropped
MAX_FIELD = 768  # characters of one escaped field (path, User-Agent, ...); longer ones end in "..."
# Connections refused at --proxy-max-connections get no line each (a flood would
# fill the disk): one line per REFUSED_WINDOW seconds sums them up, naming the
# address refused most; at most REFUSED_CLIENTS addresses are told apart.
REFUSED_WINDOW = 1.0
REFUSED_CLIENTS = 1024

_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")  # not printable ASCII, or " or \


def _hex(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match.group()[0]


def escape(raw: bytes, limit: int = MAX_FIELD) -> str:
    """A field from outside as one safe ASCII string (nginx's `escape=default`),
    at most `limit` characters (then cut, never inside an escape, and "..." added)."""
    text = raw.decode("ascii") if _UNSAFE.search(raw) is None else _UNSAFE.sub(_hex, raw).decode("ascii")
    if len(text) <= limit:
        return text
    text = text[:limit]
    cut = text.rfind("\\", limit - 3)  # an escape the limit cut in half
    return (text[:cut] if cut >= 0 else text) + "..."


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
    """Formats finished exchanges and writes them in batches, never blocking the loop."""

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
        self._sock: socket.socket | None = None
        self._chunk = WRITE_CHUNK
        self._lines: list[str] = []
        self._pending = b""  # whole lines the sink has not taken yet
        self._waiting = False  # a writer callback is registered for the fd
        self._pollable = False  # a pipe, terminal or socket (epoll refuses regular files)
        self._failed = False  # the last write failed (logged once until one succeeds)
        self._stamp_second = -1
        self._stamp = ""
        self._format_line = {"common": self._common, "combined": self._combined, "json": self._json}[fmt]
        # Refusals of the current window: by client address, and in all.
        self._refused: dict[bytes, int] = {}
        self._refused_total = 0
        self._refused_bytes = 0
        self._refused_cap = 0
        self._refused_timer: asyncio.TimerHandle | None = None

    @property
    def backlog(self) -> int:
        """Bytes formatted but not yet taken by the sink."""
        return len(self._pending) + sum(len(line) for line in self._lines)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the sink (an OSError names the file)."""
        if self.target not in STDOUT_TARGETS:
            try:
                self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OSError(f"access log {self.target}: {exc.strerror}") from None
            return
        fd = self._stdout_fd
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                # A new open file description of the same pipe or terminal: its
                # O_NONBLOCK is ours alone (print() and friends keep a blocking stdout).
                self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._pollable = True
                if stat.S_ISFIFO(mode):
                    self._chunk = select.PIPE_BUF  # written whole, never mixed with another worker's
                return
            except OSError:
                pass  # no /proc, or a pipe without a reader: fall back to a plain copy
        elif stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._fd = self._sock.fileno()
            self._pollable = True
            return
        self._fd = os.dup(fd)  # a regular file (or /proc is missing): written as a file is

    def stop(self) -> None:
        """Write what is buffered (what the sink does not take now is lost), close the sink."""
        self._sum_up_refused()
        self._flush()
        if self._pending:
            self.dropped += self._pending.count(b"\n")
            self._pending = b""
        if self._waiting:
            self.loop.remove_writer(self._fd)
            self._waiting = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    # ------------------------------------------------------------ loop side
    def record(self, ex: Exchange, status: int, sent: int) -> None:
        """Log one finished exchange (`status` as answered, `sent` bytes to the client)."""
        if len(self._pending) > self._max_backlog:
            self.dropped += 1
            return
        lines = self._lines
        if not lines:
            self.loop.call_soon(self._flush)
        lines.append(self._format_line(ex, status, sent))
        if len(lines) >= BATCH_LINES:
            self._flush()

    def refused(self, peer: bytes, sent: int, cap: int) -> None:
        """A connection refused at the cap (`sent`: the 503's bytes), summed up
        with the others of its second in one line (`_sum_up_refused`)."""
        counts = self._refused
        if not self._refused_total:
            self._refused_timer = self.loop.call_later(REFUSED_WINDOW, self._sum_up_refused)
        self._refused_total += 1
        self._refused_bytes += sent
        self._refused_cap = cap
        if peer in counts or len(counts) < REFUSED_CLIENTS:
            counts[peer] = counts.get(peer, 0) + 1

    def _sum_up_refused(self) -> None:
        """The line of this window's refusals: `refused=N clients=K cap=X`, with
        the address refused most as the client (status 503, no request)."""
        if self._refused_timer is not None:
            self._refused_timer.cancel()
            self._refused_timer = None
        total = self._refused_total
        if not total:
            return
        counts = self._refused
        top = max(counts, key=counts.__getitem__).decode("ascii", "replace") if counts else ""
        total_bytes, clients, cap = self._refused_bytes, len(counts), self._refused_cap
        self._refused = {}
        self._refused_total = self._refused_bytes = 0
        if len(self._pending) > self._max_backlog:
            self.dropped += 1
            return
        if self.format == "json":
            wall = self.wall()
            line = json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z",
                "request_id": None, "client": top, "method": None, "path": None, "protocol": None, "status": 503,
                "service": None, "endpoint": None, "upstream": None, "duration_ms": 0.0, "bytes": total_bytes,
                "retries": 0, "referer": None, "user_agent": None, "refused": total, "clients": clients, "cap": cap,
            }, separators=(",", ":")) + "\n"  # fmt: skip
        else:
            extra = ' "-" "-"' if self.format == "combined" else ""
            line = (f'{top or "-"} - - {self._clf_time()} "-" 503 {total_bytes}{extra} rid=- service=- endpoint=- '
                    f"upstream=- duration_ms=0.000 retries=0 refused={total} clients={clients} cap={cap}\n")  # fmt: skip
        if not self._lines:
            self.loop.call_soon(self._flush)
        self._lines.append(line)

    def _flush(self) -> None:
        lines = self._lines
        data = self._pending
        if lines:
            data += "".join(lines).encode("ascii", "backslashreplace")  # (outside fields are ASCII already)
            lines.clear()
        if not data or self._fd < 0:
            return
        chunk = self._chunk
        try:
            while data:
                piece = data
                if len(piece) > chunk:
                    end = piece.rfind(b"\n", 0, chunk) + 1  # whole lines only
                    piece = piece[: end or piece.index(b"\n") + 1]
                sock = self._sock
                n = sock.send(piece, socket.MSG_DONTWAIT) if sock is not None else os.write(self._fd, piece)
                data = data[n:]
                if n < len(piece):
                    break  # the sink is full
            self._failed = False
        except BlockingIOError:
            pass
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("failed: access log %s: %s (lines dropped until it works again)",
                            self.target, exc.strerror)  # fmt: skip
            self.dropped += data.count(b"\n")
            data = b""
        self._pending = data  # a file that took part of a write (disk full): retried next turn
        if not self._pollable:
            return
        if data and not self._waiting:
            self._waiting = True
            self.loop.add_writer(self._fd, self._flush)  # a pipe or socket: tell us when it has room
        elif not data and self._waiting:
            self._waiting = False
            self.loop.remove_writer(self._fd)

    # ----------------------------------------------------------- formatting
    def _fields(self, ex: Exchange) -> str:
        """Beacon's fields after the nginx ones, key=value (values never hold spaces)."""
        route = ex.route
        state = ex.tried[-1] if ex.tried else None
        endpoint = (
            f"{escape(state.id.encode(), 256)} upstream={state.address}:{state.port}" if state else "- upstream=-"
        )
        return (f" rid={escape(ex.reqid, 256) or '-'} service={route.service if route else '-'} endpoint={endpoint}"
                f" duration_ms={(time.perf_counter() - ex.t0) * 1000:.3f} retries={max(0, ex.attempts - 1)}\n")  # fmt: skip

    def _clf_time(self) -> str:
        """`[01/Dec/2026:11:36:20 +0000]`, recomputed once a second."""
        now = int(self.wall())
        if now != self._stamp_second:
            self._stamp_second = now
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))
        return self._stamp

    def _request_line(self, ex: Exchange) -> str:
        return f'"{escape(ex.method, 32) or "-"} {escape(ex.url) or "-"} HTTP/1.{1 if ex.http11 else 0}"'

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
            "request_id": escape(ex.reqid, 256),
            "client": ex.client.peer.decode(),
            "method": escape(ex.method, 32),
            "path": escape(ex.url),
            "protocol": "HTTP/1.1" if ex.http11 else "HTTP/1.0",
            "status": status,
            "service": route.service if route else None,
            "endpoint": escape(state.id.encode(), 256) if state else None,
            "upstream": f"{state.address}:{state.port}" if state else None,
            "duration_ms": round((time.perf_counter() - ex.t0) * 1000, 3),
            "bytes": sent,
            "retries": max(0, ex.attempts - 1),
            "referer": escape(referer) if referer is not None else None,
            "user_agent": escape(agent) if agent is not None else None,
        }
        return json.dumps(record, separators=(",", ":")) + "\n"



__all__ = ["FORMATS", "STDOUT_TARGETS", "AccessLog", "access_log_format", "escape"]
