"""A Consul-compatible HTTP API over Beacon's snapshots (see CONSUL.md next to this file).

Tools that discover services through Consul's HTTP API - Prometheus's
`consul_sd_configs`, consul-template, Traefik's and fabio's Consul catalog
providers, py-consul - read the catalog, health and agent endpoints served
here and work against Beacon unchanged.

Layout: pure parts first (query options, the index tracker, the views that
turn a snapshot into Consul's JSON shapes), then the waiters of blocking
queries, then the aiohttp handlers (`ConsulApi.install`).

Indexes. Beacon's snapshot index starts at 1 in every process; a Consul index
must never go backwards for a client that outlives a restart. So every index
served here is `epoch + snapshot index`, where `epoch` is the wall clock in
microseconds when this process built its `ConsulApi`: a later process starts
above anything an earlier one could have reached (it would have had to
publish more than one snapshot per microsecond). Only a wall clock stepped
back by more than the previous run's uptime breaks that; then the index goes
backwards once, and Consul clients reset to 0 as Consul's blocking-query
documentation requires of them, while Beacon answers an index above its own
at once so no client ever waits on a number that cannot come. Values stay
below 2^53 (safe in JavaScript clients) until the year 2255.

Each service has its own ModifyIndex (the last snapshot that changed it), so
a blocking query on service X sleeps through changes of service Y; the
tracker updates only what the snapshot delta names.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from aiohttp import web
from multidict import MultiMapping
from prometheus_client import Gauge

from beacon import __version__
from beacon.config import Config
from beacon.registry.catalog import Catalog
from beacon.registry.docker import detect_host_ip
from beacon.registry.manual import (
    ManualRegistry,
    NotFound,
    RegistrationError,
    parse_heartbeat,
    parse_registration,
)
from beacon.registry.manual import (
    RegistrationConflict as Conflict,
)
from beacon.registry.model import Endpoint, Service, Snapshot, State

log = logging.getLogger("beacon.api.consul")

DATACENTER = "dc1"  # Consul's default datacenter name; tools that pin `datacenter: dc1` keep working
CONSUL_VERSION = "1.15.0"  # the Consul API level these endpoints follow (reported by /v1/agent/self)
DEFAULT_WAIT = 300.0  # Consul: 5 min when ?wait is absent or not above zero
MAX_WAIT = 600.0  # Consul: 10 min at most
MAX_PARKED = 20_000  # blocking queries parked at once; beyond that a 429 (Consul: too many connections)
MAX_BODY = 64 * 1024
CACHE_ENTRIES = 512  # rendered bodies kept for the current snapshot
REMOVED_NAMES_KEPT = 10_000  # removed services whose ModifyIndex is remembered
MAINTENANCE_NOTES = "draining: the backend was asked to stop (SIGTERM); it gets no new traffic"
_NODE_NAMESPACE = uuid.UUID("6f1d2c1e-6b1a-4c59-9a53-2b4d0c6b8e01")  # node name -> stable Consul node ID

PARKED = Gauge("beacon_registry_api_consul_blocking_queries", "Consul-compatible blocking queries waiting for a change")


class ConsulError(Exception):
    """An answer in Consul's error style: a status and a plain-text body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# ------------------------------------------------------------------ queries
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration, which Consul uses for ?wait: '10s', '5m', '120000ms', '1h30m', '-1s', '0'.

    Returns seconds; raises ValueError for anything Go would reject.
    """
    if len(text) > 64:
        raise ValueError("duration too long")
    body = text
    sign = 1.0
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    while pos < len(body):
        m = _GO_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


@dataclass(frozen=True, slots=True)
class QueryOptions:
    """Consul's common query parameters, parsed like Consul's HTTP layer does."""

    index: int | None = None  # ?index= (a blocking query when present and above 0)
    wait: float = DEFAULT_WAIT  # ?wait= clamped to (0, MAX_WAIT], jitter not included
    stale: bool = False
    token: str | None = None  # ?token=


def parse_query_options(query: MultiMapping[str], datacenter: str) -> QueryOptions:
    """?dc, ?stale/?consistent, ?wait, ?index (and ?token). Unknown parameters are ignored, as Consul does."""
    dc = query.get("dc", "")
    if dc and dc != datacenter:
        # Consul answers a query for a datacenter it cannot reach with a 500 and this text.
        raise ConsulError(500, "No path to datacenter")
    stale = "stale" in query
    if stale and "consistent" in query:
        raise ConsulError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    wait = DEFAULT_WAIT
    raw_wait = query.get("wait", "")
    if raw_wait:
        try:
            seconds = parse_go_duration(raw_wait)
        except ValueError:
            raise ConsulError(400, "Invalid wait time") from None
        # Consul: a wait at or below zero means the default; above the maximum, the maximum.
        wait = DEFAULT_WAIT if seconds <= 0 else min(seconds, MAX_WAIT)
    index: int | None = None
    raw_index = query.get("index", "")
    if raw_index:
        # Go's strconv.ParseUint(…, 10, 64): digits only, no sign, at most 2^64-1.
        if not re.fullmatch(r"\d{1,20}", raw_index) or int(raw_index) >= 2**64:
            raise ConsulError(400, "Invalid index")
        index = int(raw_index)
    return QueryOptions(index=index, wait=wait, stale=stale, token=query.get("token") or None)


def blocking_timeout(wait: float, rand: Callable[[], float] = random.random) -> float:
    """The wait plus up to wait/16 of jitter, so clients that started together do not return together."""
    return wait + rand() * wait / 16


def parse_flag(query: MultiMapping[str], name: str) -> bool:
    """A Consul boolean flag: `?passing`, `?passing=true`, `?passing=1` are on; `=false`/`=0` off."""
    if name not in query:
        return False
    value = query.get(name, "").strip().lower()
    if value in ("", "1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise ConsulError(400, f"Invalid value for ?{name}: {value[:40]!r}")


# -------------------------------------------------------------- the indexes
@dataclass(slots=True)
class _EndpointIndex:
    create: int
    modify: int


class IndexTracker:
    """Consul indexes for one process, advanced from snapshot deltas (pure: no clock, no I/O).

    All stored indexes are snapshot indexes; `consul(i)` turns one into the served
    index (`epoch + i`). Keys name what a blocking query watches: `services` (the
    name → tags map), `svc:<name>`, `nodes` (the node list), `node:<name>`.
    """

    def __init__(self, snapshot: Snapshot, *, epoch: int, local_node: str) -> None:
        self.epoch = epoch
        self.local_node = local_node
        self.current = snapshot.index
        self.floor = snapshot.index  # the index of anything never seen (or forgotten)
        self.services_index = snapshot.index
        self.nodes_index = snapshot.index
        self._service: dict[str, int] = {}
        self._node: dict[str, int] = {}
        self._endpoints: dict[str, _EndpointIndex] = {}
        self._node_members: dict[str, set[str]] = {}  # node -> endpoint ids
        self._last = Snapshot(index=0, services=MappingProxyType({}), endpoints=MappingProxyType({}))
        self.update(snapshot)

    def consul(self, snapshot_index: int) -> int:
        return self.epoch + snapshot_index

    def node_of(self, ep: Endpoint) -> str:
        return ep.node or self.local_node

    # ---------------------------------------------------------------- reads
    def view_index(self, key: str) -> int:
        """The served (Consul) index of what `key` names."""
        if key == "services":
            return self.consul(self.services_index)
        if key == "nodes":
            return self.consul(self.nodes_index)
        kind, _, name = key.partition(":")
        table = self._service if kind == "svc" else self._node
        return self.consul(table.get(name, self.floor))

    def endpoint_index(self, eid: str) -> tuple[int, int]:
        entry = self._endpoints.get(eid)
        if entry is None:
            return self.consul(self.floor), self.consul(self.floor)
        return self.consul(entry.create), self.consul(entry.modify)

    def nodes(self) -> list[str]:
        return sorted(self._node_members)

    def node_endpoints(self, node: str) -> set[str]:
        return self._node_members.get(node, set())

    # --------------------------------------------------------------- update
    def update(self, new: Snapshot) -> set[str]:
        """Advance to `new`; return the keys whose index changed (the watchers to wake)."""
        old, self._last = self._last, new
        idx = new.index
        self.current = idx
        keys: set[str] = set()
        old_eps: dict[str, Endpoint] = {}
        new_eps: dict[str, Endpoint] = {}
        names_changed = False
        # O(what changed) when `old` is the snapshot just before (the catalog recorded the delta).
        for name in new.changed_since(old).services_touched:
            before, after = old.services.get(name), new.services.get(name)
            self._service[name] = idx
            keys.add("svc:" + name)
            if before is None or after is None or before.tags != after.tags:
                names_changed = True
            if before is not None:
                old_eps.update((e.id, e) for e in before.endpoints)
            if after is not None:
                new_eps.update((e.id, e) for e in after.endpoints)
        if names_changed:
            self.services_index = idx
            keys.add("services")
        nodes_before = len(self._node_members)
        touched_nodes: set[str] = set()
        for eid, ep in old_eps.items():
            after_ep = new_eps.get(eid)
            if after_ep is ep:
                continue
            if after_ep is None:
                self._endpoints.pop(eid, None)
            node = self.node_of(ep)
            if after_ep is None or self.node_of(after_ep) != node:
                members = self._node_members.get(node)
                if members is not None:
                    members.discard(eid)
                    if not members:
                        del self._node_members[node]
            touched_nodes.add(node)
        for eid, ep in new_eps.items():
            before_ep = old_eps.get(eid)
            if before_ep is ep:
                continue
            entry = self._endpoints.get(eid)
            if entry is None:
                self._endpoints[eid] = _EndpointIndex(idx, idx)
            else:
                entry.modify = idx
            node = self.node_of(ep)
            members = self._node_members.setdefault(node, set())
            if eid not in members:
                members.add(eid)
            touched_nodes.add(node)
        for node in touched_nodes:
            self._node[node] = idx
            keys.add("node:" + node)
        if len(self._node_members) != nodes_before or touched_nodes - self._node_members.keys():
            self.nodes_index = idx
            keys.add("nodes")
        self._forget_removed(new)
        return keys

    def _forget_removed(self, snap: Snapshot) -> None:
        """Bound what removed services and nodes leave behind; what is forgotten reads as `floor`."""
        if len(self._service) > len(snap.services) + REMOVED_NAMES_KEPT:
            self.floor = snap.index
            self._service = {n: i for n, i in self._service.items() if n in snap.services}
        if len(self._node) > len(self._node_members) + REMOVED_NAMES_KEPT:
            self.floor = snap.index
            self._node = {n: i for n, i in self._node.items() if n in self._node_members}


# ----------------------------------------------------------------- the views
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


# ------------------------------------------------------------------ filters
MAX_FILTER = 4096
_FILTER_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<op>==|!=|\(|\))"""
    r"""|(?P<word>[A-Za-z0-9_.\-]+(?:\["(?:[^"\\]|\\.)*"\][A-Za-z0-9_.\-]*)*))"""
)
Predicate = Callable[[Any], bool]
_NESTED_QUANTIFIER = re.compile(r"\([^)]*[+*}?][^)]*\)\s*[+*{]")


