"""What crosses the pipe between the proxy's parent process and its workers.

Frames are `kind (1 byte) | length (4 bytes, big endian) | payload`:

  parent → worker   C  the Config (pickle: our own child, same code)
                    S  a snapshot: the endpoints and services changed since
                       the last one (JSON of the fields routing needs, and each
                       changed service's folded settings; the first is full)
                    Q  drain and exit
  worker → parent   R  ready: the worker is listening
                    M  its metrics (JSON), about once a second

Snapshots hold read-only mappings and carry more than the proxy reads, so
they get their own compact JSON form instead of pickle: one row per changed
endpoint (10,000 endpoints encode in ~16 ms whole; a one-endpoint change
costs microseconds, whatever the size of its service).
"""

from __future__ import annotations

import json
import struct
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

import immutables

from beacon.registry.model import (
    NO_SETTINGS,
    Balancing,
    Endpoint,
    RouteSpec,
    Service,
    ServiceSettings,
    Snapshot,
    SnapshotDelta,
    Source,
    State,
)

HEADER = struct.Struct(">cI")

_FIELDS = ("id", "service", "address", "port", "protocol", "state", "weight", "lb", "http_hosts",
           "http_path_prefix", "http_strip_prefix", "node", "locality", "http_expose")  # fmt: skip


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _row(ep: Endpoint) -> list[Any]:
    return [ep.id, ep.service, ep.address, ep.port, ep.protocol, ep.state.value, ep.weight, ep.lb, list(ep.http_hosts),
            ep.http_path_prefix, ep.http_strip_prefix, ep.node, ep.locality, ep.http_expose]  # fmt: skip


def _endpoint(row: list[Any]) -> Endpoint:
    values = dict(zip(_FIELDS, row, strict=True))
    return Endpoint(
        id=values["id"],
        service=values["service"],
        address=values["address"],
        port=int(values["port"]),
        protocol=str(values["protocol"]),
        source=Source("manual"),
        state=State(values["state"]),
        weight=int(values["weight"]),
        lb=values["lb"],
        http_hosts=tuple(values["http_hosts"]),
        http_path_prefix=values["http_path_prefix"],
        http_strip_prefix=bool(values["http_strip_prefix"]),
        node=str(values["node"]),  # cluster: node and locality for beacon.lb.locality
        locality=values["locality"],
        http_expose=values["http_expose"],
    )


def _settings_row(settings: ServiceSettings) -> list[Any]:
    # The catalog folds these once per change; sending them saves each worker a
    # fold over every endpoint of the service.
    b = settings.balancing
    return [settings.dns_ttl, None if b is None else [b.policy, b.sticky],
            [[list(r.hosts), r.path_prefix, r.strip_prefix] for r in settings.routes], settings.expose]  # fmt: skip


def _settings(row: list[Any]) -> ServiceSettings:
    ttl, balancing, routes, expose = row
    return ServiceSettings(
        dns_ttl=None if ttl is None else int(ttl),
        balancing=None if balancing is None else Balancing(balancing[0], bool(balancing[1])),
        routes=tuple(RouteSpec(tuple(h), p, bool(strip)) for h, p, strip in routes),
        expose=None if expose is None else bool(expose),
    )


class SnapshotEncoder:
    """Parent side: each snapshot as what changed since the last one encoded.

    `Snapshot.changed_since` names the services and endpoints (O(changed) for
    consecutive catalog snapshots), so a one-endpoint change sends one
    endpoint row and its service's settings, whatever the service's size.
    """

    def __init__(self) -> None:
        self._last: Snapshot | None = None

    def encode(self, snapshot: Snapshot, full: bool = False) -> bytes:
        last, self._last = self._last, snapshot
        services, endpoints = snapshot.services, snapshot.endpoints
        if full or last is None:
            full = True
            s_changed: Iterable[str] = services.keys()
            s_removed: Iterable[str] = ()
            e_changed: Iterable[str] = endpoints.keys()
            e_removed: Iterable[str] = ()
        else:
            delta = snapshot.changed_since(last)
            s_changed, s_removed = delta.services_changed, delta.services_removed
            e_changed, e_removed = delta.endpoints_changed, delta.endpoints_removed
        doc = {
            "index": snapshot.index,
            "full": full,
            "services": {name: _settings_row(services[name].settings) for name in s_changed if name in services},
            "removed": sorted(s_removed),
            "endpoints": [_row(endpoints[eid]) for eid in e_changed if eid in endpoints],
            "endpoints_removed": sorted(e_removed),
        }
        return json.dumps(doc, separators=(",", ":")).encode()


