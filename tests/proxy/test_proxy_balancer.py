"""The pure balancer: policies, retries, sticky tokens and passive-health ejection."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import replace
from itertools import accumulate
from typing import Any

import pytest

from beacon.proxy.balancer import (
    INF,
    P2C_THRESHOLD,
    Balancer,
    Ejection,
    EndpointState,
    FailureKind,
    Pool,
    sticky_token,
)
from beacon.proxy.core import ProxyCore
from beacon.registry import Catalog, Endpoint, State
from beacon.registry.model import Snapshot, parse_lb
from tests.helpers import test_config
from tests.proxy.proxytest import ep


def members(*weights: int) -> list[EndpointState]:
    return [EndpointState(chr(ord("a") + i), "svc", "127.0.0.1", 1000 + i, w) for i, w in enumerate(weights)]


def seq(pool: Pool, n: int, now: float = 0.0) -> str:
    out = []
    for _ in range(n):
        m = pool.pick(now)
        assert m is not None
        out.append(m.id)
    return "".join(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("round_robin", False)),
        ("", ("round_robin", False)),
        ("least_conn", ("least_conn", False)),
        ("sticky", ("round_robin", True)),
        ("random+sticky", ("random", True)),
        (" Least_Conn , sticky ", ("least_conn", True)),
    ],
)
def test_parse_lb(text: str | None, expected: tuple[str, bool]) -> None:
    assert parse_lb(text) == expected


def test_parse_lb_names_a_bad_policy() -> None:
    with pytest.raises(ValueError, match="fastest"):
        parse_lb("fastest")


def test_round_robin_with_equal_weights_rotates() -> None:
    pool = Pool("svc", members(1, 1, 1), rng=random.Random(0))
    s = seq(pool, 9)
    assert sorted(s[:3]) == ["a", "b", "c"] and s == s[:3] * 3


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((5, 1, 1), "aabacaa"),  # nginx's smooth weighted round robin: no burst of a's
        ((2, 1), "aba"),
        ((1, 3), "babb"),
    ],
)
def test_smooth_weighted_round_robin_sequence(weights: tuple[int, ...], expected: str) -> None:
    pool = Pool("svc", members(*weights))
    assert seq(pool, len(expected) * 3) == expected * 3


def test_least_conn_picks_the_fewest_in_flight_relative_to_weight() -> None:
    ms = members(1, 1, 2)
    ms[0].inflight, ms[1].inflight, ms[2].inflight = 3, 1, 3  # scores 4, 2, 2
    pool = Pool("svc", ms, "least_conn", rng=random.Random(1))
    picked = Counter(pool.pick(0).id for _ in range(200))  # type: ignore[union-attr]
    assert set(picked) == {"b", "c"}  # a tie, broken at random
    assert min(picked.values()) > 50


def test_least_conn_uses_two_random_choices_in_a_large_pool() -> None:
    ms = members(*([1] * (P2C_THRESHOLD + 8)))
    busy = ms[0]
    busy.inflight = 100
    pool = Pool("svc", ms, "least_conn", rng=random.Random(2))
    picked = Counter(pool.pick(0).id for _ in range(2000))  # type: ignore[union-attr]
    assert busy.id not in picked  # it loses every pairing it is drawn into
    assert len(picked) == len(ms) - 1  # and the rest share the load


def test_random_follows_weights() -> None:
    pool = Pool("svc", members(3, 1), "random", rng=random.Random(3))
    picked = Counter(seq(pool, 4000))
    assert 2700 < picked["a"] < 3300


def test_an_empty_pool_picks_nothing() -> None:
    pool = Pool("svc", [])
    assert pool.pick(0) is None
    assert pool.pick_retry(0, [], None) is None


def test_retries_avoid_tried_endpoints_and_never_repeat_the_last() -> None:
    ms = members(1, 1, 1)
    pool = Pool("svc", ms, rng=random.Random(4))
    first = pool.pick(0)
    assert first is not None
    second = pool.pick_retry(0, [first], first)
    assert second is not None and second is not first
    third = pool.pick_retry(0, [first, second], second)
    assert third is not None and third not in (first, second)
    # Everything tried: anything but the last one.
    fourth = pool.pick_retry(0, [first, second, third], third)
    assert fourth is not None and fourth is not third
    single = Pool("svc", ms[:1])
    assert single.pick_retry(0, [ms[0]], ms[0]) is None  # never the same one twice in a row


def test_sticky_token_names_an_eligible_endpoint() -> None:
    ms = members(1, 1)
    pool = Pool("svc", ms, sticky=True)
    assert pool.pick_sticky(sticky_token("b"), 0) is ms[1]
    assert pool.pick_sticky(b"unknown", 0) is None
    ms[1].ejected_until = 10.0
    assert pool.pick_sticky(sticky_token("b"), 5.0) is None


def test_ejection_after_consecutive_failures_capped_and_returning() -> None:
    # Through the balancer's hooks, as the data path does it.
    cat = Catalog()
    cat.set_source("m", [ep(i, 1000 + n, "svc") for n, i in enumerate("abcd")])
    balancer = Balancer(Ejection(threshold=3, base_time=10.0, max_fraction=0.5), random.Random(1))
    assert balancer.update_service(cat.publish().services["svc"], "round_robin", False, 0.0) == []
    pool = balancer.pools["svc"]
    a, b, c, _ = (balancer.states[i] for i in "abcd")
    gw = FailureKind.GATEWAY_ERROR
    assert not balancer.failure(a, gw, 0) and not balancer.failure(a, gw, 0)
    balancer.success(a)  # a success resets the run
    assert not balancer.failure(a, gw, 1) and not balancer.failure(a, FailureKind.RESET, 1)
    assert balancer.failure(a, FailureKind.TIMEOUT, 1)  # third in a row: ejected
    assert a.ejected_until == 11.0
    assert a not in pool.eligible and len(pool.eligible) == 3
    for _ in range(3):
        balancer.failure(b, gw, 2)
    assert b.is_ejected(2)
    for _ in range(5):  # half of four already out: c stays, however it fails
        assert not balancer.failure(c, gw, 3)
    assert not c.is_ejected(3)
    assert {m.id for m in pool.eligible} == {"c", "d"}
    # a returns when its time is up
    assert "a" in seq(pool, 8, now=11.5)


def test_take_and_drop_count_in_flight_tries_and_a_draining_endpoint_is_retired() -> None:
    cat = Catalog()
    cat.set_source("m", [ep("a", 1000, "svc"), ep("b", 1001, "svc")])
    balancer = Balancer(Ejection(), random.Random(1))
    balancer.update_service(cat.publish().services["svc"], "least_conn", False, 0.0)
    a = balancer.states["a"]
    balancer.take(a)
    balancer.take(a)
    assert a.inflight == 2 and balancer.pools["svc"].pick(0).id == "b"  # type: ignore[union-attr]
    balancer.drop(a)
    assert a.inflight == 1
    cat.set_source("m", [ep("a", 1000, "svc", state=State.DRAINING), ep("b", 1001, "svc")])
    retired = balancer.update_service(cat.publish().services["svc"], "least_conn", False, 0.0)
    assert retired == [a] and not balancer.takes_requests(a)
    assert [m.id for m in balancer.pools["svc"].members] == ["b"]


def test_ejection_time_grows_with_repeated_ejections_and_is_capped() -> None:
    ms = members(1, 1)
    ej = Ejection(threshold=1, base_time=10.0, max_fraction=0.5, max_factor=3)
    pool = Pool("svc", ms, ejection=ej)
    a = ms[0]
    now = 0.0
    durations = []
    for _ in range(5):
        assert pool.record_failure(a, now)
        durations.append(round(a.ejected_until - now, 6))
        now = a.ejected_until + 0.1
        pool.pick(now)  # a returns
        assert not a.is_ejected(now)
    assert durations == [10.0, 20.0, 30.0, 30.0, 30.0]


def test_ejections_are_forgotten_after_healthy_time() -> None:
    ms = members(1, 1)
    pool = Pool("svc", ms, ejection=Ejection(threshold=1, base_time=10.0))
    a = ms[0]
    assert pool.record_failure(a, 0)
    pool.pick(10.5)
    assert pool.record_failure(a, 11.0)  # soon again: twice as long
    assert a.ejected_until == 31.0
    pool.pick(31.5)
    assert pool.record_failure(a, 100.0)  # long healthy in between: back to the base time
    assert a.ejected_until == 110.0


def test_a_single_endpoint_is_never_ejected() -> None:
    ms = members(1)
    pool = Pool("svc", ms, ejection=Ejection(threshold=1, max_fraction=1.0))
    assert not any(pool.record_failure(ms[0], 0) for _ in range(10))
    assert pool.pick(0) is ms[0]


def test_a_zero_base_time_never_divides_by_zero() -> None:
    # Config rejects --eject-base-time 0; should a zero slip through anyway,
    # repeated ejections must not raise (a raise in the data path hangs clients).
    ms = members(1, 1)
    pool = Pool("svc", ms, ejection=Ejection(threshold=1, base_time=0.0))
    a = ms[0]
    for now in (100.0, 101.0, 102.0):
        pool.record_failure(a, now)
        assert pool.pick(now + 0.5) is not None
    assert not a.is_ejected(103.0)


# ------------------------------------------- incremental pools (issue 10 §5)
def _same_as_from_scratch(core: ProxyCore, snapshot: Snapshot, now: float) -> None:
    """The pools `core.apply` updated per endpoint equal pools built from every
    endpoint, and each pool's incremental bookkeeping equals a recompute."""
    got = core.balancer
    fresh = Balancer(Ejection(), random.Random(0))
    for svc in snapshot.services.values():
        balancing = svc.balancing
        policy = (balancing.policy if balancing is not None else None) or core.config.lb
        sticky = balancing.sticky if balancing is not None else False
        fresh.update_service(svc, policy, sticky, now, local_node=core.config.node)
    assert set(got.pools) == set(fresh.pools)
    assert set(got.states) == set(fresh.states) == set(snapshot.endpoints)
    assert got._passing == fresh._passing
    for name, want in fresh.pools.items():
        pool = got.pools[name]
        assert (pool.policy, pool.sticky) == (want.policy, want.sticky), name
        assert sorted((m.id, m.weight, m.address, m.port) for m in pool.members) == sorted(
            (m.id, m.weight, m.address, m.port) for m in want.members
        ), name
        assert all(got.states[m.id] is m for m in pool.members)  # current states, never stale ones
        assert {t: m.id for t, m in pool.tokens.items()} == {t: m.id for t, m in want.tokens.items()}
        # Bookkeeping: what a recompute over the same member states gives.
        picked = pool.pick(now)  # returns the ejected whose time is up
        assert picked is None if not pool.eligible else picked in pool.eligible
        members_now = list(pool.members)
        eligible = [m for m in members_now if m.ejected_until <= now]
        assert sorted(m.id for m in pool.eligible) == sorted(m.id for m in eligible)
        assert {m.id for m in pool.eligible}.isdisjoint(pool._ejected)
        assert set(pool._ejected) | {m.id for m in pool.eligible} == {m.id for m in members_now}
        assert pool._total == sum(m.weight for m in pool.eligible)
        assert pool._weighted == (len({m.weight for m in pool.eligible}) > 1)
        assert len(pool._current) == len(pool.eligible)
        assert all(pool.members[i] is m for m, i in ((m, pool._member_at[m.id]) for m in members_now))
        assert all(pool.eligible[pool._eligible_at[m.id]] is m for m in pool.eligible)
        assert len(pool._member_at) == len(members_now) and len(pool._eligible_at) == len(pool.eligible)
        assert pool.next_return <= min((m.ejected_until for m in pool._ejected.values()), default=INF)
        if not pool._cum_stale:
            assert pool._cum == list(accumulate(m.weight for m in pool.eligible))