class FilterError(ValueError):
    """A ?filter expression Beacon cannot parse (Consul: 400)."""


def parse_filter(text: str) -> Predicate:
    """Consul's ?filter language (hashicorp/go-bexpr), the parts tools use:

    `Sel == "v"`, `Sel != "v"`, `"v" in Sel`, `"v" not in Sel`, `Sel contains "v"`,
    `Sel not contains "v"`, `Sel is empty`, `Sel is not empty`, `Sel matches "re"`,
    `Sel not matches "re"`, joined with `and`, `or`, `not` and parentheses. A selector is a
    dotted path into an answer entry (`Service.Tags`, `ServiceMeta.env`, `Node.Meta["k-1"]`);
    through a list (`Checks.Status`) it matches when any element does.
    """
    if len(text) > MAX_FILTER:
        raise FilterError(f"filter longer than {MAX_FILTER} characters")
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _FILTER_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise FilterError(f"unexpected input at position {pos}: {text[pos:pos + 20]!r}")
        tokens.append(m.group(m.lastgroup or "word"))
        pos = m.end()
    parser = _FilterParser(tokens)
    predicate = parser.expression(0)
    if parser.pos != len(tokens):
        raise FilterError(f"unexpected {tokens[parser.pos]!r}")
    return predicate


def _unquote(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1]
    if token.startswith('"'):
        return str(json.loads(token))
    return token


