"""Parked blocking queries and watch streams, woken by the keys a snapshot changed.

The one mechanism behind every "wait for a change" of the APIs: Beacon's own
blocking queries and `/v1/watch` streams (`blocking.py`, `watch.py`) and the
Consul-compatible blocking queries (`consul/routes.py`). Each view names what
it watches with a key (`*` any change, `svc:<name>` one service, Consul's
`services`, `nodes`, `node:<name>`); whoever follows the catalog's snapshots
wakes the keys a snapshot changed, and a woken wait re-checks its own view
index (a spurious wake-up costs one comparison).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


class Waiters:
    """The parked waits, by watched key; a snapshot wakes only the keys it changed.

    Each parked wait owns one future and one timer, kept in its key's set and dropped
    with it (a client that hangs up is cancelled by aiohttp and leaves the set), so memory
    follows the number of parked waits. Nothing is shared between waiters: no callback
    list on a common future that every departure would have to search, and no task per
    wait. Closed (before `open()`, after `close()`), every wait returns at once.
    """

    def __init__(self) -> None:
        self.slots: dict[str, set[asyncio.Future[None]]] = {}
        self.parked = 0
        self.closed = True

    def open(self) -> None:
        self.closed = False

    def close(self) -> None:
        """Shutdown: every parked wait ends now, and later ones do not park."""
        self.closed = True
        self.wake(list(self.slots))

    async def wait(self, key: str, timeout: float) -> None:
        """Until `key` is woken, `timeout` seconds pass or the waiters close."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiters = self.slots.get(key)
        if waiters is None:
            waiters = self.slots[key] = set()
        waiters.add(future)
        self.parked += 1
        timer = loop.call_later(max(0.0, timeout), _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            self.parked -= 1
            waiters.discard(future)
            if not waiters and self.slots.get(key) is waiters:
                del self.slots[key]

    async def until(self, key: str, changed: Callable[[], bool], timeout: float) -> None:
        """Park on `key` until `changed()` holds, `timeout` seconds pass or the waiters close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed and not changed():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await self.wait(key, remaining)

    def count(self, key: str) -> int:
        return len(self.slots.get(key, ()))

    def wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            for future in self.slots.pop(key, ()):
                _settle(future)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["Waiters"]
