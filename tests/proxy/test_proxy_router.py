"""The pure router: snapshot → routing table; host, wildcard and path matching
(and one end-to-end check of the beacon.http.expose label on real containers)."""

from __future__ import annotations

import random

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beacon.proxy.router import RouteIndex, RoutingTable, build_table, normalise_host, strip_prefix
from beacon.registry import Catalog, Endpoint, Service, ServiceSettings, Snapshot, SnapshotDelta, State
from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually, running_app
from tests.proxy.proxytest import ep


def snapshot(*endpoints: Endpoint) -> Snapshot:
    cat = Catalog()
    for e in endpoints:
        cat.set_source(f"manual:{e.id}", [e])
    return cat.publish()


SNAP = snapshot(
    ep("w1", 1, "web"),
    ep("a1", 2, "api", http_hosts=("api.example.com",)),
    ep("s1", 3, "shop", http_hosts=("*.shop.test",)),
    ep("d1", 4, "deep", http_hosts=("*.eu.shop.test",)),
    ep("v1", 5, "v1api", http_hosts=("api.example.com",), http_path_prefix="/v1", http_strip_prefix=True),
    ep("v2", 6, "v2api", http_hosts=("api.example.com",), http_path_prefix="/v1/beta/"),
    ep("p1", 7, "files", http_path_prefix="/files", http_strip_prefix=True),
)
TABLE = build_table(SNAP, "localhost.")


@pytest.mark.parametrize(
    ("host", "path", "service"),
    [
        ("web.localhost", "/", "web"),
        ("WEB.LocalHost:8080", "/x?y=1", "web"),  # case and port do not matter
        ("web.localhost.", "/", "web"),  # nor a trailing dot
        ("api.localhost", "/", "api"),  # every service keeps its implicit name
        ("api.example.com", "/users", "api"),
        ("api.example.com", "/v1", "v1api"),  # the longest prefix wins
        ("api.example.com", "/v1/users", "v1api"),
        ("api.example.com", "/v1?x", "v1api"),
        ("api.example.com", "/v1x", "api"),  # prefixes match whole segments
        ("api.example.com", "/v1/beta/x", "v2api"),
        ("a.shop.test", "/", "shop"),
        ("a.b.shop.test", "/", "shop"),  # wildcards match at any depth
        ("x.eu.shop.test", "/", "deep"),  # the longer wildcard suffix wins
        ("shop.test", "/", None),  # a wildcard never matches its bare domain
        ("anything.test", "/files/a.txt", "files"),  # a prefix without a host: any host
        ("web.localhost", "/files/a.txt", "web"),  # ...but an exact host comes first
        ("nope.localhost", "/", None),
        ("[::1]:8080", "/", None),
        ("", "/", None),
    ],
)
def test_routing_table(host: str, path: str, service: str | None) -> None:
    route = TABLE.match(host, path)
    assert (route.service if route else None) == service


def test_a_host_level_without_a_matching_prefix_falls_through_to_a_wider_one() -> None:
    table = build_table(snapshot(
        ep("a", 1, "admin", http_hosts=("*.example.com",)),
        ep("b", 2, "blog", http_hosts=("www.example.com",), http_path_prefix="/blog"),
    ), "localhost.")  # fmt: skip
    assert table.match("www.example.com", "/blog/1").service == "blog"  # type: ignore[union-attr]
    assert table.match("www.example.com", "/other").service == "admin"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("prefix", "target", "stripped"),
    [
        (b"/api", b"/api", b"/"),
        (b"/api", b"/api/", b"/"),
        (b"/api", b"/api/users?id=1", b"/users?id=1"),
        (b"/api", b"/api?x=1", b"/?x=1"),
        (b"/", b"/keep", b"/keep"),
    ],
)
def test_strip_prefix(prefix: bytes, target: bytes, stripped: bytes) -> None:
    assert strip_prefix(prefix, target) == stripped


