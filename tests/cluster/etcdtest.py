"""A real etcd cluster on loopback and a TCP relay the tests can cut or stall.

`EtcdCluster` runs three `etcd` members (Debian's etcd-server) with their own
data dirs. etcd cannot listen on port 0, so ports are picked by binding and
releasing; a member that fails to start (a port taken in between) makes the
whole cluster start again on new ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.root = Path(tempfile.mkdtemp(prefix="beacon-etcd-"))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            self.client_ports = [free_port() for _ in range(self.size)]
            self.peer_ports = [free_port() for _ in range(self.size)]
            for i in range(self.size):
                shutil.rmtree(self.root / f"m{i}", ignore_errors=True)
                self.start_member(i, wait=False)
            try:
                for i in range(self.size):
                    self.wait_healthy(i)
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def _args(self, i: int) -> list[str]:
        cluster = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [
            ETCD, "--name", f"m{i}", "--data-dir", str(self.root / f"m{i}"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"beacon-{os.getpid()}-{self.root.name}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--snapshot-count", "100000",
        ]

    def start_member(self, i: int, *, wait: bool = True) -> None:
        log = open(self.root / f"m{i}.log", "ab")
        self.procs[i] = subprocess.Popen(self._args(i), stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_healthy(i)

    def stop_member(self, i: int) -> None:
        proc = self.procs[i]
        self.procs[i] = None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait_healthy(self, i: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.client_ports[i]}/health"
        while time.monotonic() < deadline:
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"etcd member m{i} exited: {self.tail(i)}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return
            time.sleep(0.05)
        raise RuntimeError(f"etcd member m{i} not healthy within {timeout}s: {self.tail(i)}")

    def tail(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return (self.root / f"m{i}.log").read_text(errors="replace")[-1500:]
        return ""

    def stop(self) -> None:
        for i in range(self.size):
            self.stop_member(i)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class TcpRelay:
    """Relays loopback TCP to one etcd member; the test can cut, stall or slow it.

    cut(): abort every relayed connection and refuse new ones (etcd "down").
    stall(): keep connections open but forward nothing (a half-open path).
    stall_open_watches(): silence the watch streams open now, nothing else (etcd#8980).
    slow(delay): forward each chunk `delay` seconds late.
    restore(): back to a clean relay.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.delay = 0.0
        self.connections = 0
        self._watch_writers: set[asyncio.StreamWriter] = set()  # client sides of watch requests
        self._silenced: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def stall(self) -> None:
        self._flowing.clear()

    def stall_open_watches(self) -> int:
        self._silenced |= self._watch_writers
        return len(self._silenced)

    def slow(self, delay: float) -> None:
        self.delay = delay

    async def restore(self) -> None:
        self._flowing.set()
        self.delay = 0.0
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        for src, dst, client in ((reader, up_writer, writer), (up_reader, writer, None)):
            task = asyncio.create_task(self._pipe(src, dst, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: asyncio.StreamWriter | None
    ) -> None:
        try:
            while data := await src.read(65536):
                if client is not None and data.startswith(b"POST /v3/watch"):
                    self._watch_writers.add(client)  # this connection carries a watch
                await self._flowing.wait()  # stalled: hold the bytes, the peer sees silence
                if dst in self._silenced:  # a silenced watch: never answer again (until cut)
                    await asyncio.Event().wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()
