"""Automatic HTTPS end to end: a labelled busybox container, Beacon, and Pebble
validating for real against Beacon's own listeners (see pebble.py)."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from beacon.app import App
from beacon.config import HostPort
from beacon.metrics import exposition
from beacon.proxy.tls import manager as tls_manager
from beacon.proxy.tls.certs import FALLBACK_NAME
from beacon.proxy.tls.frontend import TlsFrontend
from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually, test_config
from tests.tls.pebble import ZONE, Pebble, ZoneResolver, dns_zone, new_pebble, start_pebble
from tests.tls.tlstest import client_context, dns_names, get, peer_cert, run, tls_connect

ANY = HostPort("127.0.0.1", 0)
LOOPBACK_PORT = {"80/tcp": ("127.0.0.1", None)}


@dataclass
class Env:
    app: App
    pebble: Pebble
    resolver: ZoneResolver
    storage: Path

    @property
    def tls(self) -> TlsFrontend:
        assert self.app.proxy.tls is not None
        return self.app.proxy.tls  # type: ignore[no-any-return]

    @property
    def https(self) -> HostPort:
        assert self.tls.address is not None
        return self.tls.address

    @property
    def http(self) -> HostPort:
        assert self.app.proxy.address is not None
        return self.app.proxy.address


@asynccontextmanager
async def beacon_app(pebble: Pebble, storage: Path, **overrides: Any) -> AsyncIterator[App]:
    config = test_config(proxy_tls_listen=ANY, acme_storage=str(storage), acme_directory=pebble.directory,
                         acme_ca_bundle=str(pebble.ca_bundle), acme_email="ops@" + ZONE, **overrides)  # fmt: skip
    app = App(config)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@asynccontextmanager
async def acme_env(tmp_path: Path, **overrides: Any) -> AsyncIterator[Env]:
    pebble = new_pebble(tmp_path / "pebble")
    storage = tmp_path / "acme"
    async with dns_zone() as (dns_port, resolver), beacon_app(pebble, storage, **overrides) as app:
        env = Env(app, pebble, resolver, storage)
        await start_pebble(pebble, tmp_path / "pebble", env.http.port, env.https.port, dns_port)
        try:
            yield env
        finally:
            await pebble.stop()


@pytest.fixture(autouse=True)
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_manager, "CHECK_INTERVAL", 0.1)
    monkeypatch.setattr(tls_manager, "RETRY_BASE", 2.0)


def metric(name: str, host: str) -> float | None:
    """One sample of the /metrics exposition, read with Prometheus's own parser."""
    for family in text_string_to_metric_families(exposition()[0].decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("host") == host:
                return float(sample.value)
    return None


def served(env: Env, host: str) -> bool:
    return env.tls.index.lookup(host) is not None


@pytest.mark.docker
async def test_labelled_container_gets_a_certificate_and_serves_https(
    run_container: ContainerFactory, tmp_path: Path
) -> None:
    host = f"web-{RUN_ID}.{ZONE}"
    service = f"tls{RUN_ID}"
    async with acme_env(tmp_path) as env:
        container = run_container(ports=LOOPBACK_PORT, labels={
            "beacon.service": service, "beacon.http.host": host, "beacon.tls.redirect": "true",
            "beacon.tls.hsts": "true"})  # fmt: skip
        await eventually(lambda: served(env, host), timeout=40)
        root = env.pebble.root_pem()
        (tmp_path / "root.pem").write_bytes(root)
        assert env.pebble.orders() == 1
        # curl, trusting Pebble's root only.
        url = f"https://{host}:{env.https.port}/"
        rc, body, err = await run("curl", "-sS", "--cacert", str(tmp_path / "root.pem"),
                                  "--resolve", f"{host}:{env.https.port}:127.0.0.1", url)  # fmt: skip
        assert rc == 0, err
        assert body.strip() == container.attrs["Config"]["Hostname"]
        # Python's ssl: chain to Pebble's root, SAN, expiry.
        reader, writer = await tls_connect(env.https, host, root)
        leaf = peer_cert(writer)
        assert dns_names(leaf) == [host]
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert datetime.timedelta(minutes=55) <= lifetime <= datetime.timedelta(minutes=65)  # Pebble's 3600 s
        assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
        status, headers, _ = await get(reader, writer, host)
        assert status == 200 and headers["strict-transport-security"] == "max-age=31536000"
        writer.close()
        # Plain HTTP: a 308 to https; the challenge path is Beacon's, never the backend's.
        reader, writer = await asyncio.open_connection(env.http.host, env.http.port)
        status, headers, _ = await get(reader, writer, host, "/x?y=1")
        assert status == 308 and headers["location"] == f"https://{host}:{env.https.port}/x?y=1"
        status, headers, body_b = await get(reader, writer, host, "/.well-known/acme-challenge/not-a-token")
        assert status == 404 and body_b == b"unknown ACME challenge token\n" and "x-request-id" in headers
        writer.close()
        # Key and certificate on disk; the key readable by us only.
        key_file = env.storage / "certs" / f"{host}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert (env.storage / "certs" / f"{host}.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert metric("beacon_tls_certificate_expiry_seconds", host) == leaf.not_valid_after_utc.timestamp()
        assert metric("beacon_tls_certificates_issued_total", host) == 1
        # An unknown name in SNI gets the self-signed fallback and orders nothing.
        for name in (f"evil.{ZONE}", "random.example.net"):
            _, w = await tls_connect(env.https, name, None)
            assert dns_names(peer_cert(w)) == [FALLBACK_NAME]
            w.close()
        await asyncio.sleep(0.3)  # several manager ticks
        manager = env.tls.manager
        assert manager is not None and not manager.orders
        assert env.pebble.orders() == 1
        assert f"evil.{ZONE}" not in env.resolver.queries


async def test_restart_reuses_the_stored_certificate_and_renewal_swaps_it_under_open_connections(
    tmp_path: Path,
) -> None:
    """Manual registration (no container needed): an endpoint with meta beacon.tls=true."""
    from beacon.registry import Endpoint, Source

    host = f"api-{RUN_ID}.{ZONE}"
    async with acme_env(tmp_path) as env:
        from tests.proxy.proxytest import start_backend

        backend = await start_backend("b1")
        try:
            env.app.catalog.set_source("m", [Endpoint(id="e1", service="api", address="127.0.0.1", port=backend.port,
                                                      source=Source("manual"), http_hosts=(host,),
                                                      meta={"beacon.tls": "true"})])  # fmt: skip
            env.app.catalog.publish()
            await eventually(lambda: served(env, host), timeout=40)
            first = env.tls.index.lookup(host)
            assert first is not None
            root = env.pebble.root_pem()
            reader, writer = await tls_connect(env.https, host, root)
            assert (await get(reader, writer, host))[0] == 200
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(f"wss://127.0.0.1:{env.https.port}/ws", headers={"Host": host},
                                          server_hostname=host, ssl=client_context(root))  # fmt: skip
            await ws.send_str("before")
            assert (await ws.receive_str(timeout=5)) == "b1:before"
            # Move the clock past two thirds of the lifetime: the manager renews.
            manager = env.tls.manager
            assert manager is not None
            skew = first.renew_at() - time.time() + 1
            manager.clock = lambda: time.time() + skew
            await eventually(lambda: env.tls.index.lookup(host) is not first, timeout=40)
            assert env.pebble.orders() == 2
            # The keep-alive connection opened before the renewal still works, on the old certificate.
            assert (await get(reader, writer, host))[0] == 200
            assert peer_cert(writer).serial_number == x509.load_pem_x509_certificate(first.chain_pem).serial_number
            await ws.send_str("after")  # the websocket too
            assert (await ws.receive_str(timeout=5)) == "b1:after"
            await ws.close()
            await session.close()
            _, w2 = await tls_connect(env.https, host, root)
            second_serial = peer_cert(w2).serial_number
            assert second_serial != peer_cert(writer).serial_number
            w2.close()

            # A failing ACME server: the old certificate keeps serving, the
            # failure is counted, and the retry waits (no storm).
            await env.pebble.stop()
            renewed = env.tls.index.lookup(host)
            assert renewed is not None
            skew2 = renewed.renew_at() - time.time() + 1
            manager.clock = lambda: time.time() + skew2
            await eventually(lambda: manager.failures_total.get(host) == 1, timeout=30)
            await asyncio.sleep(0.5)  # five more ticks: the backoff holds the next attempt
            assert manager.failures_total[host] == 1
            assert env.tls.index.lookup(host) is renewed
            _, w3 = await tls_connect(env.https, host, root)
            assert peer_cert(w3).serial_number == second_serial
            w3.close()
            assert metric("beacon_tls_renewal_failures_total", host) == 1
            writer.close()
        finally:
            await backend.stop()
    # A restart with the same storage: the stored certificate is served, nothing
    # is ordered, and the stored backoff still holds the failed renewal.
    pebble = new_pebble(tmp_path / "pebble2")
    async with dns_zone() as (dns_port, _), beacon_app(pebble, tmp_path / "acme") as app:
        await start_pebble(pebble, tmp_path / "pebble2", app.proxy.address.port,  # type: ignore[union-attr]
                           app.proxy.tls.address.port, dns_port)  # fmt: skip
        app.catalog.set_source("m", [Endpoint(id="e1", service="api", address="127.0.0.1", port=1,
                                              source=Source("manual"), http_hosts=(host,),
                                              meta={"beacon.tls": "true"})])  # fmt: skip
        app.catalog.publish()
        tls = app.proxy.tls
        cert = tls.index.lookup(host)
        assert cert is not None and x509.load_pem_x509_certificate(cert.chain_pem).serial_number == second_serial
        await asyncio.sleep(0.5)
        assert pebble.orders() == 0
        assert tls.manager.states[host].failures == 1
        await pebble.stop()


async def test_tls_alpn_01_validates_on_the_tls_listener(tmp_path: Path) -> None:
    from beacon.registry import Endpoint, Source

    host = f"alpn-{RUN_ID}.{ZONE}"
    excluded = f"other-{RUN_ID}.{ZONE}"
    async with acme_env(tmp_path, acme_challenge="tls-alpn-01", acme_allow=(f"alpn-*.{ZONE}",)) as env:
        env.app.catalog.set_source("m", [Endpoint(id="e1", service="alpn", address="127.0.0.1", port=1,
                                                  source=Source("manual"), http_hosts=(host, excluded),
                                                  meta={"beacon.tls": "true"})])  # fmt: skip
        env.app.catalog.publish()
        await eventually(lambda: served(env, host), timeout=40)
        assert not served(env, excluded)  # a TLS route, but --acme-allow excludes it: never ordered
        assert env.tls.manager is not None and excluded not in env.tls.manager.states
        # Pebble validated on the TLS listener (acme-tls/1 handshakes), never over HTTP.
        assert env.tls.tls_alpn_validations >= 1
        assert not any("validate w/ HTTP" in line for line in env.pebble.log)
        assert env.pebble.orders() == 1
        _, w = await tls_connect(env.https, host, env.pebble.root_pem())
        assert dns_names(peer_cert(w)) == [host]
        w.close()
        assert env.tls.book.alpn(host) is None  # the challenge certificate is gone