def test_strip_flag_and_prefix_normalisation() -> None:
    table = build_table(snapshot(ep("a", 1, "api", http_path_prefix="api/", http_strip_prefix=True)), "localhost.")
    route = table.match("api.localhost", "/api/x")
    assert route is not None and route.prefix == b"/api" and route.strip


@pytest.mark.parametrize(("raw", "host"), [(b"Web.Example.COM:80", b"web.example.com"), (b"[::1]:8080", b"[::1]"),
                                           (b" a.b. ", b"a.b")])  # fmt: skip
def test_normalise_host(raw: bytes, host: bytes) -> None:
    assert normalise_host(raw) == host


def test_the_proxy_domain_is_configurable() -> None:
    table = build_table(snapshot(ep("w", 1, "web")), "apps.internal.")
    assert table.match("web.apps.internal").service == "web"  # type: ignore[union-attr]
    assert table.match("web.localhost") is None


def test_conflicting_label_routes_pick_the_first_service_by_name_and_are_listed() -> None:
    table = build_table(snapshot(
        ep("z", 1, "zeta", http_hosts=("shared.example.com",)),
        ep("a", 2, "alpha", http_hosts=("shared.example.com",)),
        ep("m", 3, "mid", http_hosts=("zeta.localhost",)),  # hides zeta's implicit name
    ), "localhost.")  # fmt: skip
    assert table.match("shared.example.com").service == "alpha"  # type: ignore[union-attr]
    assert table.match("zeta.localhost").service == "mid"  # type: ignore[union-attr]
    found = {(c.host, c.winner, c.losers, c.kind) for c in table.conflicts}
    assert found == {
        (b"shared.example.com", "alpha", ("zeta",), "conflict"),
        (b"zeta.localhost", "mid", ("zeta",), "shadowed"),
    }
    assert table.to_json()["conflicts"]  # what the API shows


def test_unchanged_services_reuse_their_routes_across_snapshots() -> None:
    cat = Catalog()
    cat.set_source("manual:a", [ep("a", 1, "alpha", http_hosts=("a.test",))])
    cat.set_source("manual:b", [ep("b", 2, "beta")])
    index = RouteIndex("localhost.")
    first = cat.publish()
    index.update(first)
    alpha_routes = index.routes_of("alpha")
    cat.set_source("manual:b", [ep("b", 3, "beta")])
    second = cat.publish()
    index.update(second, second.changed_since(first))
    assert index.routes_of("alpha") is alpha_routes
    assert index.table.match("a.test").service == "alpha"  # type: ignore[union-attr]
    cat.remove_source("manual:a")
    third = cat.publish()
    index.update(third, third.changed_since(second))
    assert index.routes_of("alpha") is None and index.table.match("a.test") is None


def test_invalid_host_labels_are_ignored_not_fatal() -> None:
    table = build_table(snapshot(ep("a", 1, "api", http_hosts=("", "bad..name", "ok.test"))), "localhost.")
    assert table.match("ok.test").service == "api"  # type: ignore[union-attr]
    assert table.match("api.localhost").service == "api"  # type: ignore[union-attr]


def test_a_snapshot_that_changes_no_route_leaves_the_table_alone() -> None:
    from beacon.registry import State

    cat = Catalog()
    cat.set_source("manual:a", [ep("a", 1, "api", http_hosts=("a.test",))])
    index = RouteIndex("localhost.")
    assert index.update(cat.publish()) == []  # routes changed, no conflict
    # State, port and new endpoints change no route.
    cat.set_source("manual:a", [ep("a", 2, "api", http_hosts=("a.test",), state=State.DRAINING)])
    cat.set_source("manual:b", [ep("b", 3, "api", http_hosts=("a.test",))])
    assert index.update(cat.publish()) is None
    # A label change does.
    cat.set_source("manual:b", [ep("b", 3, "api", http_hosts=("b.test",))])
    assert index.update(cat.publish()) == []
    assert index.table.match("b.test").service == "api"  # type: ignore[union-attr]
    # So does a new service (its implicit name); a clash is reported once, when it appears.
    cat.set_source("manual:c", [ep("c", 4, "cache", http_hosts=("b.test",))])
    (conflict,) = index.update(cat.publish()) or ()
    assert (conflict.host, conflict.winner, conflict.losers) == (b"b.test", "api", ("cache",))
    assert index.table.match("cache.localhost") is not None
    cat.set_source("manual:d", [ep("d", 5, "dummy")])
    assert index.update(cat.publish()) == []  # the standing conflict is not new