class SnapshotDecoder:
    """Worker side: applies deltas in O(changed) and returns each snapshot
    `followed_by` the one before with the delta it applied, so the worker's
    own `changed_since` (router, balancer) is O(changed) too.

    Keeps unchanged Service objects; a changed one is rebuilt from its sorted
    endpoint list (a bisect and one tuple copy, as the catalog does)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._services: immutables.Map[str, Service] = immutables.Map()
        self._endpoints: immutables.Map[str, Endpoint] = immutables.Map()
        self._ids: dict[str, list[str]] = {}  # per service, sorted
        self._members: dict[str, list[Endpoint]] = {}  # per service, in `_ids` order
        self._settings: dict[str, ServiceSettings] = {}
        self._last: Snapshot | None = None

    def decode(self, data: bytes) -> Snapshot:
        doc: dict[str, Any] = json.loads(data)
        full = bool(doc["full"])
        if full:
            self._reset()
        services, endpoints = self._services.mutate(), self._endpoints.mutate()
        touched: set[str] = set()
        e_removed: set[str] = set()
        e_changed: set[str] = set()
        for eid in doc["endpoints_removed"]:
            old = endpoints.get(eid)
            if old is not None:
                del endpoints[eid]
                self._take_out(old)
                touched.add(old.service)
                e_removed.add(eid)
        for row in doc["endpoints"]:
            ep = _endpoint(row)
            old = endpoints.get(ep.id)
            if old is not None and old.service == ep.service:
                ids = self._ids[ep.service]
                self._members[ep.service][bisect_left(ids, ep.id)] = ep
            else:
                if old is not None:  # moved to another service
                    self._take_out(old)
                    touched.add(old.service)
                ids = self._ids.setdefault(ep.service, [])
                i = bisect_left(ids, ep.id)
                ids.insert(i, ep.id)
                self._members.setdefault(ep.service, []).insert(i, ep)
            endpoints[ep.id] = ep
            touched.add(ep.service)
            e_changed.add(ep.id)
        for name, settings in doc["services"].items():
            self._settings[name] = _settings(settings)
            touched.add(name)
        s_removed: set[str] = set()
        gone = set(doc["removed"])
        touched |= gone
        s_changed: set[str] = set()
        for name in touched:
            members = self._members.get(name)
            if name in gone or (not members and name not in doc["services"]):
                self._ids.pop(name, None)
                self._members.pop(name, None)
                self._settings.pop(name, None)
                if services.get(name) is not None:
                    del services[name]
                    s_removed.add(name)
                continue
            settings = self._settings.get(name)
            services[name] = Service(name=name, endpoints=tuple(members or ()), settings=settings or NO_SETTINGS)
            s_changed.add(name)
        snapshot_services, snapshot_endpoints = services.finish(), endpoints.finish()
        self._services, self._endpoints = snapshot_services, snapshot_endpoints
        index = int(doc["index"])
        last = self._last
        if last is None or full:
            snapshot = Snapshot(index=index, services=snapshot_services, endpoints=snapshot_endpoints)
        else:
            delta = SnapshotDelta(frozenset(s_changed), frozenset(s_removed), frozenset(e_changed), frozenset(e_removed))
            snapshot = last.followed_by(index, snapshot_services, snapshot_endpoints, delta)
        self._last = snapshot
        return snapshot

    def _take_out(self, old: Endpoint) -> None:
        ids = self._ids.get(old.service)
        if ids is None:
            return
        i = bisect_left(ids, old.id)
        if i < len(ids) and ids[i] == old.id:
            del ids[i]
            del self._members[old.service][i]


def snapshot_to_wire(snapshot: Snapshot) -> bytes:
    """A whole snapshot in one frame."""
    return SnapshotEncoder().encode(snapshot, full=True)


def snapshot_from_wire(data: bytes) -> Snapshot:
    return SnapshotDecoder().decode(data)
