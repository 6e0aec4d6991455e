"""Pure parts of the Consul API: query options as Consul parses them, the index tracker
(per-service indexes, epochs), and Consul registrations mapped to Beacon's."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from beacon.api.consul.errors import ConsulError
from beacon.api.consul.filters import FilterError, parse_filter
from beacon.api.consul.indexes import IndexTracker
from beacon.api.consul.query import (
    DEFAULT_WAIT,
    MAX_WAIT,
    blocking_timeout,
    parse_go_duration,
    parse_query_options,
)
from beacon.api.consul.registration import registration_from_consul
from beacon.registry import Catalog, State
from beacon.registry.manual import parse_registration
from tests.consul.consultest import container_endpoint, drop, put


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("5m", 300.0), ("120000ms", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("100us", 1e-4),
     ("0", 0.0), ("-1s", -1.0), ("2h", 7200.0), (".5s", 0.5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "5 m", "1d", "s", "1.2.3s", "10s ", "x" * 100, "--1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def options(**query: str) -> MultiDict[str]:
    return MultiDict(query)


def test_query_options_like_consul() -> None:
    assert parse_query_options(options(), "dc1").index is None
    opts = parse_query_options(options(index="42", wait="120000ms", stale=""), "dc1")
    assert (opts.index, opts.wait, opts.stale) == (42, 120.0, True)
    assert parse_query_options(options(wait="1h"), "dc1").wait == MAX_WAIT  # capped at 10 min
    assert parse_query_options(options(wait="0s"), "dc1").wait == DEFAULT_WAIT
    assert parse_query_options(options(wait="-5s"), "dc1").wait == DEFAULT_WAIT
    assert parse_query_options(options(dc="dc1", near="_agent", filter_="x", foo="bar"), "dc1").index is None


@pytest.mark.parametrize(
    ("query", "status", "text"),
    [
        ({"index": "abc"}, 400, "Invalid index"),
        ({"index": "-1"}, 400, "Invalid index"),
        ({"index": "+1"}, 400, "Invalid index"),
        ({"index": str(2**64)}, 400, "Invalid index"),
        ({"wait": "soon"}, 400, "Invalid wait time"),
        ({"wait": "10"}, 400, "Invalid wait time"),
        ({"dc": "dc2"}, 500, "No path to datacenter"),
        ({"stale": "", "consistent": ""}, 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
    ],
)
def test_query_option_errors_are_consuls(query: dict[str, str], status: int, text: str) -> None:
    with pytest.raises(ConsulError) as err:
        parse_query_options(MultiDict(query), "dc1")
    assert (err.value.status, err.value.message) == (status, text)


def test_jitter_is_at_most_a_sixteenth() -> None:
    assert blocking_timeout(160.0, lambda: 0.0) == 160.0
    assert blocking_timeout(160.0, lambda: 0.999999) == pytest.approx(170.0, abs=1e-3)


def test_per_service_indexes_move_only_with_their_service() -> None:
    catalog = Catalog()
    put(catalog, container_endpoint("aaa", "web"), container_endpoint("bbb", "db", port=5432))
    tracker = IndexTracker(catalog.snapshot, epoch=5_000, local_node="node-a")
    web, db, services = tracker.view_index("svc:web"), tracker.view_index("svc:db"), tracker.view_index("services")
    assert web > 5_000

    put(catalog, container_endpoint("bbb", "db", port=5432, state=State.CRITICAL))
    keys = tracker.update(catalog.snapshot)
    assert keys == {"svc:db", "node:node-a"}  # a health change: not the services list, not web
    assert tracker.view_index("svc:web") == web
    assert tracker.view_index("svc:db") > db
    assert tracker.view_index("services") == services

    put(catalog, container_endpoint("ccc", "cache", node="node-b"))
    keys = tracker.update(catalog.snapshot)
    assert keys == {"svc:cache", "services", "nodes", "node:node-b"}
    assert tracker.nodes() == ["node-a", "node-b"]

    drop(catalog, "ccc-80")
    keys = tracker.update(catalog.snapshot)
    assert keys == {"svc:cache", "services", "nodes", "node:node-b"}
    removed_at = tracker.view_index("svc:cache")
    assert removed_at == tracker.consul(catalog.snapshot.index)  # a removed service keeps its index
    assert tracker.nodes() == ["node-a"]


def test_endpoint_create_and_modify_indexes() -> None:
    catalog = Catalog()
    put(catalog, container_endpoint("aaa", "web"))
    tracker = IndexTracker(catalog.snapshot, epoch=0, local_node="n")
    created = tracker.endpoint_index("aaa-80")
    assert created[0] == created[1] == catalog.snapshot.index
    put(catalog, container_endpoint("aaa", "web", tags=("new",)))
    tracker.update(catalog.snapshot)
    assert tracker.endpoint_index("aaa-80") == (created[0], catalog.snapshot.index)


def test_a_later_process_starts_above_anything_an_earlier_one_served() -> None:
    """The served index is epoch (µs wall clock at start) + snapshot index: a restart never goes back."""
    catalog = Catalog()
    first = IndexTracker(catalog.snapshot, epoch=1_700_000_000_000_000, local_node="n")
    for i in range(50):
        put(catalog, container_endpoint(f"e{i}", "web"))
        first.update(catalog.snapshot)
    last_served = first.view_index("svc:web")
    # The next process starts 1 ms later, with a fresh catalog whose index is back at 1.
    second = IndexTracker(Catalog().snapshot, epoch=1_700_000_000_001_000, local_node="n")
    assert second.view_index("svc:web") > last_served
    assert second.view_index("svc:web") < 2**53  # exact in JavaScript clients


def test_consul_registration_maps_to_beacons() -> None:
    body = {
        "ID": "redis1", "Name": "redis", "Tags": ["primary", "v1"], "Address": "127.0.0.1", "Port": 8000,
        "Meta": {"redis_version": "4.0"}, "EnableTagOverride": False, "Weights": {"Passing": 10, "Warning": 1},
        "Check": {"HTTP": "http://127.0.0.1:8000/health?full=1", "Interval": "10s", "Timeout": "5s",
                  "DeregisterCriticalServiceAfter": "90m"},
    }
    eid, beacon = registration_from_consul(body, default_address="")
    endpoint = parse_registration(eid, beacon, node="n")
    assert (endpoint.id, endpoint.service, endpoint.address, endpoint.port) == ("redis1", "redis", "127.0.0.1", 8000)
    assert (endpoint.tags, dict(endpoint.meta), endpoint.weight) == (("primary", "v1"), {"redis_version": "4.0"}, 10)
    assert endpoint.check is not None
    assert (endpoint.check.kind, endpoint.check.path, endpoint.check.interval) == ("http", "/health?full=1", 10.0)


def test_consul_registration_snake_case_ttl_and_defaults() -> None:
    eid, beacon = registration_from_consul(
        {"name": "api", "port": 9000, "check": {"ttl": "15s"}, "enable_tag_override": True},
        default_address="192.0.2.7",
    )
    endpoint = parse_registration(eid, beacon, node="n")
    assert (endpoint.id, endpoint.address) == ("api", "192.0.2.7")  # ID defaults to Name, Address to the node's
    assert endpoint.check is not None and (endpoint.check.kind, endpoint.check.ttl) == ("ttl", 15.0)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"Port": 80}, "Missing service name"),
        ({"Name": "x", "Port": 80, "Kind": "connect-proxy"}, "Kind"),
        ({"Name": "x", "Port": 80, "Check": {"Args": ["/bin/true"], "Interval": "5s"}}, "args checks"),
        ({"Name": "x", "Port": 80, "Checks": [{"TTL": "5s"}, {"TTL": "6s"}]}, "one check"),
        ({"Name": "x", "Port": 0}, "Port"),
        ({"Name": "x", "Port": 80, "Check": {"HTTP": "https://h/"}}, "plain http"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_consul_registrations_beacon_cannot_honour(body: object, text: str) -> None:
    with pytest.raises(ConsulError) as err:
        registration_from_consul(body, default_address="10.0.0.1")
    assert err.value.status == 400 and text in err.value.message


FILTER_ENTRY = {
    "Service": {"ID": "web-1", "Tags": ["prod", "v1"], "Meta": {"env": "live", "k-1": "x"}, "Port": 80},
    "Checks": [{"Status": "passing"}, {"Status": "critical"}],
    "ServiceMeta": {},
}


@pytest.mark.parametrize(
    ("expression", "matches"),
    [
        ('"prod" in Service.Tags', True),
        ('"dev" in Service.Tags', False),
        ('"dev" not in Service.Tags', True),
        ('Service.Meta.env == "live"', True),
        ('Service.Meta["k-1"] == x', True),
        ("Service.Port == 80", True),
        ("Service.Port != 80", False),
        ("Checks.Status == critical", True),  # through a list: any element
        ('Service.ID matches "^web-"', True),
        ('Service.ID not matches "^web-"', False),
        ("ServiceMeta is empty", True),
        ("Service.Tags is not empty", True),
        ("Service.Missing is empty", True),
        ('Service.Tags contains "v1" and not Service.Port == 81', True),
        ('(Service.Port == 81 or "v1" in Service.Tags) and Service.Meta.env != "test"', True),
        ('Service.Port == 81 or "v9" in Service.Tags', False),
    ],
)
def test_filter_expressions(expression: str, matches: bool) -> None:
    assert parse_filter(expression)(FILTER_ENTRY) is matches


@pytest.mark.parametrize(
    "expression", ["Service.Port ==", "(a == b", "a ~ b", '"x" b', 'a matches "("', 'a matches "(a+)+$"', "x" * 5000]
)
def test_bad_filters_are_refused(expression: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(expression)
