"""The TLS listener with certificates from --tls-cert-dir: SNI, reload, labels, bad clients."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from beacon.config import HostPort
from beacon.proxy import ProxyServer
from beacon.proxy.tls import frontend
from beacon.proxy.tls.certs import FALLBACK_NAME
from beacon.registry import Catalog
from tests.helpers import eventually
from tests.proxy.proxytest import Backend, backends, ep, put
from tests.tls.tlstest import TestCA, dns_names, get, peer_cert, run, tls_connect

ANY = HostPort("127.0.0.1", 0)


@pytest.fixture
def ca() -> TestCA:
    return TestCA.create()


@asynccontextmanager
async def tls_proxy(catalog: Catalog, cert_dir: Path, **overrides: Any) -> AsyncIterator[ProxyServer]:
    from tests.proxy.proxytest import proxy_server

    async with proxy_server(catalog, proxy_tls_listen=ANY, tls_cert_dir=str(cert_dir), **overrides) as server:
        yield server


def tls_address(server: ProxyServer) -> HostPort:
    assert server.tls is not None and server.tls.address is not None
    return server.tls.address


def web(backend: Backend, host: str, **meta: str) -> Any:
    return ep("w1", backend.port, http_hosts=(host,), meta=meta)


async def test_sni_picks_the_certificate_and_the_request_is_proxied_as_https(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com")
    ca.write_pair(tmp_path, "wild", "*.wild.example.com")
    catalog = Catalog()
    async with backends("b1") as (b1,), tls_proxy(catalog, tmp_path) as server:
        put(catalog, "m", ep("w1", b1.port, http_hosts=("app.example.com", "*.wild.example.com"),
                             meta={"beacon.tls": "true"}))  # fmt: skip
        addr = tls_address(server)
        reader, writer = await tls_connect(addr, "app.example.com", ca.pem)
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.selected_alpn_protocol() == "http/1.1"
        assert sslobj.version() in ("TLSv1.3", "TLSv1.2")
        assert dns_names(peer_cert(writer)) == ["app.example.com"]
        status, _, body = await get(reader, writer, "app.example.com")
        assert status == 200
        seen = json.loads(body)["headers"]
        assert seen["X-Forwarded-Proto"] == "https"
        assert seen["X-Forwarded-Host"] == "app.example.com"
        writer.close()
        # A wildcard certificate covers one label below its domain.
        reader, writer = await tls_connect(addr, "a.wild.example.com", ca.pem)
        assert dns_names(peer_cert(writer)) == ["*.wild.example.com"]
        assert (await get(reader, writer, "a.wild.example.com"))[0] == 200
        writer.close()


async def test_unknown_sni_gets_the_default_certificate(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com")
    catalog = Catalog()
    async with tls_proxy(catalog, tmp_path) as server:
        for name in ("other.example.com", None):  # None: no SNI at all
            _, writer = await tls_connect(tls_address(server), name, None)
            assert dns_names(peer_cert(writer)) == [FALLBACK_NAME]  # self-signed, trusted by nobody
            writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_connect(tls_address(server), "other.example.com", ca.pem)
    ca.write_pair(tmp_path, "default", "fallback.example.com")
    async with tls_proxy(catalog, tmp_path) as server:
        _, writer = await tls_connect(tls_address(server), "other.example.com", None)
        assert dns_names(peer_cert(writer)) == ["fallback.example.com"]
        writer.close()


async def test_tls_versions_below_1_2_are_refused(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com")
    async with tls_proxy(Catalog(), tmp_path) as server:
        addr = tls_address(server)
        resolve = f"app.example.com:{addr.port}:127.0.0.1"
        rc, _, _ = await run("curl", "-sS", "-o", "/dev/null", "--tlsv1.1", "--tls-max", "1.1", "-k",
                             "--resolve", resolve, f"https://app.example.com:{addr.port}/")  # fmt: skip
        assert rc != 0
        for version in ("--tlsv1.2 --tls-max 1.2", "--tlsv1.3"):
            _, out, err = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *version.split(), "-k",
                                    "--resolve", resolve, f"https://app.example.com:{addr.port}/")  # fmt: skip
            assert out == "404", (version, err)  # no route: the proxy answered over TLS


async def test_changed_files_are_served_to_new_handshakes_without_dropping_open_connections(
    ca: TestCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frontend, "CERT_DIR_POLL", 0.05)
    first = ca.write_pair(tmp_path, "app", "app.example.com")
    catalog = Catalog()
    async with backends("b1") as (b1,), tls_proxy(catalog, tmp_path) as server:
        put(catalog, "m", web(b1, "app.example.com", **{"beacon.tls": "true"}))
        addr = tls_address(server)
        reader, writer = await tls_connect(addr, "app.example.com", ca.pem)
        old_serial = peer_cert(writer).serial_number
        assert (await get(reader, writer, "app.example.com"))[0] == 200
        second = ca.issue("app.example.com", "api.example.com")
        # Replace as deployment tools do: a new file renamed over the old one.
        (tmp_path / ".app.key.new").write_bytes(second[1])
        os.replace(tmp_path / ".app.key.new", tmp_path / "app.key")
        (tmp_path / ".app.crt.new").write_bytes(second[0])
        os.replace(tmp_path / ".app.crt.new", tmp_path / "app.crt")
        assert second[0] != first

        async def new_serial() -> int:
            _, w = await tls_connect(addr, "api.example.com", ca.pem)
            serial = peer_cert(w).serial_number
            w.close()
            return serial

        deadline = time.monotonic() + 5
        while True:
            try:
                serial = await new_serial()
                break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "the new certificate was never served"
                await asyncio.sleep(0.05)
        assert serial != old_serial
        # The connection opened before the reload still works, on its old certificate.
        assert (await get(reader, writer, "app.example.com"))[0] == 200
        assert peer_cert(writer).serial_number == old_serial
        # A broken replacement keeps the last good certificate.
        (tmp_path / "app.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        await asyncio.sleep(0.3)
        assert await new_serial() == serial
        writer.close()


async def test_redirect_and_hsts_labels(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com", "plain.example.com")
    catalog = Catalog()
    async with backends("b1") as (b1,), tls_proxy(catalog, tmp_path) as server:
        put(catalog, "m",
            ep("w1", b1.port, service="app", http_hosts=("app.example.com",),
               meta={"beacon.tls.redirect": "true", "beacon.tls.hsts": "max-age=600; includeSubDomains"}),
            ep("w2", b1.port, service="plain", http_hosts=("plain.example.com",)))  # fmt: skip
        assert server.address is not None
        tls_port = tls_address(server).port
        reader, writer = await asyncio.open_connection(server.address.host, server.address.port)
        status, headers, _ = await get(reader, writer, "app.example.com", "/a/b?c=1")
        assert status == 308
        assert headers["location"] == f"https://app.example.com:{tls_port}/a/b?c=1"
        assert "strict-transport-security" not in headers  # never over plain HTTP (RFC 6797)
        assert not b1.requests
        # A service without TLS labels is proxied over plain HTTP as before.
        status, _, body = await get(reader, writer, "plain.example.com")
        assert status == 200 and json.loads(body)["headers"]["X-Forwarded-Proto"] == "http"
        writer.close()
        reader, writer = await tls_connect(tls_address(server), "app.example.com", ca.pem)
        status, headers, _ = await get(reader, writer, "app.example.com")
        assert status == 200
        assert headers["strict-transport-security"] == "max-age=600; includeSubDomains"
        writer.close()


async def test_tls_default_flag_redirects_every_route(ca: TestCA, tmp_path: Path) -> None:
    catalog = Catalog()
    async with backends("b1") as (b1,), tls_proxy(catalog, tmp_path, tls_default="redirect") as server:
        put(catalog, "m", ep("w1", b1.port, service="app", http_hosts=("a.example.com",)),
            ep("w2", b1.port, service="opt", http_hosts=("b.example.com",), meta={"beacon.tls": "false"}))
        assert server.address is not None
        reader, writer = await asyncio.open_connection(server.address.host, server.address.port)
        assert (await get(reader, writer, "a.example.com"))[0] == 308
        assert (await get(reader, writer, "app.localhost"))[0] == 308  # the implicit route too
        assert (await get(reader, writer, "b.example.com"))[0] == 200  # opted out
        writer.close()


async def test_h2_by_alpn_gets_http_1_1_and_an_h2_preface_gets_a_goaway(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com")
    async with tls_proxy(Catalog(), tmp_path) as server:
        addr = tls_address(server)
        # A client that asks for h2 by ALPN is offered http/1.1 and uses it.
        rc, out, err = await run("curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}", "-k",
                                 "--resolve", f"app.example.com:{addr.port}:127.0.0.1",
                                 f"https://app.example.com:{addr.port}/")  # fmt: skip
        assert (rc, out) == (0, "1.1"), err
        # One that ignores ALPN and sends the HTTP/2 preface gets SETTINGS + GOAWAY(HTTP_1_1_REQUIRED).
        reader, writer = await tls_connect(addr, "app.example.com", None, alpn=())
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = await asyncio.wait_for(reader.read(-1), 5)
        assert data == frontend.H2_REFUSAL
        writer.close()


async def test_bad_handshakes_never_stall_other_connections(ca: TestCA, tmp_path: Path) -> None:
    ca.write_pair(tmp_path, "app", "app.example.com")
    catalog = Catalog()
    async with backends("b1") as (b1,), tls_proxy(catalog, tmp_path, proxy_header_timeout=0.5) as server:
        put(catalog, "m", web(b1, "app.example.com", **{"beacon.tls": "true"}))
        addr = tls_address(server)
        loop = asyncio.get_running_loop()
        # Garbage instead of a ClientHello, a half ClientHello that never ends,
        # and clients that connect and say nothing.
        garbage = [socket.create_connection((addr.host, addr.port)) for _ in range(20)]
        for s in garbage:
            s.sendall(os.urandom(512))
        silent = [socket.create_connection((addr.host, addr.port)) for _ in range(50)]
        half = socket.create_connection((addr.host, addr.port))
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(16))
        try:
            started = loop.time()
            for _ in range(5):
                reader, writer = await tls_connect(addr, "app.example.com", ca.pem)
                assert (await get(reader, writer, "app.example.com"))[0] == 200
                writer.close()
            assert loop.time() - started < 2.0
            # The handshake timeout (--proxy-header-timeout) closes the silent ones.
            async def closed(s: socket.socket) -> bool:
                s.setblocking(False)
                try:
                    while await asyncio.wait_for(loop.sock_recv(s, 4096), 5):
                        pass  # an alert, then the close
                except ConnectionResetError:
                    pass
                return True

            for s in [*silent[:3], half, *garbage[:3]]:
                assert await closed(s)
            await eventually(lambda: len(server.core.clients) == 0 if server.core else False, timeout=5)
        finally:
            for s in [*garbage, *silent, half]:
                s.close()

