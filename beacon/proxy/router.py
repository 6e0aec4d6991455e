"""Pure routing: a registry snapshot becomes a table from (Host, path) to a service.

Built once per snapshot, read on every request. Every key is precomputed as
lowercase ASCII bytes so the data path matches the raw header bytes without
decoding them. The routing rules (precedence, prefixes, conflicts) are
described once, in README.md "Routing".
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from beacon.registry.model import Endpoint, RouteSpec, Service, Snapshot, SnapshotDelta

ANY_HOST = b"*"
# Endpoint protocols an HTTP proxy can talk to (a udp port never gets a request).
HTTP_PROTOCOLS = frozenset({"tcp", "http"})


@dataclass(frozen=True, slots=True)
class Route:
    """One (host, path prefix) → service rule. `prefix` is b"/" for the whole host."""

    host: bytes  # lowercase; b"*.example.com" for a wildcard, ANY_HOST for any
    prefix: bytes
    service: str
    strip: bool = False
    explicit: bool = True  # False: the implicit <service>.<domain> route

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host.decode("ascii", "replace"),
            "path_prefix": self.prefix.decode("ascii", "replace"),
            "service": self.service,
            "strip_prefix": self.strip,
            "implicit": not self.explicit,
        }


@dataclass(frozen=True, slots=True)
class RouteConflict:
    host: bytes
    prefix: bytes
    winner: str
    losers: tuple[str, ...]
    kind: str  # "conflict": two label routes; "shadowed": a label hides an implicit route

    def describe(self) -> str:
        return (
            f"host={self.host.decode('ascii', 'replace')} path_prefix={self.prefix.decode('ascii', 'replace')} "
            f"-> {self.winner} (ignored: {', '.join(self.losers)}; {self.kind})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host.decode("ascii", "replace"),
            "path_prefix": self.prefix.decode("ascii", "replace"),
            "winner": self.winner,
            "losers": list(self.losers),
            "kind": self.kind,
        }


@dataclass(slots=True)
class HostRoutes:
    """The routes of one host level, longest prefix first."""

    routes: list[Route] = field(default_factory=list)
    # Fast path: a host with a single "/" route needs no path check at all.
    only_root: Route | None = None

    def finish(self) -> None:
        self.routes.sort(key=lambda r: (-len(r.prefix), r.prefix))
        self.only_root = self.routes[0] if len(self.routes) == 1 and self.routes[0].prefix == b"/" else None

    def match(self, path: bytes) -> Route | None:
        if self.only_root is not None:
            return self.only_root
        for route in self.routes:
            if prefix_matches(route.prefix, path):
                return route
        return None


def prefix_matches(prefix: bytes, path: bytes) -> bool:
    if prefix == b"/":
        return True
    if not path.startswith(prefix):
        return False
    if len(path) == len(prefix):
        return True
    nxt = path[len(prefix) : len(prefix) + 1]
    return nxt in (b"/", b"?") or prefix.endswith(b"/")


def strip_prefix(prefix: bytes, target: bytes) -> bytes:
    """Remove `prefix` from a matching request target, keeping it absolute."""
    if prefix == b"/":
        return target
    rest = target[len(prefix) :]
    if prefix.endswith(b"/"):
        return b"/" + rest
    if not rest or rest.startswith(b"?"):
        return b"/" + rest
    return rest


def normalise_prefix(text: str) -> bytes:
    """'/api/' and 'api' both become b'/api' (the root stays b'/')."""
    text = "/" + text.strip().strip("/")
    return text.encode("ascii", "replace")


def encode_host(text: str) -> bytes:
    """A host label value as lowercase ASCII bytes (IDNA for unicode); b"" if invalid."""
    text = text.strip().lower().rstrip(".")
    if not text:
        return b""
    try:
        return text.encode("ascii") if text.isascii() else text.encode("idna")
    except UnicodeError:
        return b""


def normalise_host(host: bytes) -> bytes:
    """Lowercase a Host header value and drop its port and any trailing dot."""
    host = host.strip().lower()
    if host.startswith(b"["):  # IPv6 literal: [::1]:8080
        end = host.find(b"]")
        host = host[: end + 1] if end >= 0 else host
    else:
        colon = host.find(b":")
        if colon >= 0:
            host = host[:colon]
    return host.rstrip(b".")


@dataclass(slots=True)
class RoutingTable:
    """The lookup structures of the data path. A `RouteIndex` keeps one table
    up to date in place (its dicts and levels are never replaced wholesale), so
    `resolve` reads the same objects however the table was made."""

    exact: dict[bytes, HostRoutes]
    wildcard: dict[bytes, HostRoutes]  # key: suffix with its leading dot, b".example.com"
    any_host: HostRoutes | None
    # Every claimed (host, prefix) → its winning route, and → its conflicts.
    winners: dict[tuple[bytes, bytes], Route] = field(default_factory=dict)
    conflicts_by_key: dict[tuple[bytes, bytes], tuple[RouteConflict, ...]] = field(default_factory=dict)
    # Lookups by raw Host header value: repeated hosts skip normalisation.
    _cache: dict[bytes, tuple[HostRoutes, ...]] = field(default_factory=dict)

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every winning route, by (host, prefix): for the API and tests, not the data path."""
        return tuple(self.winners[key] for key in sorted(self.winners))

    @property
    def conflicts(self) -> tuple[RouteConflict, ...]:
        return tuple(c for key in sorted(self.conflicts_by_key) for c in self.conflicts_by_key[key])

    @property
    def conflict_count(self) -> int:
        return sum(len(c) for c in self.conflicts_by_key.values())

    def host_levels(self, raw_host: bytes) -> tuple[HostRoutes, ...]:
        """Every host level matching a raw Host header, most specific first."""
        cached = self._cache.get(raw_host)
        if cached is not None:
            return cached
        host = normalise_host(raw_host)
        levels: list[HostRoutes] = []
        exact = self.exact.get(host)
        if exact is not None:
            levels.append(exact)
        if self.wildcard:
            dot = host.find(b".")
            while dot >= 0:
                wild = self.wildcard.get(host[dot:])
                if wild is not None:
                    levels.append(wild)
                dot = host.find(b".", dot + 1)
        if self.any_host is not None:
            levels.append(self.any_host)
        result = tuple(levels)
        if len(self._cache) >= 4096:  # Host is client-controlled: bound the cache
            self._cache.clear()
        self._cache[raw_host] = result
        return result

    def resolve(self, raw_host: bytes, path: bytes) -> Route | None:
        for level in self.host_levels(raw_host):
            route = level.match(path)
            if route is not None:
                return route
        return None

    def match(self, host: str, path: str = "/") -> Route | None:
        """Convenience for tests and the API: resolve with str arguments."""
        return self.resolve(encode_host(host), path.encode())

    def to_json(self) -> dict[str, object]:
        return {
            "routes": [r.to_json() for r in self.routes],
            "conflicts": [c.to_json() for c in self.conflicts],
        }


