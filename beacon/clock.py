"""Time as a parameter: what components that wait or measure time are given.

`SYSTEM_CLOCK` is the real one (monotonic seconds, asyncio's sleep). Tests
pass a fake whose time only moves when the test says so (tests/helpers.py
`FakeClock`), so timers are exercised without waiting on the wall clock.
The catalog and manual registrations take a bare `clock()` function instead:
they never sleep themselves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = MonotonicClock()

__all__ = ["SYSTEM_CLOCK", "Clock", "MonotonicClock"]
