"""The REST API: catalog reads with blocking queries, a watch stream, manual
registrations, Beacon's own health and metrics.

Reads render the current immutable snapshot, so no response sees a
half-updated catalog. Every read carries the snapshot index in
`X-Beacon-Index`; passing it back as `?index=` turns the read into a blocking
query that returns when the answer may have changed (Consul semantics: the
wait defaults to 5 min, is capped at 10 min and gets up to wait/16 jitter).
A query about one service wakes only when that service changes, not on every
change of the catalog.

Errors are always JSON `{"error": ..., "field": ...}`; the error middleware
turns aiohttp's own 404/405/413 into that shape and logs anything unexpected
as a JSON 500. A rejected write changes nothing: validation happens before
any catalog write.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from beacon import __version__
from beacon.config import Config
from beacon.grammar import HostPort, parse_duration
from beacon.metrics import SNAPSHOT_COLLECTOR, exposition
from beacon.registry.catalog import Catalog
from beacon.registry.manual import (
    Conflict,
    ManualRegistry,
    NotFound,
    RegistrationError,
    parse_heartbeat,
    parse_registration,
    validate_service_name,
)
from beacon.registry.model import Endpoint, Snapshot, State
from beacon.registry.openapi import openapi_document

log = logging.getLogger("beacon.registry.api")

DEFAULT_WAIT = 300.0  # like Consul
MAX_WAIT = 600.0
MAX_BODY = 64 * 1024
INDEX_HEADER = "X-Beacon-Index"

API_REQUESTS = Counter(
    "beacon_registry_api_requests",
    "REST API requests by route, method and response status",
    ["route", "method", "status"],
)
API_BLOCKING = Gauge("beacon_registry_api_blocking_queries", "Blocking queries waiting for a change")
API_WATCHES = Gauge("beacon_registry_api_watch_streams", "Open /v1/watch event streams")


class ApiError(Exception):
    """An error answer: status, message and the field it is about."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status, headers=headers)


def json_response(data: object, snapshot: Snapshot, *, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers={INDEX_HEADER: str(snapshot.index)},
    )


# --------------------------------------------------------------- pure parts
@dataclasses.dataclass(frozen=True, slots=True)
class BlockingQuery:
    index: int
    wait: float  # seconds, jitter included


def parse_blocking(query: Mapping[str, str], rand: Callable[[], float] = random.random) -> BlockingQuery | None:
    """`?index=N&wait=30s` → BlockingQuery; no index → None (a plain read)."""
    wait = DEFAULT_WAIT
    if "wait" in query:
        try:
            wait = parse_duration(query["wait"])
        except ValueError:
            raise ApiError(400, f"wait must be a duration like 30s or 5m (got {query['wait']!r})", "wait") from None
        wait = min(wait, MAX_WAIT)
    if "index" not in query:
        return None
    raw = query["index"]
    if not re.fullmatch(r"\d{1,19}", raw):
        raise ApiError(400, f"index must be a non-negative integer (got {raw!r})", "index")
    # Jitter spreads the wake-ups of many clients that started together.
    return BlockingQuery(index=int(raw), wait=wait + rand() * wait / 16)


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


def _jsonable(item: object) -> object:
    to_json = getattr(item, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    return item


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}", "body") from None


