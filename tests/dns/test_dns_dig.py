"""An independent client: BIND's `dig` (Debian bind9-dnsutils, installed by
`make test`) against a running DnsServer on loopback."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from beacon.dns import DnsServer
from beacon.registry import Catalog, State
from tests.dns.dnstest import dns_server, ep, put


@pytest.fixture(scope="module", autouse=True)
def _need_dig() -> None:
    if shutil.which("dig") is None:
        pytest.fail("dig is missing: `make test` installs bind9-dnsutils", pytrace=False)


async def dig(server: DnsServer, *args: str) -> str:
    addr = server.addresses[0]
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{addr.host}", "-p", str(addr.port), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode()


def section(out: str, name: str) -> list[list[str]]:
    """Rows of one section of dig's output (ANSWER, AUTHORITY, ADDITIONAL)."""
    m = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    return [line.split() for line in m.group(1).splitlines()] if m else []


def flags(out: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]*);", out)
    assert m, out
    return set(m.group(1).split())


def catalog() -> Catalog:
    cat = Catalog()
    put(cat, "web", ep("w1", "10.0.0.1", container="web-1", port=8080), ep("w2", "10.0.0.2", port=8081, weight=4))
    put(cat, "sick", ep("s1", "10.0.0.3", "sick", state=State.CRITICAL))
    put(cat, "many", *[ep(f"m{i}", f"10.30.0.{i + 1}", "many") for i in range(120)])
    return cat


async def test_dig_a_srv_ptr_and_negative_answers() -> None:
    async with dns_server(catalog(), dns_ttl=1) as srv:
        assert sorted((await dig(srv, "+short", "web.service.beacon")).split()) == ["10.0.0.1", "10.0.0.2"]

        out = await dig(srv, "_web._tcp.service.beacon", "SRV")
        assert "status: NOERROR" in out and {"qr", "aa", "rd"} <= flags(out)
        srv_rows = sorted(r[4:] for r in section(out, "ANSWER"))
        assert srv_rows == [["1", "1", "8080", "0a000001.addr.beacon."], ["1", "4", "8081", "0a000002.addr.beacon."]]
        assert sorted((r[0], r[4]) for r in section(out, "ADDITIONAL") if r[3] == "A") == [
            ("0a000001.addr.beacon.", "10.0.0.1"),
            ("0a000002.addr.beacon.", "10.0.0.2"),
        ]
        assert {r[1] for r in section(out, "ANSWER")} == {"1"}  # the TTL

        assert (await dig(srv, "+short", "-x", "10.0.0.1")).split() == ["web-1.container.beacon."]

        out = await dig(srv, "nope.service.beacon")
        assert "status: NXDOMAIN" in out
        assert [r[3] for r in section(out, "AUTHORITY")] == ["SOA"]
        out = await dig(srv, "sick.service.beacon")
        assert "status: NOERROR" in out and "ANSWER: 0" in out and section(out, "AUTHORITY")


async def test_dig_truncation_and_tcp() -> None:
    async with dns_server(catalog()) as srv:
        out = await dig(srv, "+noedns", "+ignore", "many.service.beacon")
        assert {"qr", "aa", "tc"} <= flags(out)
        assert "ANSWER: 0" in out
        # dig's default (EDNS 1232) does not fit either: it retries over TCP by itself
        out = await dig(srv, "many.service.beacon")
        assert "Truncated, retrying in TCP mode" in out
        assert len(section(out, "ANSWER")) == 120
        assert len(section(await dig(srv, "+tcp", "many.service.beacon"), "ANSWER")) == 120
        assert len(section(await dig(srv, "+bufsize=4096", "many.service.beacon"), "ANSWER")) == 120
        out = await dig(srv, "+bufsize=4096", "+norecurse", "WEB.service.Beacon")
        assert "WEB.service.Beacon." in out and "status: NOERROR" in out and "EDNS: version: 0" in out
