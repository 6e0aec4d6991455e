"""The Docker source: watch the engine and keep the catalog equal to Docker's truth.

Lifecycle of one connection ("session"):
1. subscribe to the events stream (so nothing that happens from now on is missed),
2. list the running containers and inspect each one (events are buffered meanwhile),
3. apply the buffered events, then each new event as it arrives: an event
   re-inspects only its own container (no full re-list per event),
4. every `resync_interval`, list again and apply the difference (a diff: nothing
   changes, nothing is published), removing sources whose container is gone.
When the stream fails or ends, or a resync fails (a half-open stream never
ends by itself), the session ends and a new one starts after a capped
exponential backoff - the watcher never exits on its own.

The Docker SDK is synchronous: the events stream is read by a daemon thread that
hands each event to the loop (`call_soon_threadsafe`), and every other API call
runs in a small thread pool. Container data is turned into endpoints by the pure
`beacon.registry.labels.container_endpoints`.

Races between an event and an in-flight inspect are settled with a per-container
generation number: every event bumps it, and an inspect result is applied only
if no event for that container arrived while it was in flight.

(About 600 lines on purpose: the watch loop, event handling, drains and the
per-container record share one state and read best together; the pure parts
live in labels.py, the thread pool in daemon_executor.py.)

Length (~650 lines): one owner of every container's record - session, resync, drain timers and
restart loops all change that record, so they live together rather than pass it around.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import docker
import docker.errors

from beacon.clock import SYSTEM_CLOCK, Clock
from beacon.config import Config
from beacon.registry.catalog import Catalog, EndpointConflict
from beacon.registry.daemon_executor import DaemonExecutor
from beacon.registry.labels import (
    MAX_PROBLEMS,
    ContainerEndpoints,
    LabelOptions,
    container_endpoints,
    container_reason,
)
from beacon.registry.model import Endpoint, State

log = logging.getLogger("beacon.registry.docker")

T = TypeVar("T")

SOURCE_PREFIX = "container:"
# Actions that change what a running container offers: re-inspect it.
REFRESH_ACTIONS = frozenset({"start", "unpause", "pause", "health_status", "rename", "update", "restart"})
# Actions after which the container offers nothing.
REMOVE_ACTIONS = frozenset({"die", "stop", "destroy"})
EVENT_FILTERS: dict[str, list[str]] = {
    "type": ["container", "network"],
    "event": sorted(REFRESH_ACTIONS | REMOVE_ACTIONS | {"kill", "connect", "disconnect"}),
}
TERM_SIGNALS = frozenset({"15", "SIGTERM", "TERM"})
# Docker's grace between SIGTERM and SIGKILL when the container sets no StopTimeout.
DEFAULT_STOP_TIMEOUT = 10.0
LOGGED_PROBLEMS = 5  # label problems logged at warning per container verdict; then one line with the count
# Where the "UDP connect" probe points to find the primary interface. connect()
# on a UDP socket only asks the kernel for a route; no packet is sent.
_ROUTE_PROBES = (("198.51.100.1", socket.AF_INET),)


class DockerUnavailable(RuntimeError):
    """The Docker engine cannot be reached right now."""


class _EndOfStream:
    """Queued by the reader thread when the events stream ends or fails, and by
    the resync loop when a resync fails (the stream may be silently dead)."""

    def __init__(self, error: BaseException | None, reason: str = "events stream ended") -> None:
        self.error = error
        self.reason = reason


def usable_host_ip(ip: str) -> bool:
    """An address other hosts could use: not a wildcard, loopback or link-local."""
    return bool(ip) and not ip.startswith(("127.", "0.", "169.254.")) and ip not in ("::", "::1")


def detect_host_ip() -> str | None:
    """The primary interface's address (the source of the default route), if any."""
    for target, family in _ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                ip = str(s.getsockname()[0])
        except OSError:
            continue
        if usable_host_ip(ip):
            return ip
    try:
        for ip in socket.gethostbyname_ex(socket.gethostname())[2]:
            if usable_host_ip(ip):
                return ip
    except OSError:
        pass
    return None


