"""Consul indexes (X-Consul-Index, CreateIndex, ModifyIndex) from snapshot deltas (pure: no clock, no I/O).

Beacon's snapshot index starts at 1 in every process; a Consul index
must never go backwards for a client that outlives a restart. So every index
served here is `epoch + snapshot index`, where `epoch` is the wall clock in
microseconds when this process built its `ConsulApi`: a later process starts
above anything an earlier one could have reached (it would have had to
publish more than one snapshot per microsecond). Only a wall clock stepped
back by more than the previous run's uptime breaks that; then the index goes
backwards once, and Consul clients reset to 0 as Consul's blocking-query
documentation requires of them, while Beacon answers an index above its own
at once so no client ever waits on a number that cannot come. Values stay
below 2^53 (safe in JavaScript clients) until the year 2255.

Each service has its own ModifyIndex (the last snapshot that changed it), so
a blocking query on service X sleeps through changes of service Y; the
tracker updates only what the snapshot delta names.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from beacon.registry.model import Endpoint, Snapshot

REMOVED_NAMES_KEPT = 10_000  # removed services whose ModifyIndex is remembered


@dataclass(slots=True)
class _EndpointIndex:
    create: int
    modify: int


class IndexTracker:
    """Consul indexes for one process, advanced from snapshot deltas (pure: no clock, no I/O).

    All stored indexes are snapshot indexes; `consul(i)` turns one into the served
    index (`epoch + i`). Keys name what a blocking query watches: `services` (the
    name → tags map), `svc:<name>`, `nodes` (the node list), `node:<name>`.
    """

    def __init__(self, snapshot: Snapshot, *, epoch: int, local_node: str) -> None:
        self.epoch = epoch
        self.local_node = local_node
        self.current = snapshot.index
        self.floor = snapshot.index  # the index of anything never seen (or forgotten)
        self.services_index = snapshot.index
        self.nodes_index = snapshot.index
        self._service: dict[str, int] = {}
        self._node: dict[str, int] = {}
        self._endpoints: dict[str, _EndpointIndex] = {}
        self._node_members: dict[str, set[str]] = {}  # node -> endpoint ids
        self._last = Snapshot(index=0, services=MappingProxyType({}), endpoints=MappingProxyType({}))
        self.update(snapshot)

    def consul(self, snapshot_index: int) -> int:
        return self.epoch + snapshot_index

    def node_of(self, ep: Endpoint) -> str:
        return ep.node or self.local_node

    # ---------------------------------------------------------------- reads
    def view_index(self, key: str) -> int:
        """The served (Consul) index of what `key` names."""
        if key == "services":
            return self.consul(self.services_index)
        if key == "nodes":
            return self.consul(self.nodes_index)
        kind, _, name = key.partition(":")
        table = self._service if kind == "svc" else self._node
        return self.consul(table.get(name, self.floor))

    def endpoint_index(self, eid: str) -> tuple[int, int]:
        entry = self._endpoints.get(eid)
        if entry is None:
            return self.consul(self.floor), self.consul(self.floor)
        return self.consul(entry.create), self.consul(entry.modify)

    def nodes(self) -> list[str]:
        return sorted(self._node_members)

    def node_endpoints(self, node: str) -> set[str]:
        return self._node_members.get(node, set())

    # --------------------------------------------------------------- update
    def update(self, new: Snapshot) -> set[str]:
        """Advance to `new`; return the keys whose index changed (the watchers to wake)."""
        old, self._last = self._last, new
        idx = new.index
        self.current = idx
        keys: set[str] = set()
        names_changed = False
        # O(what changed) when `old` is the snapshot just before (the catalog recorded
        # the delta): only the endpoints it names are looked at, not whole services.
        delta = new.changed_since(old)
        for name in delta.services_touched:
            before, after = old.services.get(name), new.services.get(name)
            self._service[name] = idx
            keys.add("svc:" + name)
            if before is None or after is None or before.tags != after.tags:
                names_changed = True
        touched_eps = delta.endpoints_changed | delta.endpoints_removed
        old_eps: dict[str, Endpoint] = {e: ep for e in touched_eps if (ep := old.endpoints.get(e)) is not None}
        new_eps: dict[str, Endpoint] = {e: ep for e in delta.endpoints_changed if (ep := new.endpoints.get(e)) is not None}
        if names_changed:
            self.services_index = idx
            keys.add("services")
        nodes_before = len(self._node_members)
        touched_nodes: set[str] = set()
        for eid, ep in old_eps.items():
            after_ep = new_eps.get(eid)
            if after_ep is ep:
                continue
            if after_ep is None:
                self._endpoints.pop(eid, None)
            node = self.node_of(ep)
            if after_ep is None or self.node_of(after_ep) != node:
                members = self._node_members.get(node)
                if members is not None:
                    members.discard(eid)
                    if not members:
                        del self._node_members[node]
            touched_nodes.add(node)
        for eid, ep in new_eps.items():
            before_ep = old_eps.get(eid)
            if before_ep is ep:
                continue
            entry = self._endpoints.get(eid)
            if entry is None:
                self._endpoints[eid] = _EndpointIndex(idx, idx)
            else:
                entry.modify = idx
            node = self.node_of(ep)
            members = self._node_members.setdefault(node, set())
            if eid not in members:
                members.add(eid)
            touched_nodes.add(node)
        for node in touched_nodes:
            self._node[node] = idx
            keys.add("node:" + node)
        if len(self._node_members) != nodes_before or touched_nodes - self._node_members.keys():
            self.nodes_index = idx
            keys.add("nodes")
        self._forget_removed(new)
        return keys

    def _forget_removed(self, snap: Snapshot) -> None:
        """Bound what removed services and nodes leave behind; what is forgotten reads as `floor`."""
        if len(self._service) > len(snap.services) + REMOVED_NAMES_KEPT:
            self.floor = snap.index
            self._service = {n: i for n, i in self._service.items() if n in snap.services}
        if len(self._node) > len(self._node_members) + REMOVED_NAMES_KEPT:
            self.floor = snap.index
            self._node = {n: i for n, i in self._node.items() if n in self._node_members}

