"""Cluster benchmarks (printed, not asserted): `make bench-cluster`.

scale: a real three-member etcd on loopback, 1,000 synthetic agents x 100
endpoints written through the same store adapter (writers only), then a fresh
agent (a subprocess: its own RSS) that lists and folds them: initial sync
time, RSS, snapshot publish after one remote change, propagation p50/p99 under
200 changes/s spread over all nodes; etcd write rate, db size and what the
keepalives cost.

propagation: two real Docker hosts (a second dockerd, as in tests/cluster),
agents a and b; `docker start` on b -> visible in a's API, and SIGTERM on b ->
draining in a's API, over N containers (timed from the engine's own event time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from beacon.registry.catalog import Catalog
from beacon.registry.cluster import ClusterSource
from beacon.registry.cluster_wire import endpoint_to_wire
from beacon.registry.model import Endpoint, Source, State
from beacon.registry.store import EtcdStore, GatewaySettings
from beacon.registry.store.gateway import Gateway
from bench.common import median, percentile, print_table

PREFIX = "/beacon-bench/"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def endpoint(node: int, i: int, state: State = State.PASSING, stamp: float | None = None) -> Endpoint:
    meta = {"bench_t": repr(stamp)} if stamp is not None else {}
    return Endpoint(
        id=f"n{node}-e{i}", service=f"svc{(node * 100 + i) % 5000}", address=f"10.{node // 250}.{node % 250}.{i}",
        port=8000 + i, source=Source("container", container_id=f"{node:06x}{i:06x}", container_name=f"c{i}"),
        node=f"n{node}", state=state, tags=("bench",), meta=meta,
    )


# ------------------------------------------------------------ fresh agent (subprocess)
async def fresh_agent(endpoints: list[str], expected: int, duration: float) -> None:
    catalog = Catalog()
    store = EtcdStore(GatewaySettings(tuple(endpoints)), prefix=PREFIX, node="fresh", lease_ttl=10,
                      report_metrics=False, start_timeout=60)
    change_at: list[float] = []
    listed: list[float] = []

    def on_changes(changes: Any) -> None:  # subscribed before the cluster source: sees changes first
        change_at.append(time.perf_counter())
        if not listed:
            listed.append(time.perf_counter())  # the first batch is the whole re-list

    store.subscribe(on_changes)
    cluster = ClusterSource(catalog, store, node="fresh")
    publish: list[float] = []
    propagation: list[float] = []

    def on_snapshot(snap: Any) -> None:
        now_wall, now = time.time(), time.perf_counter()
        if change_at:
            publish.append(now - change_at[0])
            change_at.clear()
        prev = getattr(on_snapshot, "prev", None)
        on_snapshot.prev = snap  # type: ignore[attr-defined]
        if prev is None:
            return
        for eid in snap.changed_since(prev).endpoints_changed:
            stamp = snap.endpoints[eid].meta.get("bench_t")
            if stamp:
                propagation.append(now_wall - float(stamp))

    complete = asyncio.Event()
    unlisten = catalog.add_listener(lambda snap: complete.set() if len(snap.endpoints) >= expected else None)
    t0 = time.perf_counter()
    await cluster.start()
    if len(catalog.snapshot.endpoints) < expected:
        await complete.wait()
    unlisten()
    sync = time.perf_counter() - t0
    rss = rss_mb()
    catalog.add_listener(on_snapshot)
    change_at.clear()
    listed_s = listed[0] - t0 if listed else 0.0
    print(json.dumps({"synced": sync, "listed": listed_s, "rss_mb": rss, "endpoints": len(catalog.snapshot.endpoints)}),
          flush=True)
    await asyncio.sleep(duration)
    print(json.dumps({"publish": publish, "propagation": propagation, "rss_mb_end": rss_mb()}), flush=True)
    await cluster.stop()


# ------------------------------------------------------------------- scale (driver)
async def scale(nodes: int, per_node: int, churn_rate: float, churn_seconds: float) -> None:
    from tests.cluster.etcdtest import EtcdCluster

    etcd = EtcdCluster(3)
    etcd.start()
    try:
        await _scale(etcd, nodes, per_node, churn_rate, churn_seconds)
    finally:
        etcd.remove()


async def _status(gw: Gateway) -> dict[str, Any]:
    return await gw.call("maintenance/status", {}, 10)


async def _scale(etcd: Any, nodes: int, per_node: int, churn_rate: float, churn_seconds: float) -> None:
    gw = Gateway(GatewaySettings(tuple(etcd.endpoints)))
    await gw.start()
    rev0 = int((await _status(gw))["header"]["revision"])
    stores = [
        EtcdStore(GatewaySettings((etcd.endpoints[n % 3],)), prefix=PREFIX, node=f"n{n}", lease_ttl=10,
                  report_metrics=False, mirror=False)
        for n in range(nodes)
    ]
    t0 = time.perf_counter()
    gate = asyncio.Semaphore(50)

    async def bring_up(n: int) -> None:
        async with gate:
            store = stores[n]
            await store.start()
            for i in range(per_node):
                store.set_own(f"nodes/n{n}/ep/n{n}-e{i}", endpoint_to_wire(endpoint(n, i)))
            store.own_complete()
            await store.flush(120)

    await asyncio.gather(*(bring_up(n) for n in range(nodes)))
    load_s = time.perf_counter() - t0
    st = await _status(gw)
    revs = int(st["header"]["revision"]) - rev0
    total = nodes * per_node
    rows: list[tuple[str, object, str]] = [
        ("synthetic agents x endpoints", f"{nodes} x {per_node}", ""),
        ("initial load through the adapter", f"{load_s:.1f} s", f"{total / load_s:,.0f} keys/s, {revs / load_s:,.0f} txn/s"),
        ("etcd db size after load", f"{int(st.get('dbSize', 0)) / 2**20:.1f} MiB", "dbSize of one member"),
    ]
    # Keepalive cost: a quiet window, only the leases' keepalives (one every TTL/3 per agent).
    window = 10.0
    pids = [p.pid for p in etcd.procs if p is not None]
    e0, c0 = sum(cpu_seconds(p) for p in pids), time.process_time()
    await asyncio.sleep(window)
    e1, c1 = sum(cpu_seconds(p) for p in pids), time.process_time()
    rows.append(("keepalives only (quiet)", f"{nodes / (10 / 3):.0f} req/s",
                 f"etcd {100 * (e1 - e0) / window:.0f}% of a core (3 members), agents {100 * (c1 - c0) / window:.0f}%"))
    # The fresh agent, in its own process.
    fresh = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.cluster", "fresh-agent", "--endpoints", ",".join(etcd.endpoints),
        "--expected", str(total), "--duration", str(churn_seconds + 8), stdout=subprocess.PIPE,
    )
    assert fresh.stdout is not None
    synced = json.loads(await fresh.stdout.readline())
    rows.append(("fresh agent: initial sync", f"{synced['synced']:.2f} s",
                 f"{synced['endpoints']:,} endpoints; listed in {synced['listed']:.2f} s, then folded (target <= 5 s)"))
    rows.append(("fresh agent: RSS after sync", f"{synced['rss_mb']:.0f} MB", "target <= 400 MB"))
    # One remote change at a time: publish latency (50 samples).
    rng = random.Random(1)
    for k in range(50):
        n, i = rng.randrange(nodes), rng.randrange(per_node)
        state = State.WARNING if k % 2 == 0 else State.PASSING
        stores[n].set_own(f"nodes/n{n}/ep/n{n}-e{i}", endpoint_to_wire(endpoint(n, i, state)))
        await asyncio.sleep(0.1)
    # Churn: `churn_rate` changes/s spread over all nodes, each stamped with its wall time.
    r0 = int((await _status(gw))["header"]["revision"])
    t_churn = time.perf_counter()
    count = 0
    while (elapsed := time.perf_counter() - t_churn) < churn_seconds:
        due = int(elapsed * churn_rate)
        while count < due:
            n, i = rng.randrange(nodes), rng.randrange(per_node)
            state = State.WARNING if count % 2 else State.PASSING
            stores[n].set_own(f"nodes/n{n}/ep/n{n}-e{i}", endpoint_to_wire(endpoint(n, i, state, time.time())))
            count += 1
        await asyncio.sleep(0.005)
    churn_revs = int((await _status(gw))["header"]["revision"]) - r0
    out = json.loads(await fresh.stdout.readline())
    await fresh.wait()
    publish = [x * 1000 for x in out["publish"][:50]]
    prop = [x * 1000 for x in out["propagation"]]
    rows.append(("publish after one remote change", f"{median(publish):.2f} ms p50",
                 f"p99 {percentile(publish, 99):.2f} ms over {len(publish)} (target <= 5 ms)"))
    rows.append((f"propagation under {churn_rate:.0f} changes/s", f"{median(prop):.0f} ms p50",
                 f"p99 {percentile(prop, 99):.0f} ms over {len(prop)} changes (target p99 <= 200 ms)"))
    rows.append(("etcd write rate during churn", f"{churn_revs / churn_seconds:.0f} txn/s", f"{count} changes sent"))
    st = await _status(gw)
    rows.append(("etcd db size after churn", f"{int(st.get('dbSize', 0)) / 2**20:.1f} MiB", ""))
    rows.append(("fresh agent RSS at the end", f"{out['rss_mb_end']:.0f} MB", ""))
    print_table(("measure", "value", "notes"), rows)
    for store in stores:
        await store.stop(release=False)
    await gw.close()


# ------------------------------------------------------- propagation (two Docker hosts)
def propagation(count: int) -> None:
    import docker

    from tests.cluster.etcdtest import EtcdCluster
    from tests.cluster.hosts import Agent, SecondEngine
    from tests.conftest import BUSYBOX_IMAGE, HTTPD_HOSTNAME

    subprocess.run(["bash", "tests/images/build.sh"], check=True, capture_output=True)
    etcd = EtcdCluster(3)
    etcd.start()
    engine = SecondEngine(f"bench{os.getpid()}")
    agents: list[Agent] = []
    try:
        engine.start(BUSYBOX_IMAGE)
        main_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        a = Agent("a", store=etcd.url, prefix=PREFIX, docker_host=main_host, advertise_ip="127.0.0.1")
        b = Agent("b", store=etcd.url, prefix=PREFIX, docker_host=engine.host, advertise_ip="127.0.0.2")
        agents = [a, b]
        a.start()
        b.start()
        assert engine.client is not None
        client: docker.DockerClient = engine.client
        service = f"prop{os.getpid()}"
        graceful = (f"trap 'sleep 1; exit 0' TERM; {HTTPD_HOSTNAME.split('trap')[0]} httpd -f -p 80 -h /www & wait; wait")
        start_ms: list[float] = []
        drain_ms: list[float] = []
        for k in range(count):
            c = client.containers.create(
                BUSYBOX_IMAGE, command=["sh", "-c", graceful], labels={"beacon.enable": "true", "beacon.service": service},
                ports={"80/tcp": ("127.0.0.2", None)}, name=f"bprop-{os.getpid()}-{k}",
            )
            since = int(time.time()) - 1
            c.start()
            seen = _wait_state(a, service, c.id[:12], ("passing",), present=True)
            t_start = _event_time(client, c.id, "start", since)
            start_ms.append((seen - t_start) * 1000)
            c.kill(signal="SIGTERM")
            seen = _wait_state(a, service, c.id[:12], ("draining",), present=True)
            t_kill = _event_time(client, c.id, "kill", since)
            drain_ms.append((seen - t_kill) * 1000)
            c.remove(force=True)
        print_table(
            ("two hosts, b -> a", "p50", "p99", "n"),
            [
                ("docker start on b -> in a's API", f"{median(start_ms):.0f} ms", f"{percentile(start_ms, 99):.0f} ms", count),
                ("SIGTERM on b -> draining in a's API", f"{median(drain_ms):.0f} ms", f"{percentile(drain_ms, 99):.0f} ms", count),
            ],
        )
    finally:
        for agent in agents:
            agent.remove()
        engine.stop()
        etcd.remove()


def _wait_state(agent: Any, service: str, cid: str, states: tuple[str, ...], *, present: bool) -> float:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for e in agent.get(f"/v1/endpoints?service={service}"):
            if e["source"].get("container_id", "").startswith(cid) and e["state"] in states:
                return time.time()
        time.sleep(0.002)
    raise RuntimeError(f"{cid} never reached {states} on agent {agent.node}")


def _event_time(client: Any, cid: str, action: str, since: int) -> float:
    for ev in client.events(since=since, until=int(time.time()) + 1, decode=True,
                            filters={"container": cid, "event": action}):
        return float(ev["timeNano"]) / 1e9
    raise RuntimeError(f"no {action} event for {cid}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.cluster")
    sub = parser.add_subparsers(dest="what")
    s = sub.add_parser("scale")
    s.add_argument("--nodes", type=int, default=1000)
    s.add_argument("--per-node", type=int, default=100)
    s.add_argument("--churn-rate", type=float, default=200)
    s.add_argument("--churn-seconds", type=float, default=10)
    p = sub.add_parser("propagation")
    p.add_argument("--count", type=int, default=50)
    f = sub.add_parser("fresh-agent")
    f.add_argument("--endpoints", required=True)
    f.add_argument("--expected", type=int, required=True)
    f.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    if args.what == "fresh-agent":
        asyncio.run(fresh_agent(args.endpoints.split(","), args.expected, args.duration))
    elif args.what == "scale":
        asyncio.run(scale(args.nodes, args.per_node, args.churn_rate, args.churn_seconds))
    elif args.what == "propagation":
        propagation(args.count)
    else:
        propagation(50)
        asyncio.run(scale(1000, 100, 200, 10))


if __name__ == "__main__":
    main()
