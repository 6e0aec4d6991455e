"""Health checks and autoheal against real containers, through the whole Beacon.

Each test runs Beacon in-process (`running_app`) watching the real Docker
engine, and asserts only on its own containers (other tests' containers are
visible too). Containers publish port 80 on 127.0.0.1, so every probe stays on
loopback.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import docker
import pytest
from docker.models.containers import Container

from beacon.app import App
from tests.helpers import running_app

pytestmark = pytest.mark.docker

T = TypeVar("T")

# Like the suite's default web server, but /health exists only when the
# container starts for the first time...
HEALTHY_ONCE = (
    "mkdir -p /www && hostname > /www/index.html && "
    "if [ ! -e /booted ]; then echo ok > /www/health; fi; touch /booted; "
    "trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"
)
# ... or on every start (a restart heals it) ...
HEALTHY_AT_BOOT = (
    "mkdir -p /www && hostname > /www/index.html && echo ok > /www/health && "
    "trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"
)
# ... or never.
NEVER_HEALTHY = "mkdir -p /www && hostname > /www/index.html && trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"

LOOPBACK_PORT = {"80/tcp": ("127.0.0.1", None)}


def service_name() -> str:
    return f"hc{uuid.uuid4().hex[:10]}"


async def until(probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0, interval: float = 0.1) -> T:
    """Await `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def start(run_container: Callable[..., Container], **kwargs: Any) -> Container:
    """Start a container off the loop (Beacon shares this loop) and return it reloaded."""
    container = await asyncio.to_thread(run_container, **kwargs)
    await asyncio.to_thread(container.reload)
    return container


def host_port(container: Container) -> int:
    return int(container.ports["80/tcp"][0]["HostPort"])


async def exec_in(container: Container, script: str) -> None:
    result = await asyncio.to_thread(container.exec_run, ["sh", "-c", script])
    assert result.exit_code == 0, result.output


async def api_get(app: App, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(f"http://{app.api.address}{path}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def states(app: App, service: str) -> dict[str, str]:
    """Container id -> endpoint state, as the API shows it."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{app.api.address}/v1/services/{service}") as resp:
        if resp.status == 404:
            return {}
        body = await resp.json()
    return {e["source"]["container_id"]: e["state"] for e in body["endpoints"]}


async def srv_ports(app: App, service: str) -> set[int]:
    dns_at = app.dns.addresses[0]
    query = dns.message.make_query(f"{service}.service.{app.config.dns_domain}", dns.rdatatype.SRV)
    reply = await dns.asyncquery.udp(query, dns_at.host, port=dns_at.port, timeout=2)
    return {rd.port for rrset in reply.answer for rd in rrset if rrset.rdtype == dns.rdatatype.SRV}


async def proxy_backends(app: App, service: str, requests: int) -> collections.Counter[str]:
    """Which backends (container hostnames) answered `requests` proxied GETs."""
    seen: collections.Counter[str] = collections.Counter()
    host = f"{service}.{app.config.proxy_domain.rstrip('.')}"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(requests):
            async with session.get(f"http://{app.proxy.address}/", headers={"Host": host}) as resp:
                seen[(await resp.text()).strip() if resp.status == 200 else f"HTTP {resp.status}"] += 1
    return seen


async def restart_events(client: docker.DockerClient, container: Container, since: float) -> int:
    """How many times Docker itself says it restarted the container since `since`."""

    def count() -> int:
        events = client.events(
            since=int(since), until=int(time.time()) + 1, decode=True,
            filters={"container": container.id, "event": "restart"},
        )
        return sum(1 for _ in events)

    return await asyncio.to_thread(count)


def check_labels(service: str, **extra: str) -> dict[str, str]:
    return {
        "beacon.service": service,
        "beacon.check.http": "/health",
        "beacon.check.interval": "300ms",
        "beacon.check.timeout": "1s",
        **extra,
    }


# ---------------------------------------------------------------------------
async def test_failing_check_leaves_dns_and_proxy_and_comes_back(run_container: Callable[..., Container]) -> None:
    svc = service_name()
    labels = check_labels(svc, **{"beacon.check.rise": "2", "beacon.check.fall": "2"})
    async with running_app() as app:
        a = await start(run_container, labels=labels, ports=LOOPBACK_PORT)
        b = await start(run_container, labels=labels, ports=LOOPBACK_PORT)
        both = {a.id: "passing", b.id: "passing"}
        await until(lambda: _equal(states(app, svc), both))
        assert await srv_ports(app, svc) == {host_port(a), host_port(b)}
        assert set(await proxy_backends(app, svc, 6)) == {a.id[:12], b.id[:12]}

        await exec_in(b, "rm /www/health")  # b's app breaks; its process and port stay up
        await until(lambda: _equal(states(app, svc), {a.id: "passing", b.id: "critical"}))
        assert await srv_ports(app, svc) == {host_port(a)}
        assert await proxy_backends(app, svc, 6) == {a.id[:12]: 6}
        detail = await api_get(app, f"/v1/endpoints?service={svc}")
        status = next(e for e in detail if e["source"]["container_id"] == b.id)["check_status"]
        assert status["output"].startswith("HTTP GET /health: 404")
        assert status["consecutive_failures"] == 2

        await exec_in(b, "echo ok > /www/health")  # recovered
        await until(lambda: _equal(states(app, svc), both))
        assert await srv_ports(app, svc) == {host_port(a), host_port(b)}
        assert set(await proxy_backends(app, svc, 6)) == {a.id[:12], b.id[:12]}


async def test_tcp_check_on_a_closed_port_is_critical(run_container: Callable[..., Container]) -> None:
    svc = service_name()
    labels = {"beacon.service": svc, "beacon.check.tcp": "true", "beacon.check.interval": "300ms"}
    async with running_app() as app:
        # Port 80 is published but nothing listens on it inside the container.
        closed = await start(run_container, labels=labels, ports=LOOPBACK_PORT, command=["sleep", "60"])
        open_ = await start(run_container, labels=labels, ports=LOOPBACK_PORT)
        await until(lambda: _equal(states(app, svc), {closed.id: "critical", open_.id: "passing"}))
        detail = await api_get(app, f"/v1/endpoints?service={svc}")
        status = next(e for e in detail if e["source"]["container_id"] == closed.id)["check_status"]
        assert status["output"].startswith(f"TCP connect 127.0.0.1:{host_port(closed)}: ")


async def test_autoheal_restarts_a_container_whose_check_fails(
    run_container: Callable[..., Container], docker_client: docker.DockerClient
) -> None:
    svc = service_name()
    labels = check_labels(svc, **{"beacon.autoheal": "true", "beacon.autoheal.after": "2"})
    since = time.time() - 1
    async with running_app() as app:
        c = await start(run_container, labels=labels, ports=LOOPBACK_PORT, command=["sh", "-c", HEALTHY_AT_BOOT])
        await until(lambda: _equal(states(app, svc), {c.id: "passing"}))
        started_at = c.attrs["State"]["StartedAt"]

        await exec_in(c, "rm /www/health")
        log = await until(lambda: _autoheal_entries(app, c.id))
        assert log[0]["action"] == "restarted"
        assert log[0]["reason"].startswith("check failed 2 times in a row: HTTP GET /health: 404")
        await until(lambda: _equal(states(app, svc), {c.id: "passing"}))  # healed
        await asyncio.to_thread(c.reload)
        assert c.attrs["State"]["StartedAt"] != started_at
        assert await restart_events(docker_client, c, since) == 1


async def test_autoheal_restarts_a_container_docker_finds_unhealthy(
    run_container: Callable[..., Container], docker_client: docker.DockerClient
) -> None:
    svc = service_name()
    labels = {"beacon.service": svc, "beacon.autoheal": "true", "beacon.autoheal.after": "2"}
    healthcheck = {
        "test": ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/health"],
        "interval": 300_000_000, "timeout": 1_000_000_000, "retries": 2,
    }
    since = time.time() - 1
    async with running_app() as app:
        # No Beacon check: Docker's HEALTHCHECK alone decides, Beacon restarts.
        c = await start(run_container, labels=labels, ports=LOOPBACK_PORT, healthcheck=healthcheck,
                        command=["sh", "-c", HEALTHY_AT_BOOT])
        await until(lambda: _equal(states(app, svc), {c.id: "passing"}))  # Docker says healthy
        await exec_in(c, "rm /www/health")
        log = await until(lambda: _autoheal_entries(app, c.id))
        assert log[0]["action"] == "restarted"
        assert log[0]["reason"].startswith("Docker HEALTHCHECK unhealthy, ")
        await until(lambda: _equal(states(app, svc), {c.id: "passing"}))
        assert await restart_events(docker_client, c, since) == 1


async def test_autoheal_restart_limit_holds_for_a_container_that_never_recovers(
    run_container: Callable[..., Container], docker_client: docker.DockerClient
) -> None:
    svc = service_name()
    labels = check_labels(svc, **{
        "beacon.autoheal": "true", "beacon.autoheal.after": "2", "beacon.autoheal.max_restarts": "2",
        "beacon.autoheal.window": "10m", "beacon.autoheal.backoff": "500ms",
    })
    since = time.time() - 1
    async with running_app() as app:
        c = await start(run_container, labels=labels, ports=LOOPBACK_PORT, command=["sh", "-c", HEALTHY_ONCE])
        await until(lambda: _equal(states(app, svc), {c.id: "passing"}))
        await exec_in(c, "rm /www/health")  # broken now, and every restart keeps it broken
        log = await until(lambda: _autoheal_entries(app, c.id, "limited"), timeout=30)
        assert [e["action"] for e in log] == ["restarted", "restarted", "limited"]
        await asyncio.sleep(3)  # it keeps failing; the limit keeps holding
        assert [e["action"] for e in await _autoheal_entries(app, c.id)] == ["restarted", "restarted", "limited"]
        assert (await states(app, svc))[c.id] == "critical"
        assert await restart_events(docker_client, c, since) == 2
        metrics = await _metrics(app)
        assert "beacon_registry_autoheal_restarts_total" in metrics


# ---------------------------------------------------------------- helpers
async def _equal(value: Awaitable[T], expected: T) -> bool:
    return await value == expected


async def _autoheal_entries(app: App, container_id: str, wait_for: str = "restarted") -> list[dict[str, Any]]:
    """The API's autoheal log for one container, once it holds a `wait_for` entry."""
    entries = [e for e in await api_get(app, "/v1/autoheal") if e["container_id"] == container_id]
    return entries if any(e["action"] == wait_for for e in entries) else []


async def _metrics(app: App) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://{app.api.address}/metrics") as resp:
        return await resp.text()
