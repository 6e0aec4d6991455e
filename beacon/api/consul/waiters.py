"""The parked blocking queries of the Consul-compatible API, woken by the keys a snapshot changed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class Waiters:
    """The parked blocking queries, by watched key; a snapshot wakes only the keys it changed.

    Each parked query owns one future and one timer, kept in its key's set and dropped
    with it (a client that hangs up is cancelled by aiohttp and leaves the set), so memory
    follows the number of parked queries. Nothing is shared between waiters: no callback
    list on a common future that every departure would have to search.
    """

    def __init__(self) -> None:
        self.slots: dict[str, set[asyncio.Future[None]]] = {}
        self.parked = 0

    async def wait(self, key: str, timeout: float) -> None:
        """Until `key` is woken, `timeout` seconds pass or everything is woken (shutdown)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiters = self.slots.get(key)
        if waiters is None:
            waiters = self.slots[key] = set()
        waiters.add(future)
        self.parked += 1
        timer = loop.call_later(timeout, _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            self.parked -= 1
            waiters.discard(future)
            if not waiters and self.slots.get(key) is waiters:
                del self.slots[key]

    def count(self, key: str) -> int:
        return len(self.slots.get(key, ()))

    def wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            for future in self.slots.pop(key, ()):
                _settle(future)

    def wake_all(self) -> None:
        self.wake(list(self.slots))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