def _probe_unix_socket(docker_host: str) -> None:
    """Fail fast, and cleanly, when the engine's unix socket does not answer.

    docker-py leaks the socket of a failed unix connect (it never closes it);
    probing first keeps a reconnect loop against a dead engine from piling up
    unclosed sockets.
    """
    if docker_host and not docker_host.startswith("unix://"):
        return
    path = docker_host.removeprefix("unix://") or "/var/run/docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {path}: {exc.strerror or exc}") from None


def event_container_id(event: Mapping[str, Any]) -> str | None:
    """The container an event is about (network events name it in an attribute)."""
    actor = event.get("Actor") or {}
    if event.get("Type") == "network":
        cid = (actor.get("Attributes") or {}).get("container")
    else:
        cid = actor.get("ID") or event.get("id")
    return str(cid) if cid else None


def event_action(event: Mapping[str, Any]) -> str:
    """'health_status: healthy' -> 'health_status'."""
    action = str(event.get("Action") or event.get("status") or "")
    return action.split(":", 1)[0].strip()


@dataclass(slots=True, eq=False)
class _Drain:
    """A SIGTERM seen: the container's endpoints drain until it is gone, started
    again, or outlives its stop timeout. Compared by identity: a later signal
    replaces it, which orphans the first one's expiry timer."""

    started_at: str  # State.StartedAt when the signal came
    since: float  # clock time of the signal


@dataclass(slots=True)
class _Container:
    """What the source remembers about one container between events."""

    generation: int = 0  # of its last event: a stale inspect is never applied
    started_at: str = ""  # State.StartedAt last seen
    drain: _Drain | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT  # its StopTimeout, seconds
    name: str = ""  # for log lines
    reported: tuple[str | None, tuple[str, ...], tuple[str, ...], int] | None = None  # last logged verdict


