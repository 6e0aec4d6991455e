"""Composition root: builds the components from one Config and runs their lifecycle.

Start order: catalog sources first (Docker, manual registrations, health
checks), then the listeners that read snapshots (API, DNS, proxy). Stop runs in
reverse so the listeners drain while the catalog is still being fed, and every
stop is bounded by `config.shutdown_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Protocol

from beacon.api import ApiServer
from beacon.api.consul import ConsulApi, store_leader
from beacon.api.promsd import PrometheusSd
from beacon.api.status import Connections, StatusView
from beacon.api.traffic import TrafficWindow
from beacon.api.ui import Dashboard
from beacon.config import Config, etcd_endpoints
from beacon.dns import DnsServer
from beacon.metrics import DOCKER_CONNECTION
from beacon.proxy import LATENCY_BUCKETS, ProxyServer
from beacon.registry import Catalog, ClusterSource, DockerSource, HealthChecker, ManualRegistry
from beacon.registry.store import EtcdStore, GatewaySettings

log = logging.getLogger("beacon.app")


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ListenerError(OSError):
    """A listener could not be opened; the message names which one and why."""


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = config.node or socket.gethostname()
        self.catalog = Catalog()
        self.docker: DockerSource | None = (
            DockerSource(config, self.catalog, node=self.node) if config.docker else None
        )
        self.manual = ManualRegistry(config, self.catalog, node=self.node)
        self.health = HealthChecker(config, self.catalog, docker=self.docker)
        self.cluster: ClusterSource | None = None
        if config.store != "memory":
            settings = GatewaySettings(
                etcd_endpoints(config.store), cacert=config.etcd_cacert, cert=config.etcd_cert,
                key=config.etcd_key, user=config.etcd_user, password=config.etcd_password,
            )
            store = EtcdStore(settings, prefix=config.store_prefix, node=self.node, lease_ttl=config.lease_ttl)
            self.cluster = ClusterSource(self.catalog, store, node=self.node, manual=self.manual)
        self.dns = DnsServer(config, self.catalog)
        self.proxy = ProxyServer(config, self.catalog)
        self.consul = ConsulApi(config, self.catalog, manual=self.manual, node=self.node,
                                api_address=lambda: str(self.api.address or config.api_listen),
                                leader=store_leader(self.cluster.store) if self.cluster is not None else None)
        self.api = ApiServer(
            config,
            self.catalog,
            manual=self.manual,
            docker=self.docker,
            health=self.health,
            routes=self.proxy.routes_json,
            extensions=[self.consul, PrometheusSd(self.catalog), Dashboard(self.catalog),
                        StatusView(self.catalog, self.status_json)],
            nodes=self.cluster.nodes_json if self.cluster is not None else None,
            store=self.cluster.store if self.cluster is not None else None,
            traffic=TrafficWindow(self.proxy.metrics_json, LATENCY_BUCKETS),
            started=lambda: self.started,
        )
        self._started: list[Component] = []
        self.started = False  # every component started (/healthz answers 503 starting before)
        docker = self.docker
        DOCKER_CONNECTION.attach(lambda: docker is not None and docker.connected)

    @property
    def components(self) -> list[Component]:
        sources: list[Component] = [self.docker] if self.docker is not None else []
        # The cluster source starts after the local sources (its first write is
        # then the whole local state: a restart resyncs as a diff, no flapping).
        cluster: list[Component] = [self.cluster] if self.cluster is not None else []
        return [*sources, self.manual, self.health, *cluster, self.api, self.dns, self.proxy]

    def status_json(self) -> dict[str, object]:
        """Listeners as bound, connections and node: what `beacon status` shows first."""
        def bound(address: object) -> str | None:
            return None if address is None else str(address)

        tls = self.proxy.tls
        connections = Connections.of(self.docker, self.cluster.store if self.cluster is not None else None)
        return {
            "node": self.node,
            "listeners": {
                "api": bound(self.api.address),
                "dns": [str(a) for a in self.dns.addresses],
                "proxy": bound(self.proxy.address),
                "proxy_tls": bound(getattr(tls, "address", None)),
            },
            **connections.status_json(),
        }

    def _listeners_of(self, component: Component) -> str | None:
        """What a component listens on, for an error message that names it."""
        c = self.config
        if component is self.api:
            return f"API listener {c.api_listen}"
        if component is self.dns:
            return "DNS listener " + ", ".join(str(hp) for hp in c.dns_listen)
        if component is self.proxy:
            tls = getattr(c, "proxy_tls_listen", None)
            return f"proxy listener {c.proxy_listen}" + (f" (TLS {tls})" if tls else "")
        return None

    async def start(self) -> None:
        for component in self.components:
            try:
                await component.start()
            except BaseException as exc:
                await self.stop()
                where = self._listeners_of(component)
                if isinstance(exc, OSError) and where is not None:
                    # "[Errno 98] error while attempting to bind on address (...)" names
                    # neither the face nor the flag: say which listener failed and why.
                    reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
                    raise ListenerError(f"{where}: {reason}") from exc
                raise
            self._started.append(component)
        self.started = True
        log.info("started: beacon node=%s", self.node)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        while self._started:
            component = self._started.pop()
            remaining = max(0.1, deadline - loop.time())
            try:
                await asyncio.wait_for(component.stop(), remaining)
            except TimeoutError:
                log.warning("timeout: stopping %s took over %.1fs", type(component).__name__, remaining)
            except Exception:
                log.exception("failed: stopping %s", type(component).__name__)
        log.info("stopped: beacon")

    async def run_until_signal(self) -> None:
        """Start, wait for SIGTERM/SIGINT, stop. The signal only sets an event."""
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        # A signal during start-up (e.g. while the Docker watcher waits up to
        # 10 s for an engine that does not answer) must not wait for start to
        # finish: start is cancelled, stops what it had started and re-raises.
        starting = asyncio.ensure_future(self.start())
        signalled = asyncio.ensure_future(stop_requested.wait())
        try:
            await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            if not starting.done():
                if stop_requested.is_set():
                    log.info("stopping: signal received while starting")
                starting.cancel()
                await asyncio.wait((starting,))
        if starting.cancelled():
            return
        starting.result()  # a failed start stopped what it had started: raise its error
        try:
            await stop_requested.wait()
            log.info("stopping: signal received")
        finally:
            await self.stop()
