"""`GET /v1/status`: one read of what an operator checks first (`beacon status`).

The listeners as bound (port 0 resolved), the Docker and store connections,
the node and the catalog index. It is an API extension: the composition root
hands it one callable that reads those from the running components, so this
module knows no component.

`Connections` is the one derivation of the Docker and store state: `/healthz`
(`ApiServer`) and `/v1/status` (`App.status_json`) both read it, so the two
can never disagree about what is connected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from beacon.api.responses import json_response
from beacon.registry import Catalog

StatusSource = Callable[[], Mapping[str, object]]


@dataclass(frozen=True, slots=True)
class Connections:
    """The Docker and store connections, read once from the components (pure past `of`)."""

    docker: str  # "disabled" (--docker false), "connected" or "disconnected"
    store: str | None  # None: the in-memory store; else its kind ("etcd")
    store_connected: bool

    @classmethod
    def of(cls, docker: object | None, store: object | None) -> Connections:
        """From the Docker source and the cluster store (None when not in use); each has `connected`."""
        docker_state = "disabled" if docker is None else (
            "connected" if getattr(docker, "connected", False) else "disconnected")
        connected = store is None or bool(getattr(store, "connected", False))
        return cls(docker_state, None if store is None else "etcd", connected)

    @property
    def healthy(self) -> bool:
        return self.docker != "disconnected" and self.store_connected

    def healthz(self, started: bool = True) -> tuple[int, dict[str, str]]:
        """`/healthz`'s status and body: 503 `degraded` when Docker or the store is disconnected,
        503 `starting` until every listener is up (the API listens before DNS and the proxy:
        a HEALTHCHECK must not call Beacon healthy while its proxy port still refuses).
        A store named only when it is down (degraded, not dead: the last catalog is served)."""
        status = "starting" if not started else "ok" if self.healthy else "degraded"
        body = {"status": status, "docker": self.docker}
        if not self.store_connected:
            body["store"] = "disconnected"
        return (200 if status == "ok" else 503), body

    def status_json(self) -> dict[str, object]:
        """The `docker` and `store` members of `/v1/status`."""
        return {"docker": self.docker,
                "store": {"kind": self.store or "memory", "connected": self.store_connected}}


class StatusView:
    def __init__(self, catalog: Catalog, status: StatusSource) -> None:
        self._catalog = catalog
        self._status = status

    def install(self, app: web.Application) -> None:
        app.router.add_get("/v1/status", self._get)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def _get(self, request: web.Request) -> web.Response:
        snap = self._catalog.snapshot
        return json_response({**self._status(), "index": snap.index}, snap)


__all__ = ["Connections", "StatusSource", "StatusView"]
