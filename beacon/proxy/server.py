"""ProxyServer: the proxy's lifecycle - listener, snapshots in, workers, drain.

How workers share the port, get snapshots and report metrics: README.md "Workers".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Collection
from typing import Any

from beacon.config import Config
from beacon.grammar import HostPort
from beacon.proxy.accesslog import STDOUT_TARGETS, AccessLog, access_log_format
from beacon.proxy.core import ProxyCore, client_factory
from beacon.proxy.metrics import COLLECTOR, UNROUTED, fold_counters
from beacon.proxy.router import RoutingTable
from beacon.proxy.wire import HEADER, SnapshotEncoder, frame, snapshot_to_wire
from beacon.registry.catalog import Catalog
from beacon.registry.model import Snapshot

log = logging.getLogger("beacon.proxy")
BACKLOG = 1024


def listen_socket(address: HostPort, reuse_port: bool, listen: bool = True) -> socket.socket:
    """A bound (and, with `listen`, listening) socket. Bound but not listening
    it holds the port for SO_REUSEPORT workers and gets no connections."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LocalProxy:
    """Run one ProxyCore on a socket in the current loop (the parent or a worker)."""

    def __init__(self, config: Config, clock: Callable[[], float] | None = None, stdout_fd: int = 1) -> None:
        self.config = config
        self.clock = clock
        self.stdout_fd = stdout_fd  # where --access-log - writes (a worker's fd 1 is its pipe to the parent)
        self.access_log: AccessLog | None = None
        self.core: ProxyCore | None = None
        self.server: asyncio.Server | None = None
        self.address: HostPort | None = None
        self._held: socket.socket | None = None  # the port, held for the workers (--proxy-isolated)

    async def start(self, address: HostPort, reuse_port: bool, snapshot: Snapshot, listen: bool = True) -> HostPort:
        """Serve `address`; without `listen` only route (for the API) and hold the port."""
        loop = asyncio.get_running_loop()
        config = self.config
        if config.access_log and listen:
            self.access_log = AccessLog(config.access_log, access_log_format(config), loop, stdout_fd=self.stdout_fd)
            self.access_log.start()
        self.core = core = ProxyCore(config, loop, clock=self.clock, access_log=self.access_log)
        core.apply(snapshot)
        try:
            sock = listen_socket(address, reuse_port, listen)
        except BaseException:
            self._stop_access_log()
            raise
        if not listen:
            self._held = sock
            host, port = sock.getsockname()[:2]
            self.address = HostPort(host, port)
            return self.address
        try:
            # create_server listens again: pass the backlog or it drops to 100.
            self.server = await loop.create_server(client_factory(core), sock=sock, backlog=BACKLOG)
        except BaseException:
            sock.close()
            self._stop_access_log()
            raise
        core.start_timers()
        host, port = sock.getsockname()[:2]
        self.address = HostPort(host, port)
        return self.address

    async def stop(self, timeout: float) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
            self.core = None
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
        self._stop_access_log()

    def _stop_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.stop()
            self.access_log = None


