"""Proxy metrics: responses by method and exact status code (bounded), per-endpoint
upstream counters labelled with the endpoint id (dropped when it leaves)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from beacon.metrics import exposition
from beacon.proxy.metrics import METHODS, ServiceStats, fold_counters, response_labels
from beacon.registry import Catalog
from tests.proxy.proxytest import backends, ep, free_port, proxy_server, put, url


def samples(name: str, **match: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name` in /metrics whose labels include `match`, by its labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(exposition()[0].decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(name: str, **labels: str) -> float | None:
    hits = [v for k, v in samples(name, **labels).items() if dict(k) == labels]
    return hits[0] if hits else None


def test_method_and_code_labels_are_bounded() -> None:
    stats = ServiceStats()
    for method, status in ((b"GET", 200), (b"get", 200), (b"BREW", 418), (b"POST", 0), (b"PUT", 999),
                           (b"X" * 5000, 599), (b"DELETE", 100)):  # fmt: skip
        stats.observe(status, 0.001, method)
    labels = {response_labels(key): n for key, n in stats.codes.items()}
    assert labels == {("GET", "200"): 1, ("OTHER", "200"): 1, ("OTHER", "418"): 1, ("POST", "other"): 1,
                      ("PUT", "other"): 1, ("OTHER", "599"): 1, ("DELETE", "100"): 1}  # fmt: skip
    # At most |METHODS| x (500 codes + other) series per service, whatever clients send.
    assert all(response_labels(k)[0] in METHODS for k in stats.codes)


def test_worker_counters_fold_with_codes_and_endpoints() -> None:
    a, b = ServiceStats(), ServiceStats()
    a.observe(200, 0.01, b"GET")
    b.observe(200, 0.01, b"GET")
    b.observe(503, 0.01, b"POST")
    a.attempt("e1", False)
    b.attempt("e1", True)
    b.attempt("e2", False)
    merged: dict[str, dict[str, object]] = {}
    fold_counters(merged, {"web": a.to_json()})  # type: ignore[arg-type]
    fold_counters(merged, {"web": b.to_json()})  # type: ignore[arg-type]
    web = merged["web"]
    assert {response_labels(int(k)): n for k, n in web["codes"].items()} == {  # type: ignore[attr-defined]
        ("GET", "200"): 2, ("POST", "503"): 1}  # fmt: skip
    assert set(web) >= {"codes", "buckets"} and "classes" not in web  # one counter: by method and code
    assert (web["attempts"], web["retries"]) == (3, 1)
    assert {k: v["attempts"] for k, v in web["endpoints"].items()} == {"e1": 2, "e2": 1}  # type: ignore[attr-defined]


async def test_responses_count_method_and_exact_code() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:coded", ep("c1", web.port, "coded"))
        host = {"Host": "coded.localhost"}
        async with aiohttp.ClientSession() as s:
            for method, path, status in (("GET", "/status/201", 201), ("GET", "/status/201", 201),
                                         ("POST", "/status/418", 418), ("PURGE", "/status/200", 200),
                                         ("HEAD", "/status/204", 204)):  # fmt: skip
                async with s.request(method, url(proxy, path), headers=host) as r:
                    assert r.status == status
            async with s.get(url(proxy), headers={"Host": "nowhere.localhost"}) as r:
                assert r.status == 404
        # (read while the proxy runs: a stopped one leaves /metrics)
        assert value("beacon_proxy_requests_total", service="coded", method="GET", code="201") == 2
        assert value("beacon_proxy_requests_total", service="coded", method="POST", code="418") == 1
        assert value("beacon_proxy_requests_total", service="coded", method="OTHER", code="200") == 1  # PURGE
        assert value("beacon_proxy_requests_total", service="coded", method="HEAD", code="204") == 1
        assert (value("beacon_proxy_requests_total", service="unrouted", method="GET", code="404") or 0) >= 1
        # One counter per response (Traefik's traefik_service_requests_total{code,method}):
        # no class-only series, and no second family counting the same responses.
        assert not samples("beacon_proxy_requests_total", service="coded", code_class="2xx")
        assert sum(samples("beacon_proxy_requests_total", service="coded").values()) == 5
        assert not samples("beacon_proxy_responses_total")


async def test_endpoint_counters_carry_the_endpoint_id_and_go_when_it_leaves() -> None:
    cat = Catalog()
    dead_port = free_port()  # nothing listens: every try fails to connect
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:pair", ep("live1", web.port, "pair"), ep("dead1", dead_port, "pair"))
        async with aiohttp.ClientSession() as s:
            for _ in range(6):  # round robin: the dead endpoint's tries fail and are retried on the live one
                async with s.get(url(proxy), headers={"Host": "pair.localhost"}) as r:
                    assert r.status == 200
        live = value("beacon_proxy_endpoint_attempts_total", service="pair", endpoint="live1")
        dead = value("beacon_proxy_endpoint_attempts_total", service="pair", endpoint="dead1")
        assert live is not None and live >= 6 and dead is not None and dead >= 1
        assert live + dead == value("beacon_proxy_upstream_attempts_total", service="pair")
        failures = samples("beacon_proxy_endpoint_failures_total", service="pair")
        assert failures == {(("endpoint", "dead1"), ("kind", "connect_failed"), ("service", "pair")): dead}
        ejected = value("beacon_proxy_endpoint_ejections_total", service="pair", endpoint="dead1")
        assert ejected == value("beacon_proxy_ejections_total", service="pair")
        assert value("beacon_proxy_endpoint_ejections_total", service="pair", endpoint="live1") == 0
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing (make test-deps installs Debian's prometheus)"
        lint = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=exposition()[0].decode(),
                                       capture_output=True, text=True, timeout=30)  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # The dead endpoint leaves the catalog: its series go, the live one's stay.
        put(cat, "m:pair", ep("live1", web.port, "pair"))
        assert all("dead1" not in r["services"]["pair"]["endpoints"] for r in proxy.metrics_json())
        assert samples("beacon_proxy_endpoint_attempts_total", endpoint="dead1") == {}
        assert samples("beacon_proxy_endpoint_failures_total", endpoint="dead1") == {}
        assert value("beacon_proxy_endpoint_attempts_total", service="pair", endpoint="live1") == live
        # And the whole service leaving drops the rest.
        cat.remove_source("m:pair")
        cat.publish()
        assert samples("beacon_proxy_endpoint_attempts_total", service="pair") == {}
