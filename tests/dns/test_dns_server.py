"""The DNS server over real sockets: a DnsServer on 127.0.0.1 port 0, queried
with dnspython over UDP and TCP (and raw bytes for bad input)."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from prometheus_client.registry import CollectorRegistry

from beacon.config import HostPort
from beacon.dns import DnsServer
from beacon.metrics import metric_name_problems
from beacon.registry import Catalog, State
from tests.dns.dnstest import addresses, dns_server, ep, put, raw_udp, tcp, udp
from tests.helpers import running_app
from tests.helpers import test_config as make_config


def many(n: int, prefix: str = "10.20") -> list:  # type: ignore[type-arg]
    return [ep(f"m{i}", f"{prefix}.{i // 250}.{i % 250 + 1}", "many") for i in range(n)]


async def test_listens_on_udp_and_tcp_on_the_same_port_for_each_listener() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat, dns_listen=(HostPort("127.0.0.1", 0), HostPort("127.0.0.2", 0))) as srv:
        assert [a.host for a in srv.addresses] == ["127.0.0.1", "127.0.0.2"]
        for addr in srv.addresses:
            assert addr.port > 0
            assert addresses(await udp(addr, "web.service.beacon")) == ["10.0.0.1"]
            assert addresses(await tcp(addr, "web.service.beacon")) == ["10.0.0.1"]


async def test_ipv6_listener() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"), ep("b", "fd00::1"))
    async with dns_server(cat, dns_listen=(HostPort("::1", 0),)) as srv:
        addr = srv.addresses[0]
        assert addr.host == "::1" and addr.port > 0
        assert addresses(await udp(addr, "web.service.beacon", "AAAA")) == ["fd00::1"]
        assert addresses(await tcp(addr, "web.service.beacon")) == ["10.0.0.1"]
        assert (await udp(addr, "beacon", "NS")).additional[0][0].address == "::1"


async def test_a_busy_fixed_port_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        server = DnsServer(make_config(dns_listen=(HostPort("127.0.0.1", port),)), Catalog(), metrics_registry=None)
        with pytest.raises(OSError):
            await server.start()
        await server.stop()


async def test_health_states_and_only_passing() -> None:
    cat = Catalog()
    put(
        cat, "w",
        ep("p", "10.0.0.1"), ep("w", "10.0.0.2", state=State.WARNING),
        ep("c", "10.0.0.3", state=State.CRITICAL), ep("d", "10.0.0.4", state=State.DRAINING),
    )  # fmt: skip
    async with dns_server(cat) as srv:
        assert sorted(addresses(await udp(srv, "web.service.beacon"))) == ["10.0.0.1", "10.0.0.2"]
    async with dns_server(cat, dns_only_passing=True) as srv:
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]


async def test_nxdomain_and_nodata_carry_the_soa_with_the_negative_ttl() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    put(cat, "down", ep("x", "10.0.0.9", "down", state=State.CRITICAL))
    async with dns_server(cat, dns_negative_ttl=17) as srv:
        for name, rdtype, rcode in [
            ("nope.service.beacon", "A", dns.rcode.NXDOMAIN),
            ("web.service.beacon", "AAAA", dns.rcode.NOERROR),
            ("down.service.beacon", "A", dns.rcode.NOERROR),
        ]:
            msg = await udp(srv, name, rdtype)
            assert msg.rcode() == rcode, name
            assert not msg.answer
            assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]
            assert msg.authority[0].ttl == 17 and msg.authority[0][0].minimum == 17


async def test_srv_answer_has_targets_in_the_additional_section_and_they_resolve() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1", port=8081, weight=3), ep("b", "10.0.0.2", port=8082))
    async with dns_server(cat) as srv:
        msg = await udp(srv, "_web._tcp.service.beacon", "SRV")
        srv_records = {(rd.port, rd.weight, rd.target.to_text()) for rd in msg.answer[0]}
        assert srv_records == {(8081, 3, "0a000001.addr.beacon."), (8082, 1, "0a000002.addr.beacon.")}
        extra = {r.name.to_text(): r[0].address for r in msg.additional}
        assert extra == {"0a000001.addr.beacon.": "10.0.0.1", "0a000002.addr.beacon.": "10.0.0.2"}
        for _, _, target in srv_records:
            assert addresses(await udp(srv, target)) == [extra[target]]


async def test_ptr_for_endpoint_addresses() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1", container="web-a"), ep("b", "fd00::b", container="web-b"))
    async with dns_server(cat) as srv:
        msg = await udp(srv, "1.0.0.10.in-addr.arpa", "PTR")
        assert [rd.target.to_text() for rd in msg.answer[0]] == ["web-a.container.beacon."]
        v6 = dns.message.make_query(dns.reversename.from_address("fd00::b"), "PTR")
        addr = srv.addresses[0]
        reply = await dns.asyncquery.udp(v6, addr.host, port=addr.port, timeout=2)
        assert [rd.target.to_text() for rd in reply.answer[0]] == ["web-b.container.beacon."]
        assert addresses(await udp(srv, "web-b.container.beacon", "AAAA")) == ["fd00::b"]


async def test_case_is_echoed_and_rotation_spreads_the_first_address() -> None:
    cat = Catalog()
    put(cat, "a", *[ep(f"e{i}", f"10.0.0.{i}") for i in range(1, 5)])
    async with dns_server(cat) as srv:
        firsts = []
        for _ in range(8):
            msg = await udp(srv, "WEB.Service.Beacon")
            assert msg.question[0].name.to_text() == "WEB.Service.Beacon."
            assert msg.answer[0].name.to_text() == "WEB.Service.Beacon."
            assert sorted(addresses(msg)) == [f"10.0.0.{i}" for i in range(1, 5)]
            firsts.append(addresses(msg)[0])
        assert set(firsts) == {f"10.0.0.{i}" for i in range(1, 5)}


async def test_ttl_global_and_from_the_dns_ttl_label() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    put(cat, "b", ep("b", "10.0.0.2", "slow", dns_ttl=42))
    async with dns_server(cat, dns_ttl=3) as srv:
        assert (await udp(srv, "web.service.beacon")).answer[0].ttl == 3
        assert (await udp(srv, "slow.service.beacon")).answer[0].ttl == 42
        assert (await tcp(srv, "slow.service.beacon")).answer[0].ttl == 42


async def test_large_answer_sets_tc_over_udp_and_is_complete_over_tcp() -> None:
    cat = Catalog()
    put(cat, "many", *many(120))  # 120 A records: ~2 KB
    async with dns_server(cat) as srv:
        plain = await udp(srv, "many.service.beacon")  # no EDNS: 512 bytes
        assert plain.flags & dns.flags.TC and not plain.answer and plain.edns < 0
        small = await udp(srv, "many.service.beacon", use_edns=0, payload=1232)
        assert small.flags & dns.flags.TC and not small.answer and small.edns == 0
        big = await udp(srv, "many.service.beacon", use_edns=0, payload=4096)
        assert not big.flags & dns.flags.TC and len(addresses(big)) == 120 and big.edns == 0
        full = await tcp(srv, "many.service.beacon")
        assert not full.flags & dns.flags.TC and len(addresses(full)) == 120
        # dnspython's own fallback: UDP says TC, it retries over TCP
        addr = srv.addresses[0]
        q = dns.message.make_query("many.service.beacon", "A")
        reply, used_tcp = await dns.asyncquery.udp_with_fallback(q, addr.host, port=addr.port, timeout=2)
        assert used_tcp and len(addresses(reply)) == 120
        # rotated over TCP too
        firsts = {addresses(await tcp(srv, "many.service.beacon"))[0] for _ in range(4)}
        assert len(firsts) > 1


async def test_edns_opt_only_when_asked() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat) as srv:
        assert (await udp(srv, "web.service.beacon")).edns < 0
        with_opt = await udp(srv, "web.service.beacon", use_edns=0, payload=1400)
        assert with_opt.edns == 0 and with_opt.payload == 4096
        assert (await udp(srv, "web.service.beacon", use_edns=1)).rcode() == dns.rcode.BADVERS


async def test_apex_soa_ns_and_any() -> None:
    async with dns_server(Catalog(), dns_domain="corp.example.") as srv:
        soa = await udp(srv, "corp.example", "SOA")
        assert soa.answer[0][0].mname.to_text() == "ns.corp.example."
        ns = await udp(srv, "corp.example", "NS")
        assert ns.answer[0][0].target.to_text() == "ns.corp.example."
        assert [r[0].address for r in ns.additional] == ["127.0.0.1"]
        anyq = await udp(srv, "corp.example", "ANY")
        assert [r.rdtype for r in anyq.answer] == [dns.rdatatype.HINFO]


async def test_a_new_snapshot_is_answered_at_once() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat) as srv:
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]  # now cached
        put(cat, "a", ep("a", "10.0.0.7"))
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.7"]
        put(cat, "a")
        assert (await udp(srv, "web.service.beacon")).rcode() == dns.rcode.NXDOMAIN


async def test_snapshot_swaps_are_atomic_under_load() -> None:
    """Hammer queries while snapshots change; every answer is one whole snapshot.

    Generation g has g+2 endpoints 10.<g>.0.x: an answer mixing generations, or
    with a count that does not match its generation, is a torn read.
    """
    cat = Catalog()

    def generation(g: int) -> None:
        put(cat, "gen", *[ep(f"g{j}", f"10.{g}.0.{j + 1}", "gen") for j in range(g + 2)])

    generation(0)
    async with dns_server(cat) as srv:
        addr = srv.addresses[0]
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        seen: list[list[str]] = []
        try:
            for g in range(1, 40):
                for i in range(20):  # a burst of queries in flight while the catalog changes
                    q = dns.message.make_query("gen.service.beacon", "A", id=g * 100 + i, use_edns=0, payload=4096)
                    await loop.sock_sendto(sock, q.to_wire(), (addr.host, addr.port))
                    if i == 10:
                        await asyncio.sleep(0)  # let the server answer some from the old snapshot
                        generation(g)
                for _ in range(20):
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 2)
                    seen.append(addresses(dns.message.from_wire(data)))
        finally:
            sock.close()
    assert len(seen) == 39 * 20
    gens_seen: set[int] = set()
    for answer in seen:
        gens = {a.split(".")[1] for a in answer}
        assert len(gens) == 1, answer
        g = int(gens.pop())
        assert len(answer) == g + 2, answer
        gens_seen.add(g)
    assert len(gens_seen) > 30  # the answers really did follow the swaps


async def test_tcp_pipelined_queries_and_split_frames() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    put(cat, "b", ep("b", "10.0.0.2", "db"))
    async with dns_server(cat) as srv:
        addr = srv.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        frames = b""
        for qid, name in [(1, "web.service.beacon"), (2, "db.service.beacon"), (3, "nope.service.beacon")]:
            wire_q = dns.message.make_query(name, "A", id=qid).to_wire()
            frames += struct.pack("!H", len(wire_q)) + wire_q
        writer.write(frames[:5])  # a frame split across writes
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(frames[5:])
        got = {}
        for _ in range(3):
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))[0]
            msg = dns.message.from_wire(await reader.readexactly(size))
            got[msg.id] = (msg.rcode(), addresses(msg))
        writer.close()
        await writer.wait_closed()
    assert got == {1: (0, ["10.0.0.1"]), 2: (0, ["10.0.0.2"]), 3: (dns.rcode.NXDOMAIN, [])}


def _query_bytes(name: str = "web.service.beacon", qid: int = 0x4242) -> bytes:
    return dns.message.make_query(name, "A", id=qid).to_wire()


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (b"", None),
        (b"\x01\x02\x03", None),  # shorter than a header: silent drop
        (_query_bytes()[:15], dns.rcode.FORMERR),  # truncated question
        (bytes.fromhex("424201000001000000000000") + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),  # pointer loop
        (bytes.fromhex("42420100000100000000000003616161c00c00010001"), dns.rcode.FORMERR),  # forward pointer
        (b"\x42\x42\x01\x00\x00\x01" + b"\xff" * 600, dns.rcode.FORMERR),  # garbage
        (_query_bytes() + b"\x00" * 5000, dns.rcode.FORMERR),  # oversized
        (b"\x42\x42\x28\x00" + _query_bytes()[4:], dns.rcode.NOTIMP),  # opcode UPDATE (5)
        (b"\x42\x42\x01\x00\x00\x02" + _query_bytes()[6:] + _query_bytes()[12:], dns.rcode.FORMERR),  # qdcount 2
        (b"\x42\x42\x81\x80" + _query_bytes()[4:], None),  # a response: never answered
    ],
)
async def test_bad_input_gets_formerr_notimp_or_silence_and_the_server_keeps_answering(
    payload: bytes, expect: int | None
) -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    async with dns_server(cat) as srv:
        addr = srv.addresses[0]
        reply = await raw_udp(addr, payload, timeout=0.3)
        if expect is None:
            assert reply is None
        else:
            assert reply is not None
            assert reply[:2] == b"\x42\x42" and reply[2] & 0x80  # our ID, a response
            assert reply[3] & 0x0F == expect
        # the same over TCP: an answer, or the connection closed; the listener lives on
        r, w = await asyncio.open_connection(addr.host, addr.port)
        w.write(struct.pack("!H", len(payload)) + payload)
        await w.drain()
        try:
            size = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), 2))[0]
            tcp_reply: bytes | None = await r.readexactly(size)
        except asyncio.IncompleteReadError:
            tcp_reply = None
        w.close()
        await w.wait_closed()
        if expect is None:
            assert tcp_reply is None
        else:
            assert tcp_reply is not None and tcp_reply[3] & 0x0F == expect
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]
        assert addresses(await tcp(srv, "web.service.beacon")) == ["10.0.0.1"]


async def test_metrics_count_queries_by_type_and_rcode_including_cache_hits() -> None:
    cat = Catalog()
    put(cat, "a", ep("a", "10.0.0.1"))
    registry = CollectorRegistry()
    server = DnsServer(make_config(), cat, metrics_registry=registry)
    await server.start()
    try:
        for _ in range(5):
            await udp(server, "web.service.beacon")
        await udp(server, "nope.service.beacon", "AAAA")
        await raw_udp(server.addresses[0], b"\x42\x42\x01\x00\x00\x01" + b"\xff" * 40)
        await tcp(server, "web.service.beacon", "SRV")

        def value(name: str, **labels: str) -> float:
            v = registry.get_sample_value(name, labels)
            return 0.0 if v is None else v

        assert value("beacon_dns_queries_total", type="A", rcode="NOERROR") == 5
        assert value("beacon_dns_queries_total", type="AAAA", rcode="NXDOMAIN") == 1
        assert value("beacon_dns_queries_total", type="SRV", rcode="NOERROR") == 1
        assert value("beacon_dns_queries_total", type="invalid", rcode="FORMERR") == 1
        assert value("beacon_dns_answer_latency_seconds_count", path="cache") >= 4
        assert value("beacon_dns_answer_latency_seconds_count", path="resolve") >= 2
        assert value("beacon_dns_cache_entries") >= 2
        # counts survive the cache being dropped on a new snapshot
        put(cat, "a", ep("a", "10.0.0.2"))
        assert value("beacon_dns_queries_total", type="A", rcode="NOERROR") == 5
        assert metric_name_problems(registry) == []
    finally:
        await server.stop()


async def test_the_app_wires_the_dns_server_to_its_catalog() -> None:
    async with running_app(docker=False) as app:
        put(app.catalog, "manual:x", ep("x", "10.9.9.9", "db"))
        assert app.dns.addresses and app.dns.addresses[0].port > 0
        assert addresses(await udp(app.dns.addresses[0], "db.service.beacon")) == ["10.9.9.9"]


async def test_the_answer_cache_is_bounded_and_keeps_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("beacon.dns.cache.MAX_CACHE_ENTRIES", 10)
    registry = CollectorRegistry()
    server = DnsServer(make_config(), Catalog(), metrics_registry=registry)
    await server.start()
    try:
        for i in range(30):
            assert (await udp(server, f"n{i}.service.beacon")).rcode() == dns.rcode.NXDOMAIN
            assert (await udp(server, f"n{i}.example.test")).rcode() == dns.rcode.REFUSED
        assert len(server._cache.entries) <= 10 and len(server._caches_of("127.0.0.1").fwd) <= 10
        assert registry.get_sample_value("beacon_dns_queries_total", {"type": "A", "rcode": "NXDOMAIN"}) == 30
        assert registry.get_sample_value("beacon_dns_queries_total", {"type": "A", "rcode": "REFUSED"}) == 30
    finally:
        await server.stop()
