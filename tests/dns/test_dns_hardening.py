"""Hostile clients against the DNS server (issue 10): cache busting by letter
case, what a miss may cost, and the cache's bound in bytes. Real sockets on
127.0.0.1 port 0, dnspython as the client."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest
from dnslib import DNSRecord
from prometheus_client.registry import CollectorRegistry

from beacon.dns import DnsServer
from beacon.dns import resolver as dns_resolver
from beacon.dns.logs import Throttle, escape
from beacon.dns.resolver import Zone, ZoneSettings, resolve
from beacon.registry import Catalog, Endpoint
from beacon.registry.model import NetworkAddress
from tests.dns.dnstest import FakeUpstream, addresses, dns_server, ep, put, raw_udp, tcp, udp, upstreams
from tests.helpers import eventually, test_config


def mixed_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def big_service(n: int = 1000, name: str = "big") -> list[Endpoint]:
    return [ep(f"b{i}", f"10.{i // 250}.{i % 250}.1", name, port=8000 + i) for i in range(n)]


@pytest.fixture
def pack_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every reply the server packs (the cost of a miss)."""
    calls: list[int] = []
    real: Callable[[Any], bytes] = dns_resolver.pack

    def counting(record: Any) -> bytes:
        calls.append(1)
        return real(record)

    monkeypatch.setattr("beacon.dns.server.pack", counting)  # the first order, on a miss
    monkeypatch.setattr("beacon.dns.cache.pack", counting)  # the others, as they are first handed out
    return calls


async def test_case_variants_share_one_cache_entry_and_get_their_own_case_back() -> None:
    cat = Catalog()
    put(cat, "a", *[ep(f"e{i}", f"10.0.0.{i}") for i in range(1, 5)])
    rng = random.Random(7)
    async with dns_server(cat) as srv:
        for query in (udp, tcp):
            for _ in range(12):
                name = mixed_case("web.service.beacon", rng)
                msg = await query(srv, name)
                # byte for byte, as 0x20-randomising resolvers check it
                assert msg.question[0].name.to_text() == name + "."
                assert msg.answer[0].name.to_text() == name + "."
                assert sorted(addresses(msg)) == [f"10.0.0.{i}" for i in range(1, 5)]
        assert len(srv._cache.entries) == 1 and len(srv._tcp_cache.entries) == 1


async def test_a_big_answer_is_packed_only_as_it_is_sent(pack_calls: list[int]) -> None:
    """1,000 endpoints: over UDP only the small TC reply is packed (once for
    every case variant); over TCP each query packs the one order it sends."""
    cat = Catalog()
    put(cat, "big", *big_service())
    rng = random.Random(8)
    async with dns_server(cat) as srv:
        for rdtype in ("A", "SRV"):
            before = len(pack_calls)
            for _ in range(10):
                msg = await udp(srv, mixed_case("big.service.beacon", rng), rdtype, use_edns=0, payload=4096)
                assert msg.flags & dns.flags.TC and not msg.answer
            assert len(pack_calls) - before == 1, rdtype
        before = len(pack_calls)
        for _ in range(3):
            msg = await tcp(srv, mixed_case("big.service.beacon", rng), "SRV")
            assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 1000
        assert len(pack_calls) - before == 3


async def test_the_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("beacon.dns.cache.MAX_CACHE_BYTES", 400_000)
    cat = Catalog()
    put(cat, "big", *big_service())
    async with dns_server(cat) as srv:
        for i in range(12):  # each EDNS size is another key; each answer ~16 KB x 16 orders
            msg = await tcp(srv, "big.service.beacon", use_edns=0, payload=1232 + i)
            assert len(addresses(msg)) == 1000
            assert srv._tcp_cache.bytes <= 400_000
        assert 0 < len(srv._tcp_cache.entries) < 12


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def clocked_server(clock: FakeClock, catalog: Catalog | None = None, **overrides: Any) -> AsyncIterator[DnsServer]:
    server = DnsServer(test_config(**overrides), catalog or Catalog(), metrics_registry=CollectorRegistry(), clock=clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(65536), 2) == b""
    except ConnectionError:
        return True


