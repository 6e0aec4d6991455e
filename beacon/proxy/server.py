"""ProxyServer: the proxy's lifecycle - listener, snapshots in, workers, drain.

With `--proxy-workers N` the parent serves as worker 0 in its own event loop
and starts N-1 worker processes (`python -m beacon.proxy.worker`). Each binds
its own listening socket on the same port with SO_REUSEPORT, so the kernel
spreads new connections across processes. The parent forwards every snapshot
to the workers over their stdin pipe (see wire.py); workers send their
metrics back over stdout, so /metrics covers every process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any

from beacon.config import Config, HostPort
from beacon.proxy.datapath import ProxyCore, client_factory
from beacon.proxy.metrics import COLLECTOR
from beacon.proxy.router import RoutingTable
from beacon.proxy.wire import HEADER, SnapshotEncoder, frame, snapshot_to_wire
from beacon.registry.catalog import Catalog
from beacon.registry.model import Snapshot

log = logging.getLogger("beacon.proxy")
BACKLOG = 1024


def listen_socket(address: HostPort, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LocalProxy:
    """Run one ProxyCore on a socket in the current loop (the parent or a worker)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.core: ProxyCore | None = None
        self.server: asyncio.Server | None = None
        self.address: HostPort | None = None

    async def start(self, address: HostPort, reuse_port: bool, snapshot: Snapshot) -> HostPort:
        loop = asyncio.get_running_loop()
        self.core = core = ProxyCore(self.config, loop)
        core.apply(snapshot)
        sock = listen_socket(address, reuse_port)
        try:
            # create_server listens again: pass the backlog or it drops to 100.
            self.server = await loop.create_server(client_factory(core), sock=sock, backlog=BACKLOG)
        except BaseException:
            sock.close()
            raise
        core.start_timers()
        host, port = sock.getsockname()[:2]
        self.address = HostPort(host, port)
        return self.address

    async def stop(self, timeout: float) -> None:
        core, server = self.core, self.server
        if core is None or server is None:
            return
        server.close()  # stop accepting; established connections stay
        drained = core.begin_drain()
        try:
            await asyncio.wait_for(drained.wait(), timeout)
        except TimeoutError:
            log.warning("timeout: %d proxy connections still open after %.1fs, closing them",
                        len(core.clients), timeout)  # fmt: skip
        core.close_all()
        self.core = None
        self.server = None


class ProxyServer:
    """HTTP reverse proxy balancing across healthy endpoints from registry snapshots."""

    def __init__(self, config: Config, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.address: HostPort | None = None
        self._local = LocalProxy(config)
        self._unsubscribe: Any = None
        self._workers: list[_Worker] = []
        self._encoder = SnapshotEncoder()
        self._stopping = False

    # ----------------------------------------------------------- inspection
    @property
    def core(self) -> ProxyCore | None:
        return self._local.core

    @property
    def table(self) -> RoutingTable | None:
        core = self._local.core
        return core.table if core is not None else None

    @property
    def conflicts(self) -> list[dict[str, object]]:
        """Conflicting routes of the current table (for the API)."""
        table = self.table
        return [c.to_json() for c in table.conflicts] if table is not None else []

    def routes_json(self) -> dict[str, object]:
        table = self.table
        return table.to_json() if table is not None else {"routes": [], "conflicts": []}

    def metrics_json(self) -> list[dict[str, Any]]:
        core = self._local.core
        reports = [w.metrics for w in self._workers if w.metrics is not None]
        if core is not None:
            reports.append(core.metrics.to_json(len(core.clients), len(core.upstreams), len(core.table.conflicts)))
        return reports

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        workers = self.config.proxy_workers
        self.address = await self._local.start(self.config.proxy_listen, workers > 1, self.catalog.snapshot)
        self._unsubscribe = self.catalog.add_listener(self._on_snapshot)
        COLLECTOR.add(self)
        try:
            if workers > 1:
                # Deltas sent from now on are relative to this snapshot; each
                # worker gets the then-current snapshot whole when it starts.
                self._encoder.encode(self.catalog.snapshot, full=True)
            for n in range(1, workers):
                worker = _Worker(n, self.config, self.address)
                self._workers.append(worker)
                await worker.start(lambda: self.catalog.snapshot)
        except BaseException:
            await self.stop()
            raise
        log.info("listening: proxy on %s (%d worker%s)", self.address, workers, "s" if workers > 1 else "")

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        core = self._local.core
        if core is not None:
            core.apply(snapshot)
        if self._workers:
            payload = self._encoder.encode(snapshot)
            for w in self._workers:
                w.send_snapshot(payload)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        timeout = max(0.1, self.config.shutdown_timeout * 0.9)
        await asyncio.gather(
            self._local.stop(timeout),
            *(w.stop(timeout) for w in self._workers),
        )
        self._workers.clear()
        COLLECTOR.remove(self)
        log.info("stopped: proxy on %s", self.address)


class _Worker:
    """One proxy worker process, fed snapshots over its stdin."""

    def __init__(self, number: int, config: Config, address: HostPort) -> None:
        self.number = number
        self.config = config
        self.address = address
        self.proc: asyncio.subprocess.Process | None = None
        self.metrics: dict[str, Any] | None = None
        self.ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, current: Callable[[], Snapshot]) -> None:
        """Start the process; `current` returns the catalog's snapshot now."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "beacon.proxy.worker", str(self.number),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdin is not None
        # Snapshots published while the process was being created were not sent
        # to it (proc was None), yet the shared encoder counts them as sent: so
        # send the whole current snapshot, with no await between here and the
        # write - every later delta then starts from what this worker holds.
        setup = {"config": self.config, "address": self.address}
        self.proc.stdin.write(frame(b"C", pickle.dumps(setup)) + frame(b"S", snapshot_to_wire(current())))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await asyncio.wait_for(self.ready.wait(), 15)
        except TimeoutError:
            raise RuntimeError(f"proxy worker {self.number} did not start listening within 15s") from None
        log.info("started: proxy worker %d (pid %d)", self.number, self.proc.pid)

    def send_snapshot(self, payload: bytes) -> None:
        proc = self.proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(frame(b"S", payload))

    async def _read(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(HEADER.size)
                kind, length = HEADER.unpack(head)
                payload = await proc.stdout.readexactly(length)
                if kind == b"R":
                    self.ready.set()
                elif kind == b"M":
                    self.metrics = json.loads(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await proc.wait()
        if not self._stopping:
            log.error("failed: proxy worker %d exited with code %s", self.number, code)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(frame(b"Q", b""))
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout + 1.0)
        except TimeoutError:
            log.warning("timeout: proxy worker %d did not exit, killing it", self.number)
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader
