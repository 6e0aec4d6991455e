"""Pure routing: a registry snapshot becomes a table from (Host, path) to a service.

Built once per snapshot, read on every request. Every key is precomputed as
lowercase ASCII bytes so the data path matches the raw header bytes without
decoding them. The routing rules (precedence, prefixes, conflicts) are
described once, in README.md "Routing".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from beacon.registry.model import Service, Snapshot, SnapshotDelta

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
    exact: dict[bytes, HostRoutes]
    wildcard: dict[bytes, HostRoutes]  # key: suffix with its leading dot, b".example.com"
    any_host: HostRoutes | None
    routes: tuple[Route, ...]
    conflicts: tuple[RouteConflict, ...]
    # Lookups by raw Host header value: repeated hosts skip normalisation.
    _cache: dict[bytes, tuple[HostRoutes, ...]] = field(default_factory=dict)

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

    Only endpoints speaking TCP count; without `expose_by_default` the
    implicit `<service>.<domain>` route is left out, so only label routes
    (beacon.http.host / beacon.http.path_prefix) expose a service."""
    endpoints = [ep for ep in service.endpoints if ep.protocol in HTTP_PROTOCOLS]
    if not endpoints:
        return []
    implicit = Route(host=service.name.lower().encode("ascii", "replace") + b"." + domain, prefix=b"/",
                     service=service.name, explicit=False)  # fmt: skip
    routes = [implicit] if expose_by_default else []
    seen: set[tuple[bytes, bytes]] = set()
    for ep in endpoints:
        if not ep.http_hosts and ep.http_path_prefix is None:
            continue
        prefix = normalise_prefix(ep.http_path_prefix) if ep.http_path_prefix is not None else b"/"
        strip = ep.http_strip_prefix and prefix != b"/"
        hosts = [h for h in (encode_host(h) for h in ep.http_hosts) if h]
        if not hosts:
            # A path prefix without a host label: the service's own name and any host.
            hosts = [implicit.host, ANY_HOST]
        for host in hosts:
            if (host, prefix) in seen:
                continue  # endpoints of one service usually repeat the same labels
            seen.add((host, prefix))
            routes.append(Route(host=host, prefix=prefix, service=service.name, strip=strip))
    return routes


def build_table(
    snapshot: Snapshot | Mapping[str, Service],
    domain: str,
    cache: dict[str, tuple[Service, list[Route]]] | None = None,
    previous: RoutingTable | None = None,
    expose_by_default: bool = True,
    delta: SnapshotDelta | None = None,
) -> RoutingTable:
    """Build the routing table for a snapshot.

    `domain` is the proxy domain as configured (a trailing dot is allowed).
    `cache` maps service name → (Service, its routes) from the previous build;
    unchanged Service objects (the catalog reuses them) skip route derivation.
    It is updated in place. With `previous` (the table built with that cache),
    a snapshot whose services' routes are all unchanged - endpoints came,
    went or changed state, no label changed - returns `previous` itself.
    With `delta` (the snapshot's `changed_since` the one `cache` was built
    from) only the services it names are looked at: O(what changed).
    """
    services = snapshot.services if isinstance(snapshot, Snapshot) else snapshot
    domain_b = domain.strip().rstrip(".").lower().encode("ascii")
    memo = cache if cache is not None else {}
    changed = previous is None
    if delta is not None and cache is not None and previous is not None:
        gone_names: Iterable[str] = [name for name in delta.services_removed if name in memo]
        candidates: Iterable[str] = [name for name in delta.services_changed if name in services]
    else:
        gone_names = [name for name in memo if name not in services]
        candidates = services.keys()
    for gone in gone_names:
        del memo[gone]
        changed = True
    for name in candidates:
        svc = services[name]
        hit = memo.get(name)
        if hit is not None and hit[0] is svc:
            continue
        routes = service_routes(svc, domain_b, expose_by_default)
        if hit is None or hit[1] != routes:
            changed = True
        memo[name] = (svc, routes)
    if not changed and previous is not None:
        return previous
    all_routes = [r for name in sorted(memo) for r in memo[name][1]]
    return table_from_routes(all_routes)


def table_from_routes(routes: Iterable[Route]) -> RoutingTable:
    claims: dict[tuple[bytes, bytes], list[Route]] = {}
    for route in routes:
        claims.setdefault((route.host, route.prefix), []).append(route)
    winners: list[Route] = []
    conflicts: list[RouteConflict] = []
    for (host, prefix), claimants in sorted(claims.items()):
        explicit = sorted((r for r in claimants if r.explicit), key=lambda r: r.service)
        implicit = sorted((r for r in claimants if not r.explicit), key=lambda r: r.service)
        winner = explicit[0] if explicit else implicit[0]
        winners.append(winner)
        losers_explicit = sorted({r.service for r in explicit[1:]} - {winner.service})
        losers_implicit = sorted({r.service for r in implicit} - {winner.service} - set(losers_explicit))
        if losers_explicit:
            conflicts.append(RouteConflict(host, prefix, winner.service, tuple(losers_explicit), "conflict"))
        if losers_implicit:
            conflicts.append(RouteConflict(host, prefix, winner.service, tuple(losers_implicit), "shadowed"))
    exact: dict[bytes, HostRoutes] = {}
    wildcard: dict[bytes, HostRoutes] = {}
    any_host: HostRoutes | None = None
    for route in winners:
        if route.host == ANY_HOST:
            any_host = any_host or HostRoutes()
            any_host.routes.append(route)
        elif route.host.startswith(b"*."):
            wildcard.setdefault(route.host[1:], HostRoutes()).routes.append(route)
        else:
            exact.setdefault(route.host, HostRoutes()).routes.append(route)
    for level in (*exact.values(), *wildcard.values(), *([any_host] if any_host else [])):
        level.finish()
    return RoutingTable(
        exact=exact,
        wildcard=wildcard,
        any_host=any_host,
        routes=tuple(winners),
        conflicts=tuple(conflicts),
    )
