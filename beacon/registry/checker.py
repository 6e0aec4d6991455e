"""Active health checks, readiness and autoheal.

The checker follows the catalog's snapshots and runs exactly one check per
endpoint that has an HTTP or TCP `CheckSpec`, whoever registered it (container
labels or the API) and however many consumers read it. Results go back to the
catalog with `set_check_status`; the catalog folds them into the published
state, so DNS, proxy and API agree on who is healthy.

Scheduling: one scheduler task owns a heap of due times. Popping a due job
takes a slot of a semaphore (`config.check_concurrency`) and runs that one
probe in a short-lived task; the next run is pushed when it finishes (so a
slow endpoint never has two probes in flight). Times carry jitter so endpoints
registered together do not stay in step. Nothing per endpoint lives forever
except a small record, so thousands of endpoints cost a heap and a dict.

Snapshot churn: a status is written to the catalog only when something an
operator would see changes - the state, the output, or a consecutive count
still below the threshold that matters (rise, fall, autoheal.after). A steady
endpoint therefore causes no new snapshot and wakes no watcher; its
`last_checked` is the time of the last such change.

Autoheal (opt-in per container, `beacon.autoheal=true`): the checker notices
`after` consecutive failures of a container's checked endpoint, or follows
Docker's HEALTHCHECK while the container's source-side state is critical
(inspecting it at its healthcheck interval), and asks `autoheal.Autoheal`
whether to restart; that module owns the limits and the restart history.

Time: the scheduler's heap and the autoheal windows read the injected
`clock` (the loop's monotonic time by default); wall-clock times shown in
the API come from `wall_clock`.

Length (~610 lines): the scheduler heap and the probes share one bounded-concurrency slot pool.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import Counter, Gauge, Histogram
from yarl import URL

from beacon.clock import SYSTEM_CLOCK, Clock
from beacon.config import Config
from beacon.registry.autoheal import Autoheal, DockerControl, describe, docker_health
from beacon.registry.catalog import Catalog
from beacon.registry.checkspec import OUTPUT_LIMIT, truncate_output
from beacon.registry.model import AutohealSpec, CheckSpec, CheckStatus, Endpoint, Snapshot, State

log = logging.getLogger("beacon.registry.checker")

# Metrics live at module level: prometheus' default registry accepts each name
# once per process, and several checkers may exist in one process (tests).
CHECKS_RUN = Counter(
    "beacon_registry_checks_total", "Active health checks run, by kind and result", ["kind", "result"]
)
CHECK_LATENCY = Histogram(
    "beacon_registry_check_duration_seconds",
    "Time one active health check took, by kind",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CHECKED_ENDPOINTS = Gauge("beacon_registry_checked_endpoints", "Endpoints with an active HTTP or TCP check")
CHECKS_IN_FLIGHT = Gauge("beacon_registry_checks_in_flight", "Active health checks running now")
# After a TCP connect, how long to watch for an immediate close. Docker's
# userland proxy accepts on a published port even when nothing listens in the
# container, then closes at once; a live server keeps the connection open.
TCP_SETTLE = 0.1
_DOCKER_POLL_RANGE = (0.5, 30.0)  # seconds between inspects of an unhealthy container
_USER_AGENT = "beacon-health/1"
# Errors that are Beacon's own lack of resources, not the endpoint's fault: a
# probe failing with one proves nothing about the endpoint, so it is not judged.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LOCAL_WARN_EVERY = 60.0  # seconds between two "skipped" warnings


class LocalResourceError(Exception):
    """A probe could not run because Beacon itself ran out of a resource (fds)."""


def _raise_if_local(exc: BaseException) -> None:
    """Re-raise as LocalResourceError when `exc` (or what it wraps) is ours, not the endpoint's."""
    seen: BaseException | None = exc
    for _ in range(4):  # aiohttp wraps the OSError (ClientConnectorError.os_error, __cause__)
        if seen is None:
            return
        if isinstance(seen, OSError) and seen.errno in _LOCAL_ERRNOS:
            raise LocalResourceError(describe(seen)) from exc
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__


# ------------------------------------------------------------------ pure core
@dataclass(frozen=True, slots=True)
class Verdict:
    """An endpoint's checked state after applying rise/fall to its results."""

    state: State
    passes: int = 0  # consecutive passing (or warning) results
    failures: int = 0  # consecutive critical results
    ready: bool = False  # has passed at least once


