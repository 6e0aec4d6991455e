"""How an endpoint is written to the shared store, and read back (pure).

The wire form is JSON. It carries what consumers on other nodes need: the
effective state (the node's own check result folded in), a trimmed check
status (state, output, last change - not `last_checked` nor the counters,
so a check that keeps passing writes nothing), and the routing settings
(`beacon.lb`, `beacon.http.*`, DNS TTL). The check and autoheal specs are only
written in the durable form of manual registrations (`full=True`): a remote
endpoint is never checked or healed by another node.

Everything read back is hostile: `endpoint_from_wire` checks every type and
bound and raises ValueError naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from beacon.registry.model import CheckSpec, CheckStatus, Endpoint, Source, State

MAX_VALUE = 64 * 1024  # bytes of one endpoint record
_MAX_STR = 4096
_MAX_LIST = 64


def endpoint_to_wire(ep: Endpoint, *, full: bool = False) -> bytes:
    out: dict[str, Any] = {
        "id": ep.id,
        "service": ep.service,
        "address": ep.address,
        "port": ep.port,
        "protocol": ep.protocol,
        "state": ep.state.value,
        "weight": ep.weight,
        "tags": list(ep.tags),
        "meta": dict(ep.meta),
        "source": ep.source.to_json(),
    }
    for name in ("dns_ttl", "lb", "http_path_prefix"):
        if (value := getattr(ep, name)) is not None:
            out[name] = value
    if ep.http_hosts:
        out["http_hosts"] = list(ep.http_hosts)
    if ep.http_strip_prefix:
        out["http_strip_prefix"] = True
    if ep.check_status is not None and not full:
        cs = ep.check_status
        out["check_status"] = {"state": cs.state.value, "output": cs.output, "last_change": cs.last_change}
    if full and ep.check is not None:
        c = ep.check
        out["check"] = {
            "kind": c.kind, "path": c.path, "method": c.method, "status_min": c.status_min,
            "status_max": c.status_max, "interval": c.interval, "timeout": c.timeout, "rise": c.rise,
            "fall": c.fall, "ttl": c.ttl,
        }
    return json.dumps(out, separators=(",", ":"), sort_keys=True).encode()


def _get(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in d:
        if default is ...:
            raise ValueError(f"{name} is missing")
        return default
    value = d[name]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"{name} has the wrong type")
    if not isinstance(value, kind):
        raise ValueError(f"{name} has the wrong type")
    if isinstance(value, str) and len(value) > _MAX_STR:
        raise ValueError(f"{name} is too long")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} is not finite")
    return value


def _strings(d: Mapping[str, Any], name: str) -> tuple[str, ...]:
    items = _get(d, name, list, [])
    if len(items) > _MAX_LIST or not all(isinstance(i, str) and len(i) <= 255 for i in items):
        raise ValueError(f"{name} must be a list of at most {_MAX_LIST} short strings")
    return tuple(items)


def _int(d: Mapping[str, Any], name: str, low: int, high: int, default: Any = ...) -> Any:
    value = _get(d, name, int, default)
    if value is None:
        return None
    if not low <= value <= high:
        raise ValueError(f"{name} out of range")
    return int(value)


def endpoint_from_wire(raw: bytes, *, node: str) -> Endpoint:
    """Decode one record; `node` comes from the key (a node cannot speak for another)."""
    if len(raw) > MAX_VALUE:
        raise ValueError(f"record larger than {MAX_VALUE} bytes")
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("record is not JSON") from None
    if not isinstance(d, dict):
        raise ValueError("record is not an object")
    src = _get(d, "source", dict)
    kind = _get(src, "kind", str)
    if kind not in ("container", "manual"):
        raise ValueError("source.kind must be container or manual")
    source = Source(kind, _get(src, "container_id", str, None), _get(src, "container_name", str, None))
    meta = _get(d, "meta", dict, {})
    if len(meta) > _MAX_LIST or not all(isinstance(v, str) and len(v) <= _MAX_STR for v in meta.values()):
        raise ValueError("meta must map at most 64 keys to strings")
    status: CheckStatus | None = None
    if (cs := _get(d, "check_status", dict, None)) is not None:
        status = CheckStatus(
            state=State(_get(cs, "state", str)),
            output=_get(cs, "output", str, ""),
            last_change=float(_get(cs, "last_change", (int, float), 0.0)),
        )
    check: CheckSpec | None = None
    if (c := _get(d, "check", dict, None)) is not None:
        ck = _get(c, "kind", str)
        if ck not in ("http", "tcp", "ttl"):
            raise ValueError("check.kind must be http, tcp or ttl")
        check = CheckSpec(
            kind=ck,
            path=_get(c, "path", str, "/"),
            method=_get(c, "method", str, "GET"),
            status_min=_int(c, "status_min", 100, 599, 200),
            status_max=_int(c, "status_max", 100, 599, 399),
            interval=float(_get(c, "interval", (int, float), 5.0)),
            timeout=float(_get(c, "timeout", (int, float), 2.0)),
            rise=_int(c, "rise", 1, 1000, 1),
            fall=_int(c, "fall", 1, 1000, 1),
            ttl=float(_get(c, "ttl", (int, float), 0.0)),
        )
    protocol = _get(d, "protocol", str, "tcp")
    if protocol not in ("tcp", "udp"):
        raise ValueError("protocol must be tcp or udp")
    try:
        state = State(_get(d, "state", str, "passing"))
    except ValueError:
        raise ValueError("state is not a known state") from None
    return Endpoint(
        id=_get(d, "id", str),
        service=_get(d, "service", str),
        address=_get(d, "address", str),
        port=_int(d, "port", 0, 65535),
        source=source,
        node=node,
        protocol=protocol,
        state=state,
        weight=_int(d, "weight", 0, 1_000_000, 1),
        tags=_strings(d, "tags"),
        meta=MappingProxyType(dict(sorted(meta.items()))),
        dns_ttl=_int(d, "dns_ttl", 0, 2**31 - 1, None),
        lb=_get(d, "lb", str, None),
        http_hosts=_strings(d, "http_hosts"),
        http_path_prefix=_get(d, "http_path_prefix", str, None),
        http_strip_prefix=bool(_get(d, "http_strip_prefix", bool, False)),
        check=check,
        check_status=status,
    )
