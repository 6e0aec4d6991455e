"""Blocking queries (Consul semantics): `?index=N&wait=30s` waits for a change after N.

`parse_blocking` is pure. `Blocker` follows the catalog's snapshots to know,
per service, the index of its last change (so a query about one service
wakes only when that service changes) and parks the waits in `waiters.Waiters`
(the mechanism the Consul-compatible API uses too); it ends every wait at once
when the API shuts down.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import Gauge

from beacon.api.responses import ApiError
from beacon.api.waiters import Waiters
from beacon.grammar import parse_duration
from beacon.registry import Catalog, Snapshot

DEFAULT_WAIT = 300.0  # like Consul
MAX_WAIT = 600.0

API_BLOCKING = Gauge("beacon_registry_api_blocking_queries", "Blocking queries waiting for a change")

ANY = "*"  # the key of a view of the whole catalog: every snapshot wakes it


def service_key(name: str) -> str:
    """The key of a view of one service: only snapshots that touch it wake it."""
    return "svc:" + name


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
    """Runs blocking queries and the watch streams' waits against the catalog; one per ApiServer.

    It follows the snapshots and wakes, through the shared `Waiters`, the key `*`
    (anything changed) and `svc:<name>` for each service a snapshot touched.
    """

    def __init__(self, catalog: Catalog, slots: WatcherSlots | None = None) -> None:
        self._catalog = catalog
        self.slots = slots or WatcherSlots(1 << 30)
        self.waiters = Waiters()  # closed until start(): a wait returns at once
        self._unlisten: Callable[[], None] | None = None
        self._last: Snapshot = catalog.snapshot
        self._base_index = catalog.snapshot.index
        self._service_index: dict[str, int] = {}  # service name -> index of its last change

    def start(self) -> None:
        self._last = self._catalog.snapshot
        self._base_index = self._last.index
        self._unlisten = self._catalog.add_listener(self._on_snapshot)
        self.waiters.open()

    def stop(self) -> None:
        """Every wait ends now (and later ones return at once)."""
        self.waiters.close()
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    @property
    def closing(self) -> bool:
        return self.waiters.closed

    def _on_snapshot(self, snap: Snapshot) -> None:
        delta = snap.changed_since(self._last)
        touched = delta.services_touched
        for name in touched:
            self._service_index[name] = snap.index
        self._last = snap
        if delta.services_removed and len(self._service_index) > len(snap.services) + 10_000:
            # Forget removed names; an unknown name falls back to the base index.
            self._base_index = snap.index
            self._service_index = {n: i for n, i in self._service_index.items() if n in snap.services}
        self.waiters.wake((ANY, *(service_key(name) for name in touched)))

    def service_modified(self, name: str) -> int:
        """The index of the last snapshot that changed service `name` (a view index)."""
        return self._service_index.get(name, self._base_index)

    def view_index(self, key: str) -> int:
        """The index of the last change of what `key` watches (`ANY` or `service_key(name)`)."""
        if key == ANY:
            return self._catalog.snapshot.index
        return self.service_modified(key.removeprefix("svc:"))

    async def next_snapshot(self, index: int, timeout: float) -> Snapshot:
        """The first snapshot after `index`, or the current one after `timeout` or on shutdown."""
        catalog = self._catalog
        await self.waiters.until(ANY, lambda: catalog.snapshot.index > index, timeout)
        return catalog.snapshot

    async def block(self, request: web.Request, key: str) -> Snapshot:
        """Run a blocking query if `?index=` asks for one; return the snapshot to render.

        `key` names what the read shows: `ANY` (the whole catalog) or `service_key(name)`.
        """
        query = parse_blocking(request.query)
        snap = self._catalog.snapshot
        # An index above ours comes from an earlier Beacon process: answer at
        # once so the client resets (Consul clients do the same).
        if query is None or query.index > snap.index or self.view_index(key) > query.index:
            return snap
        self.slots.acquire()
        try:
            with API_BLOCKING.track_inprogress():
                index = query.index
                await self.waiters.until(key, lambda: self.view_index(key) > index, query.wait)
        finally:
            self.slots.release()
        return self._catalog.snapshot