def service_routes(service: Service, domain: bytes, expose_by_default: bool = True) -> list[Route]:
    """The routes one service asks for (implicit host first, then its labels).

    Only endpoints speaking TCP count. The service's beacon.http.expose
    (folded in `service.settings.expose`) decides first: false hides it - no
    implicit and no label route - and true gives it the implicit route;
    unset, `expose_by_default` (--proxy-expose-by-default) decides whether
    the implicit `<service>.<domain>` route exists. Label routes
    (beacon.http.host / beacon.http.path_prefix) exist unless it is false.

    This walks every endpoint (to leave out the labels of non-HTTP ones);
    `RouteIndex` counts endpoints per service instead and usually reads the
    labels the catalog already folded (`service.settings.routes`)."""
    if service.settings.expose is False:
        return []
    endpoints = [ep for ep in service.endpoints if ep.protocol in HTTP_PROTOCOLS]
    if not endpoints:
        return []
    specs = dict.fromkeys(RouteSpec(ep.http_hosts, ep.http_path_prefix, ep.http_strip_prefix)
                          for ep in endpoints if ep.http_hosts or ep.http_path_prefix is not None)  # fmt: skip
    return routes_from_specs(service, specs, domain, expose_by_default)


def routes_from_specs(service: Service, specs: Iterable[RouteSpec], domain: bytes,
                      expose_by_default: bool = True) -> list[Route]:  # fmt: skip
    """`service_routes` of a service with at least one HTTP endpoint, from the
    route labels of its HTTP endpoints (distinct, in the order of the first
    endpoint by id asking for each: the first one decides strip_prefix)."""
    expose = service.settings.expose
    if expose is False:
        return []
    implicit = Route(host=service.name.lower().encode("ascii", "replace") + b"." + domain, prefix=b"/",
                     service=service.name, explicit=False)  # fmt: skip
    routes = [implicit] if expose or (expose is None and expose_by_default) else []
    seen: set[tuple[bytes, bytes]] = set()
    for spec in specs:
        prefix = normalise_prefix(spec.path_prefix) if spec.path_prefix is not None else b"/"
        strip = spec.strip_prefix and prefix != b"/"
        hosts = [h for h in (encode_host(h) for h in spec.hosts) if h]
        if not hosts:
            # A path prefix without a host label: the service's own name and any host.
            hosts = [implicit.host, ANY_HOST]
        for host in hosts:
            if (host, prefix) in seen:
                continue  # two label sets may name the same host and prefix
            seen.add((host, prefix))
            routes.append(Route(host=host, prefix=prefix, service=service.name, strip=strip))
    return routes


