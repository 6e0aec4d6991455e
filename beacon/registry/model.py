"""Immutable data the registry publishes: endpoints, services and snapshots.

Everything here is a frozen value. Consumers (DNS, proxy, API watches) hold a
reference to one `Snapshot` and swap it when a new one arrives, so no reader
ever sees a half-updated table.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

EMPTY_MAP: Mapping[str, str] = MappingProxyType({})

# Balancing policies (label beacon.lb, flag --lb); "+sticky" adds cookie affinity.
POLICIES = ("round_robin", "least_conn", "random")


class State(enum.StrEnum):
    """Health state of one endpoint, worst last (except DRAINING, see `worst`)."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    # The backend was asked to stop (SIGTERM): no new traffic, in-flight work finishes.
    DRAINING = "draining"


_SEVERITY = {State.PASSING: 0, State.WARNING: 1, State.CRITICAL: 2, State.DRAINING: 3}


def worst(*states: State) -> State:
    """Combine states: draining beats critical beats warning beats passing."""
    return max(states, key=_SEVERITY.__getitem__)


@dataclass(frozen=True, slots=True)
class Source:
    """Where an endpoint came from: a container, or a manual API registration."""

    kind: Literal["container", "manual"]
    container_id: str | None = None
    container_name: str | None = None

    def to_json(self) -> dict[str, str]:
        out: dict[str, str] = {"kind": self.kind}
        if self.container_id is not None:
            out["container_id"] = self.container_id
        if self.container_name is not None:
            out["container_name"] = self.container_name
        return out


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """An active health check configured by labels (beacon.check.*) or the API.

    Parsed by the label parser / API; executed by `beacon.registry.checker`.
    """

    kind: Literal["http", "tcp", "ttl"]
    path: str = "/"  # http only
    method: str = "GET"  # http only
    status_min: int = 200  # http: passing when status_min <= status <= status_max
    status_max: int = 399
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 1  # consecutive passes to become passing
    fall: int = 1  # consecutive failures to become critical
    ttl: float = 0.0  # ttl only: seconds a heartbeat keeps the endpoint passing


