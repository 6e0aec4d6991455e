"""beacon.lb.locality=prefer-local: the label, the balancer's choice, the worker wire (pure)."""

from __future__ import annotations

import random

from beacon.proxy.balancer import Balancer, Ejection
from beacon.proxy.wire import SnapshotDecoder, SnapshotEncoder
from beacon.registry.catalog import Catalog
from beacon.registry.cluster_wire import endpoint_from_wire, endpoint_to_wire
from beacon.registry.model import Endpoint, Service, Source, State


def ep(eid: str, node: str, state: State = State.PASSING, locality: str | None = "prefer-local") -> Endpoint:
    return Endpoint(id=eid, service="web", address="127.0.0.1", port=8000 + len(eid), source=Source("manual"),
                    node=node, state=state, locality=locality)


def pool_ids(svc: Service, prefer: str | None) -> set[str]:
    balancer = Balancer(Ejection(), random.Random(1))
    balancer.update_service(svc, "round_robin", False, 0.0, prefer_node=prefer)
    return {m.id for m in balancer.pools["web"].members}


def test_prefer_local_keeps_local_endpoints_while_any_is_passing_then_falls_back() -> None:
    both = Service("web", (ep("a1", "a"), ep("a2", "a"), ep("b1", "b")))
    assert pool_ids(both, "a") == {"a1", "a2"}
    assert pool_ids(both, None) == {"a1", "a2", "b1"}  # no label: every node
    one_left = Service("web", (ep("a1", "a", State.CRITICAL), ep("a2", "a", State.DRAINING), ep("b1", "b")))
    assert pool_ids(one_left, "a") == {"b1"}  # no local endpoint passing: fall back to the others
    assert pool_ids(both, "c") == {"a1", "a2", "b1"}  # nothing on this node at all


def test_locality_travels_through_the_store_and_the_worker_wire() -> None:
    original = ep("a1", "a")
    assert endpoint_from_wire(endpoint_to_wire(original), node="a").locality == "prefer-local"
    catalog = Catalog()
    catalog.set_source("manual:a1", [original])
    snap = catalog.publish()
    decoded = SnapshotDecoder().decode(SnapshotEncoder().encode(snap, full=True))
    got = decoded.endpoints["a1"]
    assert (got.node, got.locality) == ("a", "prefer-local")
