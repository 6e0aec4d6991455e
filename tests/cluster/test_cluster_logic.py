"""The cluster source and its wire codec, pure (MemoryStore: the seam, no etcd)."""

from __future__ import annotations

import asyncio
import json

import pytest

from beacon.registry.catalog import Catalog
from beacon.registry.cluster import ClusterSource, parse_key
from beacon.registry.cluster_wire import MAX_VALUE, endpoint_from_wire, endpoint_to_wire
from beacon.registry.model import CheckSpec, CheckStatus, Endpoint, Source, State
from beacon.registry.store import Change, MemoryBackend, MemoryStore


def ep(eid: str, node: str = "b", **kw: object) -> Endpoint:
    return Endpoint(id=eid, service="web", address="10.0.0.1", port=80, source=Source("container", "c" * 12, "web1"),
                    node=node, **kw)  # type: ignore[arg-type]


def test_wire_round_trip_drops_check_specs_but_keeps_the_result() -> None:
    original = ep(
        "x", state=State.WARNING, tags=("a",), lb="least_conn", http_hosts=("h.example",), dns_ttl=5,
        http_expose=False, check=CheckSpec("http", path="/h"), check_status=CheckStatus(State.WARNING, "slow", 1.0, 2.0, 0, 3),
    )
    back = endpoint_from_wire(endpoint_to_wire(original), node="b")
    assert back.check is None and back.autoheal is None  # never checked or healed on another node
    assert back.check_status == CheckStatus(State.WARNING, "slow", 0.0, 2.0)  # trimmed: a steady check writes nothing
    assert (back.state, back.tags, back.lb, back.http_hosts, back.dns_ttl) == (State.WARNING, ("a",), "least_conn",
                                                                              ("h.example",), 5)
    assert back.http_expose is False  # a hidden service stays hidden on every node
    full = endpoint_from_wire(endpoint_to_wire(original, full=True), node="b")
    assert full.check == CheckSpec("http", path="/h")  # the durable form of a manual registration


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"[]", b"{", b"null", b'{"id": "x"}',
        json.dumps({"id": "x", "service": "web", "address": "1.2.3.4", "port": True, "source": {"kind": "manual"}}).encode(),
        json.dumps({"id": "x", "service": "web", "address": "1.2.3.4", "port": 70000, "source": {"kind": "manual"}}).encode(),
        json.dumps({"id": "x", "service": "web", "address": "1.2.3.4", "port": 1, "source": {"kind": "alien"}}).encode(),
        json.dumps({"id": "x", "service": "web", "address": "1.2.3.4", "port": 1, "source": {"kind": "manual"},
                    "state": "zombie"}).encode(),
        json.dumps({"id": "x", "service": "web", "address": "1.2.3.4", "port": 1, "source": {"kind": "manual"},
                    "tags": ["t"] * 1000}).encode(),
        b"[" * 100000,
        b" " * (MAX_VALUE + 1),
    ],
)
def test_hostile_records_are_refused_with_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        endpoint_from_wire(raw, node="b")


def test_parse_key() -> None:
    assert parse_key("nodes/b/ep/x-80") == ("b", "ep", "x-80")
    assert parse_key("nodes/b/owner") == ("b", "owner", "")
    assert parse_key("nodes//ep/x") is None and parse_key("manual/b/x") is None and parse_key("nodes/b") is None


async def test_remote_endpoints_fold_one_source_each_bad_and_conflicting_ones_are_ignored() -> None:
    backend = MemoryBackend()
    catalog_a = Catalog()
    a = ClusterSource(catalog_a, MemoryStore(node="a", backend=backend), node="a")
    await a.start()
    catalog_a.set_source("container:local", [ep("mine", node="a")])
    catalog_a.publish()
    b_store = MemoryStore(node="b", backend=backend)
    await b_store.start()
    b_store.set_own("nodes/b/ep/y", endpoint_to_wire(ep("y")))
    b_store.set_own("nodes/b/ep/bad", b"not json")
    b_store.set_own("nodes/b/ep/mine", endpoint_to_wire(ep("mine")))  # the id a's container owns
    b_store.set_own("nodes/b/ep/z", endpoint_to_wire(ep("other-id")))  # key and record disagree
    snap = catalog_a.publish()
    assert set(snap.endpoints) == {"mine", "y"}
    assert snap.endpoints["mine"].node == "a" and snap.endpoints["y"].node == "b"
    assert catalog_a.owner_of("y") == "remote:b/y"
    nodes = {n["node"]: n for n in a.nodes_json()["nodes"]}  # type: ignore[attr-defined]
    assert nodes["b"]["endpoints"] == 1 and nodes["a"]["endpoints"] == 1 and nodes["b"]["lease"] == "alive"
    # a wrote only its own endpoint, under its own node.
    assert sorted(k for k in backend.data if k.startswith("nodes/a/")) == ["nodes/a/ep/mine", "nodes/a/owner"]
    b_store.expire()  # b's lease ran out: every key of b goes
    snap = catalog_a.publish()
    assert set(snap.endpoints) == {"mine"}
    assert "b" not in {n["node"] for n in a.nodes_json()["nodes"]}  # type: ignore[attr-defined]
    await a.stop()


async def test_a_big_relist_is_folded_in_order_across_loop_turns() -> None:
    catalog = Catalog()
    store = MemoryStore(node="a")
    source = ClusterSource(catalog, store, node="a")
    await source.start()
    changes = [Change(f"nodes/b/ep/e{i}", endpoint_to_wire(ep(f"e{i}"))) for i in range(5000)]
    changes.append(Change("nodes/b/ep/e0", None))  # a later change of the same key wins
    source._on_store_changes(changes)
    assert len(catalog.sources("remote:")) < 5000  # not all in one callback
    for _ in range(10):
        if source._drain_handle is None:
            break
        await asyncio.sleep(0)
    snap = catalog.publish()
    assert len(snap.endpoints) == 4999 and "e0" not in snap.endpoints
    await source.stop()
