"""The pure resolver: (query, zone) -> reply, table-driven, no sockets.

Queries are built with dnspython and replies parsed back with it, so both
directions go through an independent DNS implementation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, DNSRecord

from beacon.dns import wire
from beacon.dns.resolver import (
    MAX_UDP_PAYLOAD,
    Zone,
    ZoneSettings,
    addr_label,
    pack,
    parse_addr_label,
    resolve,
    rotations,
    truncated,
)
from beacon.registry import Catalog, State
from tests.dns.dnstest import ep

NOERROR, NXDOMAIN, FORMERR, NOTIMP, REFUSED = 0, 3, 1, 4, 5


def zone(settings: ZoneSettings | None = None) -> Zone:
    cat = Catalog()
    cat.set_source(
        "web",
        [
            ep("web-1", "10.0.0.1", tags=("v1", "blue"), container="web_1", weight=5),
            ep("web-2", "10.0.0.2", tags=("v2",), state=State.WARNING, container="web_2"),
            ep("web-3", "10.0.0.3", state=State.CRITICAL, container="web_3"),
            ep("web-4", "10.0.0.4", state=State.DRAINING, container="web_4"),
            ep("web-6", "fd00::6", port=8080, container="web_6"),
        ],
    )
    cat.set_source("db", [ep("db-1", "10.0.1.1", "db", port=5432, dns_ttl=7, protocol="tcp")])
    cat.set_source("dns", [ep("dns-1", "10.0.2.1", "resolver", port=53, protocol="udp")])
    cat.set_source("down", [ep("down-1", "10.0.3.1", "down", state=State.CRITICAL)])
    cat.set_source("two", [ep("two-a", "10.0.4.1", "two", port=1), ep("two-b", "10.0.4.1", "two", port=2)])
    cat.set_source("bad", [ep("bad-1", "not-an-ip", "bad")])
    cat.set_source("ttls", [ep("t-1", "10.0.5.1", "ttls", dns_ttl=30), ep("t-2", "10.0.5.2", "ttls", dns_ttl=3)])
    return Zone(cat.publish(), settings or ZoneSettings(ttl=2, negative_ttl=9, ns_addresses=("127.0.0.1",)))


def ask(z: Zone, name: str, rdtype: str = "A", **make: Any) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **make)
    answer = resolve(DNSRecord.parse(q.to_wire()), z)
    assert answer is not None, f"{name} was not answered locally"
    return dns.message.from_wire(pack(answer.reply))


def values(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "expected"),
    [
        # passing and warning endpoints; never critical or draining
        ("web.service.beacon", "A", NOERROR, ["10.0.0.1", "10.0.0.2"]),
        ("web.service.beacon", "AAAA", NOERROR, ["fd00::6"]),
        ("v1.web.service.beacon", "A", NOERROR, ["10.0.0.1"]),
        ("V2.Web.service.BEACON", "A", NOERROR, ["10.0.0.2"]),
        ("nosuchtag.web.service.beacon", "A", NXDOMAIN, []),
        ("_web._v1.service.beacon", "SRV", NOERROR, ["1 5 80 0a000001.addr.beacon."]),
        ("_db._tcp.service.beacon", "SRV", NOERROR, ["1 1 5432 0a000101.addr.beacon."]),
        ("_resolver._udp.service.beacon", "SRV", NOERROR, ["1 1 53 0a000201.addr.beacon."]),
        ("_resolver._tcp.service.beacon", "SRV", NXDOMAIN, []),
        ("db.service.beacon", "SRV", NOERROR, ["1 1 5432 0a000101.addr.beacon."]),
        ("nope.service.beacon", "A", NXDOMAIN, []),
        ("db.service.beacon", "AAAA", NOERROR, []),  # NODATA
        ("db.service.beacon", "TXT", NOERROR, []),
        ("down.service.beacon", "A", NOERROR, []),  # known, none usable: NODATA
        ("down.service.beacon", "SRV", NOERROR, []),
        ("bad.service.beacon", "A", NOERROR, []),  # an address that is not an IP is invisible
        ("two.service.beacon", "A", NOERROR, ["10.0.4.1"]),  # one A for two ports of one address
        # containers, whatever their health
        ("web_3.container.beacon", "A", NOERROR, ["10.0.0.3"]),
        ("web_6.container.beacon", "AAAA", NOERROR, ["fd00::6"]),
        ("web_6.container.beacon", "A", NOERROR, []),
        ("ghost.container.beacon", "A", NXDOMAIN, []),
        # addr names (SRV targets)
        ("0a000001.addr.beacon", "A", NOERROR, ["10.0.0.1"]),
        ("fd000000000000000000000000000006.addr.beacon", "AAAA", NOERROR, ["fd00::6"]),
        ("0a000001.addr.beacon", "AAAA", NOERROR, []),
        ("zz.addr.beacon", "A", NXDOMAIN, []),
        # the apex and structure
        ("beacon", "NS", NOERROR, ["ns.beacon."]),
        ("ns.beacon", "A", NOERROR, ["127.0.0.1"]),
        ("beacon", "A", NOERROR, []),
        ("service.beacon", "A", NOERROR, []),  # empty non-terminal
        ("a.b.c.web.service.beacon", "A", NXDOMAIN, []),
        ("unknown.beacon", "A", NXDOMAIN, []),
        # PTR for endpoint addresses
        ("1.0.0.10.in-addr.arpa", "PTR", NOERROR, ["web_1.container.beacon."]),
        ("1.1.0.10.in-addr.arpa", "PTR", NOERROR, ["0a000101.addr.beacon."]),
        (ipaddress.ip_address("fd00::6").reverse_pointer, "PTR", NOERROR, ["web_6.container.beacon."]),
        ("1.0.0.10.in-addr.arpa", "A", NOERROR, []),
        # ANY: one synthesized HINFO (RFC 8482)
        ("web.service.beacon", "ANY", NOERROR, ['"RFC8482" ""']),
    ],
)
def test_names(name: str, rdtype: str, rcode: int, expected: list[str]) -> None:
    msg = ask(zone(), name, rdtype)
    assert msg.rcode() == rcode
    assert sorted(values(msg)) == sorted(expected)
    assert msg.flags & dns.flags.AA
    if not expected:
        # NXDOMAIN and NODATA carry the SOA with the negative TTL (RFC 2308).
        assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]
        assert msg.authority[0].ttl == 9
        assert msg.authority[0][0].minimum == 9


def test_names_outside_the_domain_are_not_ours() -> None:
    z = zone()
    for name, rdtype in [("example.com", "A"), ("beacon.example.com", "A"), ("9.9.9.9.in-addr.arpa", "PTR")]:
        q = dns.message.make_query(name, rdtype)
        assert resolve(DNSRecord.parse(q.to_wire()), z) is None


def test_question_case_is_echoed() -> None:
    msg = ask(zone(), "WeB.SeRvIcE.BeAcOn", "A")
    assert msg.question[0].name.to_text() == "WeB.SeRvIcE.BeAcOn."
    assert {r.name.to_text() for r in msg.answer} == {"WeB.SeRvIcE.BeAcOn."}


def test_srv_targets_resolve_in_the_additional_section() -> None:
    msg = ask(zone(), "_web._tcp.service.beacon", "SRV")
    targets = {rd.target.to_text(): rd for rrset in msg.answer for rd in rrset}
    assert len(targets) == 3  # passing v4, warning v4, passing v6
    extra = {r.name.to_text(): [rd.address for rd in r] for r in msg.additional}
    assert extra == {
        "0a000001.addr.beacon.": ["10.0.0.1"],
        "0a000002.addr.beacon.": ["10.0.0.2"],
        "fd000000000000000000000000000006.addr.beacon.": ["fd00::6"],
    }
    assert targets["0a000001.addr.beacon."].weight == 5
    assert targets["fd000000000000000000000000000006.addr.beacon."].port == 8080


def test_ttl_global_and_per_service() -> None:
    z = zone()
    assert {r.ttl for r in ask(z, "web.service.beacon").answer} == {2}
    assert {r.ttl for r in ask(z, "_db._tcp.service.beacon", "SRV").answer} == {7}
    # endpoints that disagree: one TTL per RRset, the smallest (RFC 2181)
    assert {r.ttl for r in ask(z, "ttls.service.beacon").answer} == {3}


def test_only_passing_drops_warning_endpoints() -> None:
    z = zone(ZoneSettings(only_passing=True))
    assert values(ask(z, "web.service.beacon")) == ["10.0.0.1"]
    assert values(ask(z, "v2.web.service.beacon")) == []


def test_custom_domain() -> None:
    z = zone(ZoneSettings(domain="svc.example."))
    assert sorted(values(ask(z, "web.service.svc.example"))) == ["10.0.0.1", "10.0.0.2"]
    q = dns.message.make_query("web.service.beacon", "A")
    assert resolve(DNSRecord.parse(q.to_wire()), z) is None


def test_soa_serial_follows_the_snapshot_index() -> None:
    z = zone()
    msg = ask(z, "beacon", "SOA")
    assert msg.answer[0][0].serial == z.snapshot.index
    assert msg.answer[0][0].mname.to_text() == "ns.beacon."


@pytest.mark.parametrize(
    ("make", "udp_limit", "opt_in_reply"),
    [
        ({}, 512, False),
        ({"use_edns": 0, "payload": 1232}, 1232, True),
        ({"use_edns": 0, "payload": 100}, 512, True),  # below 512 means 512 (RFC 6891)
        ({"use_edns": 0, "payload": 65000}, MAX_UDP_PAYLOAD, True),
    ],
)
def test_edns_payload_size(make: dict[str, Any], udp_limit: int, opt_in_reply: bool) -> None:
    q = dns.message.make_query("web.service.beacon", "A", **make)
    answer = resolve(DNSRecord.parse(q.to_wire()), zone())
    assert answer is not None
    assert answer.udp_limit == udp_limit
    reply = dns.message.from_wire(pack(answer.reply))
    assert (reply.edns >= 0) is opt_in_reply
    if opt_in_reply:
        assert reply.payload == MAX_UDP_PAYLOAD


def test_unknown_edns_version_gets_badvers() -> None:
    q = dns.message.make_query("web.service.beacon", "A", use_edns=1)
    answer = resolve(DNSRecord.parse(q.to_wire()), zone())
    assert answer is not None
    reply = dns.message.from_wire(pack(answer.reply))
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0 and not reply.answer


def _opcode_status(q: DNSRecord) -> None:
    q.header.opcode = 2


def _two_questions(q: DNSRecord) -> None:
    q.questions.append(q.questions[0])


def _no_question(q: DNSRecord) -> None:
    q.questions = []


def _two_opts(q: DNSRecord) -> None:
    q.ar.append(q.ar[0])


@pytest.mark.parametrize(
    ("mutate", "rcode"),
    [(_opcode_status, NOTIMP), (_two_questions, FORMERR), (_no_question, FORMERR), (_two_opts, FORMERR)],
)
def test_malformed_queries(mutate: Callable[[DNSRecord], None], rcode: int) -> None:
    q = DNSRecord.question("web.service.beacon")
    q.add_ar(EDNS0(udp_len=1232))
    mutate(q)
    answer = resolve(DNSRecord.parse(q.pack()), zone())
    assert answer is not None
    assert answer.reply.header.rcode == rcode


def test_zone_transfer_and_other_classes_are_refused() -> None:
    z = zone()
    assert ask(z, "beacon", "AXFR").rcode() == REFUSED
    msg = ask(z, "web.service.beacon", "A", rdclass="CH")
    assert msg.rcode() == REFUSED and not msg.answer


def test_rotations_cover_every_first_position() -> None:
    cat = Catalog()
    cat.set_source("big", [ep(f"e{i}", f"10.1.0.{i}", "big") for i in range(1, 6)])
    z = Zone(cat.publish(), ZoneSettings())
    q = dns.message.make_query("big.service.beacon", "A")
    answer = resolve(DNSRecord.parse(q.to_wire()), z)
    assert answer is not None and answer.rotate
    firsts = []
    for rec in rotations(answer, 16):
        msg = dns.message.from_wire(pack(rec))
        order = [rd.address for rd in msg.answer[0]]
        assert sorted(order) == [f"10.1.0.{i}" for i in range(1, 6)]
        firsts.append(order[0])
    assert sorted(firsts) == [f"10.1.0.{i}" for i in range(1, 6)]
    assert len(rotations(answer, 3)) == 3  # capped


def test_truncated_reply_keeps_question_and_opt_and_sets_tc() -> None:
    q = dns.message.make_query("web.service.beacon", "A", use_edns=0, payload=1232)
    answer = resolve(DNSRecord.parse(q.to_wire()), zone())
    assert answer is not None
    msg = dns.message.from_wire(pack(truncated(answer)))
    assert msg.flags & dns.flags.TC
    assert not msg.answer and msg.question[0].name.to_text() == "web.service.beacon."
    assert msg.edns == 0


@pytest.mark.parametrize("address", ["10.0.0.1", "255.255.255.255", "fd00::6", "::1"])
def test_addr_labels_round_trip(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert parse_addr_label(addr_label(ip)) == ip


@pytest.mark.parametrize("label", ["", "0a00001", "0a0000zz", "0a000001ff"])
def test_bad_addr_labels(label: str) -> None:
    assert parse_addr_label(label) is None


# ------------------------------------------------------------------ wire.py
def test_header_reply_for_unparsable_packets() -> None:
    data = bytes.fromhex("1234 0100 0001 0000 0000 0000".replace(" ", "")) + b"\xff\xff"
    reply = wire.header_reply(data, wire.FORMERR)
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.id == 0x1234 and msg.rcode() == dns.rcode.FORMERR and msg.flags & dns.flags.QR
    assert msg.flags & dns.flags.RD
    assert wire.header_reply(data[:11], wire.FORMERR) is None  # no ID to echo
    assert wire.header_reply(b"\x12\x34\x81" + data[3:], wire.FORMERR) is None  # a response


def test_question_end_and_question_reply() -> None:
    q = dns.message.make_query("Example.COM", "AAAA", use_edns=0)
    data = q.to_wire()
    end = wire.question_end(data)
    assert end == 12 + len(b"\x07Example\x03COM\x00") + 4
    assert wire.qtype_at(data, end) == 28
    msg = dns.message.from_wire(wire.question_reply(data, end, wire.REFUSED, ra=True))
    assert msg.rcode() == dns.rcode.REFUSED and msg.id == q.id
    assert msg.question[0].name.to_text() == "Example.COM." and msg.flags & dns.flags.RA
    assert wire.question_end(data[:20]) is None
    assert wire.question_end(data[:12] + b"\x7f" + b"a" * 20) is None  # label longer than the packet