def build_table(snapshot: Snapshot | Mapping[str, Service], domain: str, expose_by_default: bool = True) -> RoutingTable:
    """The routing table of a snapshot, built from scratch (tests, tools).

    `domain` is the proxy domain as configured (a trailing dot is allowed).
    The proxy itself keeps a `RouteIndex`, which updates its table from each
    snapshot's delta instead.
    """
    services = snapshot.services if isinstance(snapshot, Snapshot) else snapshot
    domain_b = encode_domain(domain)
    return table_from_routes(r for name in sorted(services) for r in service_routes(services[name], domain_b,
                                                                                    expose_by_default))


def encode_domain(domain: str) -> bytes:
    return domain.strip().rstrip(".").lower().encode("ascii")


def decide(host: bytes, prefix: bytes, claimants: Iterable[Route]) -> tuple[Route, tuple[RouteConflict, ...]]:
    """Who gets one (host, prefix): a label route beats the implicit name, then
    the first service by name; the others are reported as conflicts."""
    claimants = list(claimants)
    if len(claimants) == 1:  # the usual case: one service claims a key
        return claimants[0], ()
    explicit = sorted((r for r in claimants if r.explicit), key=lambda r: r.service)
    implicit = sorted((r for r in claimants if not r.explicit), key=lambda r: r.service)
    winner = explicit[0] if explicit else implicit[0]
    losers_explicit = sorted({r.service for r in explicit[1:]} - {winner.service})
    losers_implicit = sorted({r.service for r in implicit} - {winner.service} - set(losers_explicit))
    conflicts: list[RouteConflict] = []
    if losers_explicit:
        conflicts.append(RouteConflict(host, prefix, winner.service, tuple(losers_explicit), "conflict"))
    if losers_implicit:
        conflicts.append(RouteConflict(host, prefix, winner.service, tuple(losers_implicit), "shadowed"))
    return winner, tuple(conflicts)


