"""HealthHistory (pure): snapshots in, endpoint state changes out, bounded, with the reason."""

from __future__ import annotations

from dataclasses import replace

from beacon.api.ui import HealthHistory, endpoint_reason
from beacon.registry import Catalog, CheckSpec, CheckStatus, Endpoint, Source, State


def endpoint(eid: str, service: str = "web", state: State = State.PASSING, **kw: object) -> Endpoint:
    return Endpoint(
        id=eid, service=service, address="10.0.0.1", port=80, node="n1",
        source=Source("container", container_id=eid, container_name=f"c-{eid}"), state=state, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def changes(history: HealthHistory) -> list[tuple[str, str | None, str | None, str]]:
    return [(t.endpoint, t.before, t.after, t.reason) for t in history]


def test_records_added_changed_and_removed_endpoints_with_the_reason() -> None:
    catalog = Catalog()
    clock = iter(range(100, 200))
    history = HealthHistory(clock=lambda: float(next(clock)))
    history.observe(catalog.snapshot)
    catalog.set_source("container:a", [endpoint("a")])
    history.observe(catalog.publish())
    catalog.set_check_status("a", CheckStatus(State.CRITICAL, output="HTTP GET /health: 404 Not Found"))
    history.observe(catalog.publish())
    catalog.set_source_state("container:a", State.DRAINING)
    history.observe(catalog.publish())
    catalog.remove_source("container:a")
    history.observe(catalog.publish())
    assert changes(history) == [
        ("a", None, "passing", ""),
        ("a", "passing", "critical", "HTTP GET /health: 404 Not Found"),
        ("a", "critical", "draining", "HTTP GET /health: 404 Not Found"),
        ("a", "draining", None, ""),
    ]
    newest = history.to_json()[0]
    assert newest["after"] is None and newest["at"] == 103.0 and newest["service"] == "web"


def test_the_first_snapshot_is_the_starting_point_and_unchanged_services_cost_nothing() -> None:
    catalog = Catalog()
    catalog.set_source("container:a", [endpoint("a")])
    catalog.set_source("container:b", [endpoint("b", service="api")])
    history = HealthHistory()
    history.observe(catalog.publish())
    assert changes(history) == []
    # A change that keeps every state (a new tag) is not a transition.
    catalog.set_source("container:a", [endpoint("a", tags=("v2",))])
    history.observe(catalog.publish())
    catalog.set_source("container:b", [endpoint("b", service="api", state=State.CRITICAL)])
    history.observe(catalog.publish())
    assert changes(history) == [("b", "passing", "critical", "")]


def test_history_is_bounded_oldest_dropped_first() -> None:
    catalog = Catalog()
    history = HealthHistory(limit=3)
    history.observe(catalog.snapshot)
    for n in range(5):
        catalog.set_source(f"container:{n}", [endpoint(str(n))])
        history.observe(catalog.publish())
    assert [t.endpoint for t in history] == ["2", "3", "4"]


def test_reason_explains_each_bad_state() -> None:
    check = CheckSpec(kind="http", path="/health")
    assert endpoint_reason(endpoint("a", state=State.CRITICAL, check=check)) == "waiting for the first check to pass"
    assert endpoint_reason(endpoint("a", state=State.DRAINING)).startswith("stopping")
    failing = endpoint("a", state=State.CRITICAL, check=check, check_status=CheckStatus(State.CRITICAL, output=""))
    assert endpoint_reason(failing) == "check critical"
    long = replace(failing, check_status=CheckStatus(State.CRITICAL, output="x" * 5000))
    assert len(endpoint_reason(long)) == 300
    assert endpoint_reason(endpoint("a")) == ""
