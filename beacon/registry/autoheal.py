"""Autoheal: restart a running-but-unhealthy container, within limits.

Opt-in per container (`beacon.autoheal=true`). The health checker decides
*that* a container looks unhealthy - `after` consecutive failures of its own
check, or Docker's HEALTHCHECK saying `unhealthy` with a long enough failing
streak - and asks `Autoheal.consider`. This module decides *whether* to
restart now:

- never a container being stopped (SIGTERM seen, endpoints draining), paused,
  stopped or already restarting: Docker is inspected again right before;
- restarts are spaced by `backoff`, doubling with each restart in the window,
  and at most `max_restarts` happen per `window`; past that the container is
  left alone and logged `limited:` once per window.

Time comes from the injected `clock` (the loop's monotonic time by default),
so the windows can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from beacon.registry.checkspec import truncate_output
from beacon.registry.model import AutohealSpec

log = logging.getLogger("beacon.registry.autoheal")

AUTOHEAL_RESTARTS = Counter(
    "beacon_registry_autoheal_restarts_total", "Unhealthy containers restarted by autoheal"
)
AUTOHEAL_LIMITED = Counter(
    "beacon_registry_autoheal_limited_total",
    "Autoheal restarts withheld because a container reached its limit per window",
)
AUTOHEAL_LOG_SIZE = 200


class DockerControl(Protocol):
    """What autoheal needs from the Docker source."""

    async def inspect_container(self, container_id: str) -> Mapping[str, Any] | None: ...

    async def restart_container(self, container_id: str, timeout: float = 10) -> None: ...


# ------------------------------------------------------------------ pure core
def backoff_delay(spec: AutohealSpec, restarts_in_window: int) -> float:
    """Least wait after the latest restart: backoff, doubling per restart, capped at the window."""
    if restarts_in_window <= 0:
        return 0.0
    return float(min(spec.window, spec.backoff * 2 ** (restarts_in_window - 1)))


def docker_health(info: Mapping[str, Any]) -> tuple[str, int, float | None, str]:
    """(status, failing streak, healthcheck interval in seconds or None, last output)
    from a container inspect document."""
    state = info.get("State") or {}
    health = state.get("Health") or {}
    status = str(health.get("Status") or "")
    streak = health.get("FailingStreak")
    streak = streak if isinstance(streak, int) else 0
    logs = health.get("Log") or []
    output = str(logs[-1].get("Output") or "").strip() if logs and isinstance(logs[-1], dict) else ""
    interval_ns = ((info.get("Config") or {}).get("Healthcheck") or {}).get("Interval")
    interval = interval_ns / 1e9 if isinstance(interval_ns, int) and interval_ns > 0 else None
    return status, streak, interval, output


@dataclass(slots=True)
class _RestartHistory:
    """One container's restarts that still count against its limit."""

    window: float
    times: collections.deque[float] = field(default_factory=collections.deque)  # clock() of each restart
    restarting: bool = False
    limited_until: float = 0.0  # no repeated "limited" log before this


class Autoheal:
    """Restart decisions and their history, per container id.

    `draining(cid)` tells whether someone is stopping the container;
    `on_restarted(cid)` lets the checker give the fresh process a fresh count.
    """

    def __init__(
        self,
        docker: DockerControl | None,
        *,
        draining: Callable[[str], bool],
        on_restarted: Callable[[str], None],
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._docker = docker
        self._draining = draining
        self._on_restarted = on_restarted
        self._clock = clock
        self._wall_clock = wall_clock
        self._history: dict[str, _RestartHistory] = {}
        self._log: collections.deque[dict[str, object]] = collections.deque(maxlen=AUTOHEAL_LOG_SIZE)
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # ---------------------------------------------------------------- reads
    def actions(self) -> list[dict[str, object]]:
        """Autoheal actions, oldest first: restarted, failed (restart error) and limited."""
        return [dict(entry) for entry in self._log]

    def tracked(self) -> set[str]:
        """Container ids with a restart history still kept."""
        return set(self._history)

    # ------------------------------------------------------------ decisions
    def consider(
        self, cid: str, name: str, spec: AutohealSpec, reason: str, *, endpoint_id: str | None = None
    ) -> None:
        """The container looks unhealthy: restart it now if the limits allow."""
        if self._docker is None or self._draining(cid):
            return
        heal = self._history.setdefault(cid, _RestartHistory(spec.window))
        heal.window = spec.window
        if heal.restarting:
            return
        now = self.now()
        self._prune(heal, now)
        if len(heal.times) >= spec.max_restarts:
            if now >= heal.limited_until:
                heal.limited_until = heal.times[0] + spec.window
                AUTOHEAL_LIMITED.inc()
                log.warning(
                    "limited: %s %s not restarted, %d restarts within %gs already (%s)",
                    cid[:12], name, len(heal.times), spec.window, reason,
                )
                self._record("limited", cid, name, reason, endpoint_id, len(heal.times))
            return
        if heal.times and now < heal.times[-1] + backoff_delay(spec, len(heal.times)):
            return
        heal.restarting = True
        task = asyncio.create_task(self._restart(cid, name, heal, reason, endpoint_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget_expired(self, followed: Callable[[str], bool]) -> None:
        """Free the history of containers no longer followed once it stops counting."""
        now = self.now()
        for cid in [c for c, h in self._history.items() if not followed(c) and not h.restarting]:
            heal = self._history[cid]
            self._prune(heal, now)
            if not heal.times:
                del self._history[cid]

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ internals
    async def _restart(
        self, cid: str, name: str, heal: _RestartHistory, reason: str, endpoint_id: str | None
    ) -> None:
        assert self._docker is not None
        try:
            # Docker's word is final: never restart a container someone paused,
            # stopped or that Docker is already restarting.
            info = await self._docker.inspect_container(cid)
            state = (info or {}).get("State") or {}
            if not state.get("Running") or state.get("Paused") or state.get("Restarting"):
                log.info("skipped: autoheal of %s %s, container is not running", cid[:12], name)
                return
            if self._draining(cid):  # `docker stop` began while we looked
                return
            heal.times.append(self.now())
            await self._docker.restart_container(cid)
        except Exception as exc:
            log.warning("failed: autoheal restart of %s %s: %s", cid[:12], name, describe(exc))
            self._record("failed", cid, name, f"{reason}; restart failed: {describe(exc)}", endpoint_id, len(heal.times))
            return
        finally:
            heal.restarting = False
        AUTOHEAL_RESTARTS.inc()
        log.warning("restarted: %s %s (%s)", cid[:12], name, reason)
        self._record("restarted", cid, name, reason, endpoint_id, len(heal.times))
        self._on_restarted(cid)

    @staticmethod
    def _prune(heal: _RestartHistory, now: float) -> None:
        cutoff = now - heal.window
        while heal.times and heal.times[0] <= cutoff:
            heal.times.popleft()

    def _record(
        self, action: str, cid: str, name: str, reason: str, endpoint_id: str | None, restarts: int
    ) -> None:
        self._log.append(
            {
                "time": self._wall_clock(),
                "action": action,
                "container_id": cid,
                "container_name": name,
                "endpoint_id": endpoint_id,
                "reason": truncate_output(reason, 1024),
                "restarts_in_window": restarts,
            }
        )


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
