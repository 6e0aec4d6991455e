"""The catalog's contract: incremental changes, versioned snapshots, coalescing."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from beacon.registry import Catalog, CheckSpec, CheckStatus, Endpoint, EndpointConflict, Source, State
from beacon.registry.model import Balancing, RouteSpec, Service, SnapshotDelta


def ep(eid: str, service: str = "web", port: int = 80, **kw: object) -> Endpoint:
    return Endpoint(
        id=eid, service=service, address="127.0.0.1", port=port,
        source=Source("container", container_id=eid, container_name=eid), **kw,  # type: ignore[arg-type]
    )


def test_set_source_publishes_a_new_index() -> None:
    cat = Catalog()
    first = cat.snapshot.index
    cat.set_source("container:a", [ep("a1")])
    snap = cat.publish()
    assert snap.index == first + 1
    assert [e.id for e in snap.services["web"].endpoints] == ["a1"]
    assert snap.endpoints["a1"].port == 80


def test_identical_change_is_not_republished() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1")])
    snap = cat.publish()
    assert cat.set_source("container:a", [ep("a1")]) is False
    assert cat.publish() is snap
    # A change and its undo within one window publish nothing either.
    cat.set_source("container:a", [ep("a1", port=81)])
    cat.set_source("container:a", [ep("a1")])
    assert cat.publish() is snap


def test_service_membership_follows_changes() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1"), ep("a2", service="api")])
    cat.set_source("container:b", [ep("b1")])
    cat.publish()
    cat.set_source("container:a", [ep("a1", service="api")])  # a1 moves, a2 goes
    snap = cat.publish()
    assert [e.id for e in snap.services["web"].endpoints] == ["b1"]
    assert [e.id for e in snap.services["api"].endpoints] == ["a1"]
    cat.remove_source("container:b")
    snap = cat.publish()
    assert "web" not in snap.services
    assert set(snap.endpoints) == {"a1"}


def test_snapshots_are_immutable_and_old_ones_unchanged() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1")])
    old = cat.publish()
    cat.set_source_state("container:a", State.DRAINING)
    new = cat.publish()
    assert old.endpoints["a1"].state is State.PASSING
    assert new.endpoints["a1"].state is State.DRAINING
    with pytest.raises(TypeError):
        new.services["x"] = new.services["web"]  # type: ignore[index]


def test_endpoint_id_owned_by_one_source() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1")])
    with pytest.raises(EndpointConflict):
        cat.set_source("manual:a1", [ep("a1")])
    assert cat.owner_of("a1") == "container:a"


def test_checked_endpoint_is_critical_until_first_pass() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1", check=CheckSpec(kind="tcp"))])
    assert cat.publish().endpoints["a1"].state is State.CRITICAL
    cat.set_check_status("a1", CheckStatus(State.PASSING, consecutive_passes=1))
    snap = cat.publish()
    assert snap.endpoints["a1"].state is State.PASSING
    assert snap.endpoints["a1"].check_status is not None
    cat.set_source_state("container:a", State.DRAINING)  # draining beats a passing check
    assert cat.publish().endpoints["a1"].state is State.DRAINING


def test_service_tags_are_the_union() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1", tags=("v1", "blue"))])
    cat.set_source("container:b", [ep("b1", tags=("v2", "blue"))])
    assert cat.publish().services["web"].tags == ("blue", "v1", "v2")


async def test_burst_is_coalesced_and_published_within_50ms() -> None:
    cat = Catalog()
    seen: list[int] = []
    cat.add_listener(lambda s: seen.append(len(s.endpoints)))
    start = time.monotonic()
    for i in range(200):
        cat.set_source(f"container:{i}", [ep(f"e{i}")])
    snap = await cat.wait_for_index(1, wait=1.0)
    assert time.monotonic() - start < 0.05
    await asyncio.sleep(0.06)
    assert seen[-1] == 200 and len(seen) <= 2
    assert cat.snapshot.index >= snap.index


async def test_blocking_wait_returns_on_change_or_timeout() -> None:
    cat = Catalog()
    idx = cat.snapshot.index
    t0 = time.monotonic()
    same = await cat.wait_for_index(idx, wait=0.1)
    assert same.index == idx and time.monotonic() - t0 >= 0.09
    waiter = asyncio.create_task(cat.wait_for_index(idx, wait=5))
    await asyncio.sleep(0.01)
    cat.set_source("container:a", [ep("a1")])
    snap = await asyncio.wait_for(waiter, 1)
    assert snap.index == idx + 1


def test_one_change_in_a_large_catalog_keeps_every_other_object_and_records_the_delta() -> None:
    cat = Catalog()
    for s in range(1000):
        cat.set_source(f"container:{s}", [ep(f"s{s}-{i}", service=f"svc{s}", port=1000 + i) for i in range(10)])
    old = cat.publish()
    cat.set_source("container:5", [ep(f"s5-{i}", service="svc5", port=2000 + i) for i in range(10)])
    snap = cat.publish()
    assert snap.services["svc5"].endpoints[0].port == 2000
    # Everything that did not change is the very same object, not an equal copy.
    assert all(snap.services[n] is old.services[n] for n in old.services if n != "svc5")
    assert all(snap.endpoints[e] is old.endpoints[e] for e in old.endpoints if not e.startswith("s5-"))
    assert snap.services["svc5"] is not old.services["svc5"]
    # The delta was recorded by the publish, not derived by comparing the maps.
    delta = snap.changed_since(old)
    assert delta is snap.delta
    assert delta.services_changed == {"svc5"} and not delta.services_removed
    assert delta.endpoints_changed == {f"s5-{i}" for i in range(10)} and not delta.endpoints_removed


def test_changed_since_reports_added_changed_and_removed() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1"), ep("a2", service="api")])
    first = cat.publish()
    assert first.changed_since(first) == SnapshotDelta()
    cat.set_source("container:a", [ep("a1", port=81), ep("d1", service="db")])  # a2 and api go
    second = cat.publish()
    delta = second.changed_since(first)
    assert delta.services_changed == {"web", "db"} and delta.services_removed == {"api"}
    assert delta.endpoints_changed == {"a1", "d1"} and delta.endpoints_removed == {"a2"}
    assert delta.services_touched == {"web", "db", "api"}
    # Across skipped snapshots the answer is the same, by comparison of the maps.
    cat.set_source("container:b", [ep("b1", service="cache")])
    third = cat.publish()
    across = third.changed_since(first)
    assert across is not third.delta
    assert across.services_changed == {"web", "db", "cache"} and across.services_removed == {"api"}
    assert across.endpoints_changed == {"a1", "d1", "b1"} and across.endpoints_removed == {"a2"}


def test_changed_since_a_snapshot_of_another_catalog_compares_instead_of_trusting_the_index() -> None:
    one, other = Catalog(), Catalog()
    one.set_source("container:a", [ep("a1")])
    other.set_source("container:b", [ep("b1", service="api")])
    a, b = one.publish(), other.publish()
    assert a.index == b.index
    one.set_source("container:a", [ep("a1", port=81)])
    a2 = one.publish()
    assert a2.previous_index == b.index  # same index, yet b is not a2's predecessor
    delta = a2.changed_since(b)
    assert delta.services_changed == {"web"} and delta.services_removed == {"api"}


def test_tags_follow_each_endpoint_change() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1", tags=("v1", "blue"))])
    cat.set_source("container:b", [ep("b1", tags=("blue",))])
    assert cat.publish().services["web"].tags == ("blue", "v1")
    cat.set_source("container:a", [ep("a1", tags=("v2",))])
    assert cat.publish().services["web"].tags == ("blue", "v2")
    cat.remove_source("container:b")
    assert cat.publish().services["web"].tags == ("v2",)


def test_publish_after_one_change_in_a_large_catalog_is_fast() -> None:
    cat = Catalog()
    for s in range(1000):
        cat.set_source(f"container:{s}", [ep(f"s{s}-{i}", service=f"svc{s}", port=1000 + i) for i in range(10)])
    cat.publish()
    cat.set_source("container:5", [ep(f"s5-{i}", service="svc5", port=2000 + i) for i in range(10)])
    t0 = time.perf_counter()
    snap = cat.publish()
    # Generous bound against gross regressions; identity and the delta are
    # asserted above, the benchmark measures the real figure.
    assert time.perf_counter() - t0 < 0.05
    assert snap.services["svc5"].endpoints[0].port == 2000


def test_endpoints_of_a_big_service_stay_sorted_through_changes() -> None:
    cat = Catalog()
    ids = [f"e{n:04d}" for n in range(0, 2000, 2)]
    for eid in ids:
        cat.set_source(f"container:{eid}", [ep(eid)])
    cat.publish()
    for eid in ("e0001", "e1999", "e0999"):
        cat.set_source(f"container:{eid}", [ep(eid)])
    cat.remove_source("container:e0000")
    cat.set_source("container:e0500", [ep("e0500", port=99)])
    snap = cat.publish()
    got = [e.id for e in snap.services["web"].endpoints]
    assert got == sorted({*ids, "e0001", "e1999", "e0999"} - {"e0000"})
    assert snap.endpoints["e0500"].port == 99
    assert next(e for e in snap.services["web"].endpoints if e.id == "e0500").port == 99


def test_service_settings_are_folded_once_and_follow_every_change() -> None:
    cat = Catalog()
    cat.set_source("container:a", [ep("a1", dns_ttl=30, lb="least_conn+sticky", http_hosts=("a.test",))])
    cat.set_source("container:b", [ep("b1", dns_ttl=10, lb="least_conn+sticky", http_hosts=("a.test",))])
    web = cat.publish().services["web"]
    assert web.dns_ttl == 10
    assert web.balancing == Balancing("least_conn", True)
    assert web.routes == (RouteSpec(("a.test",)),)
    # A state flip changes no label: the very same settings object is reused.
    cat.set_source_state("container:a", State.DRAINING)
    assert cat.publish().services["web"].settings is web.settings
    cat.remove_source("container:b")
    assert cat.publish().services["web"].dns_ttl == 30


def test_incremental_service_folds_match_a_fold_from_scratch() -> None:
    """Random writes; after each publish every service equals one built from scratch."""
    rng = random.Random(7)
    cat = Catalog()
    choices = {
        "dns_ttl": [None, None, 5, 30],
        "lb": [None, None, "random", "sticky"],
        "http_hosts": [(), (), ("a.test",), ("b.test", "a.test")],
        "http_path_prefix": [None, None, "/api"],
        "tags": [(), ("x",), ("x", "y"), ("z",)],
    }
    for _ in range(400):
        n = rng.randrange(40)
        if rng.random() < 0.2:
            cat.remove_source(f"container:{n}")
        else:
            kw = {k: rng.choice(v) for k, v in choices.items()}
            cat.set_source(f"container:{n}", [ep(f"e{n:02d}", service=rng.choice(["web", "api"]), **kw)])
        if rng.random() < 0.3:
            snap = cat.publish()
            for name, svc in snap.services.items():
                fresh = Service(name, svc.endpoints, tuple(sorted({t for e in svc.endpoints for t in e.tags})))
                assert svc == fresh and svc.settings == fresh.settings
                assert [e.id for e in svc.endpoints] == sorted(e.id for e in svc.endpoints)
            assert {e.id for s in snap.services.values() for e in s.endpoints} == set(snap.endpoints)
