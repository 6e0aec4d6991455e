"""The REST API server: catalog reads with blocking queries, the watch stream,
manual registrations, Beacon's own health and metrics, and the route sets
other modules mount (`extensions`).

Reads render the current immutable snapshot, so no response sees a
half-updated catalog. Every read carries the snapshot index in
`X-Beacon-Index`; passing it back as `?index=` turns the read into a blocking
query (`blocking.py`).

Errors are always JSON `{"error": ..., "field": ...}`; the error middleware
turns aiohttp's own 404/405/413 into that shape and logs anything unexpected
as a JSON 500 - for every route, mounted ones included. A rejected write
changes nothing: validation happens before any catalog write.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import Counter

from beacon import __version__
from beacon.api.blocking import ANY, Blocker, WatcherSlots, service_key
from beacon.api.openapi import openapi_document
from beacon.api.responses import (
    INDEX_HEADER,
    MAX_BODY,
    ApiError,
    error_response,
    json_response,
    jsonable,
    parse_json_body,
)
from beacon.api.status import Connections
from beacon.api.traffic import TrafficWindow, no_traffic
from beacon.api.watch import WatchStreams
from beacon.config import Config
from beacon.grammar import HostPort
from beacon.metrics import SNAPSHOT_COLLECTOR, exposition
from beacon.registry import Catalog, Endpoint, ManualRegistry, Snapshot, State
from beacon.registry.manual import (
    NotFound,
    RegistrationConflict,
    RegistrationError,
    parse_heartbeat,
    parse_registration,
    validate_service_name,
)

log = logging.getLogger("beacon.api")

API_REQUESTS = Counter(
    "beacon_registry_api_requests",
    "REST API requests by route, method and response status",
    ["route", "method", "status"],
)


# --------------------------------------------------------------- pure parts
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Is a Host header one the API answers writes on? localhost, any IP literal
    (an address cannot be rebound), or a name in `allowed` ('*' allows all;
    '*.example.com' any name below example.com)."""
    if "*" in allowed:
        return True
    host = host_header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if host == "localhost" or host in allowed:
        return True
    return any(a.startswith("*.") and host.endswith(a[1:]) for a in allowed)


def parse_states(raw: str | None) -> frozenset[State] | None:
    if raw is None or raw == "":
        return None
    states = set()
    for part in raw.split(","):
        try:
            states.add(State(part.strip().lower()))
        except ValueError:
            allowed = ", ".join(s.value for s in State)
            raise ApiError(400, f"state must be one or more of {allowed} (got {part!r})", "state") from None
    return frozenset(states)


def filter_endpoints(
    snap: Snapshot, service: str | None, tag: str | None, states: frozenset[State] | None
) -> list[Endpoint]:
    if service is not None:
        svc = snap.services.get(service)
        candidates: Iterable[Endpoint] = svc.endpoints if svc is not None else ()
    else:
        candidates = (e for name in sorted(snap.services) for e in snap.services[name].endpoints)
    return [
        e
        for e in candidates
        if (tag is None or tag in e.tags) and (states is None or e.state in states)
    ]


# ------------------------------------------------------------ extensions
class ApiExtension(Protocol):
    """A set of routes another module mounts on the API (the Consul-compatible
    view, Prometheus SD, the UI): `install` adds its routes to the aiohttp app
    (they get the same middleware: JSON errors, request metrics, body limit);
    `start`/`stop` run inside the API's own start/stop."""

    def install(self, app: web.Application) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# ------------------------------------------------------------------ server