@dataclass(frozen=True, slots=True)
class AutohealSpec:
    """Opt-in restart of a running-but-unhealthy container (label beacon.autoheal)."""

    after: int = 3  # consecutive failed checks before a restart
    max_restarts: int = 3  # per window
    window: float = 600.0
    backoff: float = 10.0  # least wait between restarts; doubles with each restart in the window


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """Last outcome of an endpoint's active check (shown in the API)."""

    state: State
    output: str = ""
    last_checked: float = 0.0  # wall-clock seconds
    last_change: float = 0.0  # wall-clock seconds
    consecutive_passes: int = 0
    consecutive_failures: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "output": self.output,
            "last_checked": self.last_checked,
            "last_change": self.last_change,
            "consecutive_passes": self.consecutive_passes,
            "consecutive_failures": self.consecutive_failures,
        }


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """Where a container's port is reached from one Docker network it is on."""

    subnet: str  # the network's CIDR as the container sees it, e.g. 172.18.0.0/16
    address: str  # the container's IP on that network
    port: int  # the container's own port (not the published one)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One reachable instance of a service: address:port plus what we know about it.

    `state` is the source's view (Docker: running, paused, HEALTHCHECK, SIGTERM).
    The catalog publishes endpoints whose `state` already folds in the active
    check's result (`check_status`), so consumers read `state` and nothing else.
    """

    id: str
    service: str
    address: str
    port: int
    source: Source
    node: str = ""
    protocol: str = "tcp"
    state: State = State.PASSING
    reason: str = ""  # why the source set `state` (Docker: "paused", the HEALTHCHECK's output...)
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    # Per-endpoint settings that consumers read (all from beacon.* labels).
    dns_ttl: int | None = None  # beacon.dns.ttl
    lb: str | None = None  # beacon.lb
    locality: str | None = None  # beacon.lb.locality: "prefer-local" (proxy prefers this node's endpoints)
    http_hosts: tuple[str, ...] = ()  # beacon.http.host
    http_path_prefix: str | None = None  # beacon.http.path_prefix
    http_strip_prefix: bool = False  # beacon.http.strip_prefix
    http_expose: bool | None = None  # beacon.http.expose; None: --proxy-expose-by-default
    check: CheckSpec | None = None  # beacon.check.*
    autoheal: AutohealSpec | None = None  # beacon.autoheal*
    check_status: CheckStatus | None = None  # filled in by the catalog
    # A container's addresses on its Docker networks: DNS answers a querier on
    # one of these subnets with them instead of `address` (which it may not reach).
    networks: tuple[NetworkAddress, ...] = ()

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "service": self.service,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "node": self.node,
            "state": self.state.value,
            **({"reason": self.reason} if self.reason else {}),
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "source": self.source.to_json(),
        }
        if self.check is not None:
            out["check"] = (
                {"kind": "ttl", "ttl": self.check.ttl}  # a TTL check has no interval
                if self.check.kind == "ttl"
                else {"kind": self.check.kind, "interval": self.check.interval}
            )
        if self.check_status is not None:
            out["check_status"] = self.check_status.to_json()
        return out


@dataclass(frozen=True, slots=True)
class Balancing:
    """The parsed `beacon.lb` label: a policy (None: the proxy's --lb) and cookie affinity."""

    policy: str | None = None
    sticky: bool = False

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def parse(text: str) -> Balancing:
        """'least_conn' | 'sticky' | 'random+sticky' ... → Balancing; ValueError names a bad part.

        Cached: the label parser validates a value and the catalog folds it
        into each rebuilt `Service`, and both get the one parsed object.
        """
        policy: str | None = None
        sticky = False
        for part in (p.strip().lower() for p in text.replace(",", "+").split("+")):
            if not part:
                continue
            if part == "sticky":
                sticky = True
            elif part in POLICIES:
                policy = part
            else:
                raise ValueError(f"unknown balancing policy {part!r} (expected {', '.join(POLICIES)}, sticky)")
        return Balancing(policy, sticky)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What an endpoint's beacon.http.* labels ask the proxy to route to its service."""

    hosts: tuple[str, ...] = ()  # beacon.http.host
    path_prefix: str | None = None  # beacon.http.path_prefix
    strip_prefix: bool = False  # beacon.http.strip_prefix


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Service-level settings folded once from the endpoints' labels, when the
    catalog builds the `Service` (consumers read these, not the endpoints)."""

    # The smallest beacon.dns.ttl of any endpoint (one TTL per RRset, RFC 2181); None: --dns-ttl.
    dns_ttl: int | None = None
    # beacon.lb of the first endpoint (by id) that sets a valid one; None: --lb.
    balancing: Balancing | None = None
    # Distinct route requests, in the order of the first endpoint (by id) asking for each.
    routes: tuple[RouteSpec, ...] = ()
    # beacon.http.expose: False when any endpoint says false (hiding wins: one
    # container cannot publish what another hides), else True when any says
    # true, else None (--proxy-expose-by-default decides).
    expose: bool | None = None

    @classmethod
    def fold(cls, endpoints: Iterable[Endpoint]) -> ServiceSettings:
        ttl: int | None = None
        balancing: Balancing | None = None
        routes: dict[RouteSpec, None] = {}
        expose: bool | None = None
        for ep in endpoints:
            if ep.http_expose is not None and expose is not False:
                expose = ep.http_expose
            if ep.dns_ttl is not None:
                ttl = max(0, ep.dns_ttl) if ttl is None else min(ttl, max(0, ep.dns_ttl))
            if balancing is None and ep.lb:
                with contextlib.suppress(ValueError):  # the label parser reported it
                    balancing = Balancing.parse(ep.lb)
            if ep.http_hosts or ep.http_path_prefix is not None:
                routes.setdefault(RouteSpec(ep.http_hosts, ep.http_path_prefix, ep.http_strip_prefix), None)
        if ttl is None and balancing is None and not routes and expose is None:
            return NO_SETTINGS
        return cls(ttl, balancing, tuple(routes), expose)


NO_SETTINGS = ServiceSettings()
_FOLD = ServiceSettings()  # a distinct object: "fold from the endpoints"


@dataclass(frozen=True, slots=True)
class Service:
    """A named group of endpoints. Tags are the union of the endpoints' tags.

    `settings` is folded from the endpoints when not given (the catalog passes
    the value it maintains incrementally).
    """

    name: str
    endpoints: tuple[Endpoint, ...]  # sorted by id
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    settings: ServiceSettings = field(default=_FOLD, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.settings is _FOLD:
            object.__setattr__(self, "settings", ServiceSettings.fold(self.endpoints))

    @property
    def dns_ttl(self) -> int | None:
        return self.settings.dns_ttl

    @property
    def balancing(self) -> Balancing | None:
        return self.settings.balancing

    @property
    def routes(self) -> tuple[RouteSpec, ...]:
        return self.settings.routes

    @property
    def passing(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.state is State.PASSING)

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in State}
        for e in self.endpoints:
            counts[e.state.value] += 1
        return counts

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "endpoints": [e.to_json() for e in self.endpoints],
        }

    def summary_json(self) -> dict[str, object]:
        counts = self.counts()
        return {
            "name": self.name,
            "tags": list(self.tags),
            "passing": counts[State.PASSING.value],
            "total": len(self.endpoints),
            "states": counts,
        }


@dataclass(frozen=True, slots=True)
class SnapshotDelta:
    """What changed between two snapshots, by name / id.

    "Changed" includes added; a name is in at most one of changed/removed.
    """

    services_changed: frozenset[str] = frozenset()
    services_removed: frozenset[str] = frozenset()
    endpoints_changed: frozenset[str] = frozenset()
    endpoints_removed: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.services_changed or self.services_removed or self.endpoints_changed or self.endpoints_removed)

    @property
    def services_touched(self) -> frozenset[str]:
        """Every service whose answer may differ: changed, added or removed."""
        return self.services_changed | self.services_removed


NO_CHANGE = SnapshotDelta()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    """The whole catalog at one index. `services` and `endpoints` are read-only maps.

    The catalog publishes each snapshot with the delta from the one before it
    (`previous_index`, `delta`), so `changed_since(that one)` costs nothing;
    snapshots built elsewhere (tests, the proxy's workers) carry no delta.
    """

    index: int
    services: Mapping[str, Service]
    endpoints: Mapping[str, Endpoint]
    previous_index: int | None = None  # the snapshot `delta` is against
    delta: SnapshotDelta | None = field(default=None, compare=False, repr=False)
    # The snapshot `delta` is against, weakly: a strong reference would keep
    # every snapshot ever published alive. Identity, not the index, proves that
    # `previous` is that snapshot (two catalogs may both publish index 7).
    _previous: weakref.ref[Snapshot] | None = field(default=None, compare=False, repr=False)

    def changed_since(self, previous: Snapshot) -> SnapshotDelta:
        """Services and endpoints changed (or added) and removed since `previous`.

        O(what changed) when `previous` is the snapshot published just before
        this one (the catalog recorded the delta). For any other `previous` - a
        reader that skipped snapshots, or snapshots not from the catalog - it
        falls back to comparing both maps, O(services + endpoints): identity
        first (the catalog keeps the object of everything it did not change),
        then equality, so an equal rebuilt value does not count as changed.
        """
        if previous is self:
            return NO_CHANGE
        if self.delta is not None and self._previous is not None and self._previous() is previous:
            return self.delta
        s_changed, s_removed = _diff(previous.services, self.services)
        e_changed, e_removed = _diff(previous.endpoints, self.endpoints)
        return SnapshotDelta(s_changed, s_removed, e_changed, e_removed)

    def followed_by(
        self,
        index: int,
        services: Mapping[str, Service],
        endpoints: Mapping[str, Endpoint],
        delta: SnapshotDelta,
    ) -> Snapshot:
        """The next snapshot, recording `delta` as what changed since this one."""
        return Snapshot(index, services, endpoints, self.index, delta, weakref.ref(self))


def _diff(old: Mapping[str, object], new: Mapping[str, object]) -> tuple[frozenset[str], frozenset[str]]:
    if old is new:
        return frozenset(), frozenset()
    changed = frozenset(k for k, v in new.items() if (o := old.get(k)) is not v and o != v)
    removed = frozenset(k for k in old if k not in new)
    return changed, removed


def parse_lb(text: str | None, default: str = "round_robin") -> tuple[str, bool]:
    """'least_conn' | 'sticky' | 'random+sticky' ... → (policy, sticky); see `Balancing.parse`."""
    if text is None or not text.strip():
        return default, False
    parsed = Balancing.parse(text)
    return parsed.policy or default, parsed.sticky
