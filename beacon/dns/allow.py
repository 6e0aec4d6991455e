"""Who may use forwarding: Beacon answers its own names to anyone who can reach
it, but is not an open resolver.

Loopback clients are always allowed (the host's own processes). Beyond them:
the networks of `--dns-allow` when given, else the Docker networks, found by
listing the engine's networks (their IPAM subnets). A client outside every
known network triggers at most one re-listing per `refresh_interval`, so a
network created after Beacon started is picked up on its first query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

log = logging.getLogger("beacon.dns.allow")


def docker_subnets(networks: Iterable[Mapping[str, Any]]) -> list[Network]:
    """Subnets from Docker network descriptions (`docker network inspect` shape)."""
    out: list[Network] = []
    for net in networks:
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            subnet = (cfg or {}).get("Subnet")
            if not subnet:
                continue
            try:
                parsed = ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                continue
            if parsed not in out:
                out.append(parsed)
    return out


def list_docker_subnets(docker_host: str) -> list[Network]:
    """Blocking: ask the Docker engine for its networks' subnets."""
    import docker

    client = docker.DockerClient(base_url=docker_host, timeout=5) if docker_host else docker.from_env(timeout=5)
    try:
        return docker_subnets(n.attrs for n in client.networks.list())
    finally:
        client.close()


class AllowList:
    def __init__(
        self,
        networks: Sequence[Network],
        *,
        discover: Callable[[], list[Network]] | None = None,
        refresh_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._static = tuple(networks)
        self._discovered: tuple[Network, ...] = ()
        self._discover = discover
        self._interval = refresh_interval
        self._clock = clock
        self._last_refresh = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self._decisions: dict[str, bool] = {}

    @property
    def networks(self) -> tuple[Network, ...]:
        return LOOPBACK + self._static + self._discovered

    def allows(self, host: str) -> bool:
        decision = self._decisions.get(host)
        if decision is None:
            decision = self._decide(host)
            if len(self._decisions) > 4096:  # bounded: a scan of many sources cannot grow it
                self._decisions.clear()
            self._decisions[host] = decision
        return decision

    def _decide(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
        return any(ip in net for net in self.networks)

    def can_refresh(self) -> bool:
        return self._discover is not None and (
            self._refreshing is not None or self._clock() - self._last_refresh >= self._interval
        )

    async def refresh(self) -> None:
        """Re-list the Docker networks (shared by concurrent callers, rate-limited)."""
        if self._discover is None:
            return
        if self._refreshing is None:
            if self._clock() - self._last_refresh < self._interval:
                return
            self._last_refresh = self._clock()
            self._refreshing = asyncio.ensure_future(self._run_discovery(self._discover))
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _run_discovery(self, discover: Callable[[], list[Network]]) -> None:
        try:
            found = await asyncio.to_thread(discover)
        except Exception as exc:  # Docker down: keep what we had, loopback still works
            log.warning("failed: listing Docker networks for DNS forwarding: %s", exc)
            return
        if tuple(found) != self._discovered:
            self._discovered = tuple(found)
            self._decisions.clear()
            log.info("allowed: DNS forwarding for %s", ", ".join(str(n) for n in self.networks))
