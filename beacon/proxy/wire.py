"""What crosses the pipe between the proxy's parent process and its workers.

Frames are `kind (1 byte) | length (4 bytes, big endian) | payload`:

  parent → worker   C  the Config (pickle: our own child, same code)
                    S  a snapshot: the services changed since the last one
                       (JSON of the fields routing needs; the first is full)
                    Q  drain and exit
  worker → parent   R  ready: the worker is listening
                    M  its metrics (JSON), about once a second

Snapshots hold read-only mappings and carry more than the proxy reads, so
they get their own compact JSON form instead of pickle: one row per endpoint,
and only for services whose Service object changed (10,000 endpoints encode
in ~16 ms whole; a one-endpoint change costs microseconds).
"""

from __future__ import annotations

import json
import struct
from types import MappingProxyType
from typing import Any

from beacon.registry.model import Endpoint, Service, Snapshot, Source, State

HEADER = struct.Struct(">cI")

_FIELDS = ("id", "service", "address", "port", "protocol", "state", "weight", "lb", "http_hosts",
           "http_path_prefix", "http_strip_prefix", "node", "locality")  # fmt: skip


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _rows(service: Service) -> list[list[Any]]:
    return [
        [ep.id, ep.service, ep.address, ep.port, ep.protocol, ep.state.value, ep.weight, ep.lb, list(ep.http_hosts),
         ep.http_path_prefix, ep.http_strip_prefix, ep.node, ep.locality]
        for ep in service.endpoints
    ]  # fmt: skip


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
    )


class SnapshotEncoder:
    """Parent side: each snapshot as the services that changed since the last one.

    The catalog reuses unchanged Service objects, so one identity check per
    service finds the delta; a change of one endpoint sends one service.
    """

    def __init__(self) -> None:
        self._sent: dict[str, Service] = {}

    def encode(self, snapshot: Snapshot, full: bool = False) -> bytes:
        services = snapshot.services
        sent = {} if full else self._sent
        changed = {name: _rows(svc) for name, svc in services.items() if sent.get(name) is not svc}
        removed = [name for name in sent if name not in services]
        self._sent = dict(services)
        doc = {"index": snapshot.index, "full": full, "services": changed, "removed": removed}
        return json.dumps(doc, separators=(",", ":")).encode()


class SnapshotDecoder:
    """Worker side: applies deltas, keeping unchanged Service objects (so the
    worker's own apply stays incremental too)."""

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        self._endpoints: dict[str, Endpoint] = {}

    def decode(self, data: bytes) -> Snapshot:
        doc: dict[str, Any] = json.loads(data)
        if doc["full"]:
            self._services.clear()
            self._endpoints.clear()
        changed: dict[str, list[list[Any]]] = doc["services"]
        # Take out every old version first: an endpoint may move between services.
        for name in [*doc["removed"], *changed]:
            old = self._services.pop(name, None)
            if old is not None:
                for ep in old.endpoints:
                    if self._endpoints.get(ep.id) is ep:
                        del self._endpoints[ep.id]
        for name, rows in changed.items():
            eps = tuple(sorted((_endpoint(r) for r in rows), key=lambda e: e.id))
            self._services[name] = Service(name=name, endpoints=eps)
            for ep in eps:
                self._endpoints[ep.id] = ep
        return Snapshot(
            index=int(doc["index"]),
            services=MappingProxyType(dict(self._services)),
            endpoints=MappingProxyType(dict(self._endpoints)),
        )


def snapshot_to_wire(snapshot: Snapshot) -> bytes:
    """A whole snapshot in one frame."""
    return SnapshotEncoder().encode(snapshot, full=True)


def snapshot_from_wire(data: bytes) -> Snapshot:
    return SnapshotDecoder().decode(data)
