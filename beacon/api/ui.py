"""The live dashboard at `/ui/`: static HTML/CSS/JS shipped in the package, and
one read-only JSON view the REST API does not have, recent health transitions.

Everything else the page shows it reads from the public API, like any client:
the `/v1/watch` event stream (services, endpoints, states), `/v1/routes`
(the proxy's table and conflicts), `/healthz` (Docker connection) and
`/v1/traffic` (requests, 5xx and p99 per service over the last ~10 s, computed
by the server from the proxy's counters: a few bytes a service instead of all
of `/metrics`).

The page only reads, so no route here needs `--api-token`.

`HealthHistory` is pure: it is fed snapshots and a wall clock and keeps a
bounded list of endpoint state changes (added, state changed, removed), so the
page can show what happened before it was opened.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from beacon.registry.catalog import Catalog
from beacon.registry.model import Endpoint, Snapshot, State

UI_DIR = Path(__file__).with_name("ui")
# The files the page is made of, with their types; anything else under /ui/ is a 404.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
HISTORY_LIMIT = 500  # transitions kept, oldest dropped first
MAX_REASON = 300  # characters of a check's output kept per transition
# Same-origin only, no inline code: what the page renders (container names,
# check output) comes from outside and must never run as script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def endpoint_reason(ep: Endpoint) -> str:
    """Why an endpoint is in its state, in a few words (empty when passing for no special reason)."""
    if ep.reason:  # set by sources that know more (Docker: paused, HEALTHCHECK output)
        return ep.reason[:MAX_REASON]
    if ep.check_status is not None and ep.check_status.state is not State.PASSING:
        return ep.check_status.output[:MAX_REASON] or f"check {ep.check_status.state.value}"
    if ep.state is State.DRAINING:
        return "stopping: no new requests, in-flight ones finish"
    if ep.state is State.CRITICAL and ep.check is not None and ep.check_status is None:
        return "waiting for the first check to pass"
    if ep.check_status is not None:
        return ep.check_status.output[:MAX_REASON]
    return ""


@dataclass(frozen=True, slots=True)
class Transition:
    """One endpoint's state change; `before` None: it appeared, `after` None: it left."""

    at: float  # wall-clock seconds
    index: int  # snapshot index
    endpoint: str
    service: str
    node: str
    before: str | None
    after: str | None
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "index": self.index,
            "endpoint": self.endpoint,
            "service": self.service,
            "node": self.node,
            "before": self.before,
            "after": self.after,
            "reason": self.reason,
        }


class HealthHistory:
    """A bounded log of endpoint state changes, fed one snapshot at a time.

    Only the services `Snapshot.changed_since` names are compared, so a
    snapshot costs O(what changed).
    """

    def __init__(self, limit: int = HISTORY_LIMIT, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._log: deque[Transition] = deque(maxlen=limit)
        self._last: Snapshot | None = None

    def observe(self, snap: Snapshot) -> None:
        previous, self._last = self._last, snap
        if previous is None:
            return  # the starting point: what exists now has no history yet
        now = self._clock()
        # O(endpoints changed): one change in a big service looks at one endpoint.
        delta = snap.changed_since(previous)
        for eid in sorted(delta.endpoints_changed | delta.endpoints_removed):
            old, new = previous.endpoints.get(eid), snap.endpoints.get(eid)
            if old is not None and new is not None and old.state is new.state and old.service == new.service:
                continue
            shown = new if new is not None else old
            if shown is None:
                continue
            self._log.append(
                Transition(
                    at=now,
                    index=snap.index,
                    endpoint=eid,
                    service=shown.service,
                    node=shown.node,
                    before=old.state.value if old is not None else None,
                    after=new.state.value if new is not None else None,
                    reason=endpoint_reason(new) if new is not None else "",
                )
            )

    def __iter__(self) -> Iterator[Transition]:
        return iter(self._log)

    def to_json(self) -> list[dict[str, object]]:
        """Newest first."""
        return [t.to_json() for t in reversed(self._log)]


class Dashboard:
    """The routes of `/ui/` and the history behind them, attached to one catalog.

    An API extension: the API server calls `install(app)` when it builds its
    application, then `start()` / `stop()` with its own lifecycle.
    """

    def __init__(self, catalog: Catalog, history: HealthHistory | None = None) -> None:
        self._catalog = catalog
        self.history = history if history is not None else HealthHistory()
        self._files = {name: (UI_DIR / name).read_bytes() for name in STATIC_FILES}
        self._unlisten: Callable[[], None] | None = None

    def install(self, app: web.Application) -> None:
        app.router.add_get("/ui", self._redirect)
        app.router.add_get("/ui/", self._index)
        app.router.add_get("/ui/history.json", self._history)
        app.router.add_get("/ui/{file}", self._static)

    async def start(self) -> None:
        """Record transitions from now on (what exists now is the starting point)."""
        if self._unlisten is None:
            self.history.observe(self._catalog.snapshot)
            self._unlisten = self._catalog.add_listener(self.history.observe)

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    async def _redirect(self, request: web.Request) -> web.Response:
        # A response, not a raised HTTPException: the API's error middleware
        # turns those into JSON errors.
        return web.Response(status=308, headers={"Location": "/ui/"})

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(
            body=self._files[name], headers={"Content-Type": STATIC_FILES[name], **SECURITY_HEADERS}
        )

    async def _history(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"index": self._catalog.snapshot.index, "transitions": self.history.to_json()},
            headers=SECURITY_HEADERS,
        )


__all__ = ["Dashboard", "HealthHistory", "Transition", "endpoint_reason"]
