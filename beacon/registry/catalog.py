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
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from beacon.registry.model import CheckStatus, Endpoint, Service, Snapshot, State, worst

log = logging.getLogger("beacon.registry.catalog")

Listener = Callable[[Snapshot], None]


class EndpointConflict(ValueError):
    """An endpoint id is already owned by another source."""


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
        self._members: dict[str, set[str]] = {}  # service name -> endpoint ids
        self._dirty_endpoints: set[str] = set()
        self._dirty_services: set[str] = set()
        self._snapshot = Snapshot(
            index=1, services=MappingProxyType({}), endpoints=MappingProxyType({})
        )
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
        for eid, ep in old.items():
            if eid not in new:
                self._forget_endpoint(eid, ep)
        for eid, ep in new.items():
            before = old.get(eid)
            if before == ep:
                continue
            if before is not None and (before.address, before.port) != (ep.address, ep.port):
                # A check result belongs to an address: a moved endpoint is not ready yet.
                self._check_status.pop(eid, None)
            self._owner[eid] = source_key
            self._touch(eid, ep.service)
            if before is not None and before.service != ep.service:
                self._leave_service(eid, before.service)
            self._members.setdefault(ep.service, set()).add(eid)
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
        self._touch(endpoint_id, self._by_source[owner][endpoint_id].service)
        self._schedule_publish()
        return True

    def _forget_endpoint(self, eid: str, ep: Endpoint) -> None:
        self._owner.pop(eid, None)
        self._check_status.pop(eid, None)
        self._leave_service(eid, ep.service)

    def _leave_service(self, eid: str, service: str) -> None:
        self._touch(eid, service)
        ids = self._members.get(service)
        if ids is not None:
            ids.discard(eid)
            if not ids:
                del self._members[service]

    def _touch(self, eid: str, service: str) -> None:
        self._dirty_endpoints.add(eid)
        self._dirty_services.add(service)

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

    async def watch(self, after_index: int = 0) -> AsyncIterator[Snapshot]:
        """Yield each new snapshot (latest wins: a slow reader skips intermediates)."""
        index = after_index
        while True:
            snap = await self.wait_for_index(index, None)
            index = snap.index
            yield snap

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
        """Fold pending changes into a new snapshot now (if anything visible changed)."""
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        if not self._dirty_endpoints:
            return self._snapshot
        old = self._snapshot
        endpoints = dict(old.endpoints)
        changed = False
        for eid in self._dirty_endpoints:
            ep = self._effective(eid)
            if ep is None:
                changed |= endpoints.pop(eid, None) is not None
            elif endpoints.get(eid) != ep:
                endpoints[eid] = ep
                changed = True
        services = dict(old.services)
        for name in self._dirty_services:
            svc = self._build_service(name, endpoints)
            if svc is None:
                changed |= services.pop(name, None) is not None
            elif services.get(name) != svc:
                services[name] = svc
                changed = True
        self._dirty_endpoints.clear()
        self._dirty_services.clear()
        if not changed:
            return old
        now = self._clock()
        self._last_publish = now
        snap = Snapshot(
            index=old.index + 1,
            services=MappingProxyType(services),
            endpoints=MappingProxyType(endpoints),
            created_at=now,
        )
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

    def _build_service(self, name: str, endpoints: Mapping[str, Endpoint]) -> Service | None:
        ids = self._members.get(name)
        if not ids:
            return None
        members = tuple(endpoints[eid] for eid in sorted(ids) if eid in endpoints)
        if not members:
            return None
        tags = sorted({t for e in members for t in e.tags})
        return Service(name=name, endpoints=members, tags=tuple(tags))