class ApiServer:
    """aiohttp application on `config.api_listen`; `address` is the bound address after start.

    `extensions` are mounted after Beacon's own routes (app.py passes them).
    """

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        manual: ManualRegistry,
        docker: object | None,
        health: object | None,
        routes: Callable[[], Mapping[str, object]] | None = None,
        heartbeat_interval: float = 15.0,
        extensions: Iterable[ApiExtension] = (),  # mounted after Beacon's own routes (Consul API, Prometheus SD)
        nodes: Callable[[], Mapping[str, object]] | None = None,  # the cluster source's node table
        store: object | None = None,  # the cluster store (its `connected` goes into /healthz)
        traffic: TrafficWindow | None = None,  # the proxy's per-service figures (/v1/traffic)
        started: Callable[[], bool] | None = None,  # every component is up (else /healthz says starting)
    ) -> None:
        self._extensions = list(extensions)
        self._config = config
        self._catalog = catalog
        self._manual = manual
        self._docker = docker
        self._health = health
        self._routes = routes  # the proxy's routing table, as JSON (routes and conflicts)
        listen_host = config.api_listen.host.lower()
        self._allowed_hosts = frozenset((*config.api_allowed_hosts, listen_host))
        self._nodes = nodes
        self._store = store
        self._started = started or (lambda: True)
        self._traffic = traffic if traffic is not None else TrafficWindow(no_traffic, ())
        # surrogateescape: a token read from argv/env with non-UTF-8 bytes stays those bytes.
        token = config.api_token.encode("utf-8", "surrogateescape")
        self._token_digest = hashlib.sha256(token).digest() if config.api_token else None
        self._blocker = Blocker(catalog, WatcherSlots(config.api_max_watchers))
        self._watch = WatchStreams(catalog, self._blocker, heartbeat_interval, write_timeout=config.api_watch_write_timeout)
        self._runner: web.AppRunner | None = None
        self.address: HostPort | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------ lifecycle
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/v1/services", self._services)
        r.add_get("/v1/services/{name}", self._service)
        r.add_get("/v1/endpoints", self._endpoints)
        r.add_get("/v1/endpoints/{id}", self._endpoint)
        r.add_put("/v1/endpoints/{id}", self._register)
        r.add_delete("/v1/endpoints/{id}", self._deregister)
        r.add_put("/v1/endpoints/{id}/heartbeat", self._heartbeat_handler)
        r.add_get("/v1/watch", self._watch.handle)
        r.add_get("/v1/autoheal", self._autoheal)
        r.add_get("/v1/routes", self._routes_table)
        r.add_get("/v1/nodes", self._nodes_table)
        r.add_get("/v1/traffic", self._traffic_figures)
        r.add_get("/v1/openapi.json", self._openapi)
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        for extension in self._extensions:
            extension.install(app)
        return app

    async def start(self) -> None:
        self._blocker.start()
        SNAPSHOT_COLLECTOR.attach(self._current_snapshot)
        for extension in self._extensions:
            await extension.start()
        # handler_cancellation: a client that hangs up stops its blocking query.
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=min(5.0, self._config.shutdown_timeout),
        )
        await runner.setup()
        listen = self._config.api_listen
        try:
            site = web.TCPSite(runner, listen.host, listen.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            self._detach()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.address = HostPort(host, port)
        log.info("listening: api on %s", self.address)

    async def stop(self) -> None:
        # Wake blocking queries and watch streams so they end now, not at their timeout.
        self._blocker.stop()
        for extension in self._extensions:
            await extension.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("stopped: api on %s", self.address)
        self._detach()

    @property
    def open_connections(self) -> int:
        """HTTP connections the API holds open now (aiohttp's live request handlers)."""
        runner = self._runner
        return len(runner.server.connections) if runner is not None and runner.server is not None else 0

    def _current_snapshot(self) -> Snapshot:
        return self._catalog.snapshot

    def _detach(self) -> None:
        SNAPSHOT_COLLECTOR.detach(self._current_snapshot)
        self._blocker.stop()

    async def _block(self, request: web.Request, key: str) -> Snapshot:
        return await self._blocker.block(request, key)

    # ---------------------------------------------------------- middleware
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            if request.method not in _SAFE_METHODS:
                self._check_host(request)
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.field, exc.headers)
        except web.HTTPException as exc:
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            message = {
                404: f"no route {request.path}",
                405: f"method {request.method} not allowed here",
                413: f"the body is larger than {MAX_BODY} bytes",
            }
            response = error_response(exc.status, message.get(exc.status, exc.reason), None, headers)
        except Exception:
            log.exception("failed: %s %s", request.method, request.path)
            response = error_response(500, "internal error (logged)")
        API_REQUESTS.labels(route, request.method, str(response.status)).inc()
        return response

    def _check_host(self, request: web.Request) -> None:
        """DNS rebinding guard: a write addressed to a name Beacon does not answer to
        came through a name that an attacker's DNS pointed at us."""
        host = request.headers.get("Host")
        if host is None or host_allowed(host, self._allowed_hosts):
            return
        raise ApiError(
            403,
            f"writes addressed to host {host[:100]!r} are refused: not localhost, an IP address or a name "
            "allowed with --api-allowed-hosts",
            "Host",
        )

    def _authorize(self, request: web.Request) -> None:
        if self._token_digest is None:
            return
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: non-UTF-8
        # bytes come back out as themselves instead of raising (a 500).
        given = hashlib.sha256(credential.strip().encode("utf-8", "surrogateescape")).digest()
        # Compare fixed-length digests in constant time: no length or prefix leaks.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token_digest):
            raise ApiError(
                401,
                "this write needs the header Authorization: Bearer <token>",
                "Authorization",
                {"WWW-Authenticate": 'Bearer realm="beacon"'},
            )

    # --------------------------------------------------------------- reads
    async def _services(self, request: web.Request) -> web.Response:
        snap = await self._block(request, ANY)
        body = [snap.services[name].summary_json() for name in sorted(snap.services)]
        return json_response(body, snap)

    async def _service(self, request: web.Request) -> web.Response:
        raw = request.match_info["name"]
        try:
            name = validate_service_name(raw, "name")
        except RegistrationError:  # not a DNS label, so no such service can exist
            snap = self._catalog.snapshot
            return json_response({"error": f"no service named {raw!r}", "field": "name"}, snap, status=404)
        snap = await self._block(request, service_key(name))
        svc = snap.services.get(name)
        if svc is None:
            return json_response({"error": f"no service named {name!r}", "field": "name"}, snap, status=404)
        return json_response(svc.to_json(), snap)

    async def _endpoints(self, request: web.Request) -> web.Response:
        q = request.query
        service = q.get("service") or None
        if service is not None:
            try:
                service = validate_service_name(service)
            except RegistrationError as exc:
                raise ApiError(400, str(exc), "service") from None
        tag = q.get("tag") or None
        states = parse_states(q.get("state"))
        snap = await self._block(request, ANY if service is None else service_key(service))
        return json_response([e.to_json() for e in filter_endpoints(snap, service, tag, states)], snap)

    async def _endpoint(self, request: web.Request) -> web.Response:
        eid = request.match_info["id"]
        snap = await self._block(request, ANY)
        ep = snap.endpoints.get(eid)
        if ep is None:
            return json_response({"error": f"no endpoint {eid!r}", "field": "id"}, snap, status=404)
        return json_response(ep.to_json(), snap)

    # -------------------------------------------------------------- writes
    async def _read_json(self, request: web.Request, *, required: bool) -> object:
        raw = await request.read()
        if not raw.strip():
            if required:
                raise ApiError(400, "malformed JSON: the body is empty; a JSON object is required", "body")
            return {}
        # A page in a browser can send text/plain anywhere without asking first;
        # application/json it cannot (CORS preflight): writes must say JSON.
        if request.content_type != "application/json":
            raise ApiError(415, f"a write body must be Content-Type: application/json (got {request.content_type!r})",
                           "Content-Type")
        return parse_json_body(raw)

    async def _register(self, request: web.Request) -> web.Response:
        self._authorize(request)
        eid = request.match_info["id"]
        body = await self._read_json(request, required=True)
        try:
            endpoint = parse_registration(eid, body, node=self._manual.node)
            created = self._manual.register(endpoint)
        except RegistrationError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        except RegistrationConflict as exc:
            raise ApiError(409, str(exc), exc.field) from None
        # Publish now so a read right after this write sees it (read-your-writes).
        snap = self._catalog.publish()
        return json_response(snap.endpoints[eid].to_json(), snap, status=201 if created else 200)

    async def _deregister(self, request: web.Request) -> web.Response:
        self._authorize(request)
        eid = request.match_info["id"]
        try:
            self._manual.deregister(eid)
        except NotFound as exc:
            raise ApiError(404, str(exc), exc.field) from None
        except RegistrationConflict as exc:
            raise ApiError(409, str(exc), exc.field) from None
        snap = self._catalog.publish()
        return json_response({"id": eid, "deregistered": True}, snap)

    async def _heartbeat_handler(self, request: web.Request) -> web.Response:
        self._authorize(request)
        eid = request.match_info["id"]
        data: dict[str, Any] = {k: v for k, v in request.query.items() if k in ("status", "output")}
        body = await self._read_json(request, required=False)
        if not isinstance(body, dict):
            raise ApiError(422, 'the body must be a JSON object like {"status": "passing"}', "body")
        data.update(body)
        try:
            state, output = parse_heartbeat(data)
            self._manual.heartbeat(eid, state, output)
        except RegistrationError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        except NotFound as exc:
            raise ApiError(404, str(exc), exc.field) from None
        except RegistrationConflict as exc:
            raise ApiError(409, str(exc), exc.field) from None
        snap = self._catalog.publish()
        return json_response(snap.endpoints[eid].to_json(), snap)

    # ---------------------------------------------------------------- misc
    async def _autoheal(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        read_log = getattr(self._health, "autoheal_log", None)
        entries = list(read_log()) if callable(read_log) else []
        return json_response([jsonable(e) for e in entries], snap)

    async def _routes_table(self, request: web.Request) -> web.Response:
        table = self._routes() if self._routes is not None else {"routes": [], "conflicts": []}
        return json_response(table, self._catalog.snapshot)

    async def _traffic_figures(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        body = self._traffic.render(snap.services, snap.index)
        return web.Response(body=body, content_type="application/json", headers={INDEX_HEADER: str(snap.index)})

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(__version__))

    async def _nodes_table(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        if self._nodes is not None:
            return json_response(self._nodes(), snap)
        node = self._manual.node
        count = sum(1 for e in snap.endpoints.values() if e.node == node)
        table = {"node": node, "store": None, "nodes": [{"node": node, "local": True, "lease": "none", "endpoints": count}]}
        return json_response(table, snap)

    async def _healthz(self, request: web.Request) -> web.Response:
        status, body = Connections.of(self._docker, self._store).healthz(self._started())
        return json_response(body, self._catalog.snapshot, status=status)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})


__all__ = ["ApiExtension", "ApiServer", "filter_endpoints", "parse_states"]