def test_services_without_an_http_endpoint_get_no_route() -> None:
    snap = snapshot(ep("u1", 53, "dns", protocol="udp"), ep("m1", 80, "mixed"), ep("m2", 81, "mixed", protocol="udp",
                    http_hosts=("udp-only.test",)))  # fmt: skip
    table = build_table(snap, "localhost.")
    assert table.match("dns.localhost") is None
    assert table.match("mixed.localhost").service == "mixed"  # type: ignore[union-attr]
    assert table.match("udp-only.test") is None  # a label on a udp endpoint routes nothing


def test_with_expose_by_default_off_only_labelled_services_are_routed() -> None:
    snap = snapshot(ep("w1", 1, "web"), ep("a1", 2, "api", http_hosts=("api.example.com",)),
                    ep("f1", 3, "files", http_path_prefix="/files"))  # fmt: skip
    table = build_table(snap, "localhost.", expose_by_default=False)
    assert table.match("web.localhost") is None
    assert table.match("api.localhost") is None  # its label routes it, not its implicit name
    assert table.match("api.example.com").service == "api"  # type: ignore[union-attr]
    assert table.match("any.host", "/files/x").service == "files"  # type: ignore[union-attr]


@pytest.mark.parametrize("by_default", [True, False])
def test_the_expose_label_hides_or_exposes_a_service_whatever_the_default(by_default: bool) -> None:
    snap = snapshot(ep("h1", 1, "hidden", http_expose=False, http_hosts=("hidden.test",), http_path_prefix="/h"),
                    ep("o1", 2, "opted", http_expose=True),
                    ep("l1", 3, "both", http_expose=True, http_hosts=("both.test",)),
                    ep("p1", 4, "plain"))  # fmt: skip
    table = build_table(snap, "localhost.", expose_by_default=by_default)
    assert table.match("hidden.localhost") is None  # false: no implicit route...
    assert table.match("hidden.test") is None  # ...and no label route
    assert table.match("any.test", "/h/x") is None
    assert table.match("opted.localhost").service == "opted"  # type: ignore[union-attr]
    assert table.match("both.localhost").service == "both"  # type: ignore[union-attr]  # implicit and labels
    assert table.match("both.test").service == "both"  # type: ignore[union-attr]
    plain = table.match("plain.localhost")
    assert (plain.service if plain else None) == ("plain" if by_default else None)  # the flag decides


def test_endpoints_that_disagree_on_expose_hide_the_service() -> None:
    snap = snapshot(ep("a1", 1, "mixed", http_expose=True), ep("a2", 2, "mixed", http_expose=False),
                    ep("a3", 3, "mixed"))  # fmt: skip
    assert snap.services["mixed"].settings.expose is False  # any false wins
    assert build_table(snap, "localhost.").match("mixed.localhost") is None
    only_true = snapshot(ep("a1", 1, "mixed", http_expose=True), ep("a3", 3, "mixed"))
    assert only_true.services["mixed"].settings.expose is True
    assert build_table(only_true, "localhost.", expose_by_default=False).match("mixed.localhost") is not None


def test_flipping_the_expose_label_updates_the_incremental_index() -> None:
    cat = Catalog()
    index = RouteIndex("localhost.", False)
    for label in (None, True, False, None, True):
        cat.set_source("manual:a", [ep("a1", 1, "app", http_expose=label), ep("a2", 2, "app")])
        snap = cat.publish()
        index.update(snap)
        routed = index.table.match("app.localhost") is not None
        assert routed is (label is True), label