def judge(prev: Verdict | None, result: State, rise: int, fall: int) -> Verdict:
    """Fold one probe result into the verdict.

    Readiness: until the endpoint has passed once it is critical, and its first
    pass makes it passing at once (no rise wait for a fresh start). Afterwards
    `fall` failures in a row make it critical and `rise` passes in a row bring it
    back; a warning result (HTTP 429) counts as alive and shows at once.
    """
    if prev is None:
        prev = Verdict(State.CRITICAL)
    if result is State.CRITICAL:
        failures = prev.failures + 1
        down = prev.state is State.CRITICAL or failures >= fall
        return Verdict(State.CRITICAL if down else prev.state, 0, failures, prev.ready)
    passes = prev.passes + 1
    if prev.state is State.CRITICAL and prev.ready and passes < rise:
        return Verdict(State.CRITICAL, passes, 0, True)
    return Verdict(result, passes, 0, True)


def classify_http(status: int, spec: CheckSpec) -> State:
    """Expected range -> passing; 429 Too Many Requests -> warning (as Consul); else critical."""
    if spec.status_min <= status <= spec.status_max:
        return State.PASSING
    if status == 429:
        return State.WARNING
    return State.CRITICAL


# ---------------------------------------------------------------- the checker
@dataclass(eq=False, slots=True)
class _Job:
    """Something in the scheduler heap. A heap entry is live only while
    `seq` matches the job's current one (rescheduling or removal orphans it)."""

    seq: int = -1
    alive: bool = True


@dataclass(eq=False, slots=True)
class _Target(_Job):
    endpoint_id: str = ""
    address: str = ""
    port: int = 0
    spec: CheckSpec = field(default_factory=lambda: CheckSpec(kind="tcp"))
    container_id: str | None = None
    container_name: str | None = None
    autoheal: AutohealSpec | None = None
    verdict: Verdict | None = None
    published: tuple[object, ...] | None = None
    last_change: float = 0.0


@dataclass(eq=False, slots=True)
class _DockerWatch(_Job):
    container_id: str = ""
    container_name: str = ""
    source_key: str = ""
    spec: AutohealSpec = field(default_factory=AutohealSpec)
    next_delay: float = _DOCKER_POLL_RANGE[0]


@dataclass(slots=True)
class _Container:
    """An autoheal container we follow: its catalog source and tracked endpoints."""

    source_key: str
    endpoint_ids: set[str] = field(default_factory=set)


