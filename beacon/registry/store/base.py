"""The store interface: what the cluster source needs from a shared key-value store.

A store mirrors one key range (every node's records) into memory and reports
each change of that mirror; it owns a *session* (an etcd lease) under which
this node's own keys live, and keeps the keys it was told to keep written
through reconnects. Two implementations: `MemoryStore` (one process; several
stores may share one `MemoryBackend`, which is how the cluster logic is tested
without etcd) and `EtcdStore` (etcd v3 through its JSON gateway).

Keys are text relative to the store prefix (e.g. ``nodes/web1/ep/abc-80``);
values are bytes. Everything here runs on the event loop thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Change:
    """One change of the mirrored range: `value` None means the key was deleted."""

    key: str
    value: bytes | None


ChangeListener = Callable[[Sequence[Change]], None]


class StoreError(RuntimeError):
    """The store cannot do what was asked (the message says why)."""


class NodeNameTaken(StoreError):
    """Another live agent already holds this node name."""

    def __init__(self, node: str, holder: str) -> None:
        super().__init__(
            f"node name {node!r} is already held by a running agent ({holder}); "
            "give this agent another --node, or stop the other one"
        )
        self.node = node


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What the ownership key of a node says (JSON in the store)."""

    node: str
    instance: str  # random id of the agent process holding the node
    lease_ttl: float
    started_at: float  # wall-clock seconds
    released: bool = False  # set by a clean stop: a restart may take over at once


class Store(Protocol):
    """The interface both stores implement (see the module docstring)."""

    @property
    def connected(self) -> bool: ...

    @property
    def refused(self) -> str | None:
        """Why this node may not write (e.g. its name is taken), or None."""
        ...

    def last_sync_age(self) -> float | None:
        """Seconds since the mirror was last known current (None: never synced)."""
        ...

    def view(self) -> Mapping[str, bytes]:
        """The mirrored range as last seen (read-only)."""
        ...

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]: ...

    async def start(self) -> None:
        """Open the session and claim the node name; raise NodeNameTaken when refused."""
        ...

    async def stop(self, *, release: bool = True) -> None: ...

    def set_own(self, key: str, value: bytes | None) -> None:
        """Keep `key` = `value` under this node's session (None: keep it deleted)."""
        ...

    def set_durable(self, key: str, value: bytes | None) -> None:
        """Like set_own, but the key outlives the session (manual registrations)."""
        ...

    def own_complete(self) -> None:
        """Every own key has been set: keys of an earlier session not set now are deleted."""
        ...

    async def read_prefix(self, prefix: str) -> dict[str, bytes]:
        """One read of every key under `prefix` (raises StoreError when unreachable)."""
        ...

    async def flush(self, timeout: float) -> bool:
        """Wait until every own and durable key is written; False on timeout."""
        ...
