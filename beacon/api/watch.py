"""`GET /v1/watch`: server-sent events of the catalog's snapshots.

On connect, `event: snapshot` with the full state (or one service with
`?service=`); then one `event: change` per new snapshot with the services
changed in full and the names removed; `id:` is the snapshot index. A comment
line keeps idle proxies from closing the stream. A slow reader skips
intermediate snapshots (it always gets the latest), so nothing piles up.

Cost per watcher is kept flat: every event is serialised once and the bytes
are shared by every stream that sends it (a small cache keyed by snapshot
indexes and filter); a write that the client does not take within
`write_timeout` (its socket and our buffer are full) drops that client; and
the streams count against `--api-max-watchers` with blocking queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict

from aiohttp import web
from prometheus_client import Counter, Gauge

from beacon.api.blocking import Blocker
from beacon.api.responses import INDEX_HEADER, ApiError
from beacon.registry import Catalog, Snapshot
from beacon.registry.manual import RegistrationError, validate_service_name

log = logging.getLogger("beacon.api.watch")

API_WATCHES = Gauge("beacon_registry_api_watch_streams", "Open /v1/watch event streams")
API_WATCH_DROPPED = Counter(
    "beacon_registry_api_watch_dropped", "Watch streams dropped because the client stopped reading"
)
_CACHE_SIZE = 64


def sse(event: str, index: int, data: object) -> bytes:
    # json.dumps escapes newlines inside strings, so data is always one line.
    payload = json.dumps(data, separators=(",", ":"))
    return f"id: {index}\nevent: {event}\ndata: {payload}\n\n".encode()


class _SlowClient(Exception):
    pass


class WatchStreams:
    """The /v1/watch handler; `heartbeat` seconds of silence send a keep-alive comment."""

    def __init__(self, catalog: Catalog, blocker: Blocker, heartbeat: float = 15.0, *,
                 write_timeout: float = 10.0) -> None:
        self._catalog = catalog
        self._blocker = blocker
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        # (kind, from index, to index, filter) -> the event's bytes, shared by every stream.
        self._encoded: OrderedDict[tuple[str, int, int, str | None], bytes] = OrderedDict()

    # ------------------------------------------------------------ encoding
    def _cached(self, key: tuple[str, int, int, str | None]) -> bytes | None:
        data = self._encoded.get(key)
        if data is not None:
            self._encoded.move_to_end(key)
        return data

    def _store(self, key: tuple[str, int, int, str | None], data: bytes) -> bytes:
        self._encoded[key] = data
        if len(self._encoded) > _CACHE_SIZE:
            self._encoded.popitem(last=False)
        return data

    def _snapshot_event(self, snap: Snapshot, only: str | None) -> bytes:
        key = ("snapshot", snap.index, snap.index, only)
        data = self._cached(key)
        if data is None:
            names = [only] if only is not None else sorted(snap.services)
            services = [snap.services[n].to_json() for n in names if n in snap.services]
            data = self._store(key, sse("snapshot", snap.index, {"index": snap.index, "services": services}))
        return data

    def _change_event(self, old: Snapshot, new: Snapshot, only: str | None) -> bytes:
        """The change event from `old` to `new` (b"" when nothing the filter shows changed)."""
        key = ("change", old.index, new.index, only)
        data = self._cached(key)
        if data is None:
            delta = new.changed_since(old)
            changed, removed = delta.services_changed, delta.services_removed
            if only is not None:
                changed, removed = changed & {only}, removed & {only}
            data = b""
            if changed or removed:
                doc = {
                    "index": new.index,
                    "services": [new.services[n].to_json() for n in sorted(changed)],
                    "removed": sorted(removed),
                }
                data = sse("change", new.index, doc)
            data = self._store(key, data)
        return data

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            await asyncio.wait_for(response.write(data), self._write_timeout)
        except TimeoutError:
            raise _SlowClient from None

    # ------------------------------------------------------------- handler
    async def handle(self, request: web.Request) -> web.StreamResponse:
        only = request.query.get("service") or None
        if only is not None:
            try:
                only = validate_service_name(only)
            except RegistrationError as exc:
                raise ApiError(400, str(exc), "service") from None
        slots = self._blocker.slots
        slots.acquire()
        try:
            return await self._stream(request, only)
        finally:
            slots.release()

    async def _stream(self, request: web.Request, only: str | None) -> web.StreamResponse:
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
        blocker = self._blocker
        with API_WATCHES.track_inprogress(), contextlib.suppress(ConnectionError):
            try:
                await self._write(response, self._snapshot_event(snap, only))
                last_write = loop.time()
                while not blocker.closing:
                    timeout = max(0.0, last_write + self._heartbeat - loop.time())
                    new = await blocker.next_snapshot(snap.index, timeout)
                    if blocker.closing:
                        break
                    data = self._change_event(snap, new, only) if new is not snap else b""
                    snap = new
                    if data:
                        await self._write(response, data)
                        last_write = loop.time()
                    elif loop.time() - last_write >= self._heartbeat:
                        # An SSE comment: ignored by clients, keeps idle proxies from closing the stream.
                        await self._write(response, b": keep-alive\n\n")
                        last_write = loop.time()
            except _SlowClient:
                API_WATCH_DROPPED.inc()
                log.warning("dropped: watch stream of %s, not reading for %gs", request.remote, self._write_timeout)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
        return response