def table_from_routes(routes: Iterable[Route]) -> RoutingTable:
    """A whole table from a list of claims (what `RouteIndex` must always equal)."""
    claims: dict[tuple[bytes, bytes], list[Route]] = {}
    for route in routes:
        claims.setdefault((route.host, route.prefix), []).append(route)
    table = RoutingTable(exact={}, wildcard={}, any_host=None)
    for (host, prefix), claimants in claims.items():
        winner, conflicts = decide(host, prefix, claimants)
        table.winners[host, prefix] = winner
        if conflicts:
            table.conflicts_by_key[host, prefix] = conflicts
        if host == ANY_HOST:
            table.any_host = table.any_host or HostRoutes()
            table.any_host.routes.append(winner)
        elif host.startswith(b"*."):
            table.wildcard.setdefault(host[1:], HostRoutes()).routes.append(winner)
        else:
            table.exact.setdefault(host, HostRoutes()).routes.append(winner)
    for level in (*table.exact.values(), *table.wildcard.values(), *([table.any_host] if table.any_host else [])):
        level.finish()
    return table


def _order(route: Route) -> tuple[int, bytes]:
    return -len(route.prefix), route.prefix  # HostRoutes.routes order: longest prefix first


class RouteIndex:
    """The proxy's routing table, kept up to date snapshot by snapshot.

    `update` looks only at the services a snapshot's delta names, and touches
    only the (host, prefix) claims whose routes changed: O(routes changed),
    not O(services). The table's lookup structures are updated in place - a
    level's sorted route list gets one insert or delete - so `resolve` on the
    data path costs what it did with a table built from scratch.
    """

    def __init__(self, domain: str, expose_by_default: bool = True) -> None:
        self.domain = encode_domain(domain)
        self.expose_by_default = expose_by_default
        self.table = RoutingTable(exact={}, wildcard={}, any_host=None)
        self._services: dict[str, tuple[Service, list[Route]]] = {}  # name → (Service, its routes)
        self._claims: dict[tuple[bytes, bytes], list[Route]] = {}  # every service's claim on a key
        # What of a service's endpoints its routes depend on, counted from each
        # snapshot's endpoint delta so that a change costs O(endpoints changed),
        # not a walk of the service: [HTTP endpoints, non-HTTP ones with route labels].
        self._counts: dict[str, list[int]] = {}
        self._kinds: dict[str, tuple[str, int]] = {}  # endpoint id → (its service, index into _counts)

    def routes_of(self, name: str) -> list[Route] | None:
        hit = self._services.get(name)
        return hit[1] if hit is not None else None

    def update(self, snapshot: Snapshot, delta: SnapshotDelta | None = None) -> list[RouteConflict] | None:
        """Apply `snapshot`; `delta` is its `changed_since` the one applied last
        (None: compare every service, O(services)).

        Returns None when no route changed, else the conflicts that are new.
        """
        services = snapshot.services
        memo = self._services
        self._count(snapshot.endpoints, delta)
        if delta is not None:
            gone: Iterable[str] = [name for name in delta.services_removed if name in memo]
            candidates: Iterable[str] = [name for name in delta.services_changed if name in services]
        else:
            gone = [name for name in memo if name not in services]
            candidates = list(services)
        touched: set[tuple[bytes, bytes]] = set()
        for name in gone:
            self._unclaim(memo.pop(name)[1], touched)
        for name in candidates:
            svc = services[name]
            hit = memo.get(name)
            if hit is not None and hit[0] is svc:
                continue
            routes = self._routes(svc)
            if hit is not None and hit[1] == routes:
                memo[name] = (svc, hit[1])  # endpoints came, went or changed state: no route did
                continue
            if hit is not None:
                self._unclaim(hit[1], touched)
            for route in routes:
                key = (route.host, route.prefix)
                self._claims.setdefault(key, []).append(route)
                touched.add(key)
            memo[name] = (svc, routes)
        if not touched:
            return None
        return self._settle(touched)

    def _count(self, endpoints: Mapping[str, Endpoint], delta: SnapshotDelta | None) -> None:
        """Bring `_counts` to `endpoints`: from the delta, or (None) all again."""
        counts, kinds = self._counts, self._kinds
        if delta is None:
            counts.clear()
            kinds.clear()
            changed: Iterable[str] = endpoints
            removed: Iterable[str] = ()
        else:
            changed, removed = delta.endpoints_changed, delta.endpoints_removed
        for ids in (changed, removed):
            for eid in ids:
                old = kinds.pop(eid, None)
                if old is not None:
                    mine = counts[old[0]]
                    mine[old[1]] -= 1
                    if not mine[0] and not mine[1]:
                        del counts[old[0]]
                ep = endpoints.get(eid)
                if ep is None:
                    continue
                if ep.protocol in HTTP_PROTOCOLS:
                    kind = 0
                elif ep.http_hosts or ep.http_path_prefix is not None:
                    kind = 1
                else:
                    continue  # a non-HTTP endpoint without route labels changes nothing
                kinds[eid] = (ep.service, kind)
                counts.setdefault(ep.service, [0, 0])[kind] += 1

    def _routes(self, svc: Service) -> list[Route]:
        """`service_routes(svc)`, without walking its endpoints when it can."""
        counts = self._counts.get(svc.name)
        if counts is None or not counts[0]:
            return []  # no HTTP endpoint
        if counts[1]:
            # Route labels on a non-HTTP endpoint route nothing, but the catalog
            # folded them into `settings.routes` too: walk the endpoints (rare).
            return service_routes(svc, self.domain, self.expose_by_default)
        return routes_from_specs(svc, svc.settings.routes, self.domain, self.expose_by_default)

    def _unclaim(self, routes: list[Route], touched: set[tuple[bytes, bytes]]) -> None:
        for route in routes:
            key = (route.host, route.prefix)
            claimants = self._claims[key]
            claimants.remove(route)
            if not claimants:
                del self._claims[key]
            touched.add(key)

    def _settle(self, touched: set[tuple[bytes, bytes]]) -> list[RouteConflict]:
        """Decide each touched key again and move its winner into the lookup levels."""
        table = self.table
        new_conflicts: list[RouteConflict] = []
        for key in sorted(touched):
            host, prefix = key
            old_winner = table.winners.get(key)
            old_conflicts = table.conflicts_by_key.pop(key, ())
            claimants = self._claims.get(key)
            winner: Route | None = None
            if claimants:
                winner, conflicts = decide(host, prefix, claimants)
                table.winners[key] = winner
                if conflicts:
                    table.conflicts_by_key[key] = conflicts
                    new_conflicts += [c for c in conflicts if c not in old_conflicts]
            else:
                del table.winners[key]
            if winner != old_winner:
                self._place(host, prefix, winner)
        return new_conflicts

    def _place(self, host: bytes, prefix: bytes, winner: Route | None) -> None:
        """Put `winner` (None: nothing) at `prefix` of the level of `host`."""
        table = self.table
        levels: dict[bytes, HostRoutes] | None
        if host == ANY_HOST:
            levels, level_key, level = None, b"", table.any_host
        elif host.startswith(b"*."):
            levels, level_key = table.wildcard, host[1:]
            level = levels.get(level_key)
        else:
            levels, level_key = table.exact, host
            level = levels.get(level_key)
        if level is None:
            if winner is None:
                return
            level = HostRoutes()
            if levels is None:
                table.any_host = level
            else:
                levels[level_key] = level
            table._cache.clear()  # cached lookups lack the new level
        routes = level.routes
        order = _order(winner) if winner is not None else (-len(prefix), prefix)
        at = bisect.bisect_left(routes, order, key=_order)
        if at < len(routes) and routes[at].prefix == prefix:
            if winner is None:
                del routes[at]
            else:
                routes[at] = winner
        elif winner is not None:
            routes.insert(at, winner)
        if not routes:
            if levels is None:
                table.any_host = None
            else:
                del levels[level_key]
            table._cache.clear()  # cached lookups hold the empty level
        level.only_root = routes[0] if len(routes) == 1 and routes[0].prefix == b"/" else None