@pytest.mark.docker
async def test_the_expose_label_on_real_containers(run_container: ContainerFactory) -> None:
    port = {"80/tcp": ("127.0.0.1", None)}
    names = {kind: f"{kind}{RUN_ID}" for kind in ("hidden", "opted", "plain")}
    run_container(labels={"beacon.service": names["hidden"], "beacon.http.expose": "false",
                          "beacon.http.host": f"{names['hidden']}.test"}, ports=port)  # fmt: skip
    run_container(labels={"beacon.service": names["opted"], "beacon.http.expose": "true"}, ports=port)
    run_container(labels={"beacon.service": names["plain"]}, ports=port)
    async with running_app(proxy_expose_by_default=False) as app, aiohttp.ClientSession() as http:
        await eventually(lambda: all(
            (svc := app.catalog.snapshot.services.get(n)) is not None and svc.passing for n in names.values()
        ), timeout=20)  # fmt: skip
        assert app.proxy.address is not None

        async def status(host: str) -> int:
            async with http.get(f"http://{app.proxy.address}/", headers={"Host": host}) as resp:
                return resp.status

        assert await status(f"{names['opted']}.localhost") == 200  # true beats --proxy-expose-by-default=false
        assert await status(f"{names['plain']}.localhost") == 404  # the flag decides
        assert await status(f"{names['hidden']}.localhost") == 404  # false: no implicit route...
        assert await status(f"{names['hidden']}.test") == 404  # ...and its host label routes nothing


