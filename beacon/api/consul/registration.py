"""Consul service registrations (PUT /v1/agent/service/register) → Beacon manual registrations (pure).

What Beacon cannot honour (Connect kinds, script/gRPC/... checks, several checks) is refused
with Consul-style text rather than silently dropped.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

from beacon.api.consul.errors import ConsulError


def normal_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
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
    reg = normal_keys(body)
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
        passing = normal_keys(weights).get("passing")
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
    chk = normal_keys(raw)
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

