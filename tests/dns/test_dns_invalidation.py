"""Per-service cache invalidation: a snapshot drops only what it may change.

A cached answer of one service survives a change to another (counted as a
cache hit, not re-resolved), and every kind of answer a change affects is
right on the very next query, over UDP and TCP.
"""

from __future__ import annotations

import dns.rcode
import dns.rdatatype
import dns.reversename

from beacon.dns import DnsServer
from beacon.registry import Catalog, State
from tests.dns.dnstest import addresses, dns_server, ep, put, tcp, udp


def cache_hits(srv: DnsServer) -> int:
    return sum(srv.metrics.latency["cache"].counts)


def resolved(srv: DnsServer) -> int:
    return sum(srv.metrics.latency["resolve"].counts)


async def test_an_answer_survives_a_change_to_another_service() -> None:
    cat = Catalog()
    put(cat, "w", ep("w", "10.0.0.1"))
    put(cat, "d", ep("d", "10.0.1.1", "db"))
    async with dns_server(cat) as srv:
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]
        assert addresses(await tcp(srv, "web.service.beacon")) == ["10.0.0.1"]
        [tcp_entry] = srv._tcp_cache.entries.values()
        hits, misses = cache_hits(srv), resolved(srv)

        put(cat, "d", ep("d", "10.0.1.2", "db"))  # a change to db only
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.1"]
        assert (cache_hits(srv), resolved(srv)) == (hits + 1, misses)
        assert addresses(await tcp(srv, "web.service.beacon")) == ["10.0.0.1"]
        assert list(srv._tcp_cache.entries.values()) == [tcp_entry] and tcp_entry.hits == 2
        # ... while db itself is answered from the new snapshot
        assert addresses(await udp(srv, "db.service.beacon")) == ["10.0.1.2"]

        put(cat, "w", ep("w", "10.0.0.9"))  # now web changes: a miss, the new address
        assert addresses(await udp(srv, "web.service.beacon")) == ["10.0.0.9"]
        assert resolved(srv) == misses + 2


async def test_every_kind_of_answer_is_right_right_after_a_change() -> None:
    cat = Catalog()
    put(cat, "w", ep("a", "10.0.0.1", port=8080, container="web-1", tags=("blue",)))
    put(cat, "d", ep("d", "10.0.1.1", "db"))
    ptr1 = dns.reversename.from_address("10.0.0.1").to_text()
    ptr2 = dns.reversename.from_address("10.0.0.2").to_text()

    async def ask(name: str, rdtype: str = "A") -> dns.message.Message:
        return await udp(srv, name, rdtype)

    async def answers() -> dict[str, object]:
        srv_msg = await ask("_web._tcp.service.beacon", "SRV")
        out: dict[str, object] = {
            "A": addresses(await ask("web.service.beacon")),
            "A/tcp": addresses(await tcp(srv, "web.service.beacon")),
            "AAAA": addresses(await ask("web.service.beacon", "AAAA")),
            "SRV": sorted((rd.port, rd.target.to_text()) for rrset in srv_msg.answer for rd in rrset),
            "blue": addresses(await ask("blue.web.service.beacon")),
            "green": addresses(await ask("green.web.service.beacon")),
            "new": addresses(await ask("new.service.beacon")),
            "web-1": addresses(await ask("web-1.container.beacon")),
            "web-2": addresses(await ask("web-2.container.beacon")),
            "db": addresses(await ask("db.service.beacon")),
        }
        for key, name in [("ptr1", ptr1), ("ptr2", ptr2)]:
            msg = await ask(name, "PTR")
            out[key] = [rd.target.to_text() for rrset in msg.answer for rd in rrset] or dns.rcode.to_text(msg.rcode())
        for key, name in [("green", "green.web.service.beacon"), ("new", "new.service.beacon")]:
            if not out[key]:
                out[key] = dns.rcode.to_text((await ask(name)).rcode())
        return out

    async with dns_server(cat) as srv:
        before = {
            "A": ["10.0.0.1"], "A/tcp": ["10.0.0.1"], "AAAA": [],
            "SRV": [(8080, "0a000001.addr.beacon.")],
            "blue": ["10.0.0.1"], "green": "NXDOMAIN", "new": "NXDOMAIN",
            "web-1": ["10.0.0.1"], "web-2": [], "db": ["10.0.1.1"],
            "ptr1": ["web-1.container.beacon."], "ptr2": "REFUSED",  # not ours: forwarding is off
        }  # fmt: skip
        assert await answers() == before
        assert await answers() == before  # now every one is a cached answer

        # web moves to another container, address, port and tag; a service appears
        put(
            cat, "w",
            ep("b", "10.0.0.2", port=9090, container="web-2", tags=("green",)),
            ep("b6", "fd00::2", port=9090, container="web-2", tags=("green",)),
        )  # fmt: skip
        put(cat, "n", ep("n", "10.0.2.1", "new"))
        hits = cache_hits(srv)
        after = {
            "A": ["10.0.0.2"], "A/tcp": ["10.0.0.2"], "AAAA": ["fd00::2"],
            "SRV": [(9090, "0a000002.addr.beacon."), (9090, "fd000000000000000000000000000002.addr.beacon.")],
            "blue": [], "green": ["10.0.0.2"], "new": ["10.0.2.1"],
            "web-1": [], "web-2": ["10.0.0.2"], "db": ["10.0.1.1"],
            "ptr1": "REFUSED", "ptr2": ["web-2.container.beacon."],
        }  # fmt: skip
        assert await answers() == after
        assert cache_hits(srv) >= hits + 1  # db was still cached
        assert (await ask("blue.web.service.beacon")).rcode() == dns.rcode.NXDOMAIN
        assert (await ask("web-1.container.beacon")).rcode() == dns.rcode.NXDOMAIN

        # no usable endpoint left: NODATA, while the container name still answers
        put(
            cat, "w",
            ep("b", "10.0.0.2", port=9090, container="web-2", tags=("green",), state=State.CRITICAL),
        )  # fmt: skip
        msg = await ask("web.service.beacon")
        assert msg.rcode() == dns.rcode.NOERROR and not msg.answer
        assert not (await tcp(srv, "web.service.beacon")).answer
        assert addresses(await ask("web-2.container.beacon")) == ["10.0.0.2"]

        # web is gone: every name of it is NXDOMAIN at once
        put(cat, "w")
        for name, rdtype in [
            ("web.service.beacon", "A"), ("_web._tcp.service.beacon", "SRV"),
            ("green.web.service.beacon", "A"), ("web-2.container.beacon", "A"),
        ]:  # fmt: skip
            assert (await ask(name, rdtype)).rcode() == dns.rcode.NXDOMAIN, name
        assert (await ask(ptr2, "PTR")).rcode() == dns.rcode.REFUSED
        assert addresses(await ask("new.service.beacon")) == ["10.0.2.1"]


async def test_negative_answers_carry_the_serial_of_the_current_snapshot() -> None:
    cat = Catalog()
    put(cat, "w", ep("w", "10.0.0.1"))
    async with dns_server(cat) as srv:
        first = await udp(srv, "web.service.beacon", "AAAA")  # NODATA of a known service
        put(cat, "d", ep("d", "10.0.1.1", "db"))  # unrelated, but a new serial
        second = await udp(srv, "web.service.beacon", "AAAA")
        assert second.authority[0][0].serial == first.authority[0][0].serial + 1
        assert (await udp(srv, "beacon", "SOA")).answer[0][0].serial == cat.snapshot.index
