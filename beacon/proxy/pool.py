"""The upstream connection pool: the one owner of upstream connections.

It alone holds the idle keep-alive connections of every endpoint (LIFO),
lends one to an exchange (`acquire`), takes it back (`release`), opens new
ones and closes the idle ones of an endpoint that stops taking requests
(`retire`). A connection only calls `opened` / `lost` on it, and the core
only `acquire` / `release` (aiohttp's BaseConnector does the same).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from beacon.proxy.balancer import EndpointState
from beacon.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from beacon.proxy.core import ProxyCore
    from beacon.proxy.exchange import Exchange

log = logging.getLogger("beacon.proxy")

MAX_IDLE_PER_ENDPOINT = 256
MAX_AHEAD = 4


class UpstreamPool:
    def __init__(self, core: ProxyCore, takes_requests: Callable[[EndpointState], bool]) -> None:
        self.core = core
        self._takes_requests = takes_requests  # the balancer's view: is this endpoint still current and passing?
        self._idle: dict[EndpointState, list[UpstreamConnection]] = {}
        self.connections: set[UpstreamConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ahead: dict[EndpointState, int] = {}  # connects ahead in flight
        self._expired: set[asyncio.Task[None]] = set()  # connects cancelled by their timer

    def __len__(self) -> int:
        return len(self.connections)

    # ------------------------------------------------- called by connections
    def opened(self, conn: UpstreamConnection) -> None:
        self.connections.add(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        self.connections.discard(conn)
        idle = self._idle.get(conn.state)
        if idle is not None and conn in idle:
            idle.remove(conn)

    # ------------------------------------------------------ called by the core
    def acquire(self, ex: Exchange, state: EndpointState) -> None:
        """Send the exchange's request on an idle connection to `state`, or open
        one (the core hears back through `connected` / `connect_failed`)."""
        idle = self._idle.get(state)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.core.attach(ex, conn)
                return
        core = self.core
        task = core.loop.create_task(self._connect(ex, state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, state: EndpointState) -> UpstreamConnection:
        """A new connection to `state`, or TimeoutError after the connect timeout.

        The timeout is a plain timer that cancels the task, not
        `asyncio.timeout`: that context manager cost ~25 us of CPU per connect
        here, as much as the rest of the connect's Python work, paid again at
        every reconnect to a backend that closes keep-alive connections."""
        core = self.core
        loop = core.loop
        task = asyncio.current_task()
        assert task is not None
        timer = loop.call_later(core.connect_timeout, self._expire, task)
        try:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(core, self, state), state.address, state.port
            )
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # cancelled by close_all
            self._expired.discard(task)
            task.uncancel()
            raise TimeoutError from None
        finally:
            timer.cancel()
        return conn

    def _expire(self, task: asyncio.Task[None]) -> None:
        self._expired.add(task)
        task.cancel()

    async def _connect(self, ex: Exchange, state: EndpointState) -> None:
        core = self.core
        try:
            conn = await self._open(state)
        except (OSError, TimeoutError) as exc:
            core.connect_failed(ex, state, exc)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one request take the proxy down
            log.exception("failed: connect to %s:%d", state.address, state.port)
            core.connect_failed(ex, state, exc)
            return
        if ex.done:
            self.release(conn)  # the client left while we connected
            return
        core.attach(ex, conn)
        ex.client.flush()

    def connect_ahead(self, state: EndpointState) -> None:
        """Open a connection to `state` for the idle pool now, off any request's
        path: called when the upstream closed one (Connection: close, e.g. at
        nginx's keepalive_requests), so the next request does not wait for a
        connect. At most MAX_AHEAD in flight per endpoint; a failure counts
        for nothing (no request was waiting on it)."""
        if self.core.stopping or self._ahead.get(state, 0) >= MAX_AHEAD or not self._takes_requests(state):
            return
        self._ahead[state] = self._ahead.get(state, 0) + 1
        task = self.core.loop.create_task(self._connect_ahead(state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_ahead(self, state: EndpointState) -> None:
        try:
            conn = await self._open(state)
        except (OSError, TimeoutError) as exc:
            log.debug("failed: connect ahead to %s:%d: %s", state.address, state.port, exc)
            return
        finally:
            left = self._ahead.get(state, 1) - 1
            if left > 0:
                self._ahead[state] = left
            else:
                self._ahead.pop(state, None)
        self.release(conn)

    def release(self, conn: UpstreamConnection) -> None:
        """Take a connection back: idle in the pool, or closed when not worth keeping."""
        state = conn.state
        idle = self._idle.get(state)
        if idle is None:
            idle = self._idle[state] = []
        if (conn.closed or self.core.stopping or len(idle) >= MAX_IDLE_PER_ENDPOINT
                or not self._takes_requests(state)):  # fmt: skip
            conn.close_after_exchange()
            return
        conn.idle(self.core.now + self.core.idle_timeout)
        idle.append(conn)

    def retire(self, state: EndpointState) -> None:
        """`state` takes no new requests: close its idle connections (so a
        draining backend can exit)."""
        idle = self._idle.pop(state, None)
        if idle:
            for conn in idle:
                conn.close()

    def waiting_on(self, state: EndpointState) -> list[UpstreamConnection]:
        """Connections to `state` whose exchange has no response byte yet."""
        return [c for c in self.connections if c.state is state and c.exchange is not None
                and c.tunnel is None and not c.exchange.response_started]  # fmt: skip

    def close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
