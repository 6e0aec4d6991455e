"""Shared pieces of the proxy tests: real backends on 127.0.0.1:0, a running
proxy fed by a catalog the test fills, and raw-socket clients for exact bytes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from beacon.config import HostPort
from beacon.proxy import ProxyServer
from beacon.registry import Catalog, Endpoint, Source, State
from tests.helpers import test_config


def ep(eid: str, port: int, service: str = "web", *, state: State = State.PASSING, **kw: Any) -> Endpoint:
    return Endpoint(id=eid, service=service, address="127.0.0.1", port=port, source=Source("manual"),
                    state=state, **kw)  # fmt: skip


def put(catalog: Catalog, key: str, *endpoints: Endpoint) -> None:
    catalog.set_source(key, endpoints)
    catalog.publish()


@asynccontextmanager
async def proxy_server(catalog: Catalog, clock: Callable[[], float] | None = None,
                       **overrides: Any) -> AsyncIterator[ProxyServer]:  # fmt: skip
    # These tests drive the data path in this process to read its state at
    # once; the isolated topology (the default) is tests/proxy/test_proxy_workers.py's.
    overrides.setdefault("proxy_isolated", False)
    server = ProxyServer(test_config(**overrides), catalog, clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def connect(server: ProxyServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to the proxy, for byte-exact requests."""
    assert server.address is not None
    return await asyncio.open_connection(server.address.host, server.address.port)


def url(server: ProxyServer, path: str = "/") -> str:
    return f"http://{server.address}{path}"


# ------------------------------------------- what the proxy reports (public)
def stat(server: ProxyServer, service: str, key: str) -> int:
    """A per-service counter (attempts, retries, ejections) summed over processes."""
    return sum(int(r["services"].get(service, {}).get(key, 0)) for r in server.metrics_json())


def ok_responses(report: dict[str, Any], service: str = "web") -> int:
    """2xx responses of `service` in one process's metrics report (`ProxyMetrics.to_json`)."""
    codes = report["services"].get(service, {}).get("codes", {})
    return sum(n for key, n in codes.items() if 200 <= int(key) % 1000 < 300)


def in_flight(server: ProxyServer, service: str) -> int:
    return sum(int(r.get("in_flight", {}).get(service, 0)) for r in server.metrics_json())


def open_connections(server: ProxyServer, side: str) -> int:
    """Open proxy connections, side "client" or "upstream"."""
    return sum(int(r[f"{side}_connections"]) for r in server.metrics_json())


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def output(self) -> bytes:
        return b"".join(self.written)


class ManualClock:
    """A clock the test moves (the proxy's timeouts and ejections read it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------ backends
@dataclass
class Backend:
    """An aiohttp app on 127.0.0.1:0 that says who it is and what it received."""

    name: str
    port: int = 0
    runner: web.AppRunner | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: set[int] = field(default_factory=set)
    body_bytes: int = 0

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _app(backend: Backend) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        backend.connections.add(id(request.transport))
        info = {
            "backend": backend.name,
            "method": request.method,
            "path": request.path_qs,
            "headers": {k: v for k, v in request.headers.items()},
            "body_len": len(body),
            "body_sha": hashlib.sha256(body).hexdigest(),
        }
        backend.requests.append(info)
        return web.json_response(info)

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("s", "1")))
        backend.requests.append({"backend": backend.name, "path": request.path_qs})
        return web.Response(text=f"slow from {backend.name}")

    async def status(request: web.Request) -> web.StreamResponse:
        backend.requests.append({"backend": backend.name, "path": request.path_qs})
        return web.Response(status=int(request.match_info["code"]), text=backend.name)

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        block = b"x" * (256 * 1024)
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            await resp.write(chunk)  # drains: the backend waits for a slow reader
            sent += len(chunk)
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        backend.body_bytes += total
        return web.json_response({"backend": backend.name, "received": total})

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"{backend.name}:{msg.data}")
        return sock

    app = web.Application(client_max_size=2**40)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_backend(name: str) -> Backend:
    backend = Backend(name)
    runner = web.AppRunner(_app(backend), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend.port = int(runner.addresses[0][1])
    backend.runner = runner
    return backend


@asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[Backend]]:
    started = [await start_backend(n) for n in names]
    try:
        yield started
    finally:
        for b in started:
            await b.stop()


# -------------------------------------------------- scripted raw backends
Handler = Callable[[bytes, asyncio.Transport], Awaitable[None] | None]


@dataclass
class RawBackend:
    """A TCP server that answers each request head with a scripted action."""

    port: int
    server: asyncio.Server
    heads: list[bytes]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class _RawProtocol(asyncio.Protocol):
    def __init__(self, handler: Callable[[bytes, asyncio.Transport], None], heads: list[bytes]) -> None:
        self.handler = handler
        self.heads = heads
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.heads.append(head)
            assert self.transport is not None
            self.handler(head, self.transport)
            if self.transport.is_closing():
                return


async def raw_backend(handler: Callable[[bytes, asyncio.Transport], None]) -> RawBackend:
    heads: list[bytes] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _RawProtocol(handler, heads), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return RawBackend(port, server, heads)


def free_port() -> int:
    """A loopback port with nothing listening (connects are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------ raw clients
async def raw_request(address: HostPort, data: bytes | list[bytes], *, timeout: float = 5.0,
                      pause: float = 0.0) -> bytes:  # fmt: skip
    """Send bytes (a list: written one by one with `pause`), read until the proxy closes."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Read one response (Content-Length or chunked) from a keep-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, headers, body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return status, headers, await reader.read(-1)
