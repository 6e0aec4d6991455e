"""What crosses the pipe between the proxy's parent process and its workers.

Frames are `kind (1 byte) | length (4 bytes, big endian) | payload`:

  parent → worker   C  the Config (pickle: our own child, same code)
                    S  a snapshot, as JSON of the fields routing needs
                    Q  drain and exit
  worker → parent   R  ready: the worker is listening
                    M  its metrics (JSON), about once a second

Snapshots hold read-only mappings and carry more than the proxy reads, so
they get their own compact JSON form instead of pickle: one row per endpoint.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from beacon.registry.model import Endpoint, Service, Snapshot, Source, State

HEADER = struct.Struct(">cI")

_FIELDS = ("id", "service", "address", "port", "state", "weight", "lb", "http_hosts",
           "http_path_prefix", "http_strip_prefix")  # fmt: skip


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def snapshot_to_wire(snapshot: Snapshot) -> bytes:
    rows = [
        [ep.id, ep.service, ep.address, ep.port, ep.state.value, ep.weight, ep.lb, list(ep.http_hosts),
         ep.http_path_prefix, ep.http_strip_prefix]
        for ep in snapshot.endpoints.values()
    ]  # fmt: skip
    return json.dumps({"index": snapshot.index, "endpoints": rows}, separators=(",", ":")).encode()


def snapshot_from_wire(data: bytes) -> Snapshot:
    from types import MappingProxyType

    doc: dict[str, Any] = json.loads(data)
    endpoints: dict[str, Endpoint] = {}
    members: dict[str, list[Endpoint]] = {}
    for row in doc["endpoints"]:
        values = dict(zip(_FIELDS, row, strict=True))
        ep = Endpoint(
            id=values["id"],
            service=values["service"],
            address=values["address"],
            port=int(values["port"]),
            source=Source("manual"),
            state=State(values["state"]),
            weight=int(values["weight"]),
            lb=values["lb"],
            http_hosts=tuple(values["http_hosts"]),
            http_path_prefix=values["http_path_prefix"],
            http_strip_prefix=bool(values["http_strip_prefix"]),
        )
        endpoints[ep.id] = ep
        members.setdefault(ep.service, []).append(ep)
    services = {
        name: Service(name=name, endpoints=tuple(sorted(eps, key=lambda e: e.id)))
        for name, eps in members.items()
    }
    return Snapshot(
        index=int(doc["index"]),
        services=MappingProxyType(services),
        endpoints=MappingProxyType(endpoints),
    )
