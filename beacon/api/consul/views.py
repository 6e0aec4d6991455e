"""The pure views: a snapshot (and the index tracker) → Consul's JSON shapes, endpoint by endpoint.

Shapes follow the examples of Consul's API documentation field by field
(tests/consul/test_consul_shapes.py); draining maps to Consul's maintenance mode.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from beacon import __version__
from beacon.api.consul.filters import Predicate
from beacon.api.consul.indexes import IndexTracker
from beacon.registry.model import Endpoint, Service, Snapshot, State

DATACENTER = "dc1"  # Consul's default datacenter name; tools that pin `datacenter: dc1` keep working
CONSUL_VERSION = "1.15.0"  # the Consul API level these endpoints follow (reported by /v1/agent/self)
MAINTENANCE_NOTES = "draining: the backend was asked to stop (SIGTERM); it gets no new traffic"
_NODE_NAMESPACE = uuid.UUID("6f1d2c1e-6b1a-4c59-9a53-2b4d0c6b8e01")  # node name -> stable Consul node ID


def node_id(node: str) -> str:
    """A stable UUID for a node name (Consul node IDs are UUIDs)."""
    return str(uuid.uuid5(_NODE_NAMESPACE, node))


@dataclass(frozen=True, slots=True)
class ViewContext:
    """What the views need besides the snapshot."""

    tracker: IndexTracker
    datacenter: str = DATACENTER
    local_address: str = ""  # the local node's address (advertised host IP)


def node_address(ctx: ViewContext, snap: Snapshot, node: str) -> str:
    """The local node's advertised address; for another node, the address of its first endpoint."""
    if node == ctx.tracker.local_node and ctx.local_address:
        return ctx.local_address
    for eid in sorted(ctx.tracker.node_endpoints(node)):
        ep = snap.endpoints.get(eid)
        if ep is not None:
            return ep.address
    return ctx.local_address