class ProxyServer:
    """HTTP reverse proxy balancing across healthy endpoints from registry snapshots."""

    def __init__(self, config: Config, catalog: Catalog, clock: Callable[[], float] | None = None) -> None:
        """`clock` (monotonic seconds) decides timeouts and ejections; default:
        the event loop's clock. Worker processes always use their own loop's."""
        self.config = config
        self.catalog = catalog
        self.address: HostPort | None = None
        self._local = LocalProxy(config, clock)
        self._unsubscribe: Any = None
        self._workers: list[_Worker] = []
        self._encoder = SnapshotEncoder()
        self._stopping = False
        self.tls: Any = None  # beacon.proxy.tls.TlsFrontend with --proxy-tls-listen

    # ----------------------------------------------------------- inspection
    @property
    def core(self) -> ProxyCore | None:
        return self._local.core

    @property
    def table(self) -> RoutingTable | None:
        core = self._local.core
        return core.table if core is not None else None

    def routes_json(self) -> dict[str, object]:
        table = self.table
        return table.to_json() if table is not None else {"routes": [], "conflicts": []}

    def metrics_json(self) -> list[dict[str, Any]]:
        core = self._local.core
        live = self.catalog.snapshot.services
        reports = [r for w in self._workers for r in w.reports(live)]
        if core is not None:
            report = core.report()
            report["worker_restarts"] = sum(w.restarts for w in self._workers)
            reports.append(report)
        return reports

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        workers = self.config.proxy_workers
        isolated = self.config.proxy_isolated
        # Isolated: every proxy process is a worker and this one only routes
        # for the API; else this process is worker 0.
        children = workers if isolated else workers - 1
        self.address = await self._local.start(self.config.proxy_listen, children > 0, self.catalog.snapshot,
                                               listen=not isolated)  # fmt: skip
        self._unsubscribe = self.catalog.add_listener(self._on_snapshot)
        COLLECTOR.add(self)
        try:
            if self.config.proxy_tls_listen is not None:
                from beacon.proxy.tls import TlsFrontend  # imported only when used (acme, cryptography)

                assert self._local.core is not None
                self.tls = TlsFrontend(self.config, self._local.core)
                await self.tls.start(self.catalog.snapshot)
            if children:
                # Deltas sent from now on are relative to this snapshot; each
                # worker gets the then-current snapshot whole when it starts.
                self._encoder.encode(self.catalog.snapshot, full=True)
            for n in range(1, children + 1):
                worker = _Worker(n, self.config, self.address, lambda: self.catalog.snapshot)
                self._workers.append(worker)
                await worker.start()
        except BaseException:
            await self.stop()
            raise
        log.info("listening: proxy on %s (%d worker%s%s)", self.address, children + (not isolated),
                 "s" if children + (not isolated) > 1 else "", ", isolated" if isolated else "")  # fmt: skip

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        core = self._local.core
        if core is not None:
            core.apply(snapshot)
        if self.tls is not None:
            self.tls.apply(snapshot)
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
        if self.tls is not None:
            self.tls.close()  # stop accepting; its connections drain with the plain ones
        await asyncio.gather(
            self._local.stop(timeout),
            *(w.stop(timeout) for w in self._workers),
        )
        self._workers.clear()
        if self.tls is not None:
            await self.tls.stop()
        COLLECTOR.remove(self)
        log.info("stopped: proxy on %s", self.address)


class RestartBackoff:
    """Pure: how long to wait before restarting a worker that exited.

    Each exit that follows a short run doubles the wait (base, 2*base, ... up
    to cap), so a worker that crashes at once does not spin the CPU; a run of
    at least `stable_after` seconds means the last crash was a one-off, and the
    wait starts over from `base`.
    """

    def __init__(self, base: float, cap: float, stable_after: float) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._failures = 0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.stable_after:
            self._failures = 0
        delay = min(self.cap, self.base * 2.0**self._failures)
        if delay < self.cap:  # past the cap the exponent has no use (and could overflow)
            self._failures += 1
        return delay


# Module constants rather than Config options: they guard against crash loops
# and need no tuning per deployment (tests patch them).
RESTART_BASE_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
RESTART_STABLE_AFTER = 60.0
READY_TIMEOUT = 15.0


