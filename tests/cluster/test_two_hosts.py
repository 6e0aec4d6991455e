"""Two real Docker hosts, two Beacon agents (subprocesses), one etcd cluster.

Agent a watches the main engine and advertises 127.0.0.1; agent b watches a
second engine started by the session (tests/cluster/hosts.py) and advertises
127.0.0.2, where that engine publishes its ports.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from tests.cluster.conftest import Pair
from tests.cluster.etcdtest import EtcdCluster
from tests.cluster.hosts import Agent
from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually

pytestmark = pytest.mark.docker

ON_A = {"80/tcp": ("127.0.0.1", None)}
ON_B = {"80/tcp": ("127.0.0.2", None)}
# Keeps serving for 3 s after SIGTERM, like an app finishing its requests.
GRACEFUL = (
    "mkdir -p /www && hostname > /www/index.html && "
    "httpd -f -p 80 -h /www & trap 'sleep 3; exit 0' TERM; wait; wait"
)


def labels(service: str) -> dict[str, str]:
    return {"beacon.enable": "true", "beacon.service": service}


def ids_of(agent: Agent, service: str) -> dict[str, str]:
    """endpoint id -> state of one service, as the agent's API shows it."""
    return {e["id"]: e["state"] for e in agent.get(f"/v1/endpoints?service={service}")}


def nodes_of(agent: Agent, service: str) -> dict[str, str]:
    return {e["id"]: e["node"] for e in agent.get(f"/v1/endpoints?service={service}")}


async def proxy_get(http: aiohttp.ClientSession, agent: Agent, service: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{agent.proxy_port}/"
    async with http.get(url, headers={"Host": f"{service}.localhost"}, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, (await r.text()).strip()


async def test_container_on_b_is_in_a_api_dns_and_proxy(pair: Pair, run_b: ContainerFactory) -> None:
    service = f"web{RUN_ID}"
    c = run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: list(ids_of(pair.a, service).values()) == ["passing"], timeout=10)
    (ep,) = pair.a.get(f"/v1/endpoints?service={service}")
    assert ep["node"] == "b" and ep["address"] == "127.0.0.2"
    assert ep["source"]["container_id"] == c.id[:12] or c.id.startswith(ep["source"]["container_id"])
    query = dns.message.make_query(f"{service}.service.beacon.", "A")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=pair.a.dns_port, timeout=2)
    assert [r.to_text() for rrset in reply.answer for r in rrset] == ["127.0.0.2"]
    async with aiohttp.ClientSession() as http:
        status, body = await proxy_get(http, pair.a, service)
    assert (status, body) == (200, c.id[:12])
    nodes = {n["node"]: n for n in pair.a.get("/v1/nodes")["nodes"]}
    assert nodes["b"]["lease"] == "alive" and nodes["b"]["endpoints"] >= 1
    cli = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "beacon", "nodes", "--api", pair.a.api],
        capture_output=True, text=True, timeout=20,
    )
    assert cli.returncode == 0 and "b" in cli.stdout and "alive" in cli.stdout, cli.stdout + cli.stderr


async def test_docker_stop_on_b_drains_on_a_with_zero_failed_requests(
    pair: Pair, run_b: ContainerFactory, run_container: ContainerFactory
) -> None:
    service = f"drain{RUN_ID}"
    stays = run_container(labels=labels(service), ports=ON_A)
    leaves = run_b(labels=labels(service), ports=ON_B, command=["sh", "-c", GRACEFUL])
    await eventually(lambda: sorted(ids_of(pair.a, service).values()) == ["passing", "passing"], timeout=15)
    leaving_id = next(i for i, n in nodes_of(pair.a, service).items() if n == "b")
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        for _ in range(3000):  # bounded in count, and in time by `stop`
            if stop.is_set():
                return
            try:
                status, body = await proxy_get(http, pair.a, service)
                statuses[status] += 1
                served[body] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(repr(exc))

    async with aiohttp.ClientSession() as http:
        clients = [asyncio.create_task(client(http)) for _ in range(4)]
        await eventually(lambda: served[leaves.id[:12]] > 5, timeout=10)
        stopping = asyncio.create_task(asyncio.to_thread(leaves.stop, timeout=10))
        await eventually(lambda: ids_of(pair.a, service).get(leaving_id) == "draining", timeout=3)
        leaves.reload()
        assert leaves.status == "running"  # a drained it while the container still served
        await stopping
        await eventually(lambda: leaving_id not in ids_of(pair.a, service), timeout=5)
        await asyncio.sleep(0.3)  # a little load after it is gone, too
        stop.set()
        await asyncio.gather(*clients)
    assert errors == [] and set(statuses) == {200}, (statuses, errors[:3])
    assert served[stays.id[:12]] > 0


async def test_kill_9_agent_b_leaves_a_within_ttl_then_restart_brings_them_back(
    pair: Pair, run_b: ContainerFactory
) -> None:
    service = f"kill{RUN_ID}"
    run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: len(ids_of(pair.a, service)) == 1, timeout=10)
    t0 = time.monotonic()
    pair.b.kill(signal.SIGKILL)
    await eventually(lambda: ids_of(pair.a, service) == {}, timeout=6)
    gone_after = time.monotonic() - t0
    assert gone_after <= 2.0 + 1.5, gone_after  # TTL 2 s (+ etcd's lease granularity and one watch trip)
    nodes = {n["node"]: n for n in pair.a.get("/v1/nodes")["nodes"]}
    assert "b" not in nodes or nodes["b"]["lease"] == "expired"
    pair.b.start()
    await eventually(lambda: list(ids_of(pair.a, service).values()) == ["passing"], timeout=10)