def node_json(ctx: ViewContext, snap: Snapshot, node: str, *, meta_key: str = "Meta") -> dict[str, Any]:
    address = node_address(ctx, snap, node)
    index = ctx.tracker.view_index("node:" + node)
    return {
        "ID": node_id(node),
        "Node": node,
        "Address": address,
        "Datacenter": ctx.datacenter,
        "TaggedAddresses": {"lan": address, "wan": address},
        meta_key: {},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _tagged(ep: Endpoint, *, agent: bool = False) -> dict[str, dict[str, Any]]:
    # Consul's docs spell these keys in lower case in catalog/health answers and capitalised in the
    # agent's; Go clients decode either (encoding/json matches keys case-insensitively).
    a, p = ("Address", "Port") if agent else ("address", "port")
    return {"lan": {a: ep.address, p: ep.port}, "wan": {a: ep.address, p: ep.port}}


def agent_service_json(ctx: ViewContext, ep: Endpoint, *, agent: bool = False) -> dict[str, Any]:
    """An endpoint as Consul's service instance (`Service` in /v1/health/service, the agent's view)."""
    create, modify = ctx.tracker.endpoint_index(ep.id)
    return {
        "ID": ep.id,
        "Service": ep.service,
        "Tags": list(ep.tags),
        "Address": ep.address,
        "TaggedAddresses": _tagged(ep, agent=agent),
        "Meta": dict(ep.meta),
        "Port": ep.port,
        "Weights": {"Passing": ep.weight, "Warning": 1},
        "EnableTagOverride": False,
        "Datacenter": ctx.datacenter,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


def catalog_service_json(ctx: ViewContext, snap: Snapshot, ep: Endpoint) -> dict[str, Any]:
    """An endpoint as one entry of /v1/catalog/service/<name>."""
    node = ctx.tracker.node_of(ep)
    address = node_address(ctx, snap, node)
    create, modify = ctx.tracker.endpoint_index(ep.id)
    return {
        "ID": node_id(node),
        "Node": node,
        "Address": address,
        "Datacenter": ctx.datacenter,
        "TaggedAddresses": {"lan": address, "wan": address},
        "NodeMeta": {},
        "CreateIndex": create,
        "ModifyIndex": modify,
        "ServiceAddress": ep.address,
        "ServiceEnableTagOverride": False,
        "ServiceID": ep.id,
        "ServiceKind": "",
        "ServiceName": ep.service,
        "ServicePort": ep.port,
        "ServiceMeta": dict(ep.meta),
        "ServiceTaggedAddresses": _tagged(ep),
        "ServiceTags": list(ep.tags),
        "ServiceWeights": {"Passing": ep.weight, "Warning": 1},
        "ServiceProxy": {
            "DestinationServiceName": "",
            "DestinationServiceID": "",
            "LocalServiceAddress": "",
            "LocalServicePort": 0,
            "Config": None,
            "Upstreams": None,
        },
        "ServiceConnect": {"Native": False, "Proxy": None},
    }


def _check(
    ctx: ViewContext, ep: Endpoint, check_id: str, name: str, status: str, *, notes: str = "",
    output: str = "", service: bool = True, kind: str = "",
) -> dict[str, Any]:
    create, modify = ctx.tracker.endpoint_index(ep.id)
    return {
        "Node": ctx.tracker.node_of(ep),
        "CheckID": check_id,
        "Name": name,
        "Status": status,
        "Notes": notes,
        "Output": output,
        "ServiceID": ep.id if service else "",
        "ServiceName": ep.service if service else "",
        "ServiceTags": list(ep.tags) if service else [],
        "Type": kind,
        "Definition": {},
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


def checks_json(ctx: ViewContext, ep: Endpoint) -> list[dict[str, Any]]:
    """Consul's checks for one endpoint: the node's serfHealth, the service check, and for a
    draining endpoint the critical `_service_maintenance:<id>` check Consul's maintenance mode adds.

    Draining maps to maintenance: every tool that routes (`?passing`, DNS, consul-template's
    health queries, Traefik, fabio) drops it, Prometheus shows `__meta_consul_health="maintenance"`.
    """
    checks = [
        _check(ctx, ep, "serfHealth", "Serf Health Status", "passing", output="Agent alive and reachable",
               service=False)
    ]
    output = ep.check_status.output if ep.check_status is not None else ""
    kind: str
    if ep.check is not None:
        kind = ep.check.kind
    else:
        kind = "docker" if ep.source.kind == "container" else ""
    if ep.state is State.DRAINING:
        # The backend's own health before the signal: the last check result, else passing.
        status = ep.check_status.state.value if ep.check_status is not None else "passing"
        if status == State.DRAINING.value:
            status = "passing"
    else:
        status = ep.state.value
    checks.append(_check(ctx, ep, "service:" + ep.id, f"Service '{ep.service}' check", status,
                         output=output, kind=kind))
    if ep.state is State.DRAINING:
        checks.append(_check(ctx, ep, "_service_maintenance:" + ep.id, "Service Maintenance Mode", "critical",
                             notes=MAINTENANCE_NOTES, kind="maintenance"))
    return checks


def aggregated_status(checks: Iterable[Mapping[str, Any]]) -> str:
    """Consul's AggregatedStatus: maintenance, then critical, then warning, else passing."""
    statuses = set()
    for check in checks:
        if str(check["CheckID"]).startswith(("_service_maintenance:", "_node_maintenance")):
            return "maintenance"
        statuses.add(check["Status"])
    for status in ("critical", "warning"):
        if status in statuses:
            return status
    return "passing"


def _matching(svc: Service | None, tags: Iterable[str]) -> list[Endpoint]:
    if svc is None:
        return []
    wanted = tuple(tags)
    return [e for e in svc.endpoints if all(t in e.tags for t in wanted)]


def catalog_services_view(snap: Snapshot, ctx: ViewContext | None = None,
                          predicate: Predicate | None = None) -> dict[str, list[str]]:
    """/v1/catalog/services: service name → all its tags; with a filter, Consul evaluates it on
    each instance (as in /v1/catalog/service) and lists the services and tags of those that match."""
    if predicate is None or ctx is None:
        return {name: list(snap.services[name].tags) for name in sorted(snap.services)}
    out: dict[str, list[str]] = {}
    for name in sorted(snap.services):
        for ep in snap.services[name].endpoints:
            if predicate(catalog_service_json(ctx, snap, ep)):
                tags = out.setdefault(name, [])
                tags.extend(t for t in ep.tags if t not in tags)
    return {name: sorted(tags) for name, tags in out.items()}


def catalog_service_view(ctx: ViewContext, snap: Snapshot, name: str, tags: Iterable[str] = ()) -> list[Any]:
    """/v1/catalog/service/<name>: every instance (health not applied, as in Consul)."""
    return [catalog_service_json(ctx, snap, e) for e in _matching(snap.services.get(name), tags)]


def health_entry(ctx: ViewContext, snap: Snapshot, ep: Endpoint) -> dict[str, Any]:
    node = ctx.tracker.node_of(ep)
    return {"Node": node_json(ctx, snap, node), "Service": agent_service_json(ctx, ep), "Checks": checks_json(ctx, ep)}


def health_service_view(
    ctx: ViewContext, snap: Snapshot, name: str, tags: Iterable[str] = (), passing: bool = False
) -> list[Any]:
    """/v1/health/service/<name>: instances with node and checks; `passing` keeps those whose every check passes."""
    out = []
    for ep in _matching(snap.services.get(name), tags):
        if passing and ep.state is not State.PASSING:
            continue  # warning, critical and draining (maintenance) all have a check that is not passing
        out.append(health_entry(ctx, snap, ep))
    return out


def catalog_nodes_view(ctx: ViewContext, snap: Snapshot) -> list[Any]:
    """/v1/catalog/nodes: every node seen in the snapshot (and the local node, always)."""
    names = set(ctx.tracker.nodes()) | {ctx.tracker.local_node}
    return [node_json(ctx, snap, n) for n in sorted(names)]


def catalog_node_view(ctx: ViewContext, snap: Snapshot, node: str,
                      predicate: Predicate | None = None) -> dict[str, Any] | None:
    """/v1/catalog/node/<node>: the node and its services by ID; None (JSON null) for an unknown node."""
    eids = ctx.tracker.node_endpoints(node)
    if not eids and node != ctx.tracker.local_node:
        return None
    services: dict[str, Any] = {}
    for eid in sorted(eids):
        ep = snap.endpoints.get(eid)
        if ep is not None:
            entry = agent_service_json(ctx, ep)
            del entry["Datacenter"]
            if predicate is None or predicate(entry):
                services[eid] = entry
    return {"Node": node_json(ctx, snap, node), "Services": services}


def agent_self_view(ctx: ViewContext, *, api_address: str) -> dict[str, Any]:
    """/v1/agent/self, minimal but well-formed: tools read Config.Datacenter and Config.NodeName."""
    node = ctx.tracker.local_node
    address = ctx.local_address or api_address.rsplit(":", 1)[0].strip("[]")
    return {
        "Config": {
            "Datacenter": ctx.datacenter,
            "PrimaryDatacenter": ctx.datacenter,
            "NodeName": node,
            "NodeID": node_id(node),
            "Server": True,
            "Revision": f"beacon-{__version__}",
            "Version": CONSUL_VERSION,
        },
        "DebugConfig": {},
        "Coord": {"Adjustment": 0, "Error": 1.5, "Height": 0, "Vec": [0.0] * 8},
        "Member": {
            "Name": node,
            "Addr": address,
            "Port": 8301,
            "Tags": {"dc": ctx.datacenter, "id": node_id(node), "role": "consul", "build": f"beacon-{__version__}"},
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        },
        "Meta": {},
    }


def agent_health_view(ctx: ViewContext, snap: Snapshot, name: str) -> tuple[int, str, list[Any]]:
    """/v1/agent/health/service/name/<svc> on this node: (HTTP status, worst status, entries).

    200 when every instance passes, 429 when the worst is warning, 503 when one is critical
    (or in maintenance: draining); 404 when this node has no instance of the service.
    """
    svc = snap.services.get(name)
    local = ctx.tracker.local_node
    entries = []
    worst = "passing"
    order = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}
    for ep in svc.endpoints if svc is not None else ():
        if ctx.tracker.node_of(ep) != local:
            continue
        checks = checks_json(ctx, ep)[1:]  # the agent endpoint lists service checks only
        status = aggregated_status(checks)
        worst = max(worst, status, key=order.__getitem__)
        service = agent_service_json(ctx, ep, agent=True)
        entries.append({"AggregatedStatus": status, "Service": service, "Checks": checks})
    if not entries:
        return 404, "", []
    code = {"passing": 200, "warning": 429}.get(worst, 503)
    return code, "critical" if worst == "maintenance" else worst, entries

