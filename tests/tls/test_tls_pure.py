"""The pure parts of TLS: label policy, name checks, retry timing, renewal decisions, storage."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from beacon.proxy.tls import manager as tls_manager
from beacon.proxy.tls.certs import CertIndex, load_pair, matches
from beacon.proxy.tls.frontend import H2_REFUSAL
from beacon.proxy.tls.issuer import AcmeIssuer, ChallengeBook
from beacon.proxy.tls.manager import CertificateManager, HostState, retry_delay
from beacon.proxy.tls.policy import build_sites, may_order, public_looking, service_settings
from beacon.proxy.tls.store import FileCertStore, check_name
from beacon.registry import Endpoint, Service, Source
from tests.tls.tlstest import TestCA


def svc(name: str, hosts: tuple[str, ...] = (), **meta: str) -> Service:
    ep = Endpoint(id=f"{name}-1", service=name, address="127.0.0.1", port=80, source=Source("manual"),
                  http_hosts=hosts, meta=meta)  # fmt: skip
    return Service(name=name, endpoints=(ep,))


@pytest.mark.parametrize(("host", "public"), [
    ("app.example.com", True), ("a.b.c.example.org", True), ("example.com", True),
    ("localhost", False), ("web.localhost", False), ("nas.local", False), ("db.internal", False),
    ("x.test", False), ("x.example", False), ("router.home.arpa", False), ("box.lan", False),
    ("127.0.0.1", False), ("single", False), ("*.example.com", False), ("under_score.example.com", False),
    ("a.123", False), ("-bad.example.com", False),
])  # fmt: skip
def test_public_looking(host: str, public: bool) -> None:
    assert public_looking(host) is public


def test_only_route_hosts_that_are_public_and_allowed_may_be_ordered() -> None:
    sites = build_sites({"web": svc("web", ("app.example.com", "*.wild.example.com", "x.internal"),
                                    **{"beacon.tls": "true"})}, "localhost.")  # fmt: skip
    assert may_order("app.example.com", sites, ())
    assert not may_order("web.localhost", sites, ())  # the implicit route: served, never ordered
    assert not may_order("a.wild.example.com", sites, ())  # HTTP-01 cannot issue wildcards
    assert not may_order("x.internal", sites, ())
    assert not may_order("other.example.com", sites, ())  # no route names it
    assert may_order("app.example.com", sites, ("*.example.com",))
    assert not may_order("app.example.com", sites, ("*.example.org", "example.com"))


@pytest.mark.parametrize(("meta", "default", "expected", "problems"), [
    ({}, "off", (False, False, None), 0),
    ({}, "on", (True, False, None), 0),
    ({}, "redirect", (True, True, None), 0),
    ({"beacon.tls": "false"}, "redirect", (False, False, None), 0),
    ({"beacon.tls": "true"}, "off", (True, False, None), 0),
    ({"beacon.tls.redirect": "true"}, "off", (True, True, None), 0),  # redirect implies TLS
    ({"beacon.tls": "true", "beacon.tls.hsts": "true"}, "off", (True, False, "max-age=31536000"), 0),
    ({"beacon.tls": "1", "beacon.tls.hsts": "max-age=60;includeSubDomains ; preload"}, "off",
     (True, False, "max-age=60; includeSubDomains; preload"), 0),
    ({"beacon.tls": "true", "beacon.tls.hsts": "max-age=abc"}, "off", (True, False, None), 1),
    ({"beacon.tls": "maybe"}, "off", (False, False, None), 1),
    ({"beacon.tls": "false", "beacon.tls.hsts": "true"}, "off", (False, False, None), 0),  # HSTS needs TLS
])  # fmt: skip
def test_service_settings_from_labels(meta: dict[str, str], default: str, expected: tuple[object, ...],
                                      problems: int) -> None:  # fmt: skip
    found: list[str] = []
    assert service_settings(svc("web", **meta), default, found) == expected
    assert len(found) == problems


def test_a_host_shared_by_two_services_merges_their_settings() -> None:
    services = {"api": svc("api", ("shop.example.com",), **{"beacon.tls": "true", "beacon.tls.hsts": "true"}),
                "web": svc("web", ("shop.example.com",), **{"beacon.tls.redirect": "true"})}  # fmt: skip
    site = build_sites(services, "localhost.").lookup("shop.example.com")
    assert site is not None and site.redirect and site.hsts == "max-age=31536000"
    assert site.services == ("api", "web")


def test_build_sites_reuses_unchanged_services() -> None:
    memo: dict[str, object] = {}
    web = svc("web", ("a.example.com",), **{"beacon.tls": "true"})
    build_sites({"web": web}, "localhost.", memo=memo)  # type: ignore[arg-type]
    first = memo["web"]
    build_sites({"web": web, "x": svc("x")}, "localhost.", memo=memo)  # type: ignore[arg-type]
    assert memo["web"] is first
    assert build_sites({}, "localhost.", memo=memo).hosts() == []  # type: ignore[arg-type]
    assert memo == {}


@pytest.mark.parametrize(("pattern", "host", "ok"), [
    ("a.example.com", "a.example.com", True), ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", False), ("*.example.com", "example.com", False),
])  # fmt: skip
def test_certificate_name_matching(pattern: str, host: str, ok: bool) -> None:
    assert matches(pattern, host) is ok


def test_index_prefers_files_then_the_longest_lived() -> None:
    ca = TestCA.create()
    short = load_pair(*ca.issue("a.example.com", days=1), origin="file a.crt")
    long = load_pair(*ca.issue("a.example.com", days=5), origin="file a.crt")
    acme = load_pair(*ca.issue("a.example.com", "*.example.com", days=50), origin="acme")
    index = CertIndex.build([short, long, acme])
    assert index.lookup("a.example.com") is long
    assert index.lookup("b.example.com") is acme
    assert index.lookup("x.b.example.com") is None


def test_load_pair_rejects_mismatched_keys_and_nameless_certs() -> None:
    ca = TestCA.create()
    chain, _ = ca.issue("a.example.com")
    _, other_key = ca.issue("b.example.com")
    with pytest.raises(ValueError, match="do not load together"):
        load_pair(chain, other_key)
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_pair(b"junk", other_key)


def test_retry_delay_doubles_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_manager, "RETRY_BASE", 60.0)
    monkeypatch.setattr(tls_manager, "RETRY_CAP", 3600.0)
    assert [retry_delay(n) for n in (1, 2, 3, 6, 7, 100, 10**6)] == [60, 120, 240, 1920, 3600, 3600, 3600]


def test_renewal_decisions_follow_the_injected_clock(tmp_path: Path) -> None:
    store = FileCertStore(tmp_path)
    store.open()
    now = [1_000_000.0]
    manager = CertificateManager(store, AcmeIssuer(store, ChallengeBook(), "https://acme.invalid/dir"),
                                 on_change=lambda: None, clock=lambda: now[0])  # fmt: skip
    ca = TestCA.create()
    cert = load_pair(*ca.issue("a.example.com", days=9), origin="acme")
    now[0] = cert.not_before
    assert manager.due("a.example.com", now[0])  # no certificate: order
    manager.certs["a.example.com"] = cert
    lifetime = cert.not_after - cert.not_before
    assert cert.renew_at() == cert.not_before + lifetime * 2 / 3
    assert not manager.due("a.example.com", cert.renew_at() - 1)
    assert manager.due("a.example.com", cert.renew_at())
    # A failure holds the next attempt until its backoff is over.
    manager.states["a.example.com"] = HostState(failures=2, next_attempt=cert.not_before + 7 * 86400)
    assert not manager.due("a.example.com", cert.not_before + 6.9 * 86400)
    assert manager.due("a.example.com", cert.not_before + 7 * 86400)
    # An ARI window earlier than 2/3 of the lifetime wins.
    manager.states["a.example.com"] = HostState(ari_renew_at=cert.not_before + 3 * 86400)
    assert manager.due("a.example.com", cert.not_before + 3 * 86400)


def test_stored_state_survives_a_restart(tmp_path: Path) -> None:
    store = FileCertStore(tmp_path)
    store.open()
    ca = TestCA.create()
    chain, key = ca.issue("a.example.com")
    store.write("certs/a.example.com.key", key, secret=True)
    store.write("certs/a.example.com.crt", chain)
    issuer = AcmeIssuer(store, ChallengeBook(), "https://acme.invalid/dir")
    first = CertificateManager(store, issuer, on_change=lambda: None, clock=lambda: 100.0)
    first._failed("a.example.com", RuntimeError("CA down"))
    second = CertificateManager(store, issuer, on_change=lambda: None, clock=lambda: 101.0)
    second.load_stored()
    assert set(second.certs) == {"a.example.com"}
    state = second.states["a.example.com"]
    assert state.failures == 1 and state.next_attempt == 100.0 + tls_manager.RETRY_BASE
    assert "CA down" in state.last_error


def test_file_store_writes_atomically_with_private_keys(tmp_path: Path) -> None:
    store = FileCertStore(tmp_path / "acme")
    store.open()
    assert stat.S_IMODE((tmp_path / "acme").stat().st_mode) == 0o700
    store.write("certs/a.example.com.key", b"secret", secret=True)
    store.write("certs/a.example.com.crt", b"public")
    store.write("certs/a.example.com.crt", b"public 2")
    assert stat.S_IMODE((tmp_path / "acme/certs/a.example.com.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "acme/certs/a.example.com.crt").stat().st_mode) == 0o644
    assert store.read("certs/a.example.com.crt") == b"public 2"
    assert store.read("certs/none.crt") is None
    assert sorted(os.listdir(tmp_path / "acme/certs")) == ["a.example.com.crt", "a.example.com.key"]  # no temp left
    assert store.names("certs/") == ["certs/a.example.com.crt", "certs/a.example.com.key"]
    for bad in ("../x", "certs/../../etc", "/abs", "a b", ""):
        with pytest.raises(ValueError):
            check_name(bad)


def test_issuance_lock_admits_one_holder(tmp_path: Path) -> None:
    store = FileCertStore(tmp_path)
    store.open()
    seen: list[bool] = []
    with store.issuance_lock("a.example.com") as held:
        assert held
        t = threading.Thread(target=lambda: seen.append(store.issuance_lock("a.example.com").__enter__()))
        t.start()
        t.join()
        with store.issuance_lock("b.example.com") as other:
            assert other
    assert seen == [False]
    with store.issuance_lock("a.example.com") as again:
        assert again


def test_h2_refusal_is_settings_then_goaway_http_1_1_required() -> None:
    assert H2_REFUSAL[:9] == b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
    frame = H2_REFUSAL[9:]
    length = int.from_bytes(frame[:3], "big")
    assert frame[3] == 0x07 and len(frame) == 9 + length  # GOAWAY
    assert int.from_bytes(frame[13:17], "big") == 0x0D  # HTTP_1_1_REQUIRED
    assert b"HTTP/1.1" in frame[17:]


@pytest.mark.parametrize(("flags", "error"), [
    ({"tls_cert_dir": "/x"}, "need --proxy-tls-listen"),
    ({"acme_storage": "/x"}, "need --proxy-tls-listen"),
    ({"proxy_tls_listen": "127.0.0.1:0", "proxy_workers": "2"}, "main process only"),
    ({"proxy_tls_listen": "127.0.0.1:0", "acme_email": "a@b.c"}, "need --acme-storage"),
    ({"proxy_tls_listen": "127.0.0.1:0", "acme_storage": "/x", "acme_directory": "ftp://x"}, "http"),
    ({"tls_default": "sometimes"}, "expected one of"),
])  # fmt: skip
def test_tls_options_are_checked_together(flags: dict[str, str], error: str) -> None:
    from beacon.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=error):
        build_config(flags, environ={})


def test_tls_options_from_flags_and_environment() -> None:
    from beacon.config import HostPort, build_config

    config = build_config({"proxy_tls_listen": "0.0.0.0:443", "acme_storage": "/var/lib/beacon/acme"},
                          environ={"BEACON_ACME_ALLOW": "*.example.com,example.com", "BEACON_TLS_DEFAULT": "redirect"})  # fmt: skip
    assert config.proxy_tls_listen == HostPort("0.0.0.0", 443)
    assert config.acme_allow == ("*.example.com", "example.com")
    assert config.tls_default == "redirect"
    assert config.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
