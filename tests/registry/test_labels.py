"""The label parser, table-driven over inspect dicts shaped like Docker's (no Docker)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from beacon.registry.labels import (
    MAX_PROBLEMS,
    ContainerEndpoints,
    LabelOptions,
    container_endpoints,
    dns_label,
    image_base_name,
)
from beacon.registry.model import Source, State

CID = "0123456789abcdef" * 4
SHORT = CID[:12]
HOST = LabelOptions(address_mode="host", host_ip="192.0.2.10", node="n1")
INTERNAL = LabelOptions(address_mode="internal", host_ip="192.0.2.10", node="n1")


def container(
    *,
    name: str = "web",
    labels: dict[str, str] | None = None,
    env: list[str] | None = None,
    exposed: list[str] | None = None,
    published: dict[str, list[tuple[str, str]]] | None = None,
    networks: dict[str, tuple[str, str]] | None = None,
    running: bool = True,
    paused: bool = False,
    restarting: bool = False,
    health: str | None = None,
    image: str = "registry.example:5000/team/web-app:1.2",
    network_mode: str = "default",
) -> dict[str, Any]:
    """An inspect dict with only the fields the parser reads, as Docker spells them."""
    published = published if published is not None else {"80/tcp": [("127.0.0.1", "32768")]}
    ports: dict[str, Any] = {k: [{"HostIp": ip, "HostPort": hp} for ip, hp in v] for k, v in published.items()}
    for key in exposed or ():
        ports.setdefault(key, None)
    state: dict[str, Any] = {
        "Status": "running" if running else "exited",
        "Running": running,
        "Paused": paused,
        "Restarting": restarting,
        "Dead": False,
        "StartedAt": "2026-01-01T00:00:00Z",
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
    nets = networks if networks is not None else {"bridge": ("172.17.0.2", "")}
    return {
        "Id": CID,
        "Name": "/" + name,
        "State": state,
        "Config": {
            "Image": image,
            "Labels": labels or {},
            "Env": ["PATH=/bin", *(env or [])],
            "ExposedPorts": {k: {} for k in [*(exposed or []), *published]},
        },
        "HostConfig": {"NetworkMode": network_mode},
        "NetworkSettings": {
            "Ports": ports,
            "Networks": {
                n: {"IPAddress": v4, "GlobalIPv6Address": v6, "IPPrefixLen": 16} for n, (v4, v6) in nets.items()
            },
        },
    }


def summary(result: ContainerEndpoints) -> list[tuple[str, str, str, int, str]]:
    return [(e.id, e.service, e.address, e.port, e.state.value) for e in result.endpoints]


# ------------------------------------------------------------------- naming
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("web", "web"),
        ("/web", "web"),
        ("My_Service.v2", "my-service-v2"),
        ("eager_turing", "eager-turing"),
        ("registry.example:5000/team/web-app:1.2", "web-app"),
        ("team/api@sha256:" + "a" * 64, "api"),
        ("nginx:latest", "nginx"),
        ("--weird--", "weird"),
        ("___", ""),
        ("x" * 80, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
    ],
)
def test_dns_label(raw: str, expected: str) -> None:
    assert dns_label(raw) == expected


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("busybox", "busybox"),
        ("busybox:1.36", "busybox"),
        ("localhost:5000/busybox", "busybox"),
        ("ghcr.io/org/team/app:v1@sha256:abc", "app"),
    ],
)
def test_image_base_name(image: str, expected: str) -> None:
    assert image_base_name(image) == expected


@dataclass
class Case:
    id: str
    attrs: dict[str, Any]
    expected: list[tuple[str, str, str, int, str]]
    options: LabelOptions = HOST
    ignored: str | None = None
    problems: list[str] = field(default_factory=list)  # substrings, one per expected problem


CASES = [
    Case("default-host-mode-loopback-binding", container(), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")]),
    Case(
        "wildcard-binding-uses-host-ip-and-dedupes-v4-v6-pair",
        container(published={"80/tcp": [("0.0.0.0", "8080"), ("::", "8080")]}),
        [(f"{SHORT}-80", "web", "192.0.2.10", 8080, "passing")],
    ),
    Case(
        "ipv6-specific-binding-is-carried",
        container(published={"80/tcp": [("127.0.0.1", "8080"), ("::1", "8081")]}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 8080, "passing"), (f"{SHORT}-80-1", "web", "::1", 8081, "passing")],
    ),
    Case(
        "empty-host-ip-is-a-wildcard",
        container(published={"80/tcp": [("", "8080")]}),
        [(f"{SHORT}-80", "web", "192.0.2.10", 8080, "passing")],
    ),
    Case(
        "exposed-only-is-ignored-in-host-mode",
        container(published={}, exposed=["80/tcp"]),
        [],
        ignored="no published port",
    ),
    Case("no-ports-at-all", container(published={}), [], ignored="no published port"),
    Case("no-ports-internal", container(published={}), [], options=INTERNAL, ignored="no exposed port"),
    Case(
        "exposed-only-internal-mode",
        container(published={}, exposed=["8080/tcp"]),
        [(f"{SHORT}-8080", "web", "172.17.0.2", 8080, "passing")],
        options=INTERNAL,
    ),
    Case(
        "internal-mode-uses-container-port-and-ip",
        container(published={"80/tcp": [("127.0.0.1", "32768")]}),
        [(f"{SHORT}-80", "web", "172.17.0.2", 80, "passing")],
        options=INTERNAL,
    ),
    Case(
        "internal-mode-carries-global-ipv6",
        container(networks={"v6net": ("172.20.0.5", "fd00::5")}),
        [(f"{SHORT}-80", "web", "172.20.0.5", 80, "passing"), (f"{SHORT}-80-1", "web", "fd00::5", 80, "passing")],
        options=INTERNAL,
    ),
    Case(
        "internal-multi-network-picks-first-by-name",
        container(networks={"zeta": ("10.0.2.2", ""), "alpha": ("10.0.1.2", "")}),
        [(f"{SHORT}-80", "web", "10.0.1.2", 80, "passing")],
        options=INTERNAL,
    ),
    Case(
        "internal-network-flag",
        container(networks={"zeta": ("10.0.2.2", ""), "alpha": ("10.0.1.2", "")}),
        [(f"{SHORT}-80", "web", "10.0.2.2", 80, "passing")],
        options=LabelOptions(address_mode="internal", network="zeta"),
    ),
    Case(
        "beacon-network-label-beats-flag",
        container(
            labels={"beacon.network": "alpha"},
            networks={"zeta": ("10.0.2.2", ""), "alpha": ("10.0.1.2", "")},
        ),
        [(f"{SHORT}-80", "web", "10.0.1.2", 80, "passing")],
        options=LabelOptions(address_mode="internal", network="zeta"),
    ),
    Case(
        "compose-short-network-name",
        container(
            labels={"beacon.network": "back", "com.docker.compose.project": "shop"},
            networks={"shop_front": ("10.0.2.2", ""), "shop_back": ("10.0.1.2", "")},
        ),
        [(f"{SHORT}-80", "web", "10.0.1.2", 80, "passing")],
        options=INTERNAL,
    ),
    Case(
        "chosen-network-missing-is-ignored",
        container(networks={"alpha": ("10.0.1.2", "")}),
        [],
        options=LabelOptions(address_mode="internal", network="nope"),
        ignored="not attached to network 'nope' (--network)",
    ),
    Case(
        "network-without-address-skipped",
        container(networks={"none": ("", "")}),
        [],
        options=INTERNAL,
        ignored="no container IP address",
    ),
    Case(
        "host-network-container-uses-host-ip",
        container(network_mode="host", published={}, exposed=["9000/tcp"], networks={"host": ("", "")}),
        [(f"{SHORT}-9000", "web", "192.0.2.10", 9000, "passing")],
        options=INTERNAL,
    ),
    Case(
        "host-network-with-beacon-port",
        container(network_mode="host", published={}, labels={"beacon.port": "7000"}, networks={"host": ("", "")}),
        [(f"{SHORT}-7000", "web", "192.0.2.10", 7000, "passing")],
    ),
    Case(
        "address-label-overrides-host-network-ip",
        container(network_mode="host", published={}, exposed=["9000/tcp"], networks={"host": ("", "")},
                  labels={"beacon.address": "192.0.2.77"}),
        [(f"{SHORT}-9000", "web", "192.0.2.77", 9000, "passing")],
        options=INTERNAL,
    ),
    Case(
        "address-label-overrides-published-ip-keeps-port",
        container(labels={"beacon.address": "2001:db8::7"}),
        [(f"{SHORT}-80", "web", "2001:db8::7", 32768, "passing")],
    ),
    Case(
        "address-label-not-an-ip-is-reported",
        container(labels={"beacon.address": "web.example"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        problems=["beacon.address"],
    ),
    Case(
        "address-label-wildcard-is-reported",
        container(labels={"beacon.address": "0.0.0.0"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        problems=["not an address a client can connect to"],
    ),
    # --- naming
    Case(
        "beacon-service-label",
        container(labels={"beacon.service": "api", "com.docker.compose.service": "backend"}),
        [(f"{SHORT}-80", "api", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "compose-service-beats-container-name",
        container(name="shop_backend_1", labels={"com.docker.compose.service": "backend"}),
        [(f"{SHORT}-80", "backend", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "container-name-normalised",
        container(name="Eager_Turing"),
        [(f"{SHORT}-80", "eager-turing", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "invalid-service-label-normalised-and-reported",
        container(labels={"beacon.service": "My_API"}),
        [(f"{SHORT}-80", "my-api", "127.0.0.1", 32768, "passing")],
        problems=["label beacon.service='My_API': not a valid DNS label; using 'my-api'"],
    ),
    Case(
        "service-label-image-like-loses-host-and-tag",
        container(labels={"beacon.service": "registry.example:5000/team/shop:1.0"}),
        [(f"{SHORT}-80", "shop", "127.0.0.1", 32768, "passing")],
        problems=["beacon.service="],
    ),
    Case(
        "unusable-service-label-falls-back-to-name",
        container(labels={"beacon.service": "!!!"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        problems=["label beacon.service='!!!': no valid DNS label left"],
    ),
    Case(
        "several-ports-one-service-each",
        container(published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]}),
        [(f"{SHORT}-80", "web-80", "127.0.0.1", 1080, "passing"), (f"{SHORT}-443", "web-443", "127.0.0.1", 1443, "passing")],
    ),
    Case(
        "beacon-port-picks-one",
        container(
            labels={"beacon.port": "443"},
            published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]},
        ),
        [(f"{SHORT}-443", "web", "127.0.0.1", 1443, "passing")],
    ),
    Case(
        "beacon-port-not-published-in-host-mode",
        container(labels={"beacon.port": "8080"}),
        [],
        ignored="beacon.port 8080/tcp is not published",
    ),
    Case(
        "beacon-port-unexposed-in-internal-mode",
        container(labels={"beacon.port": "8080"}, published={}),
        [(f"{SHORT}-8080", "web", "172.17.0.2", 8080, "passing")],
        options=INTERNAL,
    ),
    Case(
        "beacon-port-invalid-uses-defaults",
        container(labels={"beacon.port": "http"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        problems=["label beacon.port='http': expected a port"],
    ),
    Case(
        "per-port-service-override",
        container(
            labels={"beacon.443.service": "tls", "beacon.service": "shop"},
            published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]},
        ),
        [(f"{SHORT}-80", "shop-80", "127.0.0.1", 1080, "passing"), (f"{SHORT}-443", "tls", "127.0.0.1", 1443, "passing")],
    ),
    Case(
        "udp-port-gets-distinct-id-same-service",
        container(published={"53/tcp": [("127.0.0.1", "1053")], "53/udp": [("127.0.0.1", "1053")]}),
        [(f"{SHORT}-53", "web", "127.0.0.1", 1053, "passing"), (f"{SHORT}-53-udp", "web", "127.0.0.1", 1053, "passing")],
    ),
    Case(
        "long-name-with-port-suffix-stays-a-label",
        container(
            name="n" * 70,
            published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]},
        ),
        [(f"{SHORT}-80", "n" * 60 + "-80", "127.0.0.1", 1080, "passing"), (f"{SHORT}-443", "n" * 59 + "-443", "127.0.0.1", 1443, "passing")],
    ),
    # --- registrator
    Case(
        "registrator-service-name-env",
        container(env=["SERVICE_NAME=billing"]),
        [(f"{SHORT}-80", "billing", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "registrator-label-beats-env",
        container(env=["SERVICE_NAME=billing"], labels={"SERVICE_NAME": "invoices"}),
        [(f"{SHORT}-80", "invoices", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "beacon-service-beats-registrator",
        container(env=["SERVICE_NAME=billing"], labels={"beacon.service": "api"}),
        [(f"{SHORT}-80", "api", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "registrator-per-port-name",
        container(
            env=["SERVICE_443_NAME=secure"],
            published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]},
        ),
        [(f"{SHORT}-80", "web-80", "127.0.0.1", 1080, "passing"), (f"{SHORT}-443", "secure", "127.0.0.1", 1443, "passing")],
    ),
    Case("registrator-ignore-env", container(env=["SERVICE_IGNORE=1"]), [], ignored="SERVICE_IGNORE is set"),
    Case("registrator-ignore-label", container(labels={"SERVICE_IGNORE": "true"}), [], ignored="SERVICE_IGNORE"),
    Case(
        "registrator-ignore-false-is-not-ignored",
        container(env=["SERVICE_IGNORE=false"]),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
    ),
    Case(
        "registrator-per-port-ignore",
        container(
            env=["SERVICE_443_IGNORE=yes"],
            published={"80/tcp": [("127.0.0.1", "1080")], "443/tcp": [("127.0.0.1", "1443")]},
        ),
        [(f"{SHORT}-80", "web-80", "127.0.0.1", 1080, "passing")],
    ),
    Case(
        "registrator-every-port-ignored",
        container(env=["SERVICE_80_IGNORE=1"]),
        [],
        ignored="every port is ignored",
    ),
    # --- enable / explicit
    Case("enable-false", container(labels={"beacon.enable": "false"}), [], ignored="beacon.enable=false"),
    Case(
        "explicit-without-enable",
        container(),
        [],
        options=LabelOptions(explicit=True),
        ignored="no label beacon.enable=true (--explicit)",
    ),
    Case(
        "explicit-with-enable",
        container(labels={"beacon.enable": "true"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        options=LabelOptions(explicit=True),
    ),
    Case(
        "enable-invalid-registers-by-default",
        container(labels={"beacon.enable": "maybe"}),
        [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")],
        problems=["label beacon.enable='maybe': expected true or false; registered"],
    ),
    Case(
        "enable-invalid-in-explicit-mode-skips",
        container(labels={"beacon.enable": "maybe"}),
        [],
        options=LabelOptions(explicit=True),
        ignored="no label beacon.enable=true",
        problems=["not registered (--explicit)"],
    ),
    # --- state
    Case("not-running-offers-nothing", container(running=False), [], ignored=None),
    Case("paused-is-critical", container(paused=True), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "critical")]),
    Case("restarting-is-critical", container(restarting=True), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "critical")]),
    Case("health-starting", container(health="starting"), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "critical")]),
    Case("health-healthy", container(health="healthy"), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "passing")]),
    Case("health-unhealthy", container(health="unhealthy"), [(f"{SHORT}-80", "web", "127.0.0.1", 32768, "critical")]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_container_endpoints(case: Case) -> None:
    result = container_endpoints(case.attrs, case.options)
    assert summary(result) == case.expected
    assert result.ignored == case.ignored if case.ignored is None else case.ignored in (result.ignored or "")
    assert len(result.problems) == len(case.problems), result.problems
    for want, got in zip(case.problems, result.problems, strict=True):
        assert want in got
        assert SHORT in got and "(" in got  # names the container


def test_endpoint_fields_source_node_protocol() -> None:
    result = container_endpoints(
        container(published={"53/udp": [("127.0.0.1", "1053")]}), LabelOptions(node="n7")
    )
    (ep,) = result.endpoints
    assert ep.source == Source("container", container_id=CID, container_name="web")
    assert ep.node == "n7"
    assert ep.protocol == "udp"
    assert ep.id == f"{SHORT}-53-udp"


def test_ids_are_stable_and_unique() -> None:
    attrs = container(
        published={
            "80/tcp": [("127.0.0.1", "1080"), ("::1", "1080")],
            "80/udp": [("127.0.0.1", "1080")],
            "443/tcp": [("127.0.0.1", "1443")],
        }
    )
    first = container_endpoints(attrs, HOST)
    again = container_endpoints(attrs, HOST)
    assert first == again
    ids = [e.id for e in first.endpoints]
    assert len(ids) == len(set(ids)) == 4


def test_all_settings_labels() -> None:
    labels = {
        "beacon.tags": "Blue, v2,blue",
        "beacon.weight": "5",
        "beacon.meta.team": "payments",
        "beacon.meta.owner.email": "a@b.c",
        "beacon.dns.ttl": "30s",
        "beacon.lb": "least_conn",
        "beacon.http.host": "Shop.Example.com., *.shop.example.com,api.local",
        "beacon.http.path_prefix": "/api/",
        "beacon.http.strip_prefix": "true",
    }
    (ep,) = container_endpoints(container(labels=labels, env=["SERVICE_TAGS=legacy,v2"]), HOST).endpoints
    assert ep.tags == ("blue", "legacy", "v2")
    assert ep.weight == 5
    assert dict(ep.meta) == {"owner.email": "a@b.c", "team": "payments"}
    assert ep.dns_ttl == 30
    assert ep.lb == "least_conn"
    assert ep.http_hosts == ("shop.example.com", "*.shop.example.com", "api.local")
    assert ep.http_path_prefix == "/api"
    assert ep.http_strip_prefix is True


@pytest.mark.parametrize("value", ["sticky", "least_conn+sticky", "Random+Sticky", "round_robin"])
def test_lb_label_accepts_policies_with_sticky(value: str) -> None:
    (ep,) = container_endpoints(container(labels={"beacon.lb": value}), HOST).endpoints
    assert ep.lb == value.lower()


def test_defaults_when_no_settings_labels() -> None:
    (ep,) = container_endpoints(container(), HOST).endpoints
    assert (ep.weight, ep.tags, dict(ep.meta), ep.dns_ttl, ep.lb) == (1, (), {}, None, None)
    assert (ep.http_hosts, ep.http_path_prefix, ep.http_strip_prefix) == ((), None, False)
    assert ep.http_expose is None  # --proxy-expose-by-default decides


@pytest.mark.parametrize(
    ("value", "expose"),
    [("true", True), ("false", False), ("FALSE", False), (" yes ", True), ("0", False), ("1", True)],
)
def test_http_expose_label(value: str, expose: bool) -> None:
    result = container_endpoints(container(labels={"beacon.http.expose": value}), HOST)
    assert [ep.http_expose for ep in result.endpoints] == [expose]
    assert result.problems == ()


BAD_LABELS: list[tuple[str, str, str, object]] = [
    ("beacon.weight", "heavy", "weight", 1),
    ("beacon.weight", "0", "weight", 1),
    ("beacon.weight", "70000", "weight", 1),
    ("beacon.dns.ttl", "-1", "dns_ttl", None),
    ("beacon.dns.ttl", "2d", "dns_ttl", None),
    ("beacon.dns.ttl", "100000", "dns_ttl", None),
    # str.isdigit() or \d accepts these, int() raises on some: only ASCII digits count.
    ("beacon.weight", "\u00b2", "weight", 1),  # superscript two
    ("beacon.weight", "\u2460", "weight", 1),  # circled one
    ("beacon.weight", "\u0663", "weight", 1),  # Arabic-Indic three
    ("beacon.dns.ttl", "9" * 5000, "dns_ttl", None),  # beyond int()'s 4300-digit limit
    ("beacon.dns.ttl", "\u0663\u0660s", "dns_ttl", None),
    ("beacon.lb", "fastest", "lb", None),
    ("beacon.lb", "least_conn+fastest", "lb", None),
    ("beacon.http.host", "bad host!", "http_hosts", ()),
    ("beacon.http.path_prefix", "api", "http_path_prefix", None),
    ("beacon.http.path_prefix", "/a b", "http_path_prefix", None),
    ("beacon.http.strip_prefix", "perhaps", "http_strip_prefix", False),
    ("beacon.http.expose", "maybe", "http_expose", None),
    ("beacon.http.expose", "", "http_expose", None),
    ("beacon.tags", "ok,not ok", "tags", ("ok",)),
    ("beacon.meta.bad key", "x", "meta", {}),
]


@pytest.mark.parametrize(("label", "value", "attr", "default"), BAD_LABELS)
def test_bad_label_is_reported_and_defaulted(label: str, value: str, attr: str, default: object) -> None:
    result = container_endpoints(container(labels={label: value}), HOST)
    (ep,) = result.endpoints  # still registered
    got = getattr(ep, attr)
    assert (dict(got) if attr == "meta" else got) == default
    assert len(result.problems) == 1
    assert f"label {label}={value!r}"[:60] in result.problems[0]  # long values are shown cut short
    assert SHORT in result.problems[0] and "(web)" in result.problems[0]


def test_strip_prefix_without_prefix_is_reported() -> None:
    result = container_endpoints(container(labels={"beacon.http.strip_prefix": "true"}), HOST)
    assert result.endpoints[0].http_strip_prefix is False
    assert "needs beacon.http.path_prefix" in result.problems[0]


def test_several_networks_note_names_the_choice() -> None:
    attrs = container(networks={"b-net": ("10.0.2.2", ""), "a-net": ("10.0.1.2", "")})
    result = container_endpoints(attrs, INTERNAL)
    assert any("chose a-net" in n for n in result.notes)
    single = container_endpoints(container(), INTERNAL)
    assert single.notes == ()


def test_check_labels_are_passed_to_the_check_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from beacon.registry import labels as labels_module
    from beacon.registry.model import AutohealSpec, CheckSpec

    seen: list[dict[str, str]] = []
    spec = CheckSpec(kind="http", path="/health")

    def fake(labels: dict[str, str]) -> tuple[CheckSpec, AutohealSpec, list[str]]:
        seen.append(dict(labels))
        return spec, AutohealSpec(), ["label beacon.check.interval='x': bad"]

    monkeypatch.setattr(labels_module, "parse_check_labels", fake)
    result = container_endpoints(container(labels={"beacon.check.path": "/health"}), HOST)
    assert seen and seen[0]["beacon.check.path"] == "/health"
    assert result.endpoints[0].check == spec
    assert result.endpoints[0].autoheal == AutohealSpec()
    assert result.problems == (f"container {SHORT} (web): label beacon.check.interval='x': bad",)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"Id": CID},
        {"Id": CID, "State": {"Running": True}},
        {"Id": CID, "State": {"Running": True}, "Config": None, "NetworkSettings": None},
        {"Id": CID, "State": {"Running": True}, "NetworkSettings": {"Ports": {"bogus": None, "99999/tcp": None}}},
        {"Id": CID, "State": {"Running": True}, "NetworkSettings": {"Ports": {"80/tcp": [{"HostPort": "\u00b2"}]}}},
    ],
)
def test_sparse_or_odd_inspect_data_never_raises(attrs: dict[str, Any]) -> None:
    result = container_endpoints(attrs, HOST)
    assert result.endpoints == ()


def test_states_are_state_enum() -> None:
    (ep,) = container_endpoints(container(health="starting"), HOST).endpoints
    assert ep.state is State.CRITICAL


# ---- hostile labels: bounded size and count, linear cost, nothing forged in logs
def test_a_huge_host_label_is_ignored_quickly_with_the_reason() -> None:
    names = ",".join(f"h{i}.example.com" for i in range(50_000))  # ~800 KB
    started = time.perf_counter()
    result = container_endpoints(container(labels={"beacon.http.host": names}), HOST)
    assert time.perf_counter() - started < 0.5
    (ep,) = result.endpoints  # still registered, without the label
    assert ep.http_hosts == ()
    (problem,) = result.problems
    assert "label beacon.http.host=" in problem and "longer than 4096" in problem and problem.endswith("; ignored")
    assert len(problem) < 400  # the value is not copied into the log whole


def test_lists_in_labels_are_capped_at_64_items() -> None:
    hosts = ",".join(f"h{i}.t" for i in range(100))
    tags = ",".join(f"t{i}" for i in range(100))
    result = container_endpoints(container(labels={"beacon.http.host": hosts, "beacon.tags": tags}), HOST)
    (ep,) = result.endpoints
    assert ep.http_hosts == tuple(f"h{i}.t" for i in range(64))
    assert set(ep.tags) == {f"t{i}" for i in range(64)}
    assert sum("at most 64" in p for p in result.problems) == 2


def test_too_many_beacon_labels_are_cut_with_one_report() -> None:
    labels = {f"beacon.meta.k{i:04d}": "v" for i in range(1000)}
    result = container_endpoints(container(labels=labels), HOST)
    (ep,) = result.endpoints
    assert len(ep.meta) == 64
    assert sum("at most 64" in p for p in result.problems) == 1


def test_a_label_key_cannot_forge_a_log_line() -> None:
    key = "beacon.meta.x\n2026-01-01 INFO beacon.registry.docker: added: evil"
    labels = {key: "v", "beacon.weight\r\nx": "2", "beacon.check.x\nINFO forged": "1", "beacon.check.http": "/h"}
    result = container_endpoints(container(labels=labels), HOST)
    assert result.problems
    for problem in result.problems:
        assert "\n" not in problem and "\r" not in problem
    assert any("\\n2026-01-01" in p for p in result.problems)


def test_problems_are_kept_up_to_a_bound_and_the_rest_counted() -> None:
    """Thousands of bad labels cost a bounded list of messages (the logger
    shows a few of them and the count)."""
    labels = {"beacon.service": "web", **{f"beacon.meta.bad key {j}": "x" for j in range(1000)}}
    result = container_endpoints(container(labels=labels), HOST)
    assert len(result.problems) == MAX_PROBLEMS and result.more_problems == 1000 - MAX_PROBLEMS
    assert all("metadata key must be" in p for p in result.problems), result.problems[:3]
    assert [e.service for e in result.endpoints] == ["web"]  # still registered
    few = container_endpoints(container(labels={"beacon.service": "web", "beacon.weight": "heavy"}), HOST)
    assert len(few.problems) == 1 and few.more_problems == 0
