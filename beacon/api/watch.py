"""`GET /v1/watch`: server-sent events of the catalog's snapshots.

On connect, `event: snapshot` with the full state (or one service with
`?service=`); then one `event: change` per new snapshot with the services
changed in full and the names removed; `id:` is the snapshot index. A comment
line keeps idle proxies from closing the stream. A slow reader skips
intermediate snapshots (it always gets the latest), so nothing piles up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web
from prometheus_client import Gauge

from beacon.api.blocking import Blocker
from beacon.api.responses import INDEX_HEADER, ApiError
from beacon.registry import Catalog
from beacon.registry.manual import RegistrationError, validate_service_name

API_WATCHES = Gauge("beacon_registry_api_watch_streams", "Open /v1/watch event streams")


def sse(event: str, index: int, data: object) -> bytes:
    # json.dumps escapes newlines inside strings, so data is always one line.
    payload = json.dumps(data, separators=(",", ":"))
    return f"id: {index}\nevent: {event}\ndata: {payload}\n\n".encode()


class WatchStreams:
    """The /v1/watch handler; `heartbeat` seconds of silence send a keep-alive comment."""

    def __init__(self, catalog: Catalog, blocker: Blocker, heartbeat: float = 15.0) -> None:
        self._catalog = catalog
        self._blocker = blocker
        self._heartbeat = heartbeat

    async def handle(self, request: web.Request) -> web.StreamResponse:
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
        closing = self._blocker.closing
        with API_WATCHES.track_inprogress(), contextlib.suppress(ConnectionError):
            names = [only] if only is not None else sorted(snap.services)
            services = [snap.services[n].to_json() for n in names if n in snap.services]
            await response.write(sse("snapshot", snap.index, {"index": snap.index, "services": services}))
            last_write = loop.time()
            while not closing.is_set():
                timeout = max(0.0, last_write + self._heartbeat - loop.time())
                new = await self._blocker.next_snapshot(snap.index, timeout)
                if closing.is_set():
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
                    await response.write(sse("change", new.index, data))
                    last_write = loop.time()
                elif loop.time() - last_write >= self._heartbeat:
                    # An SSE comment: ignored by clients, keeps idle proxies from closing the stream.
                    await response.write(b": keep-alive\n\n")
                    last_write = loop.time()
            await response.write_eof()
        return response
