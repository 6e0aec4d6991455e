"""A fake `beacon.clock.Clock` for tests: time moves only when the test advances it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:  # also usable where a bare clock() is taken
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """Sleeps in progress (not cancelled)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, wake every sleep that is due, and let the woken run."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)

    async def advance_until(
        self, predicate: Callable[[], object], *, step: float, limit: float, real_timeout: float = 10.0
    ) -> None:
        """Advance by `step` until `predicate()` holds; fail past `limit` fake seconds.

        Between steps real time passes too (a few ms), for I/O the woken code does.
        """
        loop = asyncio.get_running_loop()
        start, deadline = self._now, loop.time() + real_timeout
        while not predicate():
            if self._now - start > limit or loop.time() > deadline:
                raise AssertionError(f"condition not met within {limit}s of fake time")
            await self.advance(step)
            await asyncio.sleep(0.005)
