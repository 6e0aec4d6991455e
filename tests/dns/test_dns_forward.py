"""Forwarding names outside the domain: real sockets to scripted upstreams on
loopback (FakeUpstream, built on dnslib), plus the pure pieces (resolv.conf,
self-exclusion, the allow list)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.rcode
import pytest
from prometheus_client.registry import CollectorRegistry

from beacon.config import HostPort
from beacon.dns import DnsServer
from beacon.dns.allow import AllowList, docker_subnets
from beacon.dns.forward import parse_resolv_conf, without_self
from beacon.registry import Catalog
from tests.dns.dnstest import FakeUpstream, addresses, dns_server, ep, put, tcp, udp, upstreams
from tests.helpers import test_config as make_config

EXT = {"ext.example.test": "198.51.100.10"}  # data only: nothing connects to it


async def test_forwards_over_udp_and_tcp_and_passes_the_upstream_answer_through() -> None:
    up = FakeUpstream(EXT)
    async with upstreams(up) as ups, dns_server(dns_recursors=ups) as srv:
        msg = await udp(srv, "Ext.Example.Test")
        assert addresses(msg) == ["198.51.100.10"] and msg.flags & dns.flags.RA
        assert msg.question[0].name.to_text() == "Ext.Example.Test."
        assert addresses(await tcp(srv, "ext.example.test")) == ["198.51.100.10"]
        assert (await udp(srv, "missing.example.test")).rcode() == dns.rcode.NXDOMAIN
        # with EDNS, the option goes upstream unchanged
        assert addresses(await udp(srv, "ext.example.test", use_edns=0, payload=1232)) == ["198.51.100.10"]
        # answers are not cached: each query goes upstream
        assert addresses(await udp(srv, "ext.example.test")) == ["198.51.100.10"]
    assert [t for t, _ in up.queries].count("udp") == 4
    assert ("tcp", "ext.example.test") in up.queries


async def test_a_silent_upstream_times_out_fails_over_and_loses_its_preference() -> None:
    dead, good = FakeUpstream(EXT, silent=True), FakeUpstream(EXT)
    async with upstreams(dead, good) as ups, dns_server(dns_recursors=ups, dns_recursor_timeout=0.3) as srv:
        t0 = time.monotonic()
        assert addresses(await udp(srv, "ext.example.test")) == ["198.51.100.10"]
        assert time.monotonic() - t0 >= 0.25  # it waited for the dead one first
        t1 = time.monotonic()
        assert addresses(await udp(srv, "ext.example.test")) == ["198.51.100.10"]
        assert time.monotonic() - t1 < 0.25  # the live one is preferred now
        assert addresses(await tcp(srv, "ext.example.test")) == ["198.51.100.10"]
    assert len(dead.queries) == 1


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
async def test_servfail_or_refused_upstream_fails_over(rcode: int) -> None:
    bad, good = FakeUpstream(EXT, rcode=rcode), FakeUpstream(EXT)
    async with upstreams(bad, good) as ups, dns_server(dns_recursors=ups) as srv:
        assert addresses(await udp(srv, "ext.example.test")) == ["198.51.100.10"]
        assert addresses(await tcp(srv, "ext.example.test")) == ["198.51.100.10"]
    assert len(bad.queries) == 2 and len(good.queries) == 2


async def test_every_upstream_failing_gives_servfail() -> None:
    a, b = FakeUpstream(EXT, silent=True), FakeUpstream(EXT, silent=True)
    async with upstreams(a, b) as ups, dns_server(dns_recursors=ups, dns_recursor_timeout=0.2) as srv:
        t0 = time.monotonic()
        msg = await udp(srv, "ext.example.test", timeout=3)
        assert msg.rcode() == dns.rcode.SERVFAIL
        assert 0.35 <= time.monotonic() - t0 < 2.5  # both tried, each bounded by the timeout
        assert (await tcp(srv, "ext.example.test", timeout=3)).rcode() == dns.rcode.SERVFAIL


async def test_a_spoofed_reply_with_another_question_is_ignored() -> None:
    spoof = FakeUpstream(EXT, wrong_question=True)
    async with upstreams(spoof) as ups, dns_server(dns_recursors=ups, dns_recursor_timeout=0.2) as srv:
        assert (await udp(srv, "ext.example.test")).rcode() == dns.rcode.SERVFAIL


async def test_none_refuses_forwarding_but_answers_local_names() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat, dns_recursors=()) as srv:
        for ask in (udp, tcp):
            msg = await ask(srv, "ext.example.test")
            assert msg.rcode() == dns.rcode.REFUSED and not msg.flags & dns.flags.RA
            assert msg.question[0].name.to_text() == "ext.example.test."
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]


async def test_a_slow_upstream_never_delays_local_answers() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    slow = FakeUpstream(EXT, delay=1.0)
    async with upstreams(slow) as ups, dns_server(cat, dns_recursors=ups, dns_recursor_timeout=3) as srv:
        pending = [asyncio.ensure_future(udp(srv, "ext.example.test", timeout=3)) for _ in range(20)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        for _ in range(10):
            assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]
            assert addresses(await tcp(srv, "web.service.beacon")) == ["10.0.0.1"]
        assert time.monotonic() - t0 < 0.6  # twenty local answers while the upstream sleeps
        assert not any(p.done() for p in pending)
        answers = await asyncio.gather(*pending)
        assert all(addresses(a) == ["198.51.100.10"] for a in answers)


async def test_reverse_names_of_unknown_addresses_are_forwarded() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1", container="web-a"))
    up = FakeUpstream({})
    async with upstreams(up) as ups, dns_server(cat, dns_recursors=ups) as srv:
        assert (await udp(srv, "1.0.0.10.in-addr.arpa", "PTR")).answer  # ours
        assert (await udp(srv, "10.2.0.192.in-addr.arpa", "PTR")).rcode() == dns.rcode.NXDOMAIN
    assert [q for _, q in up.queries] == ["10.2.0.192.in-addr.arpa"]


async def test_forwarding_metrics() -> None:
    registry = CollectorRegistry()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    dead, good = FakeUpstream(EXT, silent=True), FakeUpstream(EXT)
    async with upstreams(dead, good) as ups:
        server = DnsServer(
            make_config(dns_recursors=ups, dns_recursor_timeout=0.2), Catalog(), metrics_registry=registry
        )
        await server.start()
        try:
            await udp(server, "ext.example.test")
            await udp(server, "nope.example.test")
            assert value("beacon_dns_forwarded_queries_total") == 2
            assert value("beacon_dns_upstream_failures_total", upstream=str(ups[0]), reason="timeout") == 1
            assert value("beacon_dns_queries_total", type="A", rcode="NOERROR") == 1
            assert value("beacon_dns_queries_total", type="A", rcode="NXDOMAIN") == 1
            assert value("beacon_dns_answer_latency_seconds_count", path="forward") == 2
        finally:
            await server.stop()


async def test_default_upstreams_come_from_resolv_conf(tmp_path: Path) -> None:
    # resolv.conf has no port: the fake listens on port 53 of a loopback address of its own.
    host = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"
    up = FakeUpstream(EXT, host=host, port=53)
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# generated\nsearch example\nnameserver {host}\noptions ndots:1\n")
    async with upstreams(up):
        server = DnsServer(make_config(dns_recursors=None), Catalog(), resolv_conf=conf, metrics_registry=None)
        await server.start()
        try:
            assert addresses(await udp(server, "ext.example.test")) == ["198.51.100.10"]
        finally:
            await server.stop()
    assert up.queries == [("udp", "ext.example.test")]


# ---------------------------------------------------------------- pure parts
def test_parse_resolv_conf() -> None:
    text = """
    # comment
    nameserver 10.1.2.3
    nameserver   fe80::1%eth0
    nameserver not-an-ip
    nameserver 10.1.2.3
    search a.example
    nameserver 127.0.0.53
    """
    assert parse_resolv_conf(text) == (
        HostPort("10.1.2.3", 53), HostPort("fe80::1%eth0", 53), HostPort("127.0.0.53", 53),
    )  # fmt: skip
    assert parse_resolv_conf("") == ()


@pytest.mark.parametrize(
    ("upstream", "listeners", "kept"),
    [
        (HostPort("127.0.0.1", 53), [HostPort("127.0.0.1", 53)], False),
        (HostPort("127.0.0.1", 53), [HostPort("0.0.0.0", 53)], False),
        (HostPort("127.0.0.1", 5353), [HostPort("127.0.0.1", 53)], True),
        (HostPort("10.0.0.2", 53), [HostPort("10.0.0.1", 53)], True),
        (HostPort("::1", 53), [HostPort("::", 53)], False),
    ],
)
def test_upstreams_that_are_our_own_listener_are_skipped(
    upstream: HostPort, listeners: list[HostPort], kept: bool
) -> None:
    assert without_self([upstream], listeners) == ((upstream,) if kept else ())


def test_allow_list_loopback_always_plus_configured_networks() -> None:
    allow = AllowList([ipaddress.ip_network("172.30.0.0/16")])
    assert allow.allows("127.0.0.1") and allow.allows("::1") and allow.allows("127.8.9.10")
    assert allow.allows("172.30.5.6") and allow.allows("::ffff:172.30.5.6")
    assert not allow.allows("172.31.0.1") and not allow.allows("192.0.2.1") and not allow.allows("junk")
    assert not allow.can_refresh()


async def test_allow_list_discovery_is_rate_limited_and_survives_failures() -> None:
    now = [100.0]
    calls: list[int] = []
    results: list[list[ipaddress.IPv4Network | ipaddress.IPv6Network] | Exception] = [
        [ipaddress.ip_network("172.18.0.0/16")],
        RuntimeError("docker down"),
        [ipaddress.ip_network("172.18.0.0/16"), ipaddress.ip_network("172.19.0.0/16")],
    ]

    def discover() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        calls.append(1)
        result = results[len(calls) - 1]
        if isinstance(result, Exception):
            raise result
        return result

    allow = AllowList((), discover=discover, refresh_interval=30, clock=lambda: now[0])
    assert not allow.allows("172.18.0.5")
    await allow.refresh()
    assert allow.allows("172.18.0.5") and not allow.allows("172.19.0.5")
    await allow.refresh()  # too soon: no second call
    assert len(calls) == 1 and not allow.can_refresh()
    now[0] += 31
    await allow.refresh()  # Docker down: keeps what it had
    assert len(calls) == 2 and allow.allows("172.18.0.5")
    now[0] += 31
    assert allow.can_refresh()
    await allow.refresh()
    assert allow.allows("172.19.0.5")


def test_docker_subnets_from_network_descriptions() -> None:
    nets: list[dict[str, Any]] = [
        {"Name": "bridge", "IPAM": {"Config": [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]}},
        {"Name": "v6", "IPAM": {"Config": [{"Subnet": "172.20.0.0/16"}, {"Subnet": "fd00:1::/64"}]}},
        {"Name": "host", "IPAM": {"Config": []}},
        {"Name": "none", "IPAM": None},
        {"Name": "odd", "IPAM": {"Config": [{"Subnet": "garbage"}]}},
    ]
    assert [str(n) for n in docker_subnets(nets)] == ["172.17.0.0/16", "172.20.0.0/16", "fd00:1::/64"]


async def test_a_forwarded_udp_answer_never_exceeds_what_the_client_accepts() -> None:
    """An upstream answers 2,600 A records (~42 KB); a UDP client gets TC at its
    own size (512 without EDNS, its EDNS size up to 4096) and the whole answer
    over TCP. A small forwarded answer is relayed untouched."""
    up = FakeUpstream(EXT, many={"huge.example.test": 2600})
    async with upstreams(up) as ups, dns_server(dns_recursors=ups) as srv:
        for make, limit in (({}, 512), ({"use_edns": 0, "payload": 1232}, 1232), ({"use_edns": 0, "payload": 65000}, 4096)):
            msg = await udp(srv, "HUGE.example.test", **make)
            assert msg.flags & dns.flags.TC and not msg.answer, make
            assert msg.question[0].name.to_text() == "HUGE.example.test."
            assert len(msg.to_wire()) <= limit and (msg.edns >= 0) == bool(make)
        full = await tcp(srv, "huge.example.test")
        assert len(addresses(full)) == 2600 and not full.flags & dns.flags.TC
        small = await udp(srv, "ext.example.test")
        assert addresses(small) == ["198.51.100.10"] and not small.flags & dns.flags.TC


@pytest.mark.parametrize("name", ["version.bind", "hostname.bind", "id.server", "web.service.beacon"])
async def test_chaos_class_is_refused_locally_never_forwarded(name: str) -> None:
    up = FakeUpstream(EXT)
    async with upstreams(up) as ups, dns_server(dns_recursors=ups) as srv:
        for query in (udp, tcp):
            msg = await query(srv, name, "TXT", rdclass="CH")
            assert msg.rcode() == dns.rcode.REFUSED and not msg.answer
        assert up.queries == []
        assert addresses(await udp(srv, "ext.example.test")) == ["198.51.100.10"]  # IN still forwards
