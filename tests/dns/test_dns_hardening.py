"""Hostile clients against the DNS server (issue 10): cache busting by letter
case, what a miss may cost, and the cache's bound in bytes. Real sockets on
127.0.0.1 port 0, dnspython as the client."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import pytest

from beacon.dns import resolver as dns_resolver
from beacon.registry import Catalog, Endpoint
from tests.dns.dnstest import addresses, dns_server, ep, put, tcp, udp


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

    monkeypatch.setattr("beacon.dns.server.pack", counting)
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
    monkeypatch.setattr("beacon.dns.server.MAX_CACHE_BYTES", 400_000)
    cat = Catalog()
    put(cat, "big", *big_service())
    async with dns_server(cat) as srv:
        for i in range(12):  # each EDNS size is another key; each answer ~16 KB x 16 orders
            msg = await tcp(srv, "big.service.beacon", use_edns=0, payload=1232 + i)
            assert len(addresses(msg)) == 1000
            assert srv._tcp_cache.bytes <= 400_000
        assert 0 < len(srv._tcp_cache.entries) < 12
