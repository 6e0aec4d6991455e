"""The container recipe, on the real Docker engine: Beacon's DNS listens on the
gateway address of a network (port 53), a container started with `--dns` at
that address resolves `<service>.service.beacon` with busybox nslookup and
reaches the service with wget.

Every container and network here is created by the test; the only other
traffic goes to loopback (the scripted upstream)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from docker.models.containers import Container
from docker.models.networks import Network

from beacon.config import HostPort
from beacon.registry import Catalog, Endpoint, Source
from tests.conftest import RUN_ID
from tests.dns.dnstest import FakeUpstream, addresses, dns_server, put, tcp, udp, upstreams
from tests.helpers import eventually, running_app

pytestmark = pytest.mark.docker

EXT = {"ext.example.test": "198.51.100.10"}  # data only: nothing connects to it


def gateway_of(network: Network) -> str:
    network.reload()
    return str(network.attrs["IPAM"]["Config"][0]["Gateway"])


def ip_on(container: Container, network: Network) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


async def run_to_completion(run_container: Callable[..., Container], script: str, **kw: Any) -> tuple[int, str]:
    """Run `script` in a busybox container; its exit code and output (bounded wait)."""
    client = await asyncio.to_thread(run_container, command=["sh", "-c", script], **kw)
    result = await asyncio.to_thread(client.wait, timeout=60)
    logs = await asyncio.to_thread(client.logs)
    return int(result["StatusCode"]), logs.decode(errors="replace")


async def test_container_resolves_and_reaches_a_service_through_beacon_on_the_gateway(
    run_container: Callable[..., Container], make_network: Callable[..., Network]
) -> None:
    net = await asyncio.to_thread(make_network)
    gateway = gateway_of(net)
    backend = await asyncio.to_thread(run_container, network=net.name)
    backend_ip = ip_on(backend, net)
    catalog = Catalog()
    put(
        catalog, f"container:{backend.id}",
        Endpoint(
            id=f"{backend.id[:12]}:80", service="web", address=backend_ip, port=80,
            source=Source("container", container_id=backend.id, container_name=backend.name),
        ),
    )  # fmt: skip
    up = FakeUpstream(EXT)
    # dns_allow unset: forwarding is allowed for the Docker networks, found at start.
    async with upstreams(up) as ups, dns_server(catalog, dns_listen=(HostPort(gateway, 53),), dns_recursors=ups) as srv:
        assert srv.addresses == [HostPort(gateway, 53)]
        code, out = await run_to_completion(
            run_container,
            "nslookup web.service.beacon && wget -q -O- http://web.service.beacon/ && "
            f"nslookup {backend.name}.container.beacon && nslookup ext.example.test",
            network=net.name,
            dns=[gateway],
        )
    assert code == 0, out
    assert out.count(backend_ip) >= 2, out  # service and container name
    assert backend.attrs["Config"]["Hostname"] in out, out  # wget reached the backend
    assert "198.51.100.10" in out, out  # forwarded for a client on a Docker network
    assert ("udp", "ext.example.test") in up.queries


async def test_beyond_loopback_forwarding_is_only_for_allowed_networks(
    run_container: Callable[..., Container], make_network: Callable[..., Network], caplog: pytest.LogCaptureFixture
) -> None:
    """A container asks Beacon directly (busybox `nslookup NAME SERVER`, no Docker
    DNS in between): its own names are answered to anyone, forwarding only for
    allowed networks and loopback."""
    net = await asyncio.to_thread(make_network)
    gateway = gateway_of(net)
    subnet = ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"])
    catalog = Catalog()
    put(catalog, "manual:x", Endpoint(id="x", service="web", address="10.0.0.1", port=80, source=Source("manual")))
    up = FakeUpstream(EXT)
    listen = (HostPort(gateway, 53),)
    script = f"nslookup web.service.beacon {gateway}; nslookup ext.example.test {gateway}; true"
    async with upstreams(up) as ups:
        elsewhere = (ipaddress.ip_network("203.0.113.0/24"),)
        async with dns_server(catalog, dns_listen=listen, dns_recursors=ups, dns_allow=elsewhere) as srv:
            with caplog.at_level(logging.WARNING, logger="beacon.dns"):
                _, out = await run_to_completion(run_container, script + f"; nslookup ext.example.test {gateway}", network=net.name)
            assert "10.0.0.1" in out and "REFUSED" in out and "198.51.100.10" not in out, out
            assert up.queries == []
            # the refused source is logged once, with the flag that would allow it
            refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused: forwarding")]
            assert len(refused) == 1 and "--dns-allow" in refused[0] and "/32" in refused[0], refused
            source = refused[0].split("--dns-allow ")[-1].split("/32")[0]
            assert ipaddress.ip_address(source) in subnet, refused
            # the host itself (loopback) may always forward
            assert addresses(await udp(srv, "ext.example.test", source="127.0.0.1")) == ["198.51.100.10"]
            assert addresses(await tcp(srv, "ext.example.test", source="127.0.0.1")) == ["198.51.100.10"]
        async with dns_server(catalog, dns_listen=listen, dns_recursors=ups, dns_allow=(subnet,)):
            _, out = await run_to_completion(run_container, script, network=net.name)
            assert "10.0.0.1" in out and "198.51.100.10" in out and "REFUSED" not in out, out


async def test_full_stack_docker_watcher_feeds_dns(
    run_container: Callable[..., Container], make_network: Callable[..., Network]
) -> None:
    """`beacon run` as a whole: the Docker source registers a labelled container,
    the DNS server on the gateway answers for it, a client container uses it."""
    net = await asyncio.to_thread(make_network)
    gateway = gateway_of(net)
    service = f"dnsweb-{RUN_ID}-{uuid.uuid4().hex[:4]}"  # unique: other runs share the engine
    async with running_app(
        address_mode="internal", network=net.name, dns_listen=(HostPort(gateway, 53),), dns_ttl=0
    ) as app:
        backend = await asyncio.to_thread(
            run_container,
            network=net.name,
            labels={"beacon.service": service, "beacon.port": "80", "beacon.dns.ttl": "7"},
        )
        backend_ip = ip_on(backend, net)
        await eventually(lambda: service in app.catalog.snapshot.services, timeout=20)
        assert [e.address for e in app.catalog.snapshot.services[service].endpoints] == [backend_ip]
        answer = await udp(HostPort(gateway, 53), f"{service}.service.beacon")
        assert addresses(answer) == [backend_ip] and answer.answer[0].ttl == 7  # label beacon.dns.ttl
        code, out = await run_to_completion(
            run_container,
            f"nslookup {service}.service.beacon && wget -q -O- http://{service}.service.beacon/",
            network=net.name,
            dns=[gateway],
        )
    assert code == 0, out
    assert backend_ip in out and backend.attrs["Config"]["Hostname"] in out, out


async def test_a_container_is_told_the_address_it_can_reach_not_the_hosts_loopback(
    run_container: Callable[..., Container], make_network: Callable[..., Network]
) -> None:
    """Issue 12: the default host address mode, a backend publishing its port on
    127.0.0.1 only. The host (loopback) is told 127.0.0.1 and the published
    port; a container on the backend's network is told the backend's address
    there and its own port (and wget reaches it); a second service published
    on loopback only, on another network, is not offered to the container."""
    net = await asyncio.to_thread(make_network)
    other = await asyncio.to_thread(make_network)
    gateway = gateway_of(net)
    service = f"reach-{RUN_ID}-{uuid.uuid4().hex[:4]}"
    async with running_app(dns_listen=(HostPort("127.0.0.1", 0), HostPort(gateway, 53)), advertise_ip="127.0.0.1") as app:
        backend = await asyncio.to_thread(
            run_container, network=net.name, ports={"80/tcp": ("127.0.0.1", None)},
            labels={"beacon.service": service, "beacon.port": "80"},
        )  # fmt: skip
        hidden = await asyncio.to_thread(
            run_container, network=other.name, ports={"80/tcp": ("127.0.0.1", None)},
            labels={"beacon.service": f"{service}-lo", "beacon.port": "80"},
        )  # fmt: skip
        backend_ip = ip_on(backend, net)
        host_port = int(backend.attrs["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"])
        snap = await eventually(
            lambda: {service, f"{service}-lo"} <= set(app.catalog.snapshot.services) and app.catalog.snapshot,
            timeout=20,
        )
        [endpoint] = snap.services[service].endpoints
        assert (endpoint.address, endpoint.port) == ("127.0.0.1", host_port)
        assert [(n.address, n.port) for n in endpoint.networks] == [(backend_ip, 80)]
        hidden_ip = ip_on(hidden, other)
        host = app.dns.addresses[0]
        assert addresses(await udp(host, f"{service}.service.beacon")) == ["127.0.0.1"]
        assert [rd.port for rd in (await udp(host, f"{service}.service.beacon", "SRV")).answer[0]] == [host_port]
        assert addresses(await udp(host, f"{backend.name}.container.beacon")) == ["127.0.0.1"]
        _, out = await run_to_completion(
            run_container,
            f"nslookup {service}.service.beacon && wget -q -O- http://{service}.service.beacon/ && "
            f"nslookup -type=srv {service}.service.beacon; nslookup {service}-lo.service.beacon; true",
            network=net.name,
            dns=[gateway],
        )
        # Container names and PTR, asked of Beacon directly (Docker's embedded
        # DNS would answer a peer's PTR itself): a peer on the backend's network
        # gets its address there and its name back from that address; the
        # container on the other network is neither offered at 127.0.0.1 nor
        # named from its address (not ours for this querier: forwarded, and
        # forwarding is off here).
        _, names = await run_to_completion(
            run_container,
            f"nslookup {backend.name}.container.beacon {gateway}; nslookup {backend_ip} {gateway}; "
            f"nslookup {hidden.name}.container.beacon {gateway}; nslookup {hidden_ip} {gateway}; true",
            network=net.name,
        )
    assert backend_ip in out and backend.attrs["Config"]["Hostname"] in out, out  # resolved and reached
    assert "Address: 127.0.0.1\n" not in out and hidden.attrs["Config"]["Hostname"] not in out, out
    assert f"service = 1 1 80 {ipaddress.ip_address(backend_ip).packed.hex()}.addr.beacon" in out, out  # SRV: container port
    assert f"Address: {backend_ip}\n" in names and f"name = {backend.name}.container.beacon" in names, names
    assert "Address: 127.0.0.1\n" not in names and f"Address: {hidden_ip}\n" not in names, names
    assert f"name = {hidden.name}" not in names and "REFUSED" in names, names  # the PTR: forwarded, refused
