"""The in-process store: today's one-host behaviour, and the seam for pure tests.

A `MemoryBackend` is the shared "etcd" of one process; each `MemoryStore` is
one agent's session on it. Keys of a session are deleted when it `expire()`s
(what a lease expiry does in etcd). A lone MemoryStore mirrors only its own
keys, so a cluster source on it sees no other node: exactly one host.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from beacon.registry.store.base import Change, ChangeListener, NodeNameTaken


class MemoryBackend:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.owner: dict[str, MemoryStore] = {}  # leased key -> session
        self.stores: list[MemoryStore] = []
        self.revision = 0

    def write(self, changes: Sequence[Change], session: MemoryStore | None) -> None:
        real: list[Change] = []
        for ch in changes:
            if ch.value is None:
                if self.data.pop(ch.key, None) is not None:
                    self.owner.pop(ch.key, None)
                    real.append(ch)
            else:
                if session is not None:
                    self.owner[ch.key] = session
                if self.data.get(ch.key) != ch.value:
                    self.data[ch.key] = ch.value
                    real.append(ch)
        if real:
            self.revision += 1
            for store in list(self.stores):
                store._deliver(real)


class MemoryStore:
    def __init__(self, *, node: str, backend: MemoryBackend | None = None) -> None:
        self._node = node
        self._backend = backend or MemoryBackend()
        self._view: dict[str, bytes] = {}
        self._listeners: list[ChangeListener] = []
        self._started = False
        self._own: set[str] = set()
        self._complete = False

    @property
    def connected(self) -> bool:
        return self._started

    @property
    def refused(self) -> str | None:
        return None

    def last_sync_age(self) -> float | None:
        return 0.0 if self._started else None

    def view(self) -> Mapping[str, bytes]:
        return MappingProxyType(self._view)

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def start(self) -> None:
        owner_key = f"nodes/{self._node}/owner"
        holder = self._backend.owner.get(owner_key)
        if holder is not None and holder is not self and holder._started:
            raise NodeNameTaken(self._node, "another store in this process")
        self._backend.stores.append(self)
        self._started = True
        self._deliver([Change(k, v) for k, v in self._backend.data.items() if k.startswith("nodes/")])
        record = {"node": self._node, "instance": str(id(self)), "released": False}
        self._write(owner_key, json.dumps(record).encode(), leased=True)

    async def stop(self, *, release: bool = True) -> None:
        self._started = False
        if self in self._backend.stores:
            self._backend.stores.remove(self)

    def expire(self) -> None:
        """What a lease expiry does: every key of this session goes."""
        self._backend.write([Change(k, None) for k, s in self._backend.owner.items() if s is self], None)
        self._own.clear()

    def _write(self, key: str, value: bytes | None, *, leased: bool) -> None:
        if leased:
            (self._own.add if value is not None else self._own.discard)(key)
        self._backend.write([Change(key, value)], self if leased else None)

    def set_own(self, key: str, value: bytes | None) -> None:
        self._write(key, value, leased=True)

    def set_durable(self, key: str, value: bytes | None) -> None:
        self._write(key, value, leased=False)

    def own_complete(self) -> None:
        if self._complete:
            return
        self._complete = True
        prefix = f"nodes/{self._node}/"
        stale = [k for k in self._backend.data if k.startswith(prefix) and k not in self._own]
        self._backend.write([Change(k, None) for k in stale], None)

    async def read_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self._backend.data.items() if k.startswith(prefix)}

    async def flush(self, timeout: float) -> bool:
        await asyncio.sleep(0)
        return True

    def _deliver(self, changes: Sequence[Change]) -> None:
        mine = [c for c in changes if c.key.startswith("nodes/")]
        for c in mine:
            if c.value is None:
                self._view.pop(c.key, None)
            else:
                self._view[c.key] = c.value
        if mine:
            for listener in list(self._listeners):
                listener(mine)
