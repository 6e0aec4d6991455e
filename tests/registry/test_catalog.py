"""The catalog's contract: incremental changes, versioned snapshots, coalescing."""

from __future__ import annotations

import asyncio
import time

import pytest

from beacon.registry import Catalog, CheckSpec, CheckStatus, Endpoint, EndpointConflict, Source, State


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


def test_publish_after_one_change_in_a_large_catalog_is_fast() -> None:
    cat = Catalog()
    for s in range(1000):
        cat.set_source(f"container:{s}", [ep(f"s{s}-{i}", service=f"svc{s}", port=1000 + i) for i in range(10)])
    cat.publish()
    cat.set_source("container:5", [ep(f"s5-{i}", service="svc5", port=2000 + i) for i in range(10)])
    t0 = time.perf_counter()
    snap = cat.publish()
    # Generous bound (the benchmark measures the real figure): an O(n) rebuild
    # of 10,000 endpoints would still pass 50 ms on this machine, so this only
    # catches gross regressions like re-building every service.
    assert time.perf_counter() - t0 < 0.05
    assert snap.services["svc5"].endpoints[0].port == 2000
