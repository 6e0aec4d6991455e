"""The catalog: sources write endpoints in, consumers read immutable snapshots out.

Writers (the Docker source, manual registrations, health checks) change the
catalog per source (one container, one manual registration) - never by
rebuilding everything. The catalog folds changes into a new `Snapshot` with a
higher index, at most `coalesce_window` seconds after the first change of a
burst, and only when something visible changed: an identical snapshot is never
republished, so a resync that finds nothing new wakes no watcher.

All methods are called from the event-loop thread; nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

import immutables

from beacon.registry.model import (
    NO_SETTINGS,
    CheckStatus,
    Endpoint,
    Service,
    ServiceSettings,
    Snapshot,
    SnapshotDelta,
    State,
    worst,
)

log = logging.getLogger("beacon.registry.catalog")

Listener = Callable[[Snapshot], None]


class EndpointConflict(ValueError):
    """An endpoint id is already owned by another source."""


_SettingsKey = tuple[int | None, str | None, tuple[str, ...], str | None, bool, bool | None]


def _settings_key(ep: Endpoint) -> _SettingsKey | None:
    """The labels an endpoint contributes to its service's settings (None: none)."""
    if (ep.dns_ttl is None and not ep.lb and not ep.http_hosts and ep.http_path_prefix is None
            and ep.http_expose is None):  # fmt: skip
        return None
    return (ep.dns_ttl, ep.lb, ep.http_hosts, ep.http_path_prefix, ep.http_strip_prefix, ep.http_expose)


class _Members:
    """One service's endpoints as the last snapshot published them, kept sorted
    by id, plus what the `Service` folds from them, so that publishing a change
    of one endpoint costs O(log k) searches and one C-level copy of the tuple
    instead of a sort and a walk of the whole service in Python.

    The settings (DNS TTL, balancing, routes) are re-folded - O(k) - only when
    the set of distinct label combinations changes, or when the service has
    several (conflicting labels, where the order by id decides). Endpoints
    that all carry the same labels, the usual case, never cause a re-fold.
    """

    __slots__ = ("endpoints", "ids", "settings", "settings_counts", "tag_counts", "tags")

    def __init__(self) -> None:
        self.ids: list[str] = []  # sorted
        self.endpoints: list[Endpoint] = []  # aligned with ids
        self.tag_counts: dict[str, int] = {}
        self.tags: tuple[str, ...] | None = ()  # None: the tag set changed, re-sort
        self.settings_counts: dict[_SettingsKey, int] = {}
        self.settings: ServiceSettings | None = NO_SETTINGS  # None: re-fold

    def add(self, ep: Endpoint) -> None:
        i = bisect.bisect_left(self.ids, ep.id)
        self.ids.insert(i, ep.id)
        self.endpoints.insert(i, ep)
        self._count(ep, 1)

    def remove(self, ep: Endpoint) -> None:
        i = bisect.bisect_left(self.ids, ep.id)
        del self.ids[i]
        del self.endpoints[i]
        self._count(ep, -1)

    def replace(self, before: Endpoint, after: Endpoint) -> None:
        self.endpoints[bisect.bisect_left(self.ids, after.id)] = after
        if before.tags != after.tags:
            self._count_tags(before, -1)
            self._count_tags(after, 1)
        if _settings_key(before) != _settings_key(after):
            self._count_settings(before, -1)
            self._count_settings(after, 1)

    def _count(self, ep: Endpoint, delta: int) -> None:
        self._count_tags(ep, delta)
        self._count_settings(ep, delta)

    def _count_settings(self, ep: Endpoint, delta: int) -> None:
        key = _settings_key(ep)
        if key is None:
            return
        counts = self.settings_counts
        n = counts.get(key, 0) + delta
        if n:
            counts[key] = n
        else:
            del counts[key]
        if n == 0 or n == delta or len(counts) > 1:
            self.settings = None

    def _count_tags(self, ep: Endpoint, delta: int) -> None:
        counts = self.tag_counts
        for tag in ep.tags:
            n = counts.get(tag, 0) + delta
            if n:
                counts[tag] = n
            else:
                del counts[tag]
            if n == 0 or n == delta:  # a tag came or went
                self.tags = None

    def service(self, name: str) -> Service:
        if self.tags is None:
            self.tags = tuple(sorted(self.tag_counts))
        if self.settings is None:
            self.settings = ServiceSettings.fold(self.endpoints) if self.settings_counts else NO_SETTINGS
        return Service(name=name, endpoints=tuple(self.endpoints), tags=self.tags, settings=self.settings)