def _selector_parts(token: str) -> list[str]:
    parts: list[str] = []
    for m in re.finditer(r'\["((?:[^"\\]|\\.)*)"\]|([^.\[\]]+)', token):
        parts.append(json.loads(f'"{m.group(1)}"') if m.group(1) is not None else m.group(2))
    return parts


def _resolve(value: Any, parts: list[str]) -> list[Any]:
    """Every value the selector reaches (lists fan out); a missing field reaches nothing."""
    values = [value]
    for part in parts:
        nxt: list[Any] = []
        for v in values:
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict) and part in item:
                    nxt.append(item[part])
        values = nxt
    return values


def _equal(field_value: Any, literal: str) -> bool:
    if isinstance(field_value, bool):
        return str(field_value).lower() == literal.lower()
    if isinstance(field_value, (int, float)):
        try:
            return float(field_value) == float(literal)
        except ValueError:
            return False
    return isinstance(field_value, str) and field_value == literal


def _contains(field_value: Any, literal: str) -> bool:
    if isinstance(field_value, str):
        return literal in field_value
    if isinstance(field_value, dict):
        return literal in field_value
    if isinstance(field_value, list):
        return any(_equal(item, literal) for item in field_value)
    return False


class _FilterParser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise FilterError("the expression ends too early")
        self.pos += 1
        return token

    def expect(self, word: str) -> None:
        token = self.take()
        if token.lower() != word:
            raise FilterError(f"expected {word!r}, got {token!r}")

    def expression(self, depth: int) -> Predicate:
        if depth > 32:
            raise FilterError("the expression nests too deep")
        left = self.conjunction(depth)
        while (self.peek() or "").lower() == "or":
            self.take()
            right = self.conjunction(depth)
            left = (lambda a, b: lambda v: a(v) or b(v))(left, right)
        return left

    def conjunction(self, depth: int) -> Predicate:
        left = self.unary(depth)
        while (self.peek() or "").lower() == "and":
            self.take()
            right = self.unary(depth)
            left = (lambda a, b: lambda v: a(v) and b(v))(left, right)
        return left

    def unary(self, depth: int) -> Predicate:
        token = self.peek()
        if token is not None and token.lower() == "not":
            self.take()
            inner = self.unary(depth + 1)
            return lambda v: not inner(v)
        if token == "(":
            self.take()
            inner = self.expression(depth + 1)
            if self.take() != ")":
                raise FilterError("a parenthesis is not closed")
            return inner
        return self.match()

    def match(self) -> Predicate:
        first = self.take()
        following = (self.peek() or "").lower()
        value_first = following == "in" or (following == "not" and (self.peek(1) or "").lower() == "in")
        if value_first or first.startswith(('"', "`")):
            literal = _unquote(first)
            negate = (self.peek() or "").lower() == "not"
            if negate:
                self.take()
            self.expect("in")
            parts = _selector_parts(self.take())
            return lambda v: (not negate) == any(_contains(x, literal) for x in _resolve(v, parts))
        parts = _selector_parts(first)
        op = self.take().lower()
        if op in ("==", "!="):
            literal = _unquote(self.take())
            want = op == "=="
            return lambda v: want == any(_equal(x, literal) for x in _resolve(v, parts))
        if op == "is":
            negate = (self.peek() or "").lower() == "not"
            if negate:
                self.take()
            self.expect("empty")
            return lambda v: negate != all(x in (None, "", [], {}) for x in _resolve(v, parts))
        negate = op == "not"
        if negate:
            op = self.take().lower()
        if op == "contains":
            literal = _unquote(self.take())
            return lambda v: (not negate) == any(_contains(x, literal) for x in _resolve(v, parts))
        if op == "matches":
            source = _unquote(self.take())
            if _NESTED_QUANTIFIER.search(source):
                # Python's re backtracks (Go's RE2 does not): refuse what could take exponential time.
                raise FilterError("nested quantifiers such as (a+)+ are not supported in matches")
            try:
                pattern = re.compile(source)
            except re.error as exc:
                raise FilterError(f"invalid regular expression: {exc}") from None
            return lambda v: (not negate) == any(isinstance(x, str) and pattern.search(x) is not None
                                                 for x in _resolve(v, parts))
        raise FilterError(f"unknown operator {op!r}")


