"""The proxy's TLS side: the listener, SNI, the HTTP hooks and the certificate sources.

`TlsFrontend` is owned by the proxy's `LocalProxy` (server.py) and shares its
`ProxyCore`: decrypted connections are the same downstream protocol as plain
ones (`TlsClientConnection` only changes `X-Forwarded-Proto` and refuses an
HTTP/2 preface). Through `ProxyCore.intercept` it answers, before routing:

- on plain HTTP, `/.well-known/acme-challenge/<token>` when ACME is on (a
  challenge never reaches a backend), then a 308 to https for hosts with
  `beacon.tls.redirect=true`;
- on HTTPS, the `Strict-Transport-Security` header for hosts with
  `beacon.tls.hsts`.

Certificates come from `--tls-cert-dir` (polled for changes) and from ACME
(`CertificateManager`); file certificates win a name. Every new handshake
looks the name up in the current `CertIndex`, so a reload or a renewal swaps
certificates without touching open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from beacon.config import Config, HostPort
from beacon.proxy.downstream import MODE_CLOSING, ClientConnection
from beacon.proxy.exchange import Exchange
from beacon.proxy.router import normalise_host
from beacon.proxy.tls.certs import (
    ALPN_ACME,
    Certificate,
    CertIndex,
    dir_signature,
    load_cert_dir,
    self_signed,
    server_context,
)
from beacon.proxy.tls.issuer import AcmeIssuer, ChallengeBook
from beacon.proxy.tls.manager import CertificateManager
from beacon.proxy.tls.policy import SiteTable, build_sites, may_order
from beacon.proxy.tls.store import FileCertStore
from beacon.registry.model import Snapshot

if TYPE_CHECKING:
    from beacon.proxy.core import ProxyCore

log = logging.getLogger("beacon.proxy.tls")

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
CERT_DIR_POLL = 2.0  # seconds between looks at --tls-cert-dir (a stat per file)
DEFAULT_CERT_NAME = "default"  # default.crt + default.key: served for unknown or absent SNI
# An HTTP/2 client with prior knowledge gets a SETTINGS frame and a GOAWAY with
# HTTP_1_1_REQUIRED (RFC 9113, 0xd) and a readable reason, not a parser error.
_H2_REASON = b"HTTP/2 is not supported here; use HTTP/1.1 (ALPN http/1.1)"
H2_REFUSAL = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + (8 + len(_H2_REASON)).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
    + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x0d" + _H2_REASON
)  # fmt: skip


class TlsClientConnection(ClientConnection):
    """A decrypted client connection: the plain protocol, marked as TLS."""

    forwarded_proto = b"X-Forwarded-Proto: https\r\n"
    tls = True

    def __init__(self, core: ProxyCore, frontend: TlsFrontend) -> None:
        super().__init__(core)
        self.frontend = frontend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == ALPN_ACME:
            self.frontend.tls_alpn_validations += 1
            transport.close()  # a TLS-ALPN-01 validation: the handshake was the answer (RFC 8737)
            return
        # Only the first chunk can be an HTTP/2 preface; later chunks go straight
        # to the plain handler (no extra call per chunk).
        self.data_received = self._first_data  # type: ignore[method-assign]

    def _first_data(self, data: bytes) -> None:
        del self.data_received  # back to the class's method
        if data[:4] == b"PRI ":
            self.mode = MODE_CLOSING  # nothing more is parsed
            self.transport.write(H2_REFUSAL)
            self.transport.close()
            return
        self.data_received(data)


class TlsFrontend:
    def __init__(self, config: Config, core: ProxyCore) -> None:
        self.config = config
        self.core = core
        self.address: HostPort | None = None
        self.sites = SiteTable()
        self.book = ChallengeBook()
        self.index = CertIndex()
        self.default: Certificate | None = None
        self.fallback = self_signed()
        self.file_certs: dict[str, Certificate] = {}
        self.manager: CertificateManager | None = None
        self.server: asyncio.Server | None = None
        self._site_memo: dict[str, Any] = {}  # policy.build_sites' per-service cache
        self._snapshot: Snapshot | None = None
        self._https_suffix = b""
        self._dir_task: asyncio.Task[None] | None = None
        self._logged_problems: set[str] = set()
        self.tls_alpn_validations = 0  # TLS-ALPN-01 handshakes seen (the ACME server's)
        if config.acme_ca_bundle and not Path(config.acme_ca_bundle).is_file():
            raise RuntimeError(f"--acme-ca-bundle {config.acme_ca_bundle}: no such file")
        if config.acme_storage:
            store = FileCertStore(config.acme_storage)
            store.open()
            issuer = AcmeIssuer(store, self.book, config.acme_directory, config.acme_email,
                                config.acme_ca_bundle, config.acme_challenge)  # fmt: skip
            self.manager = CertificateManager(store, issuer, self._rebuild_index)

    # ------------------------------------------------------------ lifecycle
    async def start(self, snapshot: Snapshot) -> HostPort:
        loop = asyncio.get_running_loop()
        if self.config.tls_cert_dir:
            self._reload_dir(log_problems=True)
        if self.manager is not None:
            self.manager.start(loop)
        self._rebuild_index()
        ctx = server_context()
        ctx.sni_callback = self._select  # called with None too when a client sends no SNI
        addr = self.config.proxy_tls_listen
        assert addr is not None
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(1024)
            sock.setblocking(False)
            core = self.core
            self.server = await loop.create_server(
                lambda: TlsClientConnection(core, self), sock=sock, backlog=1024, ssl=ctx,
                ssl_handshake_timeout=self.config.proxy_header_timeout,
            )  # fmt: skip
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        self.address = HostPort(host, port)
        self._https_suffix = b"" if port == 443 else b":%d" % port
        self.core.intercept = self.intercept
        self.apply(snapshot)
        if self.config.tls_cert_dir:
            self._dir_task = loop.create_task(self._watch_dir())
        COLLECTOR.current = self
        log.info("listening: proxy TLS on %s (%d certificate names, ACME %s)", self.address,
                 len(self.index.exact) + len(self.index.wildcard), "on" if self.manager else "off")  # fmt: skip
        return self.address

    def close(self) -> None:
        """Stop accepting TLS connections (established ones drain with the proxy's)."""
        if self.server is not None:
            self.server.close()

    async def stop(self) -> None:
        self.close()
        if self._dir_task is not None:
            self._dir_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dir_task
        if self.manager is not None:
            await self.manager.stop()
        if COLLECTOR.current is self:
            COLLECTOR.current = None

    # ------------------------------------------------------------ snapshots
    def apply(self, snapshot: Snapshot) -> None:
        """A new snapshot: recompute the sites only when a service changed."""
        previous, self._snapshot = self._snapshot, snapshot
        if previous is not None:
            delta = snapshot.changed_since(previous)
            if not delta.services_changed and not delta.services_removed:
                return
        self.sites = build_sites(snapshot.services, self.config.proxy_domain, self.config.tls_default,
                                 self._site_memo)  # fmt: skip
        for problem in self.sites.problems:
            if problem not in self._logged_problems:
                self._logged_problems.add(problem)
                log.warning("ignored: %s", problem)
        if len(self._logged_problems) > 10000:
            self._logged_problems.clear()
        if self.manager is not None:
            allow = self.config.acme_allow
            self.manager.want(h for h in self.sites.hosts() if may_order(h, self.sites, allow))

    # ----------------------------------------------------------- certificates
    def _rebuild_index(self) -> None:
        acme = self.manager.certs.values() if self.manager is not None else ()
        files = [c for n, c in sorted(self.file_certs.items()) if n != DEFAULT_CERT_NAME]
        self.index = CertIndex.build([*files, *acme])
        self.default = self.file_certs.get(DEFAULT_CERT_NAME)

    def _reload_dir(self, log_problems: bool) -> None:
        root = Path(self.config.tls_cert_dir)
        certs, problems = load_cert_dir(root, self.file_certs)
        for p in problems:
            log.error("failed: --tls-cert-dir %s", p)
        added = {n for n in certs if self.file_certs.get(n) is not certs[n]}
        removed = set(self.file_certs) - set(certs)
        self.file_certs = certs
        for name in sorted(added):
            log.info("loaded: certificate %s for %s", certs[name].origin, ", ".join(certs[name].names))
        for name in sorted(removed):
            log.info("removed: certificate %s", name)
        self._rebuild_index()

    async def _watch_dir(self) -> None:
        root = Path(self.config.tls_cert_dir)
        seen = dir_signature(root)
        while True:
            await asyncio.sleep(CERT_DIR_POLL)
            now = dir_signature(root)
            if now != seen:
                seen = now
                try:
                    self._reload_dir(log_problems=True)
                except Exception:  # a reload must never end the watch
                    log.exception("failed: reloading --tls-cert-dir")

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        """SNI callback: the certificate for this name, else the default one (default.crt
        in --tls-cert-dir, or a self-signed one naming no real host).
        Never an ACME order: orders come from routes only."""
        if server_name is not None:
            name = server_name.lower().rstrip(".")
            challenge = self.book.alpn(name)
            if challenge is not None:
                sslobj.context = challenge
                return None
            cert = self.index.lookup(name)
            if cert is not None:
                sslobj.context = cert.context
                return None
        sslobj.context = (self.default or self.fallback).context
        return None

    # --------------------------------------------------------- HTTP hooks
    def intercept(self, ex: Exchange, raw_host: bytes, url: bytes) -> None:
        """Called by ProxyCore.prepare before routing; may answer the request itself."""
        client = ex.client
        if client.tls:
            site = self.sites.lookup(normalise_host(raw_host).decode("ascii", "replace"))
            if site is not None and site.hsts is not None:
                ex.extra = b"\r\nStrict-Transport-Security: " + site.hsts.encode()
            return
        if self.manager is not None and url.startswith(CHALLENGE_PREFIX):
            token = url[len(CHALLENGE_PREFIX) :].split(b"?", 1)[0].decode("ascii", "replace")
            answer = self.book.http01(token)
            ex.error = (200, answer) if answer is not None else (404, "unknown ACME challenge token")
            return
        if not self.sites.exact and not self.sites.wildcard:
            return
        host = normalise_host(raw_host).decode("ascii", "replace")
        site = self.sites.lookup(host)
        if site is not None and site.redirect:
            ex.error = (308, f"redirecting to https://{host}")
            ex.extra = b"\r\nLocation: https://" + host.encode() + self._https_suffix + url


class TlsCollector(Collector):
    """Scrape-time TLS metrics of the running frontend."""

    def __init__(self) -> None:
        self.current: TlsFrontend | None = None

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily("beacon_tls_certificate_expiry_seconds",
                                   "Unix time at which the certificate served for a host expires", labels=["host"])  # fmt: skip
        failures = CounterMetricFamily("beacon_tls_renewal_failures",
                                       "Failed ACME orders (first issuance or renewal) per host", labels=["host"])  # fmt: skip
        issued = CounterMetricFamily("beacon_tls_certificates_issued", "Certificates issued by ACME per host",
                                     labels=["host"])  # fmt: skip
        front = self.current
        if front is not None:
            names: dict[str, float] = {}
            for table in (front.index.exact, front.index.wildcard):
                for key, cert in table.items():
                    names[key if table is front.index.exact else "*." + key] = cert.not_after
            for host, ts in sorted(names.items()):
                expiry.add_metric([host], ts)
            if front.manager is not None:
                for host, n in sorted(front.manager.failures_total.items()):
                    failures.add_metric([host], n)
                for host, n in sorted(front.manager.issued_total.items()):
                    issued.add_metric([host], n)
        yield expiry
        yield failures
        yield issued

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("beacon_tls_certificate_expiry_seconds", "", labels=["host"])
        yield CounterMetricFamily("beacon_tls_renewal_failures", "", labels=["host"])
        yield CounterMetricFamily("beacon_tls_certificates_issued", "", labels=["host"])


COLLECTOR = TlsCollector()
REGISTRY.register(COLLECTOR)