# ------------------------------------------------------------------ server
class ApiServer:
    """aiohttp application on `config.api_listen`; `address` is the bound address after start."""

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
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._manual = manual
        self._docker = docker
        self._health = health
        self._routes = routes  # the proxy's routing table, as JSON (routes and conflicts)
        self._heartbeat = heartbeat_interval
        # surrogateescape: a token read from argv/env with non-UTF-8 bytes stays those bytes.
        token = config.api_token.encode("utf-8", "surrogateescape")
        self._token_digest = hashlib.sha256(token).digest() if config.api_token else None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._unlisten: Callable[[], None] | None = None
        self._last: Snapshot = catalog.snapshot
        self._base_index = catalog.snapshot.index
        self._service_index: dict[str, int] = {}  # service name -> index of its last change
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
        r.add_get("/v1/watch", self._watch)
        r.add_get("/v1/autoheal", self._autoheal)
        r.add_get("/v1/routes", self._routes_table)
        r.add_get("/v1/openapi.json", self._openapi)
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        self._closing.clear()
        self._last = self._catalog.snapshot
        self._base_index = self._last.index
        self._unlisten = self._catalog.add_listener(self._on_snapshot)
        SNAPSHOT_COLLECTOR.attach(self._current_snapshot)
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
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("stopped: api on %s", self.address)
        self._detach()

    def _current_snapshot(self) -> Snapshot:
        return self._catalog.snapshot

    def _detach(self) -> None:
        SNAPSHOT_COLLECTOR.detach(self._current_snapshot)
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def _on_snapshot(self, snap: Snapshot) -> None:
        delta = snap.changed_since(self._last)
        for name in delta.services_touched:
            self._service_index[name] = snap.index
        self._last = snap
        if delta.services_removed and len(self._service_index) > len(snap.services) + 10_000:
            # Forget removed names; an unknown name falls back to the base index.
            self._base_index = snap.index
            self._service_index = {n: i for n, i in self._service_index.items() if n in snap.services}

    def _service_modified(self, name: str) -> int:
        return self._service_index.get(name, self._base_index)

    # ---------------------------------------------------------- middleware
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
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

    # ------------------------------------------------------------ blocking
    async def _next_snapshot(self, index: int, timeout: float) -> Snapshot:
        """The first snapshot after `index`, or the current one after `timeout` or on shutdown."""
        waiter = asyncio.ensure_future(self._catalog.wait_for_index(index, timeout))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((waiter, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closing.cancel()
        return self._catalog.snapshot

    async def _block(self, request: web.Request, view_index: Callable[[Snapshot], int]) -> Snapshot:
        """Run a blocking query if `?index=` asks for one; return the snapshot to render."""
        query = parse_blocking(request.query)
        snap = self._catalog.snapshot
        # An index above ours comes from an earlier Beacon process: answer at
        # once so the client resets (Consul clients do the same).
        if query is None or query.index > snap.index or view_index(snap) > query.index:
            return snap
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.wait
        with API_BLOCKING.track_inprogress():
            while not self._closing.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                snap = await self._next_snapshot(snap.index, remaining)
                if view_index(snap) > query.index:
                    break
        return self._catalog.snapshot

    # --------------------------------------------------------------- reads
    async def _services(self, request: web.Request) -> web.Response:
        snap = await self._block(request, lambda s: s.index)
        body = [snap.services[name].summary_json() for name in sorted(snap.services)]
        return json_response(body, snap)

    async def _service(self, request: web.Request) -> web.Response:
        raw = request.match_info["name"]
        try:
            name = validate_service_name(raw, "name")
        except RegistrationError:  # not a DNS label, so no such service can exist
            snap = self._catalog.snapshot
            return json_response({"error": f"no service named {raw!r}", "field": "name"}, snap, status=404)
        snap = await self._block(request, lambda s: self._service_modified(name))
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
        svc_name = service
        view: Callable[[Snapshot], int] = (
            (lambda s: s.index) if svc_name is None else (lambda s: self._service_modified(svc_name))
        )
        snap = await self._block(request, view)
        return json_response([e.to_json() for e in filter_endpoints(snap, service, tag, states)], snap)

    async def _endpoint(self, request: web.Request) -> web.Response:
        eid = request.match_info["id"]
        snap = await self._block(request, lambda s: s.index)
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
        except Conflict as exc:
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
        except Conflict as exc:
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
        except Conflict as exc:
            raise ApiError(409, str(exc), exc.field) from None
        snap = self._catalog.publish()
        return json_response(snap.endpoints[eid].to_json(), snap)

    # --------------------------------------------------------------- watch
    async def _watch(self, request: web.Request) -> web.StreamResponse:
        only = request.query.get("service") or None
        if only is not None:
            try:
                only = validate_service_name(only)
            except RegistrationError as exc:
                raise ApiError(400, str(exc), "service") from None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # keep reverse proxies from buffering events
            }
        )
        snap = self._catalog.snapshot
        response.headers[INDEX_HEADER] = str(snap.index)
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        with API_WATCHES.track_inprogress(), contextlib.suppress(ConnectionError):
            names = [only] if only is not None else sorted(snap.services)
            services = [snap.services[n].to_json() for n in names if n in snap.services]
            await response.write(_sse("snapshot", snap.index, {"index": snap.index, "services": services}))
            last_write = loop.time()
            while not self._closing.is_set():
                timeout = max(0.0, last_write + self._heartbeat - loop.time())
                new = await self._next_snapshot(snap.index, timeout)
                if self._closing.is_set():
                    break
                delta = new.changed_since(snap)
                changed, removed = delta.services_changed, delta.services_removed
                if only is not None:
                    changed, removed = changed & {only}, removed & {only}
                snap = new
                if changed or removed:
                    data = {
                        "index": new.index,
                        "services": [new.services[n].to_json() for n in sorted(changed)],
                        "removed": sorted(removed),
                    }
                    await response.write(_sse("change", new.index, data))
                    last_write = loop.time()
                elif loop.time() - last_write >= self._heartbeat:
                    # An SSE comment: ignored by clients, keeps idle proxies from closing the stream.
                    await response.write(b": keep-alive\n\n")
                    last_write = loop.time()
            await response.write_eof()
        return response

    # ---------------------------------------------------------------- misc
    async def _autoheal(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        read_log = getattr(self._health, "autoheal_log", None)
        entries = list(read_log()) if callable(read_log) else []
        return json_response([_jsonable(e) for e in entries], snap)

    async def _routes_table(self, request: web.Request) -> web.Response:
        table = self._routes() if self._routes is not None else {"routes": [], "conflicts": []}
        return json_response(table, self._catalog.snapshot)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(__version__))

    async def _healthz(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        if self._docker is None:
            return json_response({"status": "ok", "docker": "disabled"}, snap)
        if getattr(self._docker, "connected", False):
            return json_response({"status": "ok", "docker": "connected"}, snap)
        return json_response({"status": "degraded", "docker": "disconnected"}, snap, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})


def _sse(event: str, index: int, data: object) -> bytes:
    # json.dumps escapes newlines inside strings, so data is always one line.
    payload = json.dumps(data, separators=(",", ":"))
    return f"id: {index}\nevent: {event}\ndata: {payload}\n\n".encode()


__all__ = ["ApiError", "ApiServer", "BlockingQuery", "parse_blocking"]
