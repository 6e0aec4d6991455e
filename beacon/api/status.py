"""`GET /v1/status`: one read of what an operator checks first (`beacon status`).

The listeners as bound (port 0 resolved), the Docker and store connections,
the node and the catalog index. It is an API extension: the composition root
hands it one callable that reads those from the running components, so this
module knows no component.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web

from beacon.api.responses import json_response
from beacon.registry import Catalog

StatusSource = Callable[[], Mapping[str, object]]


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


__all__ = ["StatusSource", "StatusView"]
