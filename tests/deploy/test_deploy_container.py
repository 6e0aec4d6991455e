"""Beacon as a container, the way compose/deploy.yml runs it: the image built by
deploy/build-image.sh (no registry), non-root, read-only root filesystem, no
capabilities, the Docker socket mounted read-only, internal address mode on a
network the apps share. It must discover a labelled container and serve DNS
and proxy traffic to it - from the host through the published ports and from
another container that uses Beacon as its `dns:` server with
`dns_search: service.beacon`.

Every container and network here is created by the test; the only traffic goes
to loopback or to those containers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

pytestmark = pytest.mark.docker

SOCKET = "/var/run/docker.sock"


def ip_on(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def host_port(container: Container, port: str) -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def beacon_container(
    run_container: Callable[..., Container], image: str, network: Network, *extra: str
) -> Container:
    """Beacon with the settings of compose/deploy.yml (ports on loopback, random)."""
    loopback = ("127.0.0.1", None)
    return run_container(
        image=image,
        command=["run", "--address-mode", "internal", "--network", network.name, "--explicit", *extra],
        environment={"BEACON_NODE": "deploy-test"},
        network=network.name,
        volumes={SOCKET: {"bind": SOCKET, "mode": "ro"}},
        group_add=[str(os.stat(SOCKET).st_gid)],
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        read_only=True,
        tmpfs={"/tmp": ""},
        ports={"53/udp": loopback, "53/tcp": loopback, "80/tcp": loopback, "8700/tcp": loopback},
        # The image's own HEALTHCHECK command (no "test": inherited), run every second.
        healthcheck={"interval": 1_000_000_000, "timeout": 3_000_000_000},
    )


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with session.get(url) as resp:
            return await resp.json() if resp.status == 200 else None
    except aiohttp.ClientError:
        return None  # not listening yet


async def run_to_completion(run_container: Callable[..., Container], script: str, **kw: Any) -> tuple[int, str]:
    client = await asyncio.to_thread(run_container, command=["sh", "-c", script], **kw)
    result = await asyncio.to_thread(client.wait, timeout=60)
    logs = await asyncio.to_thread(client.logs)
    return int(result["StatusCode"]), logs.decode(errors="replace")


@pytest.mark.timeout(300)  # the first build of the image fills the wheelhouse
async def test_beacon_in_a_container_discovers_and_serves_a_labelled_container(
    beacon_image: str, run_container: Callable[..., Container], make_network: Callable[..., Network]
) -> None:
    net = await asyncio.to_thread(make_network)
    beacon = await asyncio.to_thread(beacon_container, run_container, beacon_image, net, "--dns-recursors", "none")
    beacon.reload()
    # As deployed: not root, the socket read-only, nothing writable but /tmp.
    assert beacon.attrs["Config"]["User"] == "10001:10001"
    assert [m["RW"] for m in beacon.attrs["Mounts"] if m["Destination"] == SOCKET] == [False]
    assert beacon.attrs["HostConfig"]["ReadonlyRootfs"] is True
    beacon_ip = ip_on(beacon, net)
    api = f"http://127.0.0.1:{host_port(beacon, '8700/tcp')}"

    app = await asyncio.to_thread(
        run_container, network=net.name,
        labels={"beacon.enable": "true", "beacon.service": "web", "beacon.port": "80"},
    )  # fmt: skip
    app_ip = ip_on(app, net)
    hostname = app.attrs["Config"]["Hostname"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def web_endpoints() -> list[dict[str, Any]] | None:
            body = await get_json(session, f"{api}/v1/services/web")
            return body["endpoints"] if body else None

        endpoints = await eventually_async(web_endpoints, timeout=30)
        assert [(e["address"], e["port"], e["state"]) for e in endpoints] == [(app_ip, 80, "passing")]
        assert endpoints[0]["source"]["container_id"] == app.id
        # 503 "starting" until DNS and the proxy listen too (the proxy's worker process starts last).
        healthz = await eventually_async(lambda: get_json(session, f"{api}/healthz"), timeout=15)
        assert healthz == {"status": "ok", "docker": "connected"}

        def docker_health() -> str | None:
            beacon.reload()
            status = beacon.attrs["State"].get("Health", {}).get("Status")
            return status if status != "starting" else None

        # The image's HEALTHCHECK command reaches /healthz.
        assert await eventually_async(lambda: asyncio.to_thread(docker_health), timeout=15) == "healthy"
        async with session.get(f"{api}/metrics") as resp:
            assert "\nbeacon_docker_connected 1.0\n" in await resp.text()
        # The dashboard's files are in the installed package (pyproject package-data).
        async with session.get(f"{api}/ui/app.js") as resp:
            assert resp.status == 200 and "EventSource" in await resp.text()

        # DNS from the host, through the port published on loopback.
        query = dns.message.make_query("web.service.beacon", dns.rdatatype.A)
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=host_port(beacon, "53/udp"), timeout=5)
        assert [rr.address for rrset in reply.answer for rr in rrset] == [app_ip]

        # The proxy, from the host.
        proxy = f"http://127.0.0.1:{host_port(beacon, '80/tcp')}/"
        async with session.get(proxy, headers={"Host": "web.localhost"}) as resp:
            assert resp.status == 200
            assert (await resp.text()).strip() == hostname

        # Another container, set up as deploy/README.md says: Beacon is its DNS
        # server (Docker's embedded DNS forwards to it) and `web` is a short name.
        code, out = await run_to_completion(
            run_container,
            f"nslookup web.service.beacon && wget -q -O- http://web/ && "
            f"wget -q -O- --header 'Host: web.localhost' http://{beacon_ip}/",
            network=net.name, dns=[beacon_ip], dns_search=["service.beacon"],
        )  # fmt: skip
        assert code == 0, out
        assert app_ip in out, out
        assert out.count(hostname) == 2, out  # the app directly, then through the proxy

        # The app stops: the service leaves the catalog.
        await asyncio.to_thread(app.stop, timeout=5)

        async def web_gone() -> bool:
            return await web_endpoints() is None

        await eventually_async(web_gone, timeout=15)


async def eventually_async(
    probe: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.1
) -> Any:
    """`tests.helpers.eventually` for a coroutine probe."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")

