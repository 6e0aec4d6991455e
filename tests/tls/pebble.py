"""Let's Encrypt's test CA, Pebble (Debian's `pebble`), run by a test, with REAL
challenge validation: its resolver is a DNS server the test runs (names under
`ZONE` -> 127.0.0.1, nothing else), and it validates against Beacon's own
listeners (httpPort / tlsPort set to Beacon's ports). Never PEBBLE_VA_ALWAYS_VALID;
PEBBLE_VA_NOSLEEP=1 only removes its random 0-15 s wait. Its 5 % badNonce
rejections stay on (the client must retry them)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from tests.proxy.proxytest import free_port
from tests.tls.tlstest import TestCA

ZONE = "beacon-tls-test.org"  # every test name is below it; resolved only by the test's DNS


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.queries: list[str] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        self.queries.append(qname)
        if request.q.qtype == QTYPE.A and (qname == ZONE or qname.endswith("." + ZONE)):
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=1))
        return reply


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path  # trusts Pebble's own API certificate
    management: int
    proc: asyncio.subprocess.Process | None = None
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    def orders(self) -> int:
        """New orders Pebble has received (it logs every request it handles)."""
        return sum(1 for line in self.log if "Added order" in line)

    def root_pem(self) -> bytes:
        """Pebble's issuing root, generated at its start (trusted only by the test's clients)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=ctx, timeout=5) as r:
            return bytes(r.read())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@asynccontextmanager
async def dns_zone() -> AsyncIterator[tuple[int, ZoneResolver]]:
    resolver = ZoneResolver()
    server = DNSServer(resolver, address="127.0.0.1", port=0, logger=_QuietLogger())
    server.start_thread()
    try:
        yield server.server.server_address[1], resolver
    finally:
        server.stop()
        server.server.server_close()


class _QuietLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def pebble_files(tmp: Path) -> tuple[Path, Path, Path]:
    """Pebble's own HTTPS certificate (for localhost / 127.0.0.1) from a throwaway CA."""
    ca = TestCA.create("Pebble API test CA")
    chain, key = ca.issue("localhost", ips=("127.0.0.1",), days=2)
    (tmp / "pebble-api.crt").write_bytes(chain)
    (tmp / "pebble-api.key").write_bytes(key)
    (tmp / "pebble-api-ca.pem").write_bytes(ca.pem)
    return tmp / "pebble-api.crt", tmp / "pebble-api.key", tmp / "pebble-api-ca.pem"


def new_pebble(tmp: Path) -> Pebble:
    """Choose Pebble's ports and write its API certificate (before Beacon starts,
    which needs the directory URL); `start_pebble` runs it once Beacon listens."""
    tmp.mkdir(parents=True, exist_ok=True)
    _, _, ca = pebble_files(tmp)
    port = free_port()
    return Pebble(directory=f"https://127.0.0.1:{port}/dir", ca_bundle=ca, management=free_port())


async def start_pebble(pebble: Pebble, tmp: Path, http_port: int, tls_port: int, dns_port: int,
                       validity: int = 3600) -> Pebble:  # fmt: skip
    assert shutil.which("pebble"), "pebble is not installed: run `make test-deps`"
    port = int(pebble.directory.split(":")[2].split("/")[0])
    config = {"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress": f"127.0.0.1:{pebble.management}",
        "certificate": str(tmp / "pebble-api.crt"), "privateKey": str(tmp / "pebble-api.key"),
        "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
        "externalAccountBindingRequired": False, "certificateValidityPeriod": validity,
    }}  # fmt: skip
    (tmp / "pebble.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    env["PEBBLE_VA_NOSLEEP"] = "1"
    pebble.proc = await asyncio.create_subprocess_exec(
        "pebble", "-config", str(tmp / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    pebble._reader = asyncio.get_running_loop().create_task(_read(pebble))
    deadline = asyncio.get_running_loop().time() + 10
    while not any("Listening on" in line for line in pebble.log):
        if pebble.proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
            raise RuntimeError("pebble did not start:\n" + "\n".join(pebble.log))
        await asyncio.sleep(0.05)
    return pebble


async def _read(pebble: Pebble) -> None:
    assert pebble.proc is not None and pebble.proc.stdout is not None
    async for line in pebble.proc.stdout:
        pebble.log.append(line.decode(errors="replace").rstrip())
