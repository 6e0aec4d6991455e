"""The aiohttp side of the Consul-compatible API: `ConsulApi`, an extension of Beacon's API server.

It follows the catalog's snapshots (indexes, wake-ups), runs blocking queries, renders the
views (cached per snapshot) and maps Consul's writes onto manual registrations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import Gauge

from beacon.api.consul.errors import ConsulError
from beacon.api.consul.filters import FilterError, Predicate, apply_filter, parse_filter
from beacon.api.consul.indexes import IndexTracker
from beacon.api.consul.query import QueryOptions, blocking_timeout, parse_flag, parse_query_options
from beacon.api.consul.registration import normal_keys, registration_from_consul
from beacon.api.consul.views import (
    DATACENTER,
    ViewContext,
    agent_health_view,
    agent_self_view,
    catalog_node_view,
    catalog_nodes_view,
    catalog_service_view,
    catalog_services_view,
    health_service_view,
    node_address,
)
from beacon.api.waiters import Waiters
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
from beacon.registry.model import Snapshot

MAX_PARKED = 20_000  # blocking queries parked at once; beyond that a 429 (Consul: too many connections)
CACHE_ENTRIES = 512  # rendered bodies kept for the current snapshot

PARKED = Gauge("beacon_registry_api_consul_blocking_queries", "Consul-compatible blocking queries waiting for a change")


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
        self._waiters = Waiters()  # closed until start(): a query answers at once
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
        self._waiters.open()
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
        self._waiters.close()

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
        if self._waiters.closed:
            return
        index = opts.index
        PARKED.inc()
        try:
            await self._waiters.until(key, lambda: tracker.view_index(key) > index, blocking_timeout(opts.wait, self._rand))
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
                body = normal_keys(json.loads(raw)) if raw.strip() else {}
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