@pytest.mark.parametrize("seed", range(6))
def test_pools_updated_per_endpoint_equal_pools_built_from_scratch(seed: int) -> None:
    # Random endpoint adds, changes (weight, state, address, node, locality,
    # beacon.lb, service) and removals, plus ejections and returns, through
    # the real ProxyCore.apply on the catalog's snapshots (with their deltas).
    rng = random.Random(seed)
    clock = [0.0]
    loop = asyncio.new_event_loop()
    try:
        core = ProxyCore(test_config(node="n1", eject_consecutive_failures=1), loop, rng=random.Random(seed),
                         clock=lambda: clock[0])  # fmt: skip
        cat = Catalog()
        ids = [f"e{i}" for i in range(14)]
        present: dict[str, Endpoint] = {}
        for step in range(400):
            for _ in range(rng.choice((1, 1, 1, 2, 4))):
                eid = rng.choice(ids)
                if eid in present and rng.random() < 0.25:
                    del present[eid]
                    cat.set_source(f"m:{eid}", [])
                    continue
                base = present.get(eid) or ep(eid, 2000 + ids.index(eid), rng.choice(("a", "b", "c")))
                change = rng.choice(("weight", "state", "address", "node", "locality", "lb", "service", "protocol"))
                kw: dict[str, Any] = {}
                if change == "weight":
                    kw["weight"] = rng.choice((1, 1, 2, 5))
                elif change == "state":
                    kw["state"] = rng.choice(list(State))
                elif change == "address":
                    kw["port"] = rng.choice((base.port, base.port + 100))
                elif change == "node":
                    kw["node"] = rng.choice(("n1", "n2", ""))
                elif change == "locality":
                    kw["locality"] = rng.choice(("prefer-local", None, None))
                elif change == "lb":
                    kw["lb"] = rng.choice((None, None, "least_conn", "random", "sticky", "random+sticky"))
                elif change == "service":
                    kw["service"] = rng.choice(("a", "b", "c"))
                else:
                    kw["protocol"] = rng.choice(("http", "tcp", "http"))
                present[eid] = replace(base, **kw)
                cat.set_source(f"m:{eid}", [present[eid]])
            snapshot = cat.publish()
            clock[0] = step * 1.0
            core.apply(snapshot)
            # Passive health between snapshots: eject some, let time return them.
            for pool in list(core.balancer.pools.values()):
                if pool.eligible and rng.random() < 0.3:
                    core.balancer.failure(rng.choice(pool.eligible), FailureKind.RESET, clock[0])
            _same_as_from_scratch(core, snapshot, clock[0])
    finally:
        loop.close()