class CountedEndpoints(tuple[Endpoint, ...]):
    """A service's endpoints that count every walk over them."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        CountedEndpoints.walks += 1
        return super().__iter__()


def big_service(eps: list[Endpoint]) -> Service:
    # The settings as the catalog keeps them (folded here from a plain list: not a walk we count).
    return Service("big", CountedEndpoints(eps), settings=ServiceSettings.fold(eps))


@pytest.mark.parametrize("size", [100, 10_000])
def test_a_change_to_one_endpoint_of_a_big_service_does_not_walk_the_service(size: int) -> None:
    eps = [ep(f"e{i:05d}", 1000 + i, "big", http_hosts=("big.test",)) for i in range(size)]
    first = Snapshot(1, {"big": big_service(eps)}, {e.id: e for e in eps})
    index = RouteIndex("localhost.")
    index.update(first)
    assert index.table.match("big.test").service == "big"  # type: ignore[union-attr]
    previous = first
    # A label change (routes change), a state change (they do not), a new
    # endpoint and a removed one: each O(what changed), whatever the size.
    changes = [
        (ep("e00007", 1007, "big", http_hosts=("big.test", "extra.test")), None),
        (ep("e00008", 1008, "big", http_hosts=("big.test",), state=State.CRITICAL), None),
        (ep("new", 9, "big", http_hosts=("big.test",)), None),
        (None, "e00009"),
    ]
    for n, (changed, removed) in enumerate(changes, start=2):
        if changed is not None:
            eps = sorted([e for e in eps if e.id != changed.id] + [changed], key=lambda e: e.id)
        else:
            eps = [e for e in eps if e.id != removed]
        snap = previous.followed_by(n, {"big": big_service(eps)}, {e.id: e for e in eps}, SnapshotDelta(
            services_changed=frozenset({"big"}),
            endpoints_changed=frozenset({changed.id} if changed is not None else ()),
            endpoints_removed=frozenset({removed} if removed is not None else ()),
        ))  # fmt: skip
        CountedEndpoints.walks = 0
        index.update(snap, snap.changed_since(previous))
        assert CountedEndpoints.walks == 0, f"change {n - 1} walked the service's {len(eps)} endpoints"
        previous = snap
    assert index.table.match("extra.test").service == "big"  # type: ignore[union-attr]
    assert_same_table(index, previous, True)


# ------------------------------------------------ incremental == from scratch
# A small world, so random changes keep colliding: shared hosts, wildcards,
# nested prefixes, implicit names shadowed by labels, udp endpoints.
HOSTS = ("a.test", "b.test", "*.w.test", "*.x.w.test", "s0.localhost", "s1.localhost")
PREFIXES = (None, "/", "/api", "/api/v1", "/files/")
PROBES = [(h, p) for h in ("a.test", "b.test", "q.w.test", "q.x.w.test", "s0.localhost", "s1.localhost",
                           "s2.localhost", "other.test", "A.TEST:8080")
          for p in ("/", "/api", "/api/v1/x", "/files/y", "/z")]  # fmt: skip


def random_endpoint(rng: random.Random, eid: str) -> Endpoint:
    hosts = tuple(rng.sample(HOSTS, rng.choice((0, 0, 1, 2))))
    return ep(eid, rng.randrange(1, 4), f"s{rng.randrange(5)}", http_hosts=hosts,
              http_path_prefix=rng.choice(PREFIXES), http_strip_prefix=rng.random() < 0.3,
              protocol=rng.choice(("tcp", "tcp", "tcp", "udp")),
              http_expose=rng.choice((None, None, None, True, False)),
              state=rng.choice((State.PASSING, State.PASSING, State.CRITICAL)))  # fmt: skip


def levels_of(table: RoutingTable) -> dict[str, object]:
    def level(routes: object) -> object:
        return None if routes is None else (list(routes.routes), routes.only_root)  # type: ignore[attr-defined]

    return {
        "exact": {k: level(v) for k, v in table.exact.items()},
        "wildcard": {k: level(v) for k, v in table.wildcard.items()},
        "any": level(table.any_host),
    }


def assert_same_table(index: RouteIndex, snap: Snapshot, expose: bool) -> None:
    fresh = build_table(snap, "localhost.", expose_by_default=expose)
    table = index.table
    assert table.routes == fresh.routes
    assert table.conflicts == fresh.conflicts
    assert levels_of(table) == levels_of(fresh)
    for host, path in PROBES:  # through the (warm) Host cache of the long-lived table
        assert table.match(host, path) == fresh.match(host, path), (host, path)


def run_changes(seed: int, steps: int, expose: bool, batch: int) -> None:
    rng = random.Random(seed)
    cat = Catalog()
    index = RouteIndex("localhost.", expose)
    previous: Snapshot | None = None
    reported: set[str] = set()
    live: list[str] = []
    for step in range(steps):
        for _ in range(rng.randrange(1, batch + 1)):
            roll = rng.random()
            if live and roll < 0.35:
                cat.remove_source(f"manual:{live.pop(rng.randrange(len(live)))}")
            elif live and roll < 0.6:  # change an endpoint: labels, service, protocol or state
                eid = rng.choice(live)
                cat.set_source(f"manual:{eid}", [random_endpoint(rng, eid)])
            else:
                eid = f"e{step}-{len(live)}"
                live.append(eid)
                cat.set_source(f"manual:{eid}", [random_endpoint(rng, eid)])
        snap = cat.publish()
        # Now and then a reader that skipped snapshots: no recorded delta.
        delta = snap.changed_since(previous) if previous is not None and rng.random() < 0.9 else None
        new = index.update(snap, delta)
        assert_same_table(index, snap, expose)
        now = {c.describe() for c in index.table.conflicts}
        assert set(c.describe() for c in new or ()) == now - reported  # each conflict logged once, when new
        reported = now
        previous = snap


@pytest.mark.parametrize("seed", range(8))
def test_the_incremental_table_equals_one_built_from_scratch(seed: int) -> None:
    run_changes(seed, steps=120, expose=seed % 2 == 0, batch=1 + seed % 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.booleans())
def test_the_incremental_table_equals_one_built_from_scratch_for_any_seed(seed: int, expose: bool) -> None:
    run_changes(seed, steps=40, expose=expose, batch=3)