class Catalog:
    def __init__(
        self,
        *,
        coalesce_window: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= coalesce_window <= 0.05:
            raise ValueError("coalesce_window must be within [0, 0.05] seconds")
        self._window = coalesce_window
        self._clock = clock
        # What sources told us, keyed by source key ("container:<id>", "manual:<id>").
        self._by_source: dict[str, dict[str, Endpoint]] = {}
        self._owner: dict[str, str] = {}  # endpoint id -> source key
        self._check_status: dict[str, CheckStatus] = {}  # endpoint id -> last check
        self._members: dict[str, _Members] = {}  # service name -> its published endpoints
        self._dirty: set[str] = set()  # endpoint ids that may differ from the snapshot
        # The snapshot's maps are persistent (HAMT): the next one shares all but
        # the changed paths, so a publish costs O(changed), not O(catalog).
        self._endpoint_map: immutables.Map[str, Endpoint] = immutables.Map()
        self._service_map: immutables.Map[str, Service] = immutables.Map()
        self._snapshot = Snapshot(index=1, services=self._service_map, endpoints=self._endpoint_map)
        self._listeners: list[Listener] = []
        self._next_publish: asyncio.Future[Snapshot] | None = None
        self._publish_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last_publish = float("-inf")

    # ----------------------------------------------------------------- reads
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def sources(self, prefix: str = "") -> set[str]:
        return {k for k in self._by_source if k.startswith(prefix)}

    def source_endpoints(self, source_key: str) -> Mapping[str, Endpoint]:
        """The endpoints a source last set (before checks are folded in)."""
        return MappingProxyType(self._by_source.get(source_key, {}))

    def owner_of(self, endpoint_id: str) -> str | None:
        return self._owner.get(endpoint_id)

    # ---------------------------------------------------------------- writes
    def set_source(self, source_key: str, endpoints: Iterable[Endpoint]) -> bool:
        """Replace everything `source_key` contributes. Returns True if anything changed.

        Raises EndpointConflict (changing nothing) if an endpoint id belongs to
        another source.
        """
        new = {e.id: e for e in endpoints}
        for eid in new:
            owner = self._owner.get(eid)
            if owner is not None and owner != source_key:
                raise EndpointConflict(f"endpoint id {eid!r} already registered by {owner}")
        old = self._by_source.get(source_key, {})
        if old == new:
            return False
        for eid in old.keys() - new.keys():
            self._forget_endpoint(eid)
        for eid, ep in new.items():
            before = old.get(eid)
            if before == ep:
                continue
            if before is not None and (before.address, before.port) != (ep.address, ep.port):
                # A check result belongs to an address: a moved endpoint is not ready yet.
                self._check_status.pop(eid, None)
            self._owner[eid] = source_key
            self._dirty.add(eid)
        if new:
            self._by_source[source_key] = new
        else:
            self._by_source.pop(source_key, None)
        self._schedule_publish()
        return True

    def remove_source(self, source_key: str) -> bool:
        return self.set_source(source_key, ())

    def set_source_state(self, source_key: str, state: State) -> bool:
        """Set the source-side state of every endpoint of one source (e.g. draining)."""
        eps = self._by_source.get(source_key)
        if not eps:
            return False
        return self.set_source(source_key, [replace(e, state=state) for e in eps.values()])

    def set_check_status(self, endpoint_id: str, status: CheckStatus | None) -> bool:
        """Record an active check's outcome; ignored for an endpoint that is gone."""
        owner = self._owner.get(endpoint_id)
        if owner is None:
            return False
        if self._check_status.get(endpoint_id) == status:
            return False
        if status is None:
            self._check_status.pop(endpoint_id, None)
        else:
            self._check_status[endpoint_id] = status
        self._dirty.add(endpoint_id)
        self._schedule_publish()
        return True

    def _forget_endpoint(self, eid: str) -> None:
        self._owner.pop(eid, None)
        self._check_status.pop(eid, None)
        self._dirty.add(eid)

    # ------------------------------------------------------------ publishing
    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(snapshot)` on every new snapshot (in the loop thread).

        Listeners must be quick (swap a reference, clear a cache). Returns a
        function that removes the listener.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_for_index(self, index: int, wait: float | None) -> Snapshot:
        """Return the first snapshot whose index exceeds `index`, or the current
        one when `wait` seconds elapse (a blocking query)."""
        snap = self._snapshot
        if snap.index > index:
            return snap
        if self._next_publish is None or self._next_publish.done():
            self._next_publish = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(self._next_publish), wait)
        except TimeoutError:
            return self._snapshot

    def _schedule_publish(self) -> None:
        if self._publish_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (pure use, tests): the caller calls publish()
        # Leading edge: the first change after a quiet period is published on the
        # next loop turn (so changes made in one callback coalesce); later changes
        # in the same window wait for the window to end.
        delay = self._last_publish + self._window - self._clock()
        if delay <= 0:
            self._publish_handle = loop.call_soon(self._publish_from_loop)
        else:
            self._publish_handle = loop.call_later(delay, self._publish_from_loop)

    def _publish_from_loop(self) -> None:
        self._publish_handle = None
        self.publish()

    def publish(self) -> Snapshot:
        """Fold pending changes into a new snapshot now (if anything visible changed).

        Costs O(changed endpoints) plus, per changed service, one copy of its
        endpoint tuple (a C-level copy; a service of 10,000 endpoints takes
        microseconds): nothing walks the whole catalog.
        """
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        if not self._dirty:
            return self._snapshot
        old = self._snapshot
        before_map = self._endpoint_map
        touched: set[str] = set()
        ep_changed: set[str] = set()
        ep_removed: set[str] = set()
        with before_map.mutate() as endpoints:
            for eid in self._dirty:
                before = before_map.get(eid)
                after = self._effective(eid)
                if after == before:
                    continue  # also keeps the very object of an unchanged endpoint
                if after is None:
                    del endpoints[eid]
                    ep_removed.add(eid)
                else:
                    endpoints[eid] = after
                    ep_changed.add(eid)
                if before is not None and after is not None and before.service == after.service:
                    self._members[after.service].replace(before, after)
                    touched.add(after.service)
                    continue
                if before is not None:
                    self._members[before.service].remove(before)
                    touched.add(before.service)
                if after is not None:
                    self._members.setdefault(after.service, _Members()).add(after)
                    touched.add(after.service)
            endpoint_map = endpoints.finish()
        self._dirty.clear()
        if not touched:
            return old
        sv_changed: set[str] = set()
        sv_removed: set[str] = set()
        with self._service_map.mutate() as services:
            for name in touched:
                members = self._members[name]
                if members.ids:
                    services[name] = members.service(name)
                    sv_changed.add(name)
                else:
                    del self._members[name]
                    if name in services:
                        del services[name]
                        sv_removed.add(name)
            service_map = services.finish()
        self._endpoint_map, self._service_map = endpoint_map, service_map
        self._last_publish = self._clock()
        delta = SnapshotDelta(frozenset(sv_changed), frozenset(sv_removed), frozenset(ep_changed), frozenset(ep_removed))
        snap = old.followed_by(old.index + 1, service_map, endpoint_map, delta)
        self._snapshot = snap
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception:  # a broken consumer must not stop the registry
                log.exception("failed: snapshot listener %r", listener)
        if self._next_publish is not None and not self._next_publish.done():
            self._next_publish.set_result(snap)
        self._next_publish = None
        return snap

    def _effective(self, eid: str) -> Endpoint | None:
        owner = self._owner.get(eid)
        if owner is None:
            return None
        base = self._by_source[owner][eid]
        status = self._check_status.get(eid)
        if status is not None:
            return replace(base, state=worst(base.state, status.state), check_status=status)
        if base.check is not None:
            # Readiness: an endpoint with a check gets no traffic before its first pass.
            return replace(base, state=worst(base.state, State.CRITICAL))
        return base
