"""The etcd store adapter against a real three-member etcd cluster (no Docker).

Fault injection goes through `TcpRelay` between the adapter and one member:
cut (etcd down), stall (half-open connections), slow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from beacon.registry.store import Change, EtcdStore, GatewaySettings, NodeNameTaken
from beacon.registry.store.gateway import Gateway, b64, prefix_end
from tests.cluster.etcdtest import EtcdCluster, TcpRelay
from tests.helpers import eventually

TTL = 2.0


def make_store(endpoints: Sequence[str], prefix: str, node: str, **kw: object) -> EtcdStore:
    return EtcdStore(
        GatewaySettings(tuple(endpoints)), prefix=prefix, node=node, lease_ttl=TTL,
        report_metrics=False, **kw,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def running(store: EtcdStore, *, release: bool = True) -> AsyncIterator[EtcdStore]:
    await store.start()
    try:
        yield store
    finally:
        await store.stop(release=release)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, changes: Sequence[Change]) -> None:
        self.changes.extend(changes)

    def keys(self, what: Callable[[Change], bool] = lambda c: True) -> list[str]:
        return [c.key for c in self.changes if what(c)]


async def etcd_truth(endpoints: Sequence[str], prefix: str) -> dict[str, bytes]:
    gw = Gateway(GatewaySettings(tuple(endpoints)))
    await gw.start()
    try:
        start = (prefix + "nodes/").encode()
        reply = await gw.call("kv/range", {"key": b64(start), "range_end": b64(prefix_end(start))}, 5)
    finally:
        await gw.close()
    import base64

    return {
        base64.b64decode(kv["key"]).decode()[len(prefix):]: base64.b64decode(kv.get("value", ""))
        for kv in reply.get("kvs", [])
    }


def own(view: dict[str, bytes] | object, node: str) -> dict[str, bytes]:
    assert isinstance(view, dict) or hasattr(view, "items")
    return {k: v for k, v in view.items() if k.startswith(f"nodes/{node}/") and not k.endswith("/owner")}  # type: ignore[union-attr]


async def test_two_agents_see_each_other_and_only_real_changes(etcd: EtcdCluster, prefix: str) -> None:
    async with running(make_store(etcd.endpoints, prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        seen = Recorder()
        b.subscribe(seen)
        a.set_own("nodes/a/ep/x", b"1")
        a.set_own("nodes/a/ep/y", b"2")
        await eventually(lambda: own(b.view(), "a") == {"nodes/a/ep/x": b"1", "nodes/a/ep/y": b"2"})
        a.set_own("nodes/a/ep/x", None)
        await eventually(lambda: "nodes/a/ep/x" not in b.view())
        assert a.connected and b.connected
        assert "nodes/a/owner" in b.view() and "nodes/b/owner" in a.view()
        with pytest.raises(ValueError, match="outside"):
            a.set_own("nodes/b/ep/z", b"no")  # an agent writes only under its own node


async def test_same_node_name_twice_is_refused_naming_the_node(etcd: EtcdCluster, prefix: str) -> None:
    async with running(make_store(etcd.endpoints, prefix, "web1")) as first:
        first.set_own("nodes/web1/ep/x", b"1")
        assert await first.flush(5)
        second = make_store(etcd.endpoints, prefix, "web1")
        with pytest.raises(NodeNameTaken, match="'web1'"):
            await second.start()
        await asyncio.sleep(TTL)  # the first keeps its name and keys: nothing was overwritten
        truth = await etcd_truth(etcd.endpoints, prefix)
        assert truth["nodes/web1/ep/x"] == b"1"
        assert first.connected


async def test_dead_agent_keys_leave_within_ttl_and_restart_takes_over(etcd: EtcdCluster, prefix: str) -> None:
    async with running(make_store(etcd.endpoints, prefix, "b")) as watcher:
        dead = make_store(etcd.endpoints, prefix, "a")
        await dead.start()
        dead.set_own("nodes/a/ep/x", b"1")
        await eventually(lambda: "nodes/a/ep/x" in watcher.view())
        await dead.stop(release=False)  # like kill -9: keepalives stop, nothing released
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await eventually(lambda: "nodes/a/ep/x" not in watcher.view(), timeout=TTL + 3)
        assert loop.time() - t0 <= TTL + 1.5
        # The name is free again once the dead lease ran out.
        async with running(make_store(etcd.endpoints, prefix, "a")) as again:
            again.set_own("nodes/a/ep/x", b"1")
            await eventually(lambda: "nodes/a/ep/x" in watcher.view())


async def test_clean_restart_resyncs_as_a_diff_without_flapping(etcd: EtcdCluster, prefix: str) -> None:
    async with running(make_store(etcd.endpoints, prefix, "b")) as watcher:
        first = make_store(etcd.endpoints, prefix, "a")
        await first.start()
        for k in ("keep", "change", "drop"):
            first.set_own(f"nodes/a/ep/{k}", b"v1")
        assert await first.flush(5)
        await eventually(lambda: len(own(watcher.view(), "a")) == 3)
        await first.stop(release=True)
        seen = Recorder()
        watcher.subscribe(seen)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with running(make_store(etcd.endpoints, prefix, "a")) as second:
            assert loop.time() - t0 < 1.5  # a released name is taken over at once
            second.set_own("nodes/a/ep/keep", b"v1")
            second.set_own("nodes/a/ep/change", b"v2")
            second.set_own("nodes/a/ep/new", b"v1")
            second.own_complete()
            assert await second.flush(5)
            want = {"nodes/a/ep/keep": b"v1", "nodes/a/ep/change": b"v2", "nodes/a/ep/new": b"v1"}
            await eventually(lambda: own(watcher.view(), "a") == want)
            await asyncio.sleep(TTL + 0.5)  # the old lease would have expired by now
            assert own(watcher.view(), "a") == want
            assert own(await etcd_truth(etcd.endpoints, prefix), "a") == want
        touched = seen.keys(lambda c: c.key.startswith("nodes/a/ep/"))
        assert "nodes/a/ep/keep" not in touched  # unchanged: never deleted, never re-reported
        assert sorted(touched) == ["nodes/a/ep/change", "nodes/a/ep/drop", "nodes/a/ep/new"]


async def test_cut_connection_catches_up_both_ways(etcd: EtcdCluster, prefix: str, relay: TcpRelay) -> None:
    async with running(make_store([relay.endpoint], prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        a.set_own("nodes/a/ep/before", b"1")
        await eventually(lambda: "nodes/a/ep/before" in b.view())
        await relay.cut()
        await eventually(lambda: not a.connected, timeout=TTL + 2)
        # While cut: the other node changes, and this node changes locally.
        b.set_own("nodes/b/ep/during", b"1")
        a.set_own("nodes/a/ep/during", b"1")
        a.set_own("nodes/a/ep/before", None)
        assert "nodes/b/ep/during" not in a.view()
        await relay.restore()
        await eventually(lambda: a.connected, timeout=5)
        await eventually(lambda: "nodes/b/ep/during" in a.view())
        await eventually(lambda: own(b.view(), "a") == {"nodes/a/ep/during": b"1"})
        assert a.relists == 1  # resumed from the last revision, no re-list
        assert a.view() == b.view() == await etcd_truth(etcd.endpoints, prefix)


async def test_lease_expired_while_cut_is_recreated_and_keys_rewritten(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with running(make_store([relay.endpoint], prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        a.set_own("nodes/a/ep/x", b"1")
        await eventually(lambda: "nodes/a/ep/x" in b.view())
        old_lease = a.lease
        await relay.cut()
        await eventually(lambda: "nodes/a/ep/x" not in b.view(), timeout=TTL + 3)  # lease ran out
        await relay.restore()
        await eventually(lambda: "nodes/a/ep/x" in b.view() and "nodes/a/owner" in b.view(), timeout=5)
        assert a.lease != old_lease


async def test_half_open_connection_is_detected_and_recovered(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with running(make_store([relay.endpoint], prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        await eventually(lambda: a.connected)
        relay.stall()  # connections stay open, nothing goes through
        await eventually(lambda: not a.connected, timeout=TTL + 2)
        b.set_own("nodes/b/ep/x", b"1")
        await relay.restore()
        await eventually(lambda: a.connected and "nodes/b/ep/x" in a.view(), timeout=TTL + 5)


async def test_silent_watch_is_noticed_and_resumed_without_relist(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with running(make_store([relay.endpoint], prefix, "a", watch_idle=2.0)) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        await eventually(lambda: a.connected)
        assert relay.stall_open_watches() == 1  # keepalives and writes still get through
        sessions = a.sessions
        b.set_own("nodes/b/ep/x", b"1")
        await eventually(lambda: "nodes/b/ep/x" in a.view(), timeout=2.0 + TTL + 3)
        assert a.sessions == sessions + 1 and a.relists == 1  # a new session resumed the watch


async def test_a_key_set_while_the_writer_is_busy_is_not_forgotten(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with running(make_store([relay.endpoint], prefix, "a")) as a:
        relay.slow(0.3)  # every round trip is slow: the writer is inside its cleanup for a while
        a.own_complete()  # starts the cleanup of an earlier session's keys (a range read)
        await asyncio.sleep(0.1)
        a.set_own("nodes/a/ep/late", b"1")  # arrives while the writer awaits etcd
        relay.slow(0.0)
        truth: dict[str, bytes] = {}
        for _ in range(40):
            truth = await etcd_truth(etcd.endpoints, prefix)
            if "nodes/a/ep/late" in truth:
                break
            await asyncio.sleep(0.1)
        assert truth.get("nodes/a/ep/late") == b"1"


async def test_slow_etcd_still_converges(etcd: EtcdCluster, prefix: str, relay: TcpRelay) -> None:
    relay.slow(0.05)
    async with running(make_store([relay.endpoint], prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        for i in range(20):
            b.set_own(f"nodes/b/ep/{i}", b"1")
            a.set_own(f"nodes/a/ep/{i}", b"1")
        await eventually(lambda: len(own(a.view(), "b")) == 20 and len(own(b.view(), "a")) == 20)
        assert a.connected


async def test_compacted_revision_forces_a_relist_and_result_is_exact(
    etcd: EtcdCluster, prefix: str, relay: TcpRelay
) -> None:
    async with running(make_store([relay.endpoint], prefix, "a")) as a, running(
        make_store(etcd.endpoints, prefix, "b")
    ) as b:
        for i in range(5):
            b.set_own(f"nodes/b/ep/{i}", b"v1")
        await eventually(lambda: len(own(a.view(), "b")) == 5)
        await relay.cut()
        await eventually(lambda: not a.connected, timeout=TTL + 2)
        b.set_own("nodes/b/ep/0", None)
        b.set_own("nodes/b/ep/1", b"v2")
        b.set_own("nodes/b/ep/9", b"v1")
        assert await b.flush(5)
        gw = Gateway(GatewaySettings(tuple(etcd.endpoints)))
        await gw.start()
        head = await gw.call("kv/range", {"key": b64("x")}, 5)
        await gw.call("kv/compaction", {"revision": head["header"]["revision"], "physical": True}, 5)
        await gw.close()
        seen = Recorder()
        a.subscribe(seen)
        relists = a.relists
        await relay.restore()
        await eventually(lambda: a.relists == relists + 1, timeout=TTL + 5)
        assert a.view() == await etcd_truth(etcd.endpoints, prefix)
        assert sorted(c.key for c in seen.changes) == ["nodes/b/ep/0", "nodes/b/ep/1", "nodes/b/ep/9"]


async def test_one_member_down_changes_nothing(etcd: EtcdCluster, prefix: str) -> None:
    async with running(make_store(etcd.endpoints, prefix, "a")) as a, running(
        make_store(list(reversed(etcd.endpoints)), prefix, "b")
    ) as b:
        b.set_own("nodes/b/ep/x", b"1")
        await eventually(lambda: "nodes/b/ep/x" in a.view())
        etcd.stop_member(0)  # the member `a` talks to first
        b.set_own("nodes/b/ep/y", b"1")
        a.set_own("nodes/a/ep/z", b"1")
        await eventually(lambda: "nodes/b/ep/y" in a.view() and "nodes/a/ep/z" in b.view(), timeout=TTL + 5)
        assert "nodes/b/ep/x" in a.view()  # nothing was lost on the way
