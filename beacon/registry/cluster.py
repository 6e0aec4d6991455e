"""The cluster source: one catalog across many Docker hosts, through a shared store.

Each agent writes only its own endpoints (Docker containers, accepted manual
registrations; their effective state, check result included) under
``nodes/<node>/ep/<id>``, attached to its session (an etcd lease), and folds
every other node's endpoints into the local catalog, one catalog source per
remote endpoint (``remote:<node>/<id>``). So:

* local changes are served locally at once (the catalog publishes before any
  store round trip) and written to the store as a diff of the snapshot;
* a remote change costs O(that change): one decode, one `set_source`;
* a remote endpoint arrives with its own node's check result and no check or
  autoheal spec, so this node never checks or heals another node's endpoint;
* when the store is unreachable, the last remote view stays in the catalog,
  local changes keep applying, and the store adapter catches up (resume,
  re-list and diff, re-written keys) when it returns.

Manual registrations are also kept in a durable key (``manual/<node>/<id>``,
no lease) and registered again when the agent starts: they survive a restart;
a TTL endpoint starts critical again until its next heartbeat, as documented
for any new registration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from beacon.registry.catalog import Catalog, EndpointConflict
from beacon.registry.cluster_wire import endpoint_from_wire, endpoint_to_wire
from beacon.registry.model import Endpoint, Snapshot
from beacon.registry.store.base import Change, Store, StoreError

log = logging.getLogger("beacon.registry.cluster")

SOURCE_PREFIX = "remote:"
FOLD_CHUNK = 2000  # remote changes folded per loop turn
MANUAL_SOURCE_PREFIX = "manual:"


class ManualRegistrar(Protocol):
    """What the cluster source needs from the manual registry (register at start)."""

    def register(self, endpoint: Endpoint) -> bool: ...


@dataclass(slots=True)
class NodeInfo:
    """What this agent knows about one node (for GET /v1/nodes)."""

    name: str
    record: dict[str, Any] | None = None  # the ownership record (None: no live lease seen)
    endpoints: int = 0
    last_change: float = 0.0  # wall clock of the last change seen from this node

    def to_json(self, *, local: bool) -> dict[str, object]:
        rec = self.record or {}
        if local:
            lease = "local"
        elif self.record is None:
            lease = "expired"
        else:
            lease = "released" if rec.get("released") else "alive"
        return {
            "node": self.name,
            "local": local,
            "lease": lease,
            "lease_ttl": rec.get("lease_ttl"),
            "started_at": rec.get("started_at"),
            "last_change": self.last_change or None,
            "endpoints": self.endpoints,
        }


def parse_key(key: str) -> tuple[str, str, str] | None:
    """'nodes/<node>/ep/<id>' -> (node, 'ep', id); 'nodes/<node>/owner' -> (node, 'owner', '')."""
    parts = key.split("/", 3)
    if len(parts) == 3 and parts[0] == "nodes" and parts[2] == "owner" and parts[1]:
        return parts[1], "owner", ""
    if len(parts) == 4 and parts[0] == "nodes" and parts[2] == "ep" and parts[1] and parts[3]:
        return parts[1], "ep", parts[3]
    return None


class ClusterSource:
    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        *,
        node: str,
        manual: ManualRegistrar | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._node = node
        self._manual = manual
        self._wall = wall_clock
        self._nodes: dict[str, NodeInfo] = {}
        self._published: dict[str, Endpoint] = {}  # own endpoint id -> last version written
        self._durable: dict[str, bytes] = {}  # own manual id -> durable record written
        self._previous = Snapshot(index=0, services={}, endpoints={})
        self._bad_keys: set[str] = set()  # keys whose record we could not use (logged once)
        self._unlisten: list[Callable[[], None]] = []
        self._queue: collections.deque[Change] = collections.deque()
        self._drain_handle: asyncio.Handle | None = None
        self._manual_task: asyncio.Task[None] | None = None
        self._manual_failed = False
        self.remote_changes = 0

    # ----------------------------------------------------------------- reads
    @property
    def store(self) -> Store:
        return self._store

    @property
    def node(self) -> str:
        return self._node

    def nodes_json(self) -> dict[str, object]:
        """The body of GET /v1/nodes."""
        me = self._nodes.get(self._node) or NodeInfo(self._node)
        me.endpoints = len(self._published)
        listed = [me.to_json(local=True)]
        listed += [info.to_json(local=False) for name, info in sorted(self._nodes.items()) if name != self._node]
        age = self._store.last_sync_age()
        return {
            "node": self._node,
            "store": {
                "connected": self._store.connected,
                "last_sync_age": None if age is None else round(age, 3),
                "refused": self._store.refused,
            },
            "nodes": listed,
        }

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._unlisten.append(self._store.subscribe(self._on_store_changes))
        await self._store.start()  # NodeNameTaken propagates: the agent must not run
        if self._manual is not None:
            if not await self._load_manual():
                self._manual_task = asyncio.create_task(self._retry_manual(), name="beacon-cluster-manual")
        self._catalog.publish()  # what the local sources hold now, before the first diff
        self._unlisten.append(self._catalog.add_listener(self._on_snapshot))
        self._on_snapshot(self._catalog.snapshot)
        if self._manual_task is None:
            self._store.own_complete()
        log.info("started: cluster source node=%s", self._node)

    async def stop(self) -> None:
        for unlisten in self._unlisten:
            unlisten()
        self._unlisten.clear()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        if self._manual_task is not None:
            self._manual_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._manual_task
            self._manual_task = None
        await self._store.flush(1.0)
        await self._store.stop(release=True)
        log.info("stopped: cluster source")

    # ------------------------------------------------- manual registrations
    async def _load_manual(self) -> bool:
        try:
            records = await self._store.read_prefix(f"manual/{self._node}/")
        except StoreError as exc:
            if not self._manual_failed:  # one line per outage, not per retry
                self._manual_failed = True
                log.warning("failed: loading manual registrations (%s); retrying", exc)
            return False
        self._manual_failed = False
        for key, raw in records.items():
            self._durable[key.rsplit("/", 1)[-1]] = raw
            try:
                ep = endpoint_from_wire(raw, node=self._node)
                assert self._manual is not None
                self._manual.register(ep)
            except Exception as exc:  # a bad record must not stop the agent
                log.warning("ignored: manual registration %s from the store: %s", key, exc)
        if records:
            log.info("loaded: %d manual registrations from the store", len(records))
        return True

    async def _retry_manual(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            if await self._load_manual():
                break
            delay = min(delay * 2, 5.0)
        self._manual_task = None
        self._catalog.publish()
        self._store.own_complete()

    # ------------------------------------------------ local -> store (diff)
    def _on_snapshot(self, snap: Snapshot) -> None:
        # O(what changed): the catalog recorded the delta to the snapshot before.
        delta = snap.changed_since(self._previous)
        self._previous = snap
        for eid in delta.endpoints_changed | delta.endpoints_removed:
            self._publish_endpoint(eid, snap.endpoints.get(eid))

    def _publish_endpoint(self, eid: str, ep: Endpoint | None) -> None:
        owner = self._catalog.owner_of(eid) if ep is not None else None
        local = ep is not None and owner is not None and not owner.startswith(SOURCE_PREFIX)
        key = f"nodes/{self._node}/ep/{eid}"
        if local and ep is not None:
            if self._published.get(eid) is not ep:
                self._published[eid] = ep
                self._store.set_own(key, endpoint_to_wire(ep))
        elif self._published.pop(eid, None) is not None:
            self._store.set_own(key, None)
        # Manual registrations: the durable definition (before checks are folded in).
        if local and owner is not None and owner.startswith(MANUAL_SOURCE_PREFIX):
            base = self._catalog.source_endpoints(owner).get(eid)
            if base is not None:
                raw = endpoint_to_wire(replace(base, check_status=None, state=base.state), full=True)
                if self._durable.get(eid) != raw:
                    self._durable[eid] = raw
                    self._store.set_durable(f"manual/{self._node}/{eid}", raw)
        elif eid in self._durable and (owner is None or not owner.startswith(MANUAL_SOURCE_PREFIX)):
            del self._durable[eid]
            self._store.set_durable(f"manual/{self._node}/{eid}", None)

    # ----------------------------------------------- store -> catalog (fold)
    def _on_store_changes(self, changes: Sequence[Change]) -> None:
        """Fold store changes in order; a big batch (a re-list of the whole
        cluster) is folded FOLD_CHUNK at a time so the loop keeps serving and
        the lease keepalive is never starved."""
        self._queue.extend(changes)
        if self._drain_handle is not None:
            return  # a drain is under way: these follow in order
        if len(self._queue) <= FOLD_CHUNK:
            self._fold_some()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (pure use): fold it all now
            while self._queue:
                self._fold_some()
            return
        self._drain_handle = loop.call_soon(self._drain_step)

    def _drain_step(self) -> None:
        self._fold_some()
        self._drain_handle = asyncio.get_running_loop().call_soon(self._drain_step) if self._queue else None

    def _fold_some(self) -> None:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(FOLD_CHUNK, len(queue)))]
        now = self._wall()
        for change in batch:
            parsed = parse_key(change.key)
            if parsed is None:
                continue
            node, kind, eid = parsed
            info = self._nodes.get(node)
            if info is None:
                info = self._nodes[node] = NodeInfo(node)
            info.last_change = now
            if kind == "owner":
                info.record = _record(change.value)
            elif node != self._node:
                self._fold(info, eid, change)
            if info.record is None and info.endpoints == 0 and node != self._node:
                del self._nodes[node]

    def _fold(self, info: NodeInfo, eid: str, change: Change) -> None:
        self.remote_changes += 1
        source = f"{SOURCE_PREFIX}{info.name}/{eid}"
        had = bool(self._catalog.source_endpoints(source))
        if change.value is None:
            self._catalog.remove_source(source)
            self._bad_keys.discard(change.key)
        else:
            try:
                ep = endpoint_from_wire(change.value, node=info.name)
                if ep.id != eid:
                    raise ValueError(f"id {ep.id!r} differs from the key")
                self._catalog.set_source(source, [ep])
                self._bad_keys.discard(change.key)
            except (ValueError, EndpointConflict) as exc:
                self._catalog.remove_source(source)
                if change.key not in self._bad_keys:
                    self._bad_keys.add(change.key)
                    log.warning("ignored: endpoint %s of node %s: %s", eid, info.name, exc)
        has = bool(self._catalog.source_endpoints(source))
        info.endpoints += int(has) - int(had)


def _record(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
