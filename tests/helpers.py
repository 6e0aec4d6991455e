"""Run a real Beacon (all components, one process) inside a test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar

from beacon.app import App
from beacon.config import Config, HostPort

T = TypeVar("T")

ANY_PORT = HostPort("127.0.0.1", 0)


def test_config(**overrides: Any) -> Config:
    """A Config with every listener on a free loopback port and quick resync."""
    base = Config(
        api_listen=ANY_PORT,
        dns_listen=(ANY_PORT,),
        proxy_listen=ANY_PORT,
        dns_recursors=(),
        shutdown_timeout=5.0,
        node="test-node",
    )
    return replace(base, **overrides).validate()


test_config.__test__ = False  # type: ignore[attr-defined]  # a factory, not a test


@asynccontextmanager
async def running_app(**overrides: Any) -> AsyncIterator[App]:
    app = App(test_config(**overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def eventually(probe: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `probe` until it returns a truthy value; fail with its last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
