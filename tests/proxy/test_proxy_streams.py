"""Streaming: large bodies both ways in bounded memory, WebSocket tunnels, reconfiguration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from beacon.registry import Catalog, State
from tests.helpers import eventually
from tests.proxy.proxytest import (
    backends,
    connect,
    ep,
    open_connections,
    proxy_server,
    put,
    raw_backend,
    raw_request,
    url,
)

SIZE = 256 * 1024 * 1024
# The proxy, the backend and the sampler share this process; buffering a
# 256 MB body anywhere would blow far past this.
RSS_BUDGET = 64 * 1024 * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@asynccontextmanager
async def peak_rss_growth() -> AsyncIterator[list[int]]:
    """Sample this process's RSS every 20 ms; yields [growth] filled in at exit."""
    base = rss()
    peak = base
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            await asyncio.sleep(0.02)

    task = asyncio.ensure_future(sample())
    result: list[int] = []
    try:
        yield result
    finally:
        stop.set()
        await task
        result.append(peak - base)


async def curl(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "60", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out


async def test_large_upload_and_download_stream_through_in_bounded_memory(tmp_path: Path) -> None:
    cat = Catalog()
    sparse = tmp_path / "upload.bin"
    fd = os.open(sparse, os.O_CREAT | os.O_WRONLY)
    os.ftruncate(fd, SIZE)  # sparse: no disk used, reads as zeros
    os.close(fd)
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        host = "Host: web.localhost"
        async with peak_rss_growth() as growth:
            # Content-Length upload (curl sends Expect: 100-continue for it)
            out = await curl("-H", host, "-T", str(sparse), url(proxy, "/upload"))
            assert b'"received": %d' % SIZE in out
            # chunked upload of unknown length from a pipe
            proc = await asyncio.create_subprocess_shell(
                f"head -c {SIZE} /dev/zero | curl -sS --max-time 60 -H '{host}' -T - {url(proxy, '/upload')}",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert b'"received": %d' % SIZE in out
            # download
            out = await curl("-H", host, "-o", os.devnull, "-w", "%{size_download}", url(proxy, f"/big?n={SIZE}"))
            assert out == str(SIZE).encode()
    assert web.body_bytes == 2 * SIZE
    assert growth[0] < RSS_BUDGET, f"RSS grew by {growth[0] / 2**20:.0f} MB"


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering() -> None:
    cat = Catalog()
    size = 64 * 1024 * 1024
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port, limit=2**16)
        writer.write(b"GET /big?n=%d HTTP/1.1\r\nHost: web.localhost\r\n\r\n" % size)
        await reader.readuntil(b"\r\n\r\n")
        async with peak_rss_growth() as growth:
            got = 0
            # Not reading for a second: the proxy must stop reading the backend
            # too, or it buffers the body (the RSS budget below catches that).
            await asyncio.sleep(1.0)
            while got < size:
                got += len(await reader.read(2**20))
        writer.close()
    assert got == size
    assert growth[0] < RSS_BUDGET // 2


async def test_websocket_tunnel_survives_snapshot_swaps() -> None:
    cat = Catalog()
    async with backends("one", "two") as (one, two), proxy_server(cat, proxy_idle_timeout=5.0) as proxy:
        put(cat, "m:ws", ep("ws1", one.port, "chat"))
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url(proxy, "/ws"), headers={"Host": "chat.localhost"}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "one:hello"
                # New snapshots: another endpoint, then the tunnel's own endpoint draining.
                put(cat, "m:ws2", ep("ws2", two.port, "chat"))
                put(cat, "m:other", ep("x", two.port, "other", http_hosts=("chat.localhost",)))
                put(cat, "m:ws", ep("ws1", one.port, "chat", state=State.DRAINING))
                await asyncio.sleep(0.1)
                for i in range(3):
                    await ws.send_str(f"again{i}")
                    assert (await ws.receive(timeout=5)).data == f"one:again{i}"
            # a new websocket follows the new table
            async with s.ws_connect(url(proxy, "/ws"), headers={"Host": "chat.localhost"}) as ws:
                await ws.send_str("hi")
                assert (await ws.receive(timeout=5)).data == "two:hi"


async def test_upgrade_refused_by_the_upstream_is_a_normal_response() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        async with aiohttp.ClientSession() as s:
            async with s.get(url(proxy, "/not-ws"), headers={
                "Host": "web.localhost", "Connection": "Upgrade", "Upgrade": "websocket",
            }) as r:  # fmt: skip
                assert r.status == 200
                assert (await r.json())["headers"]["Upgrade"] == "websocket"


UPGRADE_HEAD = b"GET /ws HTTP/1.1\r\nHost: web.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


async def test_bytes_after_a_refused_upgrade_never_reach_the_upstream() -> None:
    def plain_ok(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # ignores the upgrade

    backend = await raw_backend(plain_ok)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:web", ep("web1", backend.port))
            assert proxy.address is not None
            # A request pipelined behind the upgrade request: without a 101 it must
            # not reach the upstream raw (no hop-by-hop filtering, spoofable headers).
            smuggled = b"GET /smuggled HTTP/1.1\r\nHost: web.localhost\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
            raw = await raw_request(proxy.address, UPGRADE_HEAD + smuggled)
            assert [h.split(b"\r\n", 1)[0] for h in backend.heads] == [b"GET /ws HTTP/1.1"]
            assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\nok")
            assert b"\r\nconnection: close\r\n" in raw.lower()  # announced, then closed
            # never pooled after a refused upgrade: its connection closes
            await eventually(lambda: open_connections(proxy, "upstream") == 0)
    finally:
        await backend.stop()


class _UpgradeEcho(asyncio.Protocol):
    """Answers the first head with 101, then echoes every byte (the tunnel)."""

    def __init__(self) -> None:
        self.buf = b""
        self.switched = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.switched:
            self.transport.write(data)
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            _, rest = self.buf.split(b"\r\n\r\n", 1)
            self.switched = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            if rest:
                self.transport.write(rest)


async def test_bytes_sent_right_after_an_upgrade_request_reach_the_upstream_after_the_101() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_UpgradeEcho, "127.0.0.1", 0)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:web", ep("web1", server.sockets[0].getsockname()[1]))
            reader, writer = await connect(proxy)
            writer.write(UPGRADE_HEAD + b"early bytes")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"early bytes"
            writer.write(b" and later")
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b" and later"
            writer.close()
    finally:
        server.close()