def _relevant(ep: Endpoint) -> bool:
    has_check = ep.check is not None and ep.check.kind in ("http", "tcp")
    return has_check or (ep.autoheal is not None and ep.source.container_id is not None)


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class HealthChecker:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        docker: DockerControl | None,
        rng: random.Random | None = None,
        clock: Clock = SYSTEM_CLOCK,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._docker = docker
        self._rng = rng or random.Random()
        self._last_local_warning = float("-inf")
        self._clock = clock  # the heap's due times, intervals, autoheal windows
        self._wall_clock = wall_clock
        self._slots = asyncio.Semaphore(config.check_concurrency)
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._targets: dict[str, _Target] = {}
        self._watches: dict[str, _DockerWatch] = {}  # container id -> Docker health watch
        self.autoheal = Autoheal(
            docker, draining=self._draining, on_restarted=self._fresh_count, clock=clock.now, wall_clock=wall_clock
        )
        # The snapshot last followed: only the services changed since are walked.
        self._seen: Snapshot | None = None
        self._tracked: set[str] = set()  # endpoint ids with a check or autoheal
        self._containers: dict[str, _Container] = {}  # autoheal containers by id
        self._container_of: dict[str, str] = {}  # endpoint id -> autoheal container id
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._unlisten: Callable[[], None] | None = None
        self._in_flight = 0
        self.max_in_flight = 0  # high-water mark, for tests and the curious

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers={"User-Agent": _USER_AGENT},
        )
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="beacon-health-scheduler")
        self._unlisten = self._catalog.add_listener(self._on_snapshot)
        self._on_snapshot(self._catalog.snapshot)
        log.info("started: health checker (concurrency %d)", self._config.check_concurrency)

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        pending = [t for t in (self._scheduler, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.autoheal.stop()
        self._scheduler = None
        # Forget what was followed, so a later start() begins from the then-current snapshot.
        for job in (*self._targets.values(), *self._watches.values()):
            job.alive = False
        self._heap.clear()
        self._targets.clear()
        self._watches.clear()
        self._seen = None
        self._tracked.clear()
        self._containers.clear()
        self._container_of.clear()
        CHECKED_ENDPOINTS.set(0)
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("stopped: health checker")

    # ---------------------------------------------------------------- reads
    def autoheal_log(self) -> list[dict[str, object]]:
        """Autoheal actions, oldest first: restarted, failed (restart error) and limited."""
        return self.autoheal.actions()


    # ------------------------------------------------------ following snapshots
    def _on_snapshot(self, snap: Snapshot) -> None:
        # O(endpoints changed): a change to one endpoint of a 10,000-endpoint
        # service looks at that endpoint only, not at the whole service.
        if self._seen is None:
            changed: Iterable[str] = snap.endpoints.keys()
            removed: Iterable[str] = ()
        else:
            delta = snap.changed_since(self._seen)
            changed, removed = delta.endpoints_changed, delta.endpoints_removed
        self._seen = snap
        containers: set[str] = set()
        for eid in changed:
            ep = snap.endpoints.get(eid)
            if ep is not None and _relevant(ep):
                self._tracked.add(eid)
                self._upsert(ep, containers)
            elif eid in self._tracked:
                self._tracked.discard(eid)
                self._forget(eid, containers)
        for eid in removed:
            if eid in self._tracked:
                self._tracked.discard(eid)
                self._forget(eid, containers)
        for cid in containers:
            self._update_watch(cid)
        self.autoheal.forget_expired(self._containers.__contains__)
        CHECKED_ENDPOINTS.set(len(self._targets))

    def _upsert(self, ep: Endpoint, containers: set[str]) -> None:
        cid = ep.source.container_id
        if cid is not None and ep.autoheal is not None:
            key = self._catalog.owner_of(ep.id) or f"container:{cid}"
            info = self._containers.setdefault(cid, _Container(key))
            info.source_key = key
            info.endpoint_ids.add(ep.id)
            self._container_of[ep.id] = cid
            containers.add(cid)
        elif ep.id in self._container_of:
            self._untrack_container(ep.id, containers)
        target = self._targets.get(ep.id)
        check = ep.check if ep.check is not None and ep.check.kind in ("http", "tcp") else None
        if check is None:
            if target is not None:
                self._drop_target(ep.id)
            return
        if target is not None and (target.address, target.port) != (ep.address, ep.port):
            # A new address is a new backend: what we knew no longer applies (the
            # catalog already dropped the old status, so it is not ready yet).
            self._drop_target(ep.id)
            target = None
        if target is None:
            target = _Target(endpoint_id=ep.id, address=ep.address, port=ep.port, spec=check)
            self._targets[ep.id] = target
            # First probe soon (readiness), spread so a burst does not fire in step.
            self._push(target, self._rng.uniform(0.0, min(check.interval, 0.5)))
        elif target.spec != check:
            # Keep the state (no traffic blip), restart counting under the new rules.
            target.spec = check
            if target.verdict is not None:
                v = target.verdict
                target.verdict = Verdict(v.state, 0, 0, v.ready)
            if target.seq >= 0:  # not in flight: run the new check soon
                self._push(target, self._rng.uniform(0.0, min(check.interval, 0.5)))
        target.container_id = cid
        target.container_name = ep.source.container_name
        target.autoheal = ep.autoheal if cid is not None else None

    def _forget(self, eid: str, containers: set[str]) -> None:
        self._drop_target(eid)
        if eid in self._container_of:
            self._untrack_container(eid, containers)

    def _untrack_container(self, eid: str, containers: set[str]) -> None:
        cid = self._container_of.pop(eid)
        containers.add(cid)
        info = self._containers.get(cid)
        if info is not None:
            info.endpoint_ids.discard(eid)
            if not info.endpoint_ids:
                del self._containers[cid]

    def _drop_target(self, eid: str) -> None:
        target = self._targets.pop(eid, None)
        if target is not None:
            target.alive = False

    def _update_watch(self, cid: str) -> None:
        """Watch a container's Docker health while autoheal is on and its
        source-side state is critical (unhealthy, starting or paused)."""
        info = self._containers.get(cid)
        eps = self._catalog.source_endpoints(info.source_key) if info is not None else {}
        spec = next((e.autoheal for e in eps.values() if e.autoheal is not None), None)
        watch = self._watches.get(cid)
        if (
            info is not None
            and spec is not None
            and self._docker is not None
            and any(e.state is State.CRITICAL for e in eps.values())
        ):
            if watch is None:
                name = next((e.source.container_name or "" for e in eps.values()), "")
                watch = _DockerWatch(container_id=cid, container_name=name, source_key=info.source_key)
                self._watches[cid] = watch
                self._push(watch, 0.0)
            watch.spec = spec
        elif watch is not None:
            watch.alive = False
            del self._watches[cid]

    # ------------------------------------------------------------ scheduling
    def _push(self, job: _Job, delay: float) -> None:
        seq = next(self._seq)
        job.seq = seq
        due = self._clock.now() + delay
        heapq.heappush(self._heap, (due, seq, job))
        if self._heap[0][1] == seq:
            self._wake.set()  # new earliest job: the scheduler's sleep is too long

    async def _schedule_loop(self) -> None:
        popped = 0
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, seq, job = self._heap[0]
            delay = due - self._clock.now()
            if delay > 0:
                self._wake.clear()
                await self._sleep_or_wake(delay)
                continue
            heapq.heappop(self._heap)
            popped += 1
            if popped % 512 == 0:
                await asyncio.sleep(0)  # a flood of due or stale jobs must not hog the loop
            if not job.alive or job.seq != seq:
                continue
            await self._slots.acquire()  # bounded concurrency: wait here for a free slot
            if not job.alive or job.seq != seq:
                self._slots.release()
                continue
            job.seq = -1  # in flight: not in the heap until it finishes
            task = asyncio.create_task(self._run_job(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sleep_or_wake(self, delay: float) -> None:
        """Sleep `delay` on the clock, or less if a new earliest job is pushed."""
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _run_job(self, job: _Job) -> None:
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        CHECKS_IN_FLIGHT.inc()
        next_delay: float | None = None
        try:
            if isinstance(job, _Target):
                await self._check(job)
                # Jitter each interval by +-10 % so endpoints drift out of step.
                next_delay = job.spec.interval * self._rng.uniform(0.9, 1.1)
            elif isinstance(job, _DockerWatch):
                await self._inspect_health(job)
                next_delay = job.next_delay
        except Exception:  # a bug in one probe must not stop the scheduler
            log.exception("failed: health job %r", job)
            next_delay = 5.0
        finally:
            self._in_flight -= 1
            CHECKS_IN_FLIGHT.dec()
            self._slots.release()
        if job.alive and job.seq == -1 and next_delay is not None:
            self._push(job, next_delay)

    # --------------------------------------------------------------- probes
    async def _check(self, target: _Target) -> None:
        spec = target.spec
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if spec.kind == "http":
                result, output = await self._probe_http(target.address, target.port, spec)
            else:
                result, output = await self._probe_tcp(target.address, target.port, spec)
        except LocalResourceError as exc:
            # Beacon is out of file descriptors: the endpoint keeps its state and
            # is probed again at its next interval.
            CHECKS_RUN.labels(spec.kind, "skipped").inc()
            now = loop.time()
            if now - self._last_local_warning >= _LOCAL_WARN_EVERY:
                self._last_local_warning = now
                log.warning("skipped: health checks while Beacon itself is out of resources (%s); "
                            "endpoints keep their state (raise the open-file limit)", exc)
            return
        CHECK_LATENCY.labels(spec.kind).observe(loop.time() - started)
        CHECKS_RUN.labels(spec.kind, result.value).inc()
        if target.alive and target.spec == spec:
            self._record(target, result, truncate_output(output))

    async def _probe_http(self, address: str, port: int, spec: CheckSpec) -> tuple[State, str]:
        assert self._session is not None
        what = f"HTTP {spec.method} {spec.path}"
        try:
            url = URL(f"http://{_hostport(address, port)}{spec.path}")
            async with (
                asyncio.timeout(spec.timeout),
                self._session.request(spec.method, url, allow_redirects=False) as resp,
            ):
                result = classify_http(resp.status, spec)
                output = f"{what}: {resp.status} {resp.reason or ''}".rstrip()
                if result is not State.PASSING:
                    # The body explains a failure; for a pass it would only churn snapshots.
                    body = await _read_upto(resp.content, OUTPUT_LIMIT)
                    if body:
                        output += "\n" + body.decode("utf-8", "replace")
                return result, output
        except TimeoutError:
            return State.CRITICAL, f"{what}: timed out after {spec.timeout:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            _raise_if_local(exc)
            return State.CRITICAL, f"{what}: {describe(exc)}"

    async def _probe_tcp(self, address: str, port: int, spec: CheckSpec) -> tuple[State, str]:
        what = f"TCP connect {_hostport(address, port)}"
        try:
            async with asyncio.timeout(spec.timeout):
                reader, writer = await asyncio.open_connection(address, port)
        except TimeoutError:
            return State.CRITICAL, f"{what}: timed out after {spec.timeout:g}s"
        except (OSError, ValueError) as exc:
            _raise_if_local(exc)
            return State.CRITICAL, f"{what}: {describe(exc)}"
        try:
            try:
                async with asyncio.timeout(min(TCP_SETTLE, spec.timeout / 2)):
                    first = await reader.read(1)
            except TimeoutError:
                return State.PASSING, f"{what}: connected"
            except OSError as exc:
                return State.CRITICAL, f"{what}: {describe(exc)}"
            if first:
                return State.PASSING, f"{what}: connected"
            return State.CRITICAL, f"{what}: closed at once (nothing listening behind a published port?)"
        finally:
            writer.close()

    # --------------------------------------------------------------- results
    def _record(self, target: _Target, result: State, output: str) -> None:
        spec = target.spec
        before = target.verdict
        verdict = judge(before, result, spec.rise, spec.fall)
        target.verdict = verdict
        now = self._wall_clock()
        if before is None or before.state is not verdict.state:
            target.last_change = now
            if before is not None or verdict.state is not State.CRITICAL:
                log.info(
                    "changed: %s %s -> %s (%s)",
                    target.endpoint_id,
                    before.state.value if before else "new",
                    verdict.state.value,
                    output.splitlines()[0] if output else "",
                )
        # Counts are shown up to the threshold that matters; beyond it they
        # would republish a snapshot on every probe for nobody's benefit.
        fail_cap = max(spec.fall, target.autoheal.after if target.autoheal else 0)
        passes, failures = min(verdict.passes, spec.rise), min(verdict.failures, fail_cap)
        visible = (verdict.state, output, passes, failures)
        if visible != target.published:
            target.published = visible
            self._catalog.set_check_status(
                target.endpoint_id,
                CheckStatus(
                    state=verdict.state,
                    output=output,
                    last_checked=now,
                    last_change=target.last_change,
                    consecutive_passes=passes,
                    consecutive_failures=failures,
                ),
            )
        if (
            target.autoheal is not None
            and target.container_id is not None
            and verdict.failures >= target.autoheal.after
        ):
            self.autoheal.consider(
                target.container_id,
                target.container_name or "",
                target.autoheal,
                f"check failed {verdict.failures} times in a row: {output.splitlines()[0] if output else ''}",
                endpoint_id=target.endpoint_id,
            )

    # --------------------------------------------------------------- autoheal
    async def _inspect_health(self, watch: _DockerWatch) -> None:
        assert self._docker is not None
        try:
            info = await self._docker.inspect_container(watch.container_id)
        except Exception as exc:  # Docker unreachable: try again at the slow pace
            log.warning("failed: inspect of %s %s: %s", watch.container_id[:12], watch.container_name, describe(exc))
            watch.next_delay = _DOCKER_POLL_RANGE[1]
            return
        if info is None or not watch.alive:
            return
        status, streak, interval, output = docker_health(info)
        lo, hi = _DOCKER_POLL_RANGE
        watch.next_delay = min(hi, max(lo, interval if interval is not None else hi))
        if status == "unhealthy" and streak >= watch.spec.after:
            self.autoheal.consider(
                watch.container_id,
                watch.container_name,
                watch.spec,
                f"Docker HEALTHCHECK unhealthy, {streak} failures in a row: {output.splitlines()[0] if output else ''}",
            )

    def _fresh_count(self, cid: str) -> None:
        """A restarted process earns a fresh count: `after` new failures before the next restart."""
        for target in self._targets.values():
            if target.container_id == cid and target.verdict is not None:
                v = target.verdict
                target.verdict = Verdict(v.state, v.passes, 0, v.ready)

    def _draining(self, cid: str) -> bool:
        """Someone is stopping the container (SIGTERM seen): failing checks are expected."""
        info = self._containers.get(cid)
        if info is None:
            return False
        return any(e.state is State.DRAINING for e in self._catalog.source_endpoints(info.source_key).values())


async def _read_upto(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Read at most `limit` bytes of a body (a health page may be endless)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)