async def test_a_tcp_client_dribbling_bytes_is_closed_after_the_idle_timeout() -> None:
    clock = FakeClock()
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with clocked_server(clock, cat, dns_tcp_idle_timeout=10.0) as srv:
        addr = srv.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        query = dns.message.make_query("web.service.beacon", "A").to_wire()
        writer.write(len(query).to_bytes(2, "big") + query)
        size = int.from_bytes(await reader.readexactly(2), "big")
        assert dns.message.from_wire(await reader.readexactly(size)).answer  # a query is progress
        clock.now += 9.0
        srv._tcp.sweep()
        assert not writer.is_closing() and len(srv._tcp.open) == 1
        # the next query, one byte every 5 s: bytes are not progress
        for byte in (len(query).to_bytes(2, "big") + query)[:3]:
            writer.write(bytes([byte]))
            await writer.drain()
            clock.now += 5.0
            srv._tcp.sweep()
        assert await closed_by_server(reader)
        writer.close()
        await eventually(lambda: not srv._tcp.open)


async def test_tcp_connections_are_capped_and_the_cap_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat, dns_tcp_max_connections=2) as srv:
        addr = srv.addresses[0]
        held = [await asyncio.open_connection(addr.host, addr.port) for _ in range(2)]
        await eventually(lambda: len(srv._tcp.open) == 2)
        with caplog.at_level(logging.WARNING, logger="beacon.dns"):
            for _ in range(4):
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
                assert await closed_by_server(reader)
                writer.close()
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused: DNS/TCP")]
        assert len(refused) == 1 and "--dns-tcp-max-connections" in refused[0], refused
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]  # UDP unaffected
        held[0][1].close()
        await eventually(lambda: len(srv._tcp.open) == 1)
        assert addresses(await tcp(srv, "web.service.beacon")) == ["10.0.0.1"]
        for _, w in held[1:]:
            w.close()


def long_name_query(qid: int, i: int) -> bytes:
    """A query whose name is 321 bytes (over RFC 1035's 255), unique per `i`."""
    labels = [f"{i:05d}".encode() + b"a" * 58] + [b"a" * 63] * 4
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"


async def test_names_over_255_bytes_get_formerr_without_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async with dns_server() as srv:
        with caplog.at_level(logging.DEBUG, logger="beacon"):
            for i in range(300):
                reply = await raw_udp(srv.addresses[0], long_name_query(i, i))
                assert reply is not None and reply[:2] == i.to_bytes(2, "big") and reply[3] & 0x0F == 1  # FORMERR
        assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
        assert addresses(await udp(srv, "web.service.beacon")) == []  # still answering


async def test_an_internal_error_is_logged_once_a_minute_not_per_query(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("boom\n[fake] forged line")

    monkeypatch.setattr("beacon.dns.server.resolve", broken)
    async with dns_server() as srv:
        with caplog.at_level(logging.ERROR, logger="beacon"):
            for i in range(50):
                assert (await udp(srv, f"n{i}.service.beacon")).rcode() == dns.rcode.SERVFAIL
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info, [r.getMessage() for r in errors]
        assert "\n" not in errors[0].getMessage() and "boom\\x0a[fake]" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("web\n[x] forged", "web\\x0a[x] forged"), ("\x1b[31mred", "\\x1b[31mred"), ("é", "\\xe9"), (b"a\r\x00", "a\\x0d\\x00")],
)
def test_escape_keeps_log_lines_single_and_printable(raw: str | bytes, shown: str) -> None:
    assert escape(raw) == shown
    assert escape("x" * 500).endswith("...(500 chars)") and len(escape("x" * 500)) < 140