class _Worker:
    """One proxy worker process, fed snapshots over its stdin, and restarted
    (with backoff) whenever it exits while the proxy runs."""

    def __init__(self, number: int, config: Config, address: HostPort, current: Callable[[], Snapshot]) -> None:
        self.number = number
        self.config = config
        self.address = address
        self.current = current  # the catalog's snapshot now
        self.proc: asyncio.subprocess.Process | None = None
        self.metrics: dict[str, Any] | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self._retired: dict[str, dict[str, Any]] = {}  # counters of replaced processes
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()  # wakes the supervisor out of a backoff
        self._backoff = RestartBackoff(RESTART_BASE_DELAY, RESTART_MAX_DELAY, RESTART_STABLE_AFTER)

    async def start(self) -> None:
        """Start the process and wait until it listens; then supervise it."""
        await self._spawn()
        if not await self._until_ready():
            raise RuntimeError(f"proxy worker {self.number} did not start listening within {READY_TIMEOUT:g}s")
        assert self.proc is not None
        log.info("started: proxy worker %d (pid %d)", self.number, self.proc.pid)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self) -> None:
        self.ready.clear()
        # The worker's stdout is its pipe to us: `--access-log -` gets our stdout as another fd.
        stdout_fd = os.dup(1) if self.config.access_log in STDOUT_TARGETS else -1
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "beacon.proxy.worker", str(self.number),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                pass_fds=(stdout_fd,) if stdout_fd >= 0 else (),
            )  # fmt: skip
        finally:
            if stdout_fd >= 0:
                os.close(stdout_fd)
        assert self.proc.stdin is not None
        # Snapshots published while the process was being created were not sent
        # to it (they went to the previous, dead process or to none), yet the
        # shared encoder counts them as sent: so send the whole current
        # snapshot, with no await between here and the write - every later
        # delta then starts from what this worker holds.
        setup = {"config": self.config, "address": self.address, "stdout_fd": stdout_fd}
        self.proc.stdin.write(frame(b"C", pickle.dumps(setup)) + frame(b"S", snapshot_to_wire(self.current())))
        self._reader = asyncio.get_running_loop().create_task(self._read(self.proc))

    async def _until(self, *waits: asyncio.Future[Any], timeout: float | None = None) -> None:
        """Wait for the first of `waits` or stop(), never cancelling `waits`
        (one is the reader task, which must see its process to the end)."""
        stop_wait = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait([*waits, stop_wait], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()

    async def _until_ready(self) -> bool:
        """True once the process listens; False if it exited, hung or we stop."""
        assert self._reader is not None
        ready_wait = asyncio.ensure_future(self.ready.wait())
        try:
            await self._until(ready_wait, self._reader, timeout=READY_TIMEOUT)
        finally:
            ready_wait.cancel()
        return self.ready.is_set()

    async def _supervise(self) -> None:
        """Restart the process each time it exits, until stop().

        It never waits on anything that stop() could be waiting on in turn,
        and never spawns once `_stopping` is set, so stop() can await it."""
        ran_since = time.monotonic()
        while True:
            assert self.proc is not None and self._reader is not None
            await self._until(self._reader)
            if self._stopping:
                return
            code = self.proc.returncode
            self._retire_metrics()
            delay = self._backoff.next_delay(time.monotonic() - ran_since)
            log.error("failed: proxy worker %d exited with code %s, restarting in %.1fs", self.number, code, delay)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), delay)
                if self._stopping:
                    return
                try:
                    await self._spawn()
                    break
                except OSError as e:  # e.g. out of file descriptors or memory: try again later
                    delay = self._backoff.next_delay(0.0)
                    log.error("failed: proxy worker %d could not be started (%s), retrying in %.1fs",
                              self.number, e, delay)  # fmt: skip
            ran_since = time.monotonic()
            if await self._until_ready():
                self.restarts += 1
                log.warning("restarted: proxy worker %d (exit code %s) as pid %d", self.number, code,
                            self.proc.pid)  # fmt: skip
            elif not self._stopping and self.proc.returncode is None:
                log.error("failed: proxy worker %d did not listen within %gs, killing it",
                          self.number, READY_TIMEOUT)  # fmt: skip
                self.proc.kill()  # the next turn sees it exit and backs off

    def _retire_metrics(self) -> None:
        """Keep a dead process's counters, so the sums /metrics reports never go
        backwards (Prometheus would read that as a reset); its gauges go."""
        if self.metrics is not None:
            fold_counters(self._retired, self.metrics["services"])
            self.metrics = None

    def reports(self, live_services: Collection[str]) -> list[dict[str, Any]]:
        """What this worker adds to /metrics: its process's last report and the
        counters of the processes it replaced (of services still around)."""
        reports = [self.metrics] if self.metrics is not None else []
        if self._retired:
            for name in [n for n in self._retired if n not in live_services and n != UNROUTED]:
                del self._retired[name]  # the service left: drop it, as the workers do
            reports.append({"services": self._retired, "client_connections": 0, "upstream_connections": 0,
                            "conflicts": 0})  # fmt: skip
        return reports

    def send_snapshot(self, payload: bytes) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(frame(b"S", payload))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
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
        await proc.wait()

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        self._stop_requested.set()
        if self._supervisor is not None:
            await self._supervisor  # returns at once: it never spawns once _stopping is set
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None and not proc.stdin.is_closing():
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
