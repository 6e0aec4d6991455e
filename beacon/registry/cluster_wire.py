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

from beacon.registry.model import EMPTY_MAP, CheckSpec, CheckStatus, Endpoint, Source, State

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
    for name in ("dns_ttl", "lb", "http_path_prefix", "locality"):
        if (value := getattr(ep, name)) is not None:
            out[name] = value
    if ep.http_hosts:
        out["http_hosts"] = list(ep.http_hosts)
    if ep.http_strip_prefix:
        out["http_strip_prefix"] = True
    if ep.http_expose is not None:
        out["http_expose"] = ep.http_expose
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


_MISSING: Any = object()


# Hot path (a fresh agent decodes every endpoint of the cluster): exact type
# checks (`type(v) is str`) rather than isinstance, so a JSON true is never an int.
def _str(d: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    value = d.get(name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"{name} is missing")
        return default
    if type(value) is not str or len(value) > _MAX_STR:
        raise ValueError(f"{name} must be a string of at most {_MAX_STR} characters")
    return value


def _int(d: Mapping[str, Any], name: str, low: int, high: int, default: Any = _MISSING) -> Any:
    value = d.get(name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"{name} is missing")
        return default
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]")
    return value


def _num(d: Mapping[str, Any], name: str, default: float) -> float:
    value = d.get(name, default)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def _obj(d: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    value = d.get(name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"{name} is missing")
        return default
    if type(value) is not dict:
        raise ValueError(f"{name} must be an object")
    return value


def _strings(d: Mapping[str, Any], name: str) -> tuple[str, ...]:
    items = d.get(name)
    if items is None:
        return ()
    if type(items) is not list or len(items) > _MAX_LIST or not all(
        type(i) is str and len(i) <= 255 for i in items
    ):
        raise ValueError(f"{name} must be a list of at most {_MAX_LIST} short strings")
    return tuple(items)


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
    src = _obj(d, "source")
    kind = _str(src, "kind")
    if kind not in ("container", "manual"):
        raise ValueError("source.kind must be container or manual")
    source = Source(kind, _str(src, "container_id", None), _str(src, "container_name", None))
    meta = _obj(d, "meta", {})
    if len(meta) > _MAX_LIST or not all(type(v) is str and len(v) <= _MAX_STR for v in meta.values()):
        raise ValueError("meta must map at most 64 keys to strings")
    status: CheckStatus | None = None
    if (cs := _obj(d, "check_status", None)) is not None:
        status = CheckStatus(
            state=State(_str(cs, "state")),
            output=_str(cs, "output", ""),
            last_change=_num(cs, "last_change", 0.0),
        )
    check: CheckSpec | None = None
    if (c := _obj(d, "check", None)) is not None:
        ck = _str(c, "kind")
        if ck not in ("http", "tcp", "ttl"):
            raise ValueError("check.kind must be http, tcp or ttl")
        check = CheckSpec(
            kind=ck,
            path=_str(c, "path", "/"),
            method=_str(c, "method", "GET"),
            status_min=_int(c, "status_min", 100, 599, 200),
            status_max=_int(c, "status_max", 100, 599, 399),
            interval=_num(c, "interval", 5.0),
            timeout=_num(c, "timeout", 2.0),
            rise=_int(c, "rise", 1, 1000, 1),
            fall=_int(c, "fall", 1, 1000, 1),
            ttl=_num(c, "ttl", 0.0),
        )
    protocol = _str(d, "protocol", "tcp")
    if protocol not in ("tcp", "udp"):
        raise ValueError("protocol must be tcp or udp")
    try:
        state = State(_str(d, "state", "passing"))
    except ValueError:
        raise ValueError("state is not a known state") from None
    return Endpoint(
        id=_str(d, "id"),
        service=_str(d, "service"),
        address=_str(d, "address"),
        port=_int(d, "port", 0, 65535),
        source=source,
        node=node,
        protocol=protocol,
        state=state,
        weight=_int(d, "weight", 0, 1_000_000, 1),
        tags=_strings(d, "tags"),
        meta=MappingProxyType(dict(sorted(meta.items()))) if meta else EMPTY_MAP,
        dns_ttl=_int(d, "dns_ttl", 0, 2**31 - 1, None),
        lb=_str(d, "lb", None),
        locality=_str(d, "locality", None),
        http_hosts=_strings(d, "http_hosts"),
        http_path_prefix=_str(d, "http_path_prefix", None),
        http_strip_prefix=d.get("http_strip_prefix") is True,
        http_expose=d["http_expose"] if isinstance(d.get("http_expose"), bool) else None,
        check=check,
        check_status=status,
    )