class DockerSource:
    """Feeds the catalog with one source per running container ("container:<id>")."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        node: str,
        client_factory: Callable[[], docker.DockerClient] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        start_timeout: float = 10.0,
        inspect_workers: int = 8,
        drain_margin: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._node = node
        self._client_factory = client_factory or self._default_client
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._start_timeout = start_timeout
        self._drain_margin = drain_margin
        self._clock = clock  # drain timers, resync interval, reconnect backoff
        self._pool = DaemonExecutor(inspect_workers, "beacon-docker")
        self._options = LabelOptions()
        self._client: docker.DockerClient | None = None
        self._stream: Any = None
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._stopping = False
        self._connected = False
        self._generation = itertools.count(1)
        self._containers: dict[str, _Container] = {}  # container id -> what we remember
        self._inflight: set[asyncio.Task[None]] = set()
        self.sessions = 0  # successful (re)connections
        self.syncs = 0  # completed full lists (first one of a session and resyncs)
        self.events = 0  # events handled
        self.inspections = 0  # inspects after an event finished (applied, overtaken or failed)

    # --------------------------------------------------------------- public
    @property
    def connected(self) -> bool:
        """True while the events stream is up and the first list has been applied."""
        return self._connected

    async def start(self) -> None:
        ip = self._config.advertise_ip or detect_host_ip()
        if not ip:
            ip = "127.0.0.1"
            log.warning("failed: no routable host address found; advertising 127.0.0.1 (set --advertise-ip)")
        self._options = LabelOptions(
            address_mode="internal" if self._config.address_mode == "internal" else "host",
            host_ip=ip,
            network=self._config.network,
            explicit=self._config.explicit,
            node=self._node,
        )
        log.info(
            "starting: docker watcher address_mode=%s host_ip=%s network=%s explicit=%s",
            self._options.address_mode, ip, self._options.network or "-", self._options.explicit,
        )
        self._task = asyncio.create_task(self._run(), name="beacon-docker-watch")
        # Let the first list land before listeners start serving, but never hang
        # start-up on an unreachable engine: the watcher keeps retrying.
        try:
            await asyncio.wait_for(self._first_attempt.wait(), self._start_timeout)
        except TimeoutError:
            log.warning("failed: docker not synced within %.0fs; still trying", self._start_timeout)
        except BaseException:
            # Cancelled (a SIGTERM during start-up): the app does not stop a
            # component whose start did not return, so end the watcher here.
            # A Docker call hung in a worker is abandoned (daemon threads).
            await self.stop()
            raise

    async def stop(self) -> None:
        self._stopping = True
        self._close_stream()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        self._connected = False
        self._close_client()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: docker watcher")

    async def inspect_container(self, container_id: str) -> dict[str, Any] | None:
        """Docker's inspect data, or None if there is no such container.

        Raises DockerUnavailable when the engine cannot be reached.
        """
        client = self._require_client()
        try:
            attrs: dict[str, Any] = await self._call(client.api.inspect_container, container_id)
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise DockerUnavailable(str(exc)) from exc
        except OSError as exc:
            raise DockerUnavailable(str(exc)) from exc
        return attrs

    async def restart_container(self, container_id: str, timeout: float = 10) -> None:
        """`docker restart` (SIGTERM, `timeout` seconds, SIGKILL, start)."""
        client = self._require_client()
        grace = max(0, round(timeout))
        try:
            await self._call(client.api.restart, container_id, timeout=grace)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, OSError) as exc:
            raise DockerUnavailable(str(exc)) from exc

    # ------------------------------------------------------------ plumbing
    def _default_client(self) -> docker.DockerClient:
        _probe_unix_socket(self._config.docker_host)
        if self._config.docker_host:
            return docker.DockerClient(base_url=self._config.docker_host, version="auto", timeout=30)
        return docker.from_env(version="auto", timeout=30)

    def _require_client(self) -> docker.DockerClient:
        if self._client is None:
            raise DockerUnavailable("not connected to the Docker engine")
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()  # shuts the socket down: the reader thread sees EOF
            except Exception:  # already closed or half torn down: nothing to release
                pass

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    # --------------------------------------------------------- watch loop
    async def _run(self) -> None:
        delay = self._backoff_initial
        while not self._stopping:
            began = self._clock.now()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._stopping:
                    log.warning("failed: docker watch: %s", exc or type(exc).__name__)
            finally:
                self._connected = False
                self._close_stream()
                self._close_client()
                self._first_attempt.set()
            if self._stopping:
                return
            if self._clock.now() - began > 30:
                delay = self._backoff_initial  # a long healthy session resets the backoff
            pause = delay * random.uniform(0.8, 1.2)
            log.info("reconnecting: docker in %.2fs", pause)
            await self._clock.sleep(pause)
            delay = min(delay * 2, self._backoff_max)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        client = await self._call(self._client_factory)
        self._client = client
        # Subscribe first: anything that happens while we list is then in the stream.
        stream = await self._call(client.api.events, decode=True, filters=EVENT_FILTERS)
        self._stream = stream
        queue: asyncio.Queue[dict[str, Any] | _EndOfStream] = asyncio.Queue()
        reader = threading.Thread(
            target=self._read_events, args=(stream, loop, queue), name="beacon-docker-events", daemon=True
        )
        reader.start()
        await self._sync(client, initial=True)
        self._connected = True
        self.sessions += 1
        self._first_attempt.set()
        log.info("connected: docker engine (api %s)", client.api.api_version)
        resync = asyncio.create_task(self._resync_loop(client, queue), name="beacon-docker-resync")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _EndOfStream):
                    raise ConnectionError(f"{item.reason} ({item.error or 'EOF'})")
                self._on_event(item)
        finally:
            resync.cancel()

    @staticmethod
    def _read_events(
        stream: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any] | _EndOfStream]
    ) -> None:
        error: BaseException | None = None
        try:
            for event in stream:
                if isinstance(event, dict):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
        except Exception as exc:  # a cut connection mid-event, bad JSON: end of this session
            error = exc
        try:
            loop.call_soon_threadsafe(queue.put_nowait, _EndOfStream(error))
        except RuntimeError:
            pass  # the loop is closed: Beacon is shutting down

    async def _resync_loop(
        self, client: docker.DockerClient, queue: asyncio.Queue[dict[str, Any] | _EndOfStream]
    ) -> None:
        while True:
            await self._clock.sleep(self._config.resync_interval)
            try:
                await self._sync(client, initial=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The events stream may be half-open (a partition on a tcp
                # DOCKER_HOST): it would never end by itself, /healthz would say
                # connected and no stop would ever drain. End the session; the
                # reconnect subscribes and lists afresh.
                log.warning("failed: resync: %s; reconnecting", exc or type(exc).__name__)
                self._close_stream()
                queue.put_nowait(_EndOfStream(exc, "resync failed"))
                return

    async def _sync(self, client: docker.DockerClient, *, initial: bool) -> None:
        """List running containers and apply the difference to the catalog."""
        marker = next(self._generation)  # events processed after this get higher numbers
        listed = await self._call(client.api.containers)
        ids = [str(c["Id"]) for c in listed]

        async def inspect(cid: str) -> tuple[str, int, dict[str, Any] | None] | None:
            gen = self._generation_of(cid)
            try:
                attrs = await self._call(client.api.inspect_container, cid)
            except docker.errors.NotFound:
                attrs = None
            except docker.errors.APIError as exc:  # one odd container must not stall the rest
                log.warning("failed: inspect %s: %s (kept as it was)", cid[:12], exc)
                return None
            return cid, gen, attrs

        changes = 0
        for item in await asyncio.gather(*(inspect(cid) for cid in ids)):
            if item is None:
                continue
            cid, gen, attrs = item
            if self._generation_of(cid) == gen:  # else an event overtook this inspect
                changes += self._apply(cid, attrs)
        running = set(ids)
        for key in sorted(self._catalog.sources(SOURCE_PREFIX)):
            cid = key[len(SOURCE_PREFIX) :]
            if cid not in running and self._generation_of(cid) <= marker:
                changes += self._apply(cid, None)  # gone while we were not looking: no ghosts
        # Forget containers that are gone (bounded memory).
        for cid in [c for c, r in self._containers.items() if c not in running and r.generation <= marker]:
            del self._containers[cid]
        self.syncs += 1
        if initial or changes:
            log.info("synced: %d running containers, %d changes", len(ids), changes)

    # --------------------------------------------------------------- events
    def _generation_of(self, cid: str) -> int:
        record = self._containers.get(cid)
        return 0 if record is None else record.generation

    def _record(self, cid: str) -> _Container:
        record = self._containers.get(cid)
        if record is None:
            record = self._containers[cid] = _Container()
        return record

    def _name(self, cid: str) -> str:
        record = self._containers.get(cid)
        return "" if record is None else record.name

    def _on_event(self, event: Mapping[str, Any]) -> None:
        self.events += 1
        cid = event_container_id(event)
        if cid is None:
            return
        action = event_action(event)
        kind = event.get("Type") or "container"
        if kind == "network" and action not in ("connect", "disconnect"):
            return
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if kind == "container" and attributes.get("name"):
            self._record(cid).name = str(attributes["name"])
        if action == "kill":
            # Any signal produces a kill event (SIGHUP for a reload...): only a
            # SIGTERM means "about to stop", and then no new traffic at once.
            if str(attributes.get("signal", "")).upper() in TERM_SIGNALS:
                self._drain(cid)
            return
        record = self._record(cid)
        record.generation = next(self._generation)
        if action == "die":
            # Look before removing: a container its restart policy brings back
            # (`--restart=always` crash loop) stays, critical with its exit code and
            # restart count (DNS NODATA, proxy 503), instead of leaving and coming back.
            record.drain = None
            self._spawn_refresh(cid, record.generation)
        elif action in REMOVE_ACTIONS:
            record.drain = None
            self._apply(cid, None)
        elif action in REFRESH_ACTIONS or kind == "network":
            if action == "start":
                record.drain = None
            self._spawn_refresh(cid, record.generation)

    def _drain(self, cid: str) -> None:
        record = self._record(cid)
        mark = record.drain = _Drain(record.started_at, self._clock.now())
        if self._catalog.set_source_state(SOURCE_PREFIX + cid, State.DRAINING):
            log.info("draining: %s %s (SIGTERM)", cid[:12], record.name)
        # A SIGTERM that stops nothing (`docker kill -s TERM`, an app that reloads
        # on TERM) would leave the container draining forever: look again once
        # `docker stop` would have killed it. Resyncs apply the same rule.
        task = asyncio.create_task(self._drain_expiry(cid, mark, self._drain_grace(cid)))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _drain_grace(self, cid: str) -> float:
        record = self._containers.get(cid)
        return (DEFAULT_STOP_TIMEOUT if record is None else record.stop_timeout) + self._drain_margin

    async def _drain_expiry(self, cid: str, mark: _Drain, grace: float) -> None:
        await self._clock.sleep(grace)
        record = self._containers.get(cid)
        if record is not None and record.drain is mark:  # else: gone, restarted or signalled again
            record.generation = next(self._generation)
            await self._refresh(cid, record.generation)

    def _spawn_refresh(self, cid: str, gen: int) -> None:
        task = asyncio.create_task(self._refresh(cid, gen))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _refresh(self, cid: str, gen: int) -> None:
        client = self._client
        if client is None:
            return  # disconnected: the next session's list covers this container
        try:
            attrs = await self._call(client.api.inspect_container, cid)
        except docker.errors.NotFound:
            attrs = None
        except Exception as exc:
            log.warning("failed: inspect %s: %s (the next resync retries)", cid[:12], exc)
            self.inspections += 1
            return
        if self._generation_of(cid) == gen:
            self._apply(cid, attrs)
        self.inspections += 1

    # ---------------------------------------------------------------- apply
    def _apply(self, cid: str, attrs: Mapping[str, Any] | None) -> int:
        """Set the container's endpoints in the catalog; return 1 if anything changed."""
        key = SOURCE_PREFIX + cid
        result = ContainerEndpoints() if attrs is None else self._parse(cid, attrs)
        if attrs is not None and not result.endpoints and (attrs.get("State") or {}).get("Restarting"):
            # Between two runs of a restart loop its published ports are gone:
            # keep what it offered, critical, with the exit code and restart count.
            # Its label problems stay (they are the same): a verdict without them
            # would log them all again at every turn of the loop.
            kept = self._catalog.source_endpoints(key).values()
            result = replace(
                result,
                endpoints=tuple(replace(e, state=State.CRITICAL, reason=container_reason(attrs)) for e in kept),
                ignored=None,
            )
        record = self._containers.get(cid) if attrs is None else self._record(cid)
        if attrs is not None and record is not None:
            record.name = str(attrs.get("Name") or "").lstrip("/")
            self._report(cid, record, result)
            record.stop_timeout = _stop_timeout(attrs)
        endpoints = list(result.endpoints)
        drain = record.drain if record is not None else None
        if endpoints and record is not None and drain is not None:
            started = str(((attrs or {}).get("State") or {}).get("StartedAt") or "")
            running_for = self._clock.now() - drain.since
            if drain.started_at and started and drain.started_at != started:
                record.drain = None  # started again since the SIGTERM
            elif running_for >= self._drain_grace(cid):
                record.drain = None
                log.info(
                    "undrained: %s %s still running %.0fs after SIGTERM (stop timeout %gs)",
                    cid[:12], record.name, running_for, record.stop_timeout,
                )
            else:
                endpoints = [replace(e, state=State.DRAINING) for e in endpoints]
        if attrs is not None and record is not None:
            record.started_at = str((attrs.get("State") or {}).get("StartedAt") or "")
        before = self._catalog.source_endpoints(key)
        had = bool(before)
        try:
            changed = self._catalog.set_source(key, endpoints)
        except EndpointConflict as exc:
            log.warning("failed: container %s %s: %s", cid[:12], self._name(cid), exc)
            return 0
        if not changed:
            return 0
        name = self._name(cid)
        if endpoints and not had:
            log.info("added: %s %s %s", cid[:12], name, _describe(endpoints))
        elif had and not endpoints:
            log.info("removed: %s %s", cid[:12], name)
        else:
            log.info("updated: %s %s %s", cid[:12], name, _describe(endpoints))
            for ep in endpoints:
                prev = before.get(ep.id)
                if prev is not None and prev.address != ep.address:
                    # Usually a network attached or detached: clients that cached the
                    # old address (DNS TTL) will miss; the choice can be pinned.
                    log.warning(
                        "moved: %s %s endpoint %s address %s -> %s (network attached or detached? "
                        "pin it with label beacon.network, --network or beacon.address)",
                        cid[:12], name, ep.id, prev.address, ep.address,
                    )
        return 1

    def _parse(self, cid: str, attrs: Mapping[str, Any]) -> ContainerEndpoints:
        """The parser's verdict; a parser bug ignores this one container only.

        container_endpoints promises never to raise. Should a bug break that
        promise, raising here would end the session before later containers
        are applied, and every reconnect would fail the same way.
        """
        try:
            return container_endpoints(attrs, self._options)
        except Exception as exc:
            ignored = f"its inspect data could not be parsed ({_describe_error(exc)})"
            record = self._containers.get(cid)
            if record is None or (record.reported or (None,))[0] != ignored:  # once, not every resync
                log.warning("failed: parse of container %s (a bug; please report it)", cid[:12], exc_info=True)
            return ContainerEndpoints(ignored=ignored)

    def _report(self, cid: str, record: _Container, result: ContainerEndpoints) -> None:
        """Log why a container is ignored and its bad labels - once, not every resync."""
        summary = (result.ignored, result.problems, result.notes, result.more_problems)
        if record.reported == summary:
            return
        record.reported = summary
        name = record.name
        if result.ignored:
            if result.ignored in ("no published port", "no exposed port"):
                # Ignored on purpose (a worker, a database kept private): not news,
                # but say how to change it for whoever looks at debug logs.
                hint = ("publish a port or use --address-mode internal" if result.ignored == "no published port"
                        else "expose a port or set label beacon.port")
                log.debug("ignored: %s %s: %s (%s)", cid[:12], name, result.ignored, hint)
            else:
                log.info("ignored: %s %s: %s", cid[:12], name, result.ignored)
        # A container may carry hundreds of bad labels: a few lines at warning,
        # the count, and the rest (up to MAX_PROBLEMS kept) at debug.
        for problem in result.problems[:LOGGED_PROBLEMS]:
            log.warning("invalid: %s", problem)
        more = len(result.problems) + result.more_problems - LOGGED_PROBLEMS
        if more > 0:
            log.warning(
                "invalid: container %s (%s): and %d more label problems (--log-level debug lists up to %d)",
                cid[:12], name or cid[:12], more, MAX_PROBLEMS,
            )  # fmt: skip
            for problem in result.problems[LOGGED_PROBLEMS:]:
                log.debug("invalid: %s", problem)
        for note in result.notes:
            log.info("chose: %s", note)


def _describe(endpoints: list[Endpoint]) -> str:
    return ", ".join(
        f"{e.service}={'[' + e.address + ']' if e.is_ipv6 else e.address}:{e.port}"
        + ("" if e.protocol == "tcp" else f"/{e.protocol}")
        + ("" if e.state is State.PASSING else f" ({e.state.value})")
        for e in endpoints
    )


def _stop_timeout(attrs: Mapping[str, Any]) -> float:
    """Seconds `docker stop` waits between SIGTERM and SIGKILL for this container."""
    value = (attrs.get("Config") or {}).get("StopTimeout")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 86400:
        return float(value)
    return DEFAULT_STOP_TIMEOUT  # unset, or -1 (wait forever): assume Docker's default


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
