"""Manual registrations: endpoints that are not containers (a database on a VM).

The API validates a registration with the pure `parse_registration` and hands
the resulting `Endpoint` to `ManualRegistry`, which writes it to the catalog
under the source key `manual:<id>`.

TTL heartbeats follow Consul: an endpoint registered with a `ttl` carries a
`CheckSpec(kind="ttl")`, so the catalog publishes it critical until its first
heartbeat; each heartbeat sets the check's status (passing by default) and
re-arms the deadline; no heartbeat within the TTL turns it critical. Any
manual endpoint whose published state stays critical for
`config.deregister_critical_after` is removed (0 disables removal). One timer
task drives all deadlines from a heap; there is no task per endpoint.

Registrations live in memory only (the in-memory store): they are lost when
Beacon restarts, and their owners are expected to register again, like agents
re-registering with a restarted Consul agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from beacon.config import Config
from beacon.grammar import is_dns_label, parse_duration
from beacon.registry.catalog import Catalog, EndpointConflict
from beacon.registry.checkspec import CheckSpecError, check_spec_from_json, truncate_output
from beacon.registry.model import CheckSpec, CheckStatus, Endpoint, Snapshot, Source, State

log = logging.getLogger("beacon.registry.manual")

SOURCE_PREFIX = "manual:"
OUTPUT_LIMIT = 4096  # characters of heartbeat output kept (Consul keeps 4 KB)
MIN_TTL, MAX_TTL = 0.1, 86400.0
MAX_TAGS, MAX_META = 64, 64

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[^\s,\x00-\x1f\x7f]{1,255}")
_FIELDS = frozenset({"id", "service", "address", "port", "tags", "meta", "weight", "protocol", "ttl", "check"})


# ----------------------------------------------------------------- errors
class RegistrationError(ValueError):
    """Invalid registration input (HTTP 422). `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(LookupError):
    """No manual endpoint with that id (HTTP 404)."""

    field = "id"


class RegistrationConflict(RuntimeError):
    """The request contradicts the current state, e.g. a container owns the id (HTTP 409)."""

    def __init__(self, message: str, field: str | None = "id") -> None:
        super().__init__(message)
        self.field = field


# ------------------------------------------------------------ pure parsing
def source_key(endpoint_id: str) -> str:
    return SOURCE_PREFIX + endpoint_id


def validate_id(endpoint_id: str) -> str:
    if not _ID.fullmatch(endpoint_id):
        raise RegistrationError(
            "id must be 1-128 characters of letters, digits and _.:@- starting with a letter or digit",
            "id",
        )
    return endpoint_id


def validate_service_name(name: object, field: str = "service") -> str:
    """A service name is a DNS label; DNS is case-insensitive, so it is lowercased."""
    if not isinstance(name, str) or not is_dns_label(name.lower()):
        raise RegistrationError(
            f"{field} must be a DNS label: 1-63 letters, digits or '-', not starting or ending with '-' "
            f"(got {name!r})",
            field,
        )
    return name.lower()


def _duration(value: object, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RegistrationError(f"{field} must be a duration like \"10s\" or a number of seconds", field)
    try:
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
    except ValueError as exc:
        raise RegistrationError(f"{field}: {exc}", field) from None
    except OverflowError:  # a JSON integer beyond any float: far out of range
        seconds = math.inf
    if not math.isfinite(seconds) or not low <= seconds <= high:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise RegistrationError(f"{field} must be between {low:g}s and {high:g}s (got {shown})", field)
    return seconds


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegistrationError(f"{field} must be an integer", field)
    if not low <= value <= high:
        raise RegistrationError(f"{field} must be between {low} and {high} (got {value})", field)
    return value


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise RegistrationError("address must be a string holding an IPv4 or IPv6 address", "address")
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise RegistrationError(f"address must be an IPv4 or IPv6 address (got {value!r})", "address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise RegistrationError(f"address {value!r} is not a reachable unicast address", "address")
    return str(ip)


def _tags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise RegistrationError(f"tags must be a list of at most {MAX_TAGS} strings", "tags")
    for tag in value:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise RegistrationError(
                f"tag {tag!r} must be 1-255 characters without spaces, commas or control characters", "tags"
            )
    return tuple(dict.fromkeys(value))  # de-duplicated, order kept


def _meta(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_META:
        raise RegistrationError(f"meta must be an object of at most {MAX_META} string values", "meta")
    for key, item in value.items():
        if not _META_KEY.fullmatch(key):
            raise RegistrationError(f"meta key {key!r} must be 1-128 letters, digits or _.-", "meta")
        if not isinstance(item, str) or len(item) > 4096:
            raise RegistrationError(f"meta value of {key!r} must be a string of at most 4096 characters", "meta")
    return MappingProxyType(dict(sorted(value.items())))


def _check(value: object) -> CheckSpec:
    # One parser for label and API checks (beacon.registry.checkspec): same fields, same defaults.
    try:
        return check_spec_from_json(value, "check")
    except CheckSpecError as exc:
        raise RegistrationError(str(exc), exc.field) from None


def parse_registration(endpoint_id: str, body: object, *, node: str) -> Endpoint:
    """Turn a PUT /v1/endpoints/{id} body into an Endpoint, or raise RegistrationError."""
    validate_id(endpoint_id)
    if not isinstance(body, dict):
        raise RegistrationError("the body must be a JSON object", "body")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RegistrationError(f"unknown field {unknown[0]!r}", unknown[0])
    if "id" in body and body["id"] != endpoint_id:
        raise RegistrationError("id in the body differs from the id in the path", "id")
    for required in ("service", "address", "port"):
        if required not in body:
            raise RegistrationError(f"{required} is required", required)
    service = validate_service_name(body["service"])
    address = _address(body["address"])
    port = _int(body["port"], "port", 1, 65535)
    weight = _int(body.get("weight", 1), "weight", 1, 65535)
    protocol = body.get("protocol", "tcp")
    if protocol not in ("tcp", "udp"):
        raise RegistrationError(f"protocol must be tcp or udp (got {protocol!r})", "protocol")
    tags = _tags(body.get("tags", []))
    meta = _meta(body.get("meta", {}))
    check: CheckSpec | None = None
    if body.get("ttl") is not None:
        if body.get("check") is not None:
            raise RegistrationError("an endpoint has one check: give ttl or check, not both", "check")
        check = CheckSpec(kind="ttl", ttl=_duration(body["ttl"], "ttl", MIN_TTL, MAX_TTL))
    elif body.get("check") is not None:
        check = _check(body["check"])
    return Endpoint(
        id=endpoint_id,
        service=service,
        address=address,
        port=port,
        source=Source("manual"),
        node=node,
        protocol=protocol,
        weight=weight,
        tags=tags,
        meta=meta,
        check=check,
    )


def parse_heartbeat(data: Mapping[str, Any]) -> tuple[State, str]:
    """`status` (passing|warning|critical, default passing) and `output` of a heartbeat."""
    unknown = sorted(set(data) - {"status", "output"})
    if unknown:
        raise RegistrationError(f"unknown field {unknown[0]!r}", unknown[0])
    status = data.get("status", "passing")
    allowed = (State.PASSING, State.WARNING, State.CRITICAL)
    if status not in [s.value for s in allowed]:
        raise RegistrationError(f"status must be passing, warning or critical (got {status!r})", "status")
    output = data.get("output", "")
    if not isinstance(output, str):
        raise RegistrationError("output must be a string", "output")
    return State(status), truncate_output(output, OUTPUT_LIMIT)


# ---------------------------------------------------------------- registry
@dataclass(slots=True)
class _Registration:
    endpoint: Endpoint
    deadline: float | None = None  # monotonic: when the TTL runs out (None: not armed)
    critical_since: float | None = None  # monotonic: when the published state turned critical
    status: CheckStatus | None = None  # last TTL status this registry set
    # Due time of this entry's pending heap item per kind; at most one each, so
    # the heap stays small however often heartbeats arrive.
    ttl_due: float | None = None
    deregister_due: float | None = None
    seen: Endpoint | None = None  # last published version (identity check in the listener)


class ManualRegistry:
    """In-memory manual registrations with TTL heartbeats and critical deregistration."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        node: str,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._node = node
        self._deregister_after = config.deregister_critical_after
        self._clock = clock
        self._wall = wall_clock
        self._entries: dict[str, _Registration] = {}
        # (due time, sequence, endpoint id, what); stale items are skipped when popped.
        self._heap: list[tuple[float, int, str, Literal["ttl", "deregister"]]] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten = catalog.add_listener(self._on_snapshot)

    @property
    def node(self) -> str:
        return self._node

    def registrations(self) -> Mapping[str, Endpoint]:
        """The registrations held now (the cluster tests read it after a restart)."""
        return MappingProxyType({eid: e.endpoint for eid, e in self._entries.items()})

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="beacon-manual-timer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --------------------------------------------------------------- writes
    def register(self, endpoint: Endpoint) -> bool:
        """Add or replace a manual endpoint. Returns True when it is new.

        Raises RegistrationConflict (changing nothing) when another source owns the id.
        """
        eid = endpoint.id
        key = source_key(eid)
        owner = self._catalog.owner_of(eid)
        if owner is not None and owner != key:
            raise RegistrationConflict(f"endpoint {eid!r} belongs to {owner}; it cannot be changed through the API")
        try:
            self._catalog.set_source(key, [endpoint])
        except EndpointConflict as exc:
            raise RegistrationConflict(str(exc)) from None
        entry = self._entries.get(eid)
        created = entry is None
        if entry is None:
            entry = self._entries[eid] = _Registration(endpoint)
        elif entry.endpoint.check != endpoint.check:
            # A new check starts over (critical until it passes); an unchanged
            # one keeps its status, so re-registering is idempotent.
            self._catalog.set_check_status(eid, None)
            entry.deadline = None
            entry.status = None
        entry.endpoint = endpoint
        check = endpoint.check
        log.info(
            "%s: manual endpoint %s service=%s address=%s port=%d%s",
            "added" if created else "updated",
            eid,
            endpoint.service,
            endpoint.address,
            endpoint.port,
            f" ttl={check.ttl:g}s" if check is not None and check.kind == "ttl" else "",
        )
        return created

    def deregister(self, endpoint_id: str) -> Endpoint:
        entry = self._require(endpoint_id)
        self._drop(endpoint_id, entry, "deregistered through the API")
        return entry.endpoint

    def heartbeat(self, endpoint_id: str, state: State = State.PASSING, output: str = "") -> None:
        """Record a TTL heartbeat: set the check status and re-arm the deadline."""
        entry = self._require(endpoint_id)
        check = entry.endpoint.check
        if check is None or check.kind != "ttl":
            raise RegistrationConflict(f"endpoint {endpoint_id!r} has no ttl; heartbeats apply to ttl endpoints", "ttl")
        self._set_status(endpoint_id, entry, state, truncate_output(output, OUTPUT_LIMIT))
        entry.deadline = self._clock() + check.ttl
        self._schedule(entry, "ttl", entry.deadline)

    def _require(self, endpoint_id: str) -> _Registration:
        entry = self._entries.get(endpoint_id)
        if entry is not None:
            return entry
        owner = self._catalog.owner_of(endpoint_id)
        if owner is not None:
            raise RegistrationConflict(f"endpoint {endpoint_id!r} belongs to {owner}; it cannot be changed through the API")
        raise NotFound(f"no manual endpoint {endpoint_id!r}")

    def _drop(self, endpoint_id: str, entry: _Registration, why: str) -> None:
        del self._entries[endpoint_id]
        self._catalog.remove_source(source_key(endpoint_id))
        log.info("removed: manual endpoint %s service=%s (%s)", endpoint_id, entry.endpoint.service, why)

    def _set_status(self, endpoint_id: str, entry: _Registration, state: State, output: str) -> None:
        now = self._wall()
        last = entry.status
        passing = state is State.PASSING
        if last is None:
            passes, failures, changed = (1, 0, now) if passing else (0, 1, now)
        else:
            passes = last.consecutive_passes + 1 if passing else 0
            failures = 0 if passing else last.consecutive_failures + 1
            changed = last.last_change if last.state is state else now
        status = CheckStatus(
            state=state,
            output=output,
            last_checked=now,
            last_change=changed,
            consecutive_passes=passes,
            consecutive_failures=failures,
        )
        entry.status = status
        self._catalog.set_check_status(endpoint_id, status)

    # ---------------------------------------------------------------- timer
    def _schedule(self, entry: _Registration, what: Literal["ttl", "deregister"], due: float) -> None:
        """Make sure the timer looks at `entry` by `due`.

        A pending item that is due earlier is enough: when it pops, `tick`
        sees the later time and schedules again. Only an earlier time pushes a
        new item (the old one then no longer matches and is skipped).
        """
        pending = entry.ttl_due if what == "ttl" else entry.deregister_due
        if pending is not None and pending <= due:
            return
        if what == "ttl":
            entry.ttl_due = due
        else:
            entry.deregister_due = due
        earliest = self._heap[0][0] if self._heap else math.inf
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, entry.endpoint.id, what))
        if due < earliest:
            self._wake.set()  # the timer sleeps until a later time: wake it to re-plan

    def tick(self, now: float) -> float | None:
        """Expire TTLs and remove long-critical endpoints due by `now`.

        Returns when the next item is due (None: nothing scheduled). Pure apart
        from the catalog writes, so tests drive it with a fake clock.
        """
        while self._heap and self._heap[0][0] <= now:
            due, _, eid, what = heapq.heappop(self._heap)
            entry = self._entries.get(eid)
            if entry is None:
                continue
            if what == "ttl" and entry.ttl_due == due:
                entry.ttl_due = None
                if entry.deadline is None:
                    continue  # disarmed (re-registered with another check)
                if entry.deadline > now:
                    self._schedule(entry, "ttl", entry.deadline)  # heartbeats moved it on
                    continue
                entry.deadline = None
                check = entry.endpoint.check
                ttl = check.ttl if check is not None else 0.0
                self._set_status(eid, entry, State.CRITICAL, f"ttl expired: no heartbeat within {ttl:g}s")
                log.info("expired: manual endpoint %s (no heartbeat within %gs)", eid, ttl)
            elif what == "deregister" and entry.deregister_due == due:
                entry.deregister_due = None
                if entry.critical_since is None or self._deregister_after <= 0:
                    continue  # recovered in the meantime
                at = entry.critical_since + self._deregister_after
                if at > now:
                    self._schedule(entry, "deregister", at)  # critical again since a later time
                    continue
                self._drop(eid, entry, f"critical for {self._deregister_after:g}s")
        return self._heap[0][0] if self._heap else None

    def _on_snapshot(self, snap: Snapshot) -> None:
        """Note when each manual endpoint's published state turns critical (any check kind)."""
        if not self._entries:
            return
        now = None
        for eid, entry in self._entries.items():
            ep = snap.endpoints.get(eid)
            if ep is entry.seen:
                continue
            entry.seen = ep
            if ep is not None and ep.state is State.CRITICAL:
                if entry.critical_since is None:
                    now = self._clock() if now is None else now
                    entry.critical_since = now
                    if self._deregister_after > 0:
                        self._schedule(entry, "deregister", now + self._deregister_after)
            else:
                entry.critical_since = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                next_due = self.tick(self._clock())
            except Exception:  # the timer must outlive one bad registration
                log.exception("failed: manual registration timer")
                next_due = self._clock() + 1.0
            timeout = None if next_due is None else max(0.0, next_due - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
