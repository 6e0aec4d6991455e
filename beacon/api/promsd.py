"""Prometheus HTTP service discovery: `GET /v1/prometheus/targets` in `http_sd_configs` format.

The answer is `[{"targets": ["host:port"], "labels": {...}}, ...]`. Prometheus's
format carries labels per group, not per target, so each endpoint is its own
group (ordered by service, then endpoint id): that is what lets every target
carry its own node, state and container labels. Every label is
`__meta_beacon_*`, so Prometheus drops them after relabelling unless a rule
keeps them (see CONSUL.md for a relabelling example that scrapes only
services labelled `beacon.meta.metrics_port`).

Only passing endpoints by default (what should be scraped); `?state=any` or a
list such as `?state=passing,warning` asks for more; `?service=NAME` limits the
answer to one service.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from beacon.registry.catalog import Catalog
from beacon.registry.model import Endpoint, Snapshot, State

PREFIX = "__meta_beacon_"
_LABEL_CHAR = re.compile(r"[^a-zA-Z0-9_]")
CACHE_ENTRIES = 64


def sanitize_label(name: str) -> str:
    """A Prometheus label name from any key: invalid characters become '_' (as Prometheus's own SDs do)."""
    out = _LABEL_CHAR.sub("_", name)
    return out if out and not out[0].isdigit() else "_" + out


def host_port(address: str, port: int | str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def endpoint_labels(ep: Endpoint) -> dict[str, str]:
    labels = {
        PREFIX + "service": ep.service,
        PREFIX + "endpoint_id": ep.id,
        PREFIX + "node": ep.node,
        PREFIX + "address": ep.address,
        PREFIX + "port": str(ep.port),
        PREFIX + "protocol": ep.protocol,
        PREFIX + "state": ep.state.value,
        PREFIX + "weight": str(ep.weight),
        # Surrounded by the separator (as Prometheus's Consul SD does), so `.*,web,.*` matches any position.
        PREFIX + "tags": "," + ",".join(ep.tags) + "," if ep.tags else "",
        PREFIX + "source": ep.source.kind,
    }
    if ep.source.container_name is not None:
        labels[PREFIX + "container_name"] = ep.source.container_name
    if ep.source.container_id is not None:
        labels[PREFIX + "container_id"] = ep.source.container_id
    for key, value in ep.meta.items():
        labels[PREFIX + "meta_" + sanitize_label(key)] = value
    metrics_port = ep.meta.get("metrics_port", "")
    if metrics_port.isascii() and metrics_port.isdigit() and 0 < int(metrics_port) < 65536:
        # Ready for `target_label: __address__`: the endpoint's address with the metrics port.
        labels[PREFIX + "metrics_address"] = host_port(ep.address, int(metrics_port))
    return labels


def target_groups(snap: Snapshot, states: frozenset[State] | None, service: str | None = None) -> list[dict[str, Any]]:
    """The snapshot as http_sd target groups: one per endpoint in `states` (None: every state)."""
    names: Iterable[str] = (service,) if service is not None else sorted(snap.services)
    groups = []
    for name in names:
        svc = snap.services.get(name)
        for ep in svc.endpoints if svc is not None else ():
            if states is not None and ep.state not in states:
                continue
            groups.append({"targets": [host_port(ep.address, ep.port)], "labels": endpoint_labels(ep)})
    return groups


def parse_state_filter(raw: str | None) -> frozenset[State] | None:
    """`?state=`: absent → passing only; `any` → all; else a comma-separated list of states."""
    if raw is None or raw.strip() == "":
        return frozenset({State.PASSING})
    if raw.strip().lower() == "any":
        return None
    states = set()
    for part in raw.split(","):
        try:
            states.add(State(part.strip().lower()))
        except ValueError:
            allowed = ", ".join(s.value for s in State)
            raise ValueError(f"state must be any, or one or more of {allowed} (got {part[:40]!r})") from None
    return frozenset(states)


class PrometheusSd:
    """`GET /v1/prometheus/targets`; bodies cached per snapshot (Prometheus polls every refresh_interval)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._cache: dict[tuple[object, ...], bytes] = {}
        self._cache_index = -1

    def install(self, app: web.Application) -> None:
        app.router.add_get("/v1/prometheus/targets", self._targets)

    async def start(self) -> None:
        """Nothing to follow: each request renders the current snapshot (cached per snapshot)."""

    async def stop(self) -> None:
        self._cache.clear()

    async def _targets(self, request: web.Request) -> web.StreamResponse:
        try:
            states = parse_state_filter(request.query.get("state"))
        except ValueError as exc:
            return web.json_response({"error": str(exc), "field": "state"}, status=400)
        service = request.query.get("service") or None
        snap = self._catalog.snapshot
        if self._cache_index != snap.index:
            self._cache.clear()
            self._cache_index = snap.index
        key = (states, service)
        body = self._cache.get(key)
        if body is None:
            body = json.dumps(target_groups(snap, states, service), separators=(",", ":")).encode()
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = body
        return web.Response(body=body, content_type="application/json", headers={"X-Beacon-Index": str(snap.index)})


__all__ = ["PrometheusSd", "endpoint_labels", "parse_state_filter", "target_groups"]
