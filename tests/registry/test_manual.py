"""Manual registrations: the pure body parser and the TTL / deregistration timer,
driven with a fake clock (no sleeping)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.registry import Catalog, CheckStatus, Endpoint, Source, State
from beacon.registry.manual import (
    ManualRegistry,
    NotFound,
    RegistrationConflict,
    RegistrationError,
    parse_heartbeat,
    parse_registration,
)
from tests.helpers import test_config as make_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_registry(deregister_after: float = 60.0) -> tuple[Catalog, ManualRegistry, FakeClock]:
    clock = FakeClock()
    catalog = Catalog(clock=clock)
    registry = ManualRegistry(
        make_config(deregister_critical_after=deregister_after),
        catalog,
        node="n1",
        clock=clock,
        wall_clock=lambda: clock.now + 1e9,
    )
    return catalog, registry, clock


def reg(eid: str = "db1", **body: Any) -> Endpoint:
    base: dict[str, Any] = {"service": "db", "address": "10.0.0.5", "port": 5432}
    return parse_registration(eid, {**base, **body}, node="n1")


# ------------------------------------------------------------------ parsing
def test_parse_full_registration() -> None:
    ep = parse_registration(
        "pg-1",
        {
            "service": "Postgres",
            "address": "2001:db8::0:1",
            "port": 5432,
            "tags": ["primary", "eu", "primary"],
            "meta": {"version": "16"},
            "weight": 5,
            "protocol": "tcp",
            "ttl": "10s",
        },
        node="vm1",
    )
    assert ep.id == "pg-1"
    assert ep.service == "postgres"  # DNS is case-insensitive: stored lowercased
    assert ep.address == "2001:db8::1"  # normalised
    assert ep.tags == ("primary", "eu")
    assert dict(ep.meta) == {"version": "16"}
    assert ep.weight == 5
    assert ep.source == Source("manual")
    assert ep.node == "vm1"
    assert ep.check is not None and ep.check.kind == "ttl" and ep.check.ttl == 10.0


def test_parse_http_check_uses_the_shared_check_parser() -> None:
    ep = reg(check={"http": "/health", "interval": "1s", "timeout": 0.5, "status": "2xx"})
    assert ep.check is not None
    assert (ep.check.kind, ep.check.path, ep.check.interval, ep.check.timeout) == ("http", "/health", 1.0, 0.5)
    assert (ep.check.status_min, ep.check.status_max) == (200, 299)
    tcp = reg(check={"tcp": True})
    assert tcp.check is not None and tcp.check.kind == "tcp"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "10.0.0.5", "port": 1}, "service"),
        ({"service": "db", "port": 1}, "address"),
        ({"service": "db", "address": "10.0.0.5"}, "port"),
        ({"service": "bad_name", "address": "10.0.0.5", "port": 1}, "service"),
        ({"service": "-db", "address": "10.0.0.5", "port": 1}, "service"),
        ({"service": "a" * 64, "address": "10.0.0.5", "port": 1}, "service"),
        ({"service": 7, "address": "10.0.0.5", "port": 1}, "service"),
        ({"service": "db", "address": "db.example", "port": 1}, "address"),
        ({"service": "db", "address": "0.0.0.0", "port": 1}, "address"),
        ({"service": "db", "address": "::", "port": 1}, "address"),
        ({"service": "db", "address": "10.0.0.5", "port": 0}, "port"),
        ({"service": "db", "address": "10.0.0.5", "port": 65536}, "port"),
        ({"service": "db", "address": "10.0.0.5", "port": "80"}, "port"),
        ({"service": "db", "address": "10.0.0.5", "port": True}, "port"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "weight": 0}, "weight"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "ttl": "soon"}, "ttl"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "ttl": "0s"}, "ttl"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "ttl": -1}, "ttl"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "ttl": "48h"}, "ttl"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "ttl": True}, "ttl"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "tags": "a,b"}, "tags"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "tags": ["a b"]}, "tags"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "tags": [""]}, "tags"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "meta": {"k": 1}}, "meta"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "meta": {"bad key": "v"}}, "meta"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "protocol": "sctp"}, "protocol"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "tgas": ["x"]}, "tgas"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "id": "other"}, "id"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "check": {"http": "health"}}, "check.http"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "check": {"interval": "1s"}}, "check.interval"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "check": {"tcp": True}, "ttl": "5s"}, "check"),
        ({"service": "db", "address": "10.0.0.5", "port": 1, "check": "yes"}, "check"),
    ],
)
def test_invalid_registration_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistrationError) as info:
        parse_registration("db1", body, node="n1")
    assert info.value.field == field
    assert str(info.value)


@pytest.mark.parametrize("eid", ["", "bad id", "-x", "a/b", "x" * 129, "é"])
def test_invalid_id(eid: str) -> None:
    with pytest.raises(RegistrationError) as info:
        parse_registration(eid, {"service": "db", "address": "10.0.0.5", "port": 1}, node="n1")
    assert info.value.field == "id"


def test_body_must_be_an_object() -> None:
    with pytest.raises(RegistrationError) as info:
        parse_registration("db1", ["service"], node="n1")
    assert info.value.field == "body"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["service", "address", "port", "tags", "meta", "weight", "protocol", "ttl", "check", "id"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=8) | json_values)
def test_any_json_body_is_accepted_or_rejected_with_a_field(body: Any) -> None:
    """Whatever the JSON, the parser returns an Endpoint or a RegistrationError -
    never another exception (which the API would turn into a 500)."""
    try:
        ep = parse_registration("fuzz-1", body, node="n1")
    except RegistrationError as exc:
        assert exc.field is not None
    else:
        assert 1 <= ep.port <= 65535
        json.dumps(ep.to_json())


def test_parse_heartbeat() -> None:
    assert parse_heartbeat({}) == (State.PASSING, "")
    assert parse_heartbeat({"status": "warning", "output": "slow"}) == (State.WARNING, "slow")
    _state, output = parse_heartbeat({"output": "x" * 10_000})
    assert len(output) == 4096
    for bad, field in (({"status": "draining"}, "status"), ({"output": 3}, "output"), ({"x": 1}, "x")):
        with pytest.raises(RegistrationError) as info:
            parse_heartbeat(bad)
        assert info.value.field == field


# -------------------------------------------------------------------- timer
def test_ttl_endpoint_is_critical_until_the_first_heartbeat() -> None:
    catalog, registry, _clock = make_registry()
    assert registry.register(reg(ttl="10s")) is True
    snap = catalog.publish()
    assert snap.endpoints["db1"].state is State.CRITICAL
    assert catalog.owner_of("db1") == "manual:db1"
    registry.heartbeat("db1", State.PASSING, "fine")
    ep = catalog.publish().endpoints["db1"]
    assert ep.state is State.PASSING
    assert ep.check_status is not None and ep.check_status.output == "fine"


def test_missed_heartbeat_turns_critical_at_the_deadline_not_before() -> None:
    catalog, registry, clock = make_registry()
    registry.register(reg(ttl="10s"))
    registry.heartbeat("db1")
    catalog.publish()
    clock.now += 9.9
    assert registry.tick(clock.now) == pytest.approx(clock.now + 0.1)
    assert catalog.publish().endpoints["db1"].state is State.PASSING
    clock.now += 0.1
    registry.tick(clock.now)
    ep = catalog.publish().endpoints["db1"]
    assert ep.state is State.CRITICAL
    assert ep.check_status is not None and "ttl expired" in ep.check_status.output


def test_heartbeat_rearms_the_deadline() -> None:
    catalog, registry, clock = make_registry()
    registry.register(reg(ttl="10s"))
    for _ in range(5):
        registry.heartbeat("db1")
        clock.now += 8
        registry.tick(clock.now)
        assert catalog.publish().endpoints["db1"].state is State.PASSING
    ep = catalog.snapshot.endpoints["db1"]
    assert ep.check_status is not None and ep.check_status.consecutive_passes == 5


def test_critical_for_the_deregister_window_removes_the_endpoint() -> None:
    catalog, registry, clock = make_registry(deregister_after=30)
    registry.register(reg(ttl="10s"))
    registry.heartbeat("db1")
    catalog.publish()
    clock.now += 10
    registry.tick(clock.now)
    catalog.publish()  # the listener notes when the published state turned critical
    clock.now += 29.9
    registry.tick(clock.now)
    assert "db1" in catalog.publish().endpoints
    clock.now += 0.1
    assert registry.tick(clock.now) is None
    snap = catalog.publish()
    assert "db1" not in snap.endpoints and "db" not in snap.services
    with pytest.raises(NotFound):
        registry.heartbeat("db1")


def test_a_heartbeat_within_the_window_cancels_the_removal() -> None:
    catalog, registry, clock = make_registry(deregister_after=30)
    registry.register(reg(ttl="10s"))
    catalog.publish()  # critical from registration: the window starts now
    clock.now += 20
    registry.heartbeat("db1")
    catalog.publish()
    clock.now += 15
    registry.tick(clock.now)
    assert catalog.publish().endpoints["db1"].state is State.CRITICAL  # ttl ran out again at +30
    assert "db1" in catalog.snapshot.endpoints  # but the old removal was cancelled


def test_other_checks_critical_too_long_are_removed() -> None:
    """An HTTP-checked manual endpoint whose check (run by the health checker) stays critical."""
    catalog, registry, clock = make_registry(deregister_after=5)
    registry.register(reg(check={"http": "/health"}))
    catalog.set_check_status("db1", CheckStatus(State.CRITICAL, "connection refused"))
    catalog.publish()
    clock.now += 5
    registry.tick(clock.now)
    assert "db1" not in catalog.publish().endpoints


def test_zero_window_disables_removal() -> None:
    catalog, registry, clock = make_registry(deregister_after=0)
    registry.register(reg(ttl="1s"))
    catalog.publish()
    clock.now += 10_000
    assert registry.tick(clock.now) is None
    assert "db1" in catalog.publish().endpoints


def test_reregistering_keeps_status_unless_the_check_changes() -> None:
    catalog, registry, _clock = make_registry()
    registry.register(reg(ttl="10s"))
    registry.heartbeat("db1")
    first = catalog.publish()
    assert registry.register(reg(ttl="10s")) is False
    assert catalog.publish() is first  # idempotent: nothing new published
    registry.register(reg(ttl="10s", tags=["new"]))
    assert catalog.publish().endpoints["db1"].state is State.PASSING
    registry.register(reg(ttl="20s"))
    assert catalog.publish().endpoints["db1"].state is State.CRITICAL  # a new check starts over


def test_container_ids_cannot_be_taken_over() -> None:
    catalog, registry, _clock = make_registry()
    container = Endpoint("c1:80", "web", "172.17.0.2", 80, Source("container", "c1", "web-1"))
    catalog.set_source("container:c1", [container])
    before = catalog.publish()
    with pytest.raises(RegistrationConflict):
        registry.register(reg("c1:80"))
    with pytest.raises(RegistrationConflict):
        registry.deregister("c1:80")
    with pytest.raises(RegistrationConflict):
        registry.heartbeat("c1:80")
    assert catalog.publish() is before


def test_heartbeat_needs_a_ttl() -> None:
    _catalog, registry, _clock = make_registry()
    registry.register(reg())
    with pytest.raises(RegistrationConflict) as info:
        registry.heartbeat("db1")
    assert info.value.field == "ttl"


def test_the_timer_heap_stays_small_under_frequent_heartbeats() -> None:
    catalog, registry, clock = make_registry(deregister_after=30)
    for i in range(50):
        registry.register(reg(f"db{i}", ttl="10s"))
    catalog.publish()
    for _ in range(200):
        for i in range(50):
            registry.heartbeat(f"db{i}")
        clock.now += 1
        registry.tick(clock.now)
        catalog.publish()
    assert len(registry._heap) <= 2 * 50
    assert all(e.state is State.PASSING for e in catalog.snapshot.endpoints.values())
    clock.now += 10
    registry.tick(clock.now)
    assert all(e.state is State.CRITICAL for e in catalog.publish().endpoints.values())
    clock.now += 30
    registry.tick(clock.now)
    assert len(catalog.publish().endpoints) == 0
