"""Blocking queries (Consul semantics): `?index=N&wait=30s` waits for a change after N.

`parse_blocking` is pure. `Blocker` follows the catalog's snapshots to know,
per service, the index of its last change (so a query about one service
wakes only when that service changes) and runs the waits; it ends every wait
at once when the API shuts down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import Gauge

from beacon.api.responses import ApiError
from beacon.grammar import parse_duration
from beacon.registry import Catalog, Snapshot

DEFAULT_WAIT = 300.0  # like Consul
MAX_WAIT = 600.0

API_BLOCKING = Gauge("beacon_registry_api_blocking_queries", "Blocking queries waiting for a change")

ViewIndex = Callable[[Snapshot], int]


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
    if not re.fullmatch(r"[0-9]{1,19}", raw):
        raise ApiError(400, f"index must be a non-negative integer (got {raw!r})", "index")
    # Jitter spreads the wake-ups of many clients that started together.
    return BlockingQuery(index=int(raw), wait=wait + rand() * wait / 16)


class WatcherSlots:
    """The cap on clients that wait for changes (blocking queries and watch
    streams together): each costs memory and a wake-up per change."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self) -> None:
        """Take a slot or raise ApiError 429."""
        if self.used >= self.limit:
            raise ApiError(
                429,
                f"too many watchers: {self.limit} blocking queries and watch streams are open "
                "(--api-max-watchers); retry later",
                None,
                {"Retry-After": "5"},
            )
        self.used += 1

    def release(self) -> None:
        self.used -= 1


class Blocker:
    """Runs blocking queries against the catalog; one per ApiServer."""

    def __init__(self, catalog: Catalog, slots: WatcherSlots | None = None) -> None:
        self._catalog = catalog
        self.slots = slots or WatcherSlots(1 << 30)
        self.closing = asyncio.Event()  # set on shutdown: every wait ends now
        self._unlisten: Callable[[], None] | None = None
        self._last: Snapshot = catalog.snapshot
        self._base_index = catalog.snapshot.index
        self._service_index: dict[str, int] = {}  # service name -> index of its last change

    def start(self) -> None:
        self.closing.clear()
        self._last = self._catalog.snapshot
        self._base_index = self._last.index
        self._unlisten = self._catalog.add_listener(self._on_snapshot)

    def stop(self) -> None:
        self.closing.set()
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

    def service_modified(self, name: str) -> int:
        """The index of the last snapshot that changed service `name` (a view index)."""
        return self._service_index.get(name, self._base_index)

    async def next_snapshot(self, index: int, timeout: float | None) -> Snapshot:
        """The first snapshot after `index`, or the current one after `timeout` or on shutdown."""
        waiter = asyncio.ensure_future(self._catalog.wait_for_index(index, timeout))
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait((waiter, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            closing.cancel()
        return self._catalog.snapshot

    async def block(self, request: web.Request, view_index: ViewIndex) -> Snapshot:
        """Run a blocking query if `?index=` asks for one; return the snapshot to render.

        `view_index(snapshot)` is the index of the last change of what the read
        shows (`lambda s: s.index` for the whole catalog).
        """
        query = parse_blocking(request.query)
        snap = self._catalog.snapshot
        # An index above ours comes from an earlier Beacon process: answer at
        # once so the client resets (Consul clients do the same).
        if query is None or query.index > snap.index or view_index(snap) > query.index:
            return snap
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.wait
        self.slots.acquire()
        try:
            with API_BLOCKING.track_inprogress():
                while not self.closing.is_set():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    snap = await self.next_snapshot(snap.index, remaining)
                    if view_index(snap) > query.index:
                        break
        finally:
            self.slots.release()
        return self._catalog.snapshot