def test_throttle_logs_once_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    throttle = Throttle(logging.getLogger("beacon.dns.test"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="beacon.dns.test"):
        assert throttle.log(logging.WARNING, "k", "refused: %s", "a")
        assert not any(throttle.log(logging.WARNING, "k", "refused: %s", "b") for _ in range(9))
        assert throttle.log(logging.WARNING, "other", "refused: %s", "c")
        clock.now += 61
        assert throttle.log(logging.WARNING, "k", "refused: %s", "d")
    assert [r.getMessage() for r in caplog.records] == [
        "refused: a", "refused: c", "refused: d (9 more like it in the last 61s)",
    ]  # fmt: skip


# ------------------------------------------------- answers the querier can use
def networked(eid: str, host_ip: str, host_port: int, *nets: tuple[str, str, int], service: str = "web") -> Endpoint:
    return ep(eid, host_ip, service, port=host_port, networks=tuple(NetworkAddress(*n) for n in nets))


NET_A, NET_B = "172.30.0.0/24", "172.31.0.0/24"


@pytest.mark.parametrize(
    ("source", "a", "srv_port"),
    [
        ("127.0.0.1", ["192.0.2.10"], 18080),  # the host: the advertised host address
        ("172.30.0.9", ["172.30.0.5"], 80),  # on network A: the container's address there
        ("172.31.0.9", ["172.31.0.5"], 80),  # on network B: its address on B
        ("198.51.100.7", ["192.0.2.10"], 18080),  # anyone else: the host address
    ],
)
def test_an_answer_is_what_the_querier_can_reach(source: str, a: list[str], srv_port: int) -> None:
    cat = Catalog()
    put(cat, "w", networked("w", "192.0.2.10", 18080, (NET_A, "172.30.0.5", 80), (NET_B, "172.31.0.5", 80)))
    zone = Zone(cat.snapshot, ZoneSettings())
    view = zone.view_of(source)
    answer = resolve(DNSRecord.question("web.service.beacon", "A"), zone, view)
    assert answer is not None and [str(rr.rdata) for rr in answer.reply.rr] == a
    srv = resolve(DNSRecord.question("web.service.beacon", "SRV"), zone, view)
    assert srv is not None and [rr.rdata.port for rr in srv.reply.rr] == [srv_port]
    assert [str(rr.rdata) for rr in srv.reply.ar] == a  # the target's address follows


def test_an_endpoint_published_on_loopback_only_is_offered_to_loopback_only() -> None:
    cat = Catalog()
    put(cat, "l", networked("l", "127.0.0.1", 18080, (NET_A, "172.30.0.5", 80)), ep("o", "192.0.2.20", port=81))
    zone = Zone(cat.snapshot, ZoneSettings())

    def a_of(source: str) -> list[str]:
        answer = resolve(DNSRecord.question("web.service.beacon", "A"), zone, zone.view_of(source))
        assert answer is not None and answer.reply.header.rcode == 0
        return sorted(str(rr.rdata) for rr in answer.reply.rr)

    assert a_of("127.0.0.1") == ["127.0.0.1", "192.0.2.20"]
    assert a_of("::ffff:172.30.0.9") == ["172.30.0.5", "192.0.2.20"]
    assert a_of("198.51.100.7") == ["192.0.2.20"]  # never told 127.0.0.1: its own loopback
    put(cat, "l", networked("l", "127.0.0.1", 18080, (NET_A, "172.30.0.5", 80)))  # only the loopback-published one left: NODATA for outsiders, not 127.0.0.1
    zone = Zone(cat.snapshot, ZoneSettings())
    outside = resolve(DNSRecord.question("web.service.beacon", "A"), zone, zone.view_of("198.51.100.7"))
    assert outside is not None and outside.reply.header.rcode == 0 and not outside.reply.rr


async def test_the_server_answers_each_source_from_its_own_view() -> None:
    """Over real sockets: 127.0.0.2 stands for a container network (its /32),
    127.0.0.1 for the host; each keeps its own cached answer, and a snapshot
    that drops the network sends 127.0.0.2 back to the host address."""
    cat = Catalog()
    put(cat, "w", networked("w", "127.0.0.1", 18080, ("127.0.0.2/32", "10.9.0.5", 80)))
    async with dns_server(cat) as srv:
        for _ in range(2):  # a miss, then a hit, for each source
            assert addresses(await udp(srv, "web.service.beacon", source="127.0.0.1")) == ["127.0.0.1"]
            assert addresses(await udp(srv, "web.service.beacon", source="127.0.0.2")) == ["10.9.0.5"]
            assert addresses(await tcp(srv, "web.service.beacon", source="127.0.0.2")) == ["10.9.0.5"]
        srv_reply = await udp(srv, "web.service.beacon", "SRV", source="127.0.0.2")
        assert [rd.port for rd in srv_reply.answer[0]] == [80]
        put(cat, "w", ep("w", "127.0.0.1", port=18080))
        assert addresses(await udp(srv, "web.service.beacon", source="127.0.0.2")) == ["127.0.0.1"]


def view_catalog() -> Catalog:
    """web-1: host address 192.0.2.10, on networks A and B; lo-1: published on
    127.0.0.1 only, on A; a manual endpoint (no container, no network)."""
    cat = Catalog()
    put(
        cat, "w",
        ep("w", "192.0.2.10", port=18080, container="web-1",
           networks=(NetworkAddress(NET_A, "172.30.0.5", 80), NetworkAddress(NET_B, "172.31.0.5", 80))),
        ep("l", "127.0.0.1", "lo", port=18081, container="/lo-1", networks=(NetworkAddress(NET_A, "172.30.0.6", 80),)),
        ep("m", "192.0.2.20", "manual", port=81),
    )  # fmt: skip
    return cat


HOST, ON_A, ON_B, OUTSIDE = "127.0.0.1", "172.30.0.9", "172.31.0.9", "198.51.100.7"


@pytest.mark.parametrize(
    ("source", "name", "want"),
    [
        (HOST, "web-1", ["192.0.2.10"]),  # the host: the advertised host address
        (ON_A, "web-1", ["172.30.0.5"]),  # on network A: its address there
        (ON_B, "web-1", ["172.31.0.5"]),
        (OUTSIDE, "web-1", ["192.0.2.10"]),  # anyone else: the host address
        (HOST, "lo-1", ["127.0.0.1"]),  # published on loopback: the host may use it
        (ON_A, "lo-1", ["172.30.0.6"]),  # a peer on A reaches it on A
        (ON_B, "lo-1", []),  # NODATA: never told 127.0.0.1, its own loopback
        (OUTSIDE, "lo-1", []),
        (ON_A, "ghost", None),  # NXDOMAIN in every view
    ],
)
def test_a_container_name_answers_what_the_querier_can_reach(source: str, name: str, want: list[str] | None) -> None:
    zone = Zone(view_catalog().snapshot, ZoneSettings())
    answer = resolve(DNSRecord.question(f"{name}.container.beacon", "A"), zone, zone.view_of(source))
    assert answer is not None
    rcode = answer.reply.header.rcode
    assert (rcode, [str(rr.rdata) for rr in answer.reply.rr]) == ((3, []) if want is None else (0, want))


@pytest.mark.parametrize(
    ("source", "address", "want"),
    [
        (ON_A, "172.30.0.5", ["web-1.container.beacon."]),  # a peer on A looks up web-1's address there
        (ON_A, "172.30.0.6", ["lo-1.container.beacon."]),
        (ON_B, "172.31.0.5", ["web-1.container.beacon."]),
        (ON_B, "172.30.0.5", None),  # A's addresses are not B's to know: like an unknown address
        (ON_B, "172.30.0.6", None),
        (OUTSIDE, "172.30.0.5", None),
        (HOST, "172.31.0.5", None),  # the host is told the host address, not network ones
        (HOST, "192.0.2.10", ["web-1.container.beacon."]),
        (OUTSIDE, "192.0.2.10", ["web-1.container.beacon."]),
        (ON_A, "192.0.2.10", None),  # web-1 is told to A at 172.30.0.5, not here
        (HOST, "127.0.0.1", ["lo-1.container.beacon."]),
        (OUTSIDE, "127.0.0.1", None),  # loopback-only is the host's alone
        (ON_A, "192.0.2.20", ["c0000214.addr.beacon."]),  # a manual endpoint: the same in every view
        (OUTSIDE, "192.0.2.20", ["c0000214.addr.beacon."]),
    ],
)
def test_ptr_answers_only_addresses_of_the_queriers_view(source: str, address: str, want: list[str] | None) -> None:
    """None: not ours for this querier, so `resolve` returns None and the name is
    forwarded, exactly as the reverse name of an address Beacon does not know."""
    zone = Zone(view_catalog().snapshot, ZoneSettings())
    reverse = ipaddress.ip_address(address).reverse_pointer
    answer = resolve(DNSRecord.question(reverse, "PTR"), zone, zone.view_of(source))
    assert (None if answer is None else [str(rr.rdata) for rr in answer.reply.rr]) == want


async def test_container_and_ptr_answers_are_cached_per_view() -> None:
    """Over real sockets, 127.0.0.2 standing for a container network: the same
    query bytes from two views, each first asked by the other view, get each
    view's own answer (a forward decision of one view is not another's)."""
    cat = Catalog()
    put(cat, "w", ep("w", "127.0.0.1", port=18080, container="web-1", networks=(NetworkAddress("127.0.0.2/32", "10.9.0.5", 80),)))
    up = FakeUpstream()  # NXDOMAIN for every name: what an unknown address gets
    ptr = ipaddress.ip_address("10.9.0.5").reverse_pointer
    async with upstreams(up) as ups, dns_server(cat, dns_recursors=ups) as srv:
        for _ in range(2):  # a miss, then a hit, for each source
            assert addresses(await udp(srv, "web-1.container.beacon", source="127.0.0.1")) == ["127.0.0.1"]
            assert addresses(await udp(srv, "web-1.container.beacon", source="127.0.0.2")) == ["10.9.0.5"]
            assert addresses(await tcp(srv, "web-1.container.beacon", source="127.0.0.2")) == ["10.9.0.5"]
            outside = await udp(srv, ptr, "PTR", source="127.0.0.1")
            assert outside.rcode() == dns.rcode.NXDOMAIN and not outside.answer
            for ask in (udp, tcp):
                inside = await ask(srv, ptr, "PTR", source="127.0.0.2")
                assert [rd.target.to_text() for rr in inside.answer for rd in rr] == ["web-1.container.beacon."]
        assert [q for _, q in up.queries] == [ptr.rstrip(".")] * 2  # the host's two: each view keeps its own decision


def test_a_ptr_naming_many_containers_is_built_once_per_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """In host mode the host address names every container published on it:
    queries of that reverse name in other EDNS sizes (each its own cache key)
    reuse the zone's records instead of building 1,000 again."""
    built: list[str] = []
    real_ptr = dns_resolver.PTR

    def counting(target: str) -> Any:
        built.append(target)
        return real_ptr(target)

    monkeypatch.setattr(dns_resolver, "PTR", counting)
    cat = Catalog()
    put(cat, "h", *(ep(f"h{i}", "192.0.2.10", f"s{i}", port=20000 + i, container=f"web-{i}") for i in range(1000)))
    zone = Zone(cat.snapshot, ZoneSettings())
    reverse = ipaddress.ip_address("192.0.2.10").reverse_pointer
    for size in range(1232, 1252):
        query = DNSRecord.question(reverse, "PTR")
        query.add_ar(dns_resolver.EDNS0(udp_len=size))
        answer = resolve(query, zone, zone.view_of("127.0.0.1"))
        assert answer is not None and len(answer.reply.rr) == 1000
    assert len(built) == 1000