async def test_clean_restart_of_b_does_not_flap_unchanged_endpoints(pair: Pair, run_b: ContainerFactory) -> None:
    service = f"flap{RUN_ID}"
    run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: len(ids_of(pair.a, service)) == 1, timeout=10)
    seen: list[dict[str, str]] = []
    done = asyncio.Event()

    async def follow() -> None:
        async with aiohttp.ClientSession() as http:
            index = 0
            while not done.is_set():
                url = f"{pair.a.api}/v1/services/{service}?index={index}&wait=1s"
                async with http.get(url) as r:
                    index = int(r.headers.get("X-Beacon-Index", r.headers.get("X-Consul-Index", "0")))
                    body: Any = await r.json() if r.status == 200 else {"endpoints": []}
                seen.append({e["id"]: e["state"] for e in body.get("endpoints", [])})

    watcher = asyncio.create_task(follow())
    pair.b.kill(signal.SIGTERM)
    pair.b.start()
    await asyncio.sleep(2.5)  # past the old lease's TTL: a flap would have shown by now
    done.set()
    await watcher
    assert seen and all(len(s) == 1 and set(s.values()) == {"passing"} for s in seen), seen


async def test_same_node_name_twice_is_refused_with_a_clear_error(pair: Pair, etcd: EtcdCluster) -> None:
    twin = Agent("b", store=etcd.url, prefix=pair.b.prefix, docker_host=pair.b.docker_host, advertise_ip="127.0.0.2")
    twin.start(wait=False)
    assert twin.proc is not None
    code = await asyncio.to_thread(twin.proc.wait, 15)
    out = twin.log_tail()
    twin.remove()
    assert code == 1 and "node name 'b' is already held by a running agent" in out, out
    assert pair.b.get("/healthz")["status"] == "ok"


def truth(pair: Pair, service: str) -> set[str]:
    return {e for agent in pair.agents() for e in ids_of(agent, service)}


async def test_one_etcd_member_down_changes_nothing(pair: Pair, etcd: EtcdCluster, run_b: ContainerFactory) -> None:
    service = f"member{RUN_ID}"
    run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: len(ids_of(pair.a, service)) == 1, timeout=10)
    etcd.stop_member(0)
    run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: len(ids_of(pair.a, service)) == 2, timeout=10)
    for agent in pair.agents():
        assert agent.get("/healthz")["status"] == "ok"


async def test_etcd_outage_while_containers_come_and_go_then_converge(
    pair: Pair, etcd: EtcdCluster, run_b: ContainerFactory, run_container: ContainerFactory, engine_b: Any,
    docker_client: Any,
) -> None:
    service = f"outage{RUN_ID}"
    a_old = run_container(labels=labels(service), ports=ON_A)
    b_old = run_b(labels=labels(service), ports=ON_B)
    await eventually(lambda: all(len(ids_of(x, service)) == 2 for x in pair.agents()), timeout=15)
    etcd.stop()  # every member
    await eventually(lambda: all(x.get("/healthz")["status"] == "degraded" for x in pair.agents()), timeout=8)
    # Containers come and go on both hosts while etcd is down.
    a_old.remove(force=True)
    b_old.remove(force=True)
    a_new = run_container(labels=labels(service), ports=ON_A)
    b_new = run_b(labels=labels(service), ports=ON_B)

    def local_ids(agent: Agent) -> set[str]:
        return {i for i, n in nodes_of(agent, service).items() if n == agent.node}

    # Each agent keeps serving and applies its local changes at once ...
    await eventually(lambda: len(local_ids(pair.a)) == 1 and len(local_ids(pair.b)) == 1, timeout=10)
    assert any(a_new.id.startswith(i.split("-")[0]) for i in local_ids(pair.a))
    assert any(b_new.id.startswith(i.split("-")[0]) for i in local_ids(pair.b))
    for i in range(etcd.size):
        etcd.start_member(i, wait=False)
    for i in range(etcd.size):
        etcd.wait_healthy(i)
    # ... and both converge on the engines' truth: exactly the two new containers.
    want = local_ids(pair.a) | local_ids(pair.b)
    await eventually(lambda: all(set(ids_of(x, service)) == want for x in pair.agents()), timeout=15)
    await eventually(lambda: all(x.get("/healthz")["status"] == "ok" for x in pair.agents()), timeout=10)
    assert len(want) == 2


async def test_prefer_local_serves_this_node_first_and_falls_back(
    pair: Pair, run_b: ContainerFactory, run_container: ContainerFactory
) -> None:
    service = f"local{RUN_ID}"
    local = {**labels(service), "beacon.lb.locality": "prefer-local"}
    on_a = run_container(labels=local, ports=ON_A)
    on_b = run_b(labels=local, ports=ON_B)
    await eventually(lambda: all(len(ids_of(x, service)) == 2 for x in pair.agents()), timeout=15)
    async with aiohttp.ClientSession() as http:
        from_a = {(await proxy_get(http, pair.a, service))[1] for _ in range(10)}
        from_b = {(await proxy_get(http, pair.b, service))[1] for _ in range(10)}
        assert from_a == {on_a.id[:12]} and from_b == {on_b.id[:12]}
        on_a.stop(timeout=2)
        await eventually(lambda: len(ids_of(pair.a, service)) == 1, timeout=10)
        fallback = {(await proxy_get(http, pair.a, service))[1] for _ in range(10)}
    assert fallback == {on_b.id[:12]}