def apply_filter(entries: list[Any], predicate: Predicate | None) -> list[Any]:
    return entries if predicate is None else [e for e in entries if predicate(e)]


# ------------------------------------------------------------------- writes
def _normal_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Consul decodes registrations case-insensitively and accepts snake_case: ServiceID, service_id, serviceid."""
    return {str(k).replace("_", "").lower(): v for k, v in obj.items()}


_UNSUPPORTED_CHECKS = ("args", "script", "grpc", "docker", "dockercontainerid", "h2ping", "aliasservice",
                       "aliasnode", "udp", "osservice")


def registration_from_consul(body: object, *, default_address: str) -> tuple[str, dict[str, Any]]:
    """A Consul service registration → (endpoint id, a body for Beacon's `parse_registration`).

    Raises ConsulError(400) with Consul-style text for what Beacon cannot honour.
    """
    if not isinstance(body, dict):
        raise ConsulError(400, "Request decode failed: the body must be a JSON object")
    reg = _normal_keys(body)
    name = reg.get("name")
    if not isinstance(name, str) or not name:
        raise ConsulError(400, "Missing service name")
    kind = reg.get("kind") or ""
    if kind:
        raise ConsulError(400, f"Invalid service: Kind {kind!r} (Connect proxies and gateways) is not supported by Beacon")
    sid = reg.get("id") or name
    if not isinstance(sid, str):
        raise ConsulError(400, "Request decode failed: ID must be a string")
    address = reg.get("address") or default_address
    if not address:
        raise ConsulError(400, "Invalid service: Address is required (Beacon cannot pick this node's address)")
    out: dict[str, Any] = {"service": name, "address": address, "port": reg.get("port", 0)}
    if isinstance(out["port"], int) and not isinstance(out["port"], bool) and out["port"] == 0:
        raise ConsulError(400, "Invalid service: Port must be between 1 and 65535 for Beacon")
    if reg.get("tags") is not None:
        out["tags"] = reg["tags"]
    if reg.get("meta") is not None:
        out["meta"] = reg["meta"]
    weights = reg.get("weights")
    if isinstance(weights, dict):
        passing = _normal_keys(weights).get("passing")
        if passing is not None:
            out["weight"] = passing
    checks: list[Any] = []
    if reg.get("check"):
        checks.append(reg["check"])
    if isinstance(reg.get("checks"), list):
        checks.extend(c for c in reg["checks"] if c)
    if len(checks) > 1:
        raise ConsulError(400, f"Invalid check: Beacon runs one check per service instance (got {len(checks)})")
    if checks:
        key, value = _check_from_consul(checks[0])
        out[key] = value
    return sid, out


def _check_from_consul(raw: object) -> tuple[str, Any]:
    if not isinstance(raw, dict):
        raise ConsulError(400, "Request decode failed: a check must be a JSON object")
    chk = _normal_keys(raw)
    for unsupported in _UNSUPPORTED_CHECKS:
        if chk.get(unsupported):
            raise ConsulError(400, f"Invalid check: {unsupported} checks are not supported by Beacon (use http, tcp or ttl)")
    if chk.get("ttl"):
        return "ttl", chk["ttl"]
    spec: dict[str, Any] = {}
    for key in ("interval", "timeout"):
        if chk.get(key):
            spec[key] = chk[key]
    if chk.get("http"):
        url = urllib.parse.urlsplit(str(chk["http"]))
        if url.scheme not in ("http", ""):
            raise ConsulError(400, f"Invalid check: Beacon's HTTP checks are plain http (got {url.scheme}://)")
        # Beacon probes the instance's own address:port; only the path (and query) carry over.
        spec["http"] = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if chk.get("method"):
            spec["method"] = chk["method"]
        return "check", spec
    if chk.get("tcp"):
        spec["tcp"] = True
        return "check", spec
    raise ConsulError(400, "Invalid check: give one of HTTP, TCP or TTL")


# ------------------------------------------------------------------ waiters
class Waiters:
    """The parked blocking queries, by watched key; a snapshot wakes only the keys it changed.

    Each parked query owns one future and one timer, kept in its key's set and dropped
    with it (a client that hangs up is cancelled by aiohttp and leaves the set), so memory
    follows the number of parked queries. Nothing is shared between waiters: no callback
    list on a common future that every departure would have to search.
    """

    def __init__(self) -> None:
        self.slots: dict[str, set[asyncio.Future[None]]] = {}
        self.parked = 0

    async def wait(self, key: str, timeout: float) -> None:
        """Until `key` is woken, `timeout` seconds pass or everything is woken (shutdown)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiters = self.slots.get(key)
        if waiters is None:
            waiters = self.slots[key] = set()
        waiters.add(future)
        self.parked += 1
        timer = loop.call_later(timeout, _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            self.parked -= 1
            waiters.discard(future)
            if not waiters and self.slots.get(key) is waiters:
                del self.slots[key]

    def count(self, key: str) -> int:
        return len(self.slots.get(key, ()))

    def wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            for future in self.slots.pop(key, ()):
                _settle(future)

    def wake_all(self) -> None:
        self.wake(list(self.slots))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ------------------------------------------------------------------- server
Leader = Callable[[], tuple[bool, float]]  # (known leader, seconds since last contact with the store)


def _always_leader() -> tuple[bool, float]:
    return True, 0.0


class _Store(Protocol):
    @property
    def connected(self) -> bool: ...

    def last_sync_age(self) -> float | None: ...


def store_leader(store: _Store) -> Leader:
    """X-Consul-KnownLeader / LastContact from the shared store (etcd mode): known while it is
    connected; last contact is the age of the last successful sync with it."""

    def leader() -> tuple[bool, float]:
        age = store.last_sync_age()
        return store.connected, 0.0 if age is None else age

    return leader


class ConsulApi:
    """The Consul-compatible routes, mounted on the API's aiohttp application by `install`.

    `start()` follows the catalog's snapshots (indexes, wake-ups); `stop()` ends every
    parked query at once. Reads render the current immutable snapshot; rendered bodies are
    cached per snapshot so a thousand watchers woken by one change share one rendering.
    """

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        manual: ManualRegistry,
        node: str,
        datacenter: str = DATACENTER,
        local_address: str = "",
        api_address: Callable[[], str] | None = None,
        leader: Leader | None = None,  # None: one node, always its own leader
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._catalog = catalog
        self._manual = manual
        self._datacenter = datacenter
        self._leader = leader or _always_leader
        self._rand = rand
        self._api_address = api_address or (lambda: str(config.api_listen))
        token = config.api_token.encode("utf-8", "surrogateescape")
        self._token_digest = hashlib.sha256(token).digest() if config.api_token else None
        epoch = max(1, int(wall_clock() * 1_000_000))
        self._tracker = IndexTracker(catalog.snapshot, epoch=epoch, local_node=node)
        # The local node's Address, as the Docker source advertises host ports: --advertise-ip, else detected.
        address = local_address or config.advertise_ip or detect_host_ip() or ""
        self._ctx = ViewContext(self._tracker, datacenter, address)
        self._waiters = Waiters()
        self._closing: asyncio.Future[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self._cache: dict[tuple[object, ...], bytes] = {}
        self._cache_index = -1

    # ------------------------------------------------------------ lifecycle
    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/catalog/services", self._catalog_services)
        r.add_get("/v1/catalog/service/{name}", self._catalog_service)
        r.add_get("/v1/catalog/nodes", self._catalog_nodes)
        r.add_get("/v1/catalog/node/{node}", self._catalog_node)
        r.add_get("/v1/catalog/datacenters", self._datacenters)
        r.add_get("/v1/health/service/{name}", self._health_service)
        r.add_get("/v1/agent/self", self._agent_self)
        r.add_get("/v1/agent/health/service/name/{name}", self._agent_health)
        r.add_put("/v1/agent/service/register", self._register)
        r.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        r.add_put("/v1/agent/check/{verb:pass|warn|fail}/{check_id}", self._check_verb)
        r.add_put("/v1/agent/check/update/{check_id}", self._check_update)
        r.add_get("/v1/status/leader", self._status_leader)
        r.add_get("/v1/status/peers", self._status_peers)
        # Anything else under Consul's API areas: a clear 404 (or 405) in Consul's plain-text style.
        r.add_route("*", r"/v1/{area:(?:catalog|health|agent|status|kv|acl|session|event|coordinate|"
                         r"operator|query|txn|connect|config|peering|snapshot|internal|namespace|"
                         r"partition|discovery-chain|exported-services)}{rest:(?:/.*)?}", self._unknown)
        app.on_shutdown.append(self._on_shutdown)

    async def start(self) -> None:
        self._closing = asyncio.get_running_loop().create_future()
        self._on_snapshot(self._catalog.snapshot)
        self._unlisten = self._catalog.add_listener(self._on_snapshot)

    async def stop(self) -> None:
        self._shut()
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def _on_shutdown(self, app: web.Application) -> None:
        self._shut()

    def _shut(self) -> None:
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        self._waiters.wake_all()

    @property
    def parked(self) -> int:
        """Blocking queries waiting now (tests and metrics)."""
        return self._waiters.parked

    @property
    def watched_keys(self) -> int:
        return len(self._waiters.slots)

    def parked_on(self, key: str) -> int:
        """Blocking queries waiting on one key (`services`, `svc:<name>`, `nodes`, `node:<name>`)."""
        return self._waiters.count(key)

    @property
    def tracker(self) -> IndexTracker:
        return self._tracker

    def _on_snapshot(self, snap: Snapshot) -> None:
        keys = self._tracker.update(snap)
        self._cache.clear()
        self._cache_index = snap.index
        self._waiters.wake(keys)

    # ------------------------------------------------------------- helpers
    def _headers(self, index: int, opts: QueryOptions) -> dict[str, str]:
        known, last_contact = self._leader()
        return {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true" if known else "false",
            "X-Consul-LastContact": str(max(0, int(last_contact * 1000))),
            "X-Consul-Effective-Consistency": "stale" if opts.stale else "leader",
        }

    def _json(self, request: web.Request, key: tuple[object, ...] | None, render: Callable[[], object],
              headers: Mapping[str, str], status: int = 200) -> web.Response:
        pretty = "pretty" in request.query
        body: bytes | None = None
        cache_key = (*key, pretty) if key is not None else None
        if cache_key is not None and self._cache_index == self._catalog.snapshot.index:
            body = self._cache.get(cache_key)
        if body is None:
            data = render()
            body = (json.dumps(data, indent=4) + "\n" if pretty else json.dumps(data, separators=(",", ":"))).encode()
            if cache_key is not None:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[cache_key] = body
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)

    async def _read(self, request: web.Request, key: str) -> tuple[Snapshot, QueryOptions, int]:
        """Parse the common options, run the blocking query if one is asked for, return what to render."""
        opts = parse_query_options(request.query, self._datacenter)
        self._filter(request)  # a bad filter is refused at once, not after the wait
        if opts.index is not None and opts.index > 0:
            await self._block(opts, key)
        return self._catalog.snapshot, opts, self._tracker.view_index(key)

    @staticmethod
    def _filter(request: web.Request) -> tuple[str, Predicate | None]:
        text = request.query.get("filter", "")
        if not text.strip():
            return "", None
        try:
            return text, parse_filter(text)
        except FilterError as exc:
            raise ConsulError(400, f"Failed to create boolean expression evaluator: {exc}") from None

    async def _block(self, opts: QueryOptions, key: str) -> None:
        assert opts.index is not None
        tracker = self._tracker
        # An index above ours comes from an earlier epoch (a clock stepped back) or another node:
        # answer at once so the client resets, never park on a number that cannot come.
        if tracker.view_index(key) > opts.index or opts.index > tracker.consul(tracker.current):
            return
        if self._waiters.parked >= MAX_PARKED:
            raise ConsulError(429, f"Too many blocking queries ({MAX_PARKED} parked); retry later")
        closing = self._closing
        if closing is None or closing.done():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + blocking_timeout(opts.wait, self._rand)
        PARKED.inc()
        try:
            while tracker.view_index(key) <= opts.index and not closing.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._waiters.wait(key, remaining)
        finally:
            PARKED.dec()

    def _authorize(self, request: web.Request) -> None:
        """Writes need the API token: X-Consul-Token, ?token= or Authorization: Bearer (as Beacon's own writes)."""
        if self._token_digest is None:
            return
        given = request.headers.get("X-Consul-Token") or request.query.get("token")
        if not given:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            given = credential.strip() if scheme.lower() == "bearer" else ""
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        if not given or not hmac.compare_digest(digest, self._token_digest):
            # Consul's ACL answer: clients such as py-consul raise their permission-denied error on it.
            raise ConsulError(403, "Permission denied: this write needs the API token "
                                   "(X-Consul-Token or Authorization: Bearer)")

    # ---------------------------------------------------------------- reads
    async def _catalog_services(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._catalog_services_inner, request)

    async def _catalog_services_inner(self, request: web.Request) -> web.StreamResponse:
        snap, opts, index = await self._read(request, "services")
        flt, predicate = self._filter(request)
        return self._json(request, ("services", flt, snap.index),
                          lambda: catalog_services_view(snap, self._ctx, predicate),
                          self._headers(index, opts))

    async def _catalog_service(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._catalog_service_inner, request)

    async def _catalog_service_inner(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        tags = tuple(request.query.getall("tag", ()))
        snap, opts, index = await self._read(request, "svc:" + name)
        flt, predicate = self._filter(request)
        return self._json(request, ("catalog", name, tags, flt, snap.index),
                          lambda: apply_filter(catalog_service_view(self._ctx, snap, name, tags), predicate),
                          self._headers(index, opts))

    async def _health_service(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._health_service_inner, request)

    async def _health_service_inner(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        tags = tuple(request.query.getall("tag", ()))
        passing = parse_flag(request.query, "passing")
        snap, opts, index = await self._read(request, "svc:" + name)
        flt, predicate = self._filter(request)
        return self._json(request, ("health", name, tags, passing, flt, snap.index),
                          lambda: apply_filter(health_service_view(self._ctx, snap, name, tags, passing), predicate),
                          self._headers(index, opts))

    async def _catalog_nodes(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._catalog_nodes_inner, request)

    async def _catalog_nodes_inner(self, request: web.Request) -> web.StreamResponse:
        snap, opts, index = await self._read(request, "nodes")
        flt, predicate = self._filter(request)
        return self._json(request, ("nodes", flt, snap.index),
                          lambda: apply_filter(catalog_nodes_view(self._ctx, snap), predicate),
                          self._headers(index, opts))

    async def _catalog_node(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._catalog_node_inner, request)

    async def _catalog_node_inner(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        snap, opts, index = await self._read(request, "node:" + node)
        flt, predicate = self._filter(request)
        return self._json(request, ("node", node, flt, snap.index),
                          lambda: catalog_node_view(self._ctx, snap, node, predicate),
                          self._headers(index, opts))

    async def _datacenters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([self._datacenter])

    async def _agent_self(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(agent_self_view(self._ctx, api_address=self._api_address()))

    async def _agent_health(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        snap = self._catalog.snapshot
        code, status, entries = agent_health_view(self._ctx, snap, name)
        if code == 404:
            return web.Response(status=404, text=f"ServiceName {name} Not Found")
        text = request.query.get("format") == "text" or request.headers.get("Accept", "").startswith("text/plain")
        if text:
            return web.Response(status=code, text=status)
        return web.json_response(entries, status=code)

    async def _status_leader(self, request: web.Request) -> web.StreamResponse:
        known, _ = self._leader()
        return web.json_response(self._api_address() if known else "")

    async def _status_peers(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([self._api_address()])

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if any(route.handler == self._unknown for route in resource):
                continue
            _, methods = await resource.resolve(request)  # the methods of a resource whose path matches
            allowed |= methods
        if allowed:
            return web.Response(status=405, text=f"method {request.method} not allowed",
                                headers={"Allow": ", ".join(sorted(allowed))})
        return web.Response(
            status=404,
            text=f"Beacon does not serve {path}: its Consul-compatible API covers /v1/catalog/services, "
                 "/v1/catalog/service/<name>, /v1/catalog/nodes, /v1/catalog/node/<node>, /v1/health/service/<name>, "
                 "/v1/agent/self, /v1/agent/health/service/name/<name>, /v1/agent/service/register, "
                 "/v1/agent/service/deregister/<id>, /v1/status/leader (see beacon/api/CONSUL.md)",
        )

    # --------------------------------------------------------------- writes
    async def _register(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._register_inner, request)

    async def _register_inner(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        parse_query_options(request.query, self._datacenter)
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError) as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None
        local = node_address(self._ctx, self._catalog.snapshot, self._tracker.local_node)
        eid, beacon_body = registration_from_consul(body, default_address=local)
        try:
            endpoint = parse_registration(eid, beacon_body, node=self._manual.node)
            self._manual.register(endpoint)
        except RegistrationError as exc:
            raise ConsulError(400, f"Invalid service: {exc}") from None
        except Conflict as exc:
            raise ConsulError(409, str(exc)) from None
        self._catalog.publish()  # a read right after the write sees it
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.StreamResponse:
        return await self._guard(self._deregister_inner, request)

    async def _deregister_inner(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        parse_query_options(request.query, self._datacenter)
        eid = request.match_info["id"]
        try:
            self._manual.deregister(eid)
        except NotFound:
            raise ConsulError(404, f"Unknown service ID {eid!r}. Ensure that the service ID is passed, "
                                   "not the service name.") from None
        except Conflict as exc:
            raise ConsulError(409, str(exc)) from None
        self._catalog.publish()
        return web.Response(status=200)

    async def _check_verb(self, request: web.Request) -> web.StreamResponse:
        status = {"pass": "passing", "warn": "warning", "fail": "critical"}[request.match_info["verb"]]
        return await self._guard(lambda r: self._heartbeat(r, status, r.query.get("note", "")), request)

    async def _check_update(self, request: web.Request) -> web.StreamResponse:
        async def inner(r: web.Request) -> web.StreamResponse:
            raw = await r.read()
            try:
                body = _normal_keys(json.loads(raw)) if raw.strip() else {}
            except (ValueError, RecursionError, AttributeError) as exc:
                raise ConsulError(400, f"Request decode failed: {exc}") from None
            return await self._heartbeat(r, str(body.get("status", "passing")), str(body.get("output", "")))

        return await self._guard(inner, request)

    async def _heartbeat(self, request: web.Request, status: str, output: str) -> web.StreamResponse:
        """A TTL check update: Beacon's TTL check of instance `<id>` is Consul check `service:<id>`."""
        self._authorize(request)
        check_id = request.match_info["check_id"]
        if not check_id.startswith("service:"):
            raise ConsulError(404, f"Unknown check ID {check_id!r}: Beacon's TTL checks are named service:<service id>")
        eid = check_id.removeprefix("service:")
        try:
            state, text = parse_heartbeat({"status": status, "output": output})
            self._manual.heartbeat(eid, state, text)
        except RegistrationError as exc:
            raise ConsulError(400, str(exc)) from None
        except NotFound:
            raise ConsulError(404, f"Unknown check ID {check_id!r}") from None
        except Conflict as exc:
            raise ConsulError(400, str(exc)) from None
        self._catalog.publish()
        return web.Response(status=200)

    async def _guard(self, handler: Callable[[web.Request], Any], request: web.Request) -> web.StreamResponse:
        """Turn a ConsulError into Consul's plain-text error answer."""
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ConsulError as exc:
            return web.Response(status=exc.status, text=exc.message, headers=exc.headers)


__all__ = [
    "ConsulApi",
    "ConsulError",
    "IndexTracker",
    "ViewContext",
    "agent_health_view",
    "catalog_node_view",
    "catalog_nodes_view",
    "catalog_service_view",
    "catalog_services_view",
    "health_service_view",
    "parse_go_duration",
    "parse_query_options",
    "registration_from_consul",
    "store_leader",
]
