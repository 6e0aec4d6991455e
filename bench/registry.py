"""bench-registry: how fast Docker changes reach the API, and what a big catalog costs.

1. Docker -> API latency. A real `beacon run` (subprocess, loopback listeners)
   watches the engine. The bench starts N busybox containers (port published on
   127.0.0.1), then stops them, and measures from each Docker event's own
   timestamp (`timeNano` of `start` / `kill`) to the moment the endpoint is
   visible / `draining` in the REST API (a blocking query on /v1/endpoints).
2. Synthetic catalog. In a fresh process, a whole Beacon (API, DNS, proxy as
   snapshot consumers, no Docker) is fed 10,000 endpoints in 1,000 services;
   then the time to apply one change and publish the snapshot (listeners
   included) is measured, and the process RSS.
3. Registrations at scale. A catalog pre-filled with 10,000 and then 100,000
   endpoints (10 per service) takes 10,000 more registrations, each published
   at once (as `PUT /v1/endpoints/{id}` does): registrations/s and the cost of
   one publish, for new endpoints that each bring a new service and for new
   endpoints that all join one service; alone and with a whole Beacon (API,
   DNS, proxy, health checker) listening. Printed, not judged. Each run stops
   after `--scale-budget` seconds (the rate is then over what was done).

    python -m bench.registry [--containers 50] [--endpoints 10000] [--services 1000]
                             [--scale 10000,100000] [--scale-budget 20] [--skip-scale]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors

from beacon.registry.catalog import Catalog
from beacon.registry.model import Endpoint, State
from bench.common import median, percentile, print_table, stop_process

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "beacon-test/busybox:latest"
BENCH_LABEL = "beacon.bench.run"
TARGET_LATENCY_MS = 100.0
TARGET_PUBLISH_MS = 5.0
TARGET_RSS_MB = 200.0
# SIGTERM takes a second to finish, so `draining` is visible before the exit.
SLOW_STOP = "mkdir -p /www && echo ok > /www/index.html && trap 'sleep 1; exit 0' TERM; httpd -f -p 80 -h /www & wait"


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MB."""
    values: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def ensure_image(client: docker.DockerClient) -> None:
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run(["bash", str(ROOT / "tests/images/build.sh")], check=True)


@contextmanager
def beacon_process(
    api_port: int, dns_port: int | None = None, proxy_port: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`beacon run` on loopback ports (free ones unless given); stopped with SIGTERM
    (then killed) afterwards. Also used by bench.soak."""
    cmd = [
        sys.executable, "-m", "beacon", "run",
        "--api-listen", f"127.0.0.1:{api_port}",
        "--dns-listen", f"127.0.0.1:{dns_port or free_port()}",
        "--proxy-listen", f"127.0.0.1:{proxy_port or free_port()}",
        "--dns-recursors", "none",
        "--log-level", "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=15)


class EventClock:
    """Docker's own timestamps of `start` and `kill` for the bench's containers."""

    def __init__(self, client: docker.DockerClient, run_id: str) -> None:
        self.times: dict[tuple[str, str], float] = {}
        self._stream = client.api.events(
            decode=True,
            filters={"type": "container", "event": ["start", "kill"], "label": f"{BENCH_LABEL}={run_id}"},
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for ev in self._stream:
                action, cid = ev.get("Action"), (ev.get("Actor") or {}).get("ID")
                if action in ("start", "kill") and cid:
                    self.times.setdefault((cid, action), ev["timeNano"] / 1e9)
        except Exception:
            pass  # closed at the end of the run

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:
            pass


class ApiObserver:
    """Follows /v1/endpoints?tag= with blocking queries; records first sight times."""

    def __init__(self, base: str, tag: str) -> None:
        self.base, self.tag = base, tag
        self.visible: dict[str, float] = {}
        self.draining: dict[str, float] = {}
        self.errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        index = 0
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                url = f"{self.base}/v1/endpoints?tag={self.tag}&index={index}&wait=2s"
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        body = await resp.json()
                        now = time.time()
                        new_index = int(resp.headers.get("X-Beacon-Index", "0"))
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    self.errors += 1
                    if self.errors > 100:
                        raise
                    await asyncio.sleep(0.1)
                    continue
                index = new_index if new_index >= index else 0  # reset if it went backwards
                for ep in body:
                    cid = (ep.get("source") or {}).get("container_id")
                    if not cid:
                        continue
                    self.visible.setdefault(cid, now)
                    if ep.get("state") == "draining":
                        self.draining.setdefault(cid, now)


async def wait_healthy(base: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"beacon did not become healthy (Docker connected) within {timeout:.0f}s at {base}")


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------- 1. docker -> API
async def docker_latency(count: int) -> dict[str, list[float]]:
    client = docker.from_env(version="auto", timeout=60)
    ensure_image(client)
    run_id = uuid.uuid4().hex[:8]
    tag = f"bench-{run_id}"
    api_port = free_port()
    base = f"http://127.0.0.1:{api_port}"
    containers: list[Any] = []
    clock = EventClock(client, run_id)
    observer = ApiObserver(base, tag)
    stop = asyncio.Event()
    pool = ThreadPoolExecutor(max_workers=8)
    loop = asyncio.get_running_loop()
    try:
        with beacon_process(api_port):
            await wait_healthy(base)
            watcher = asyncio.create_task(observer.run(stop))

            def start(i: int) -> Any:
                return client.containers.run(
                    IMAGE, ["sh", "-c", SLOW_STOP], detach=True,
                    name=f"bench-reg-{run_id}-{i:03d}",
                    labels={BENCH_LABEL: run_id, "beacon.tags": tag, "beacon.service": f"bench-{run_id}-{i:03d}"},
                    ports={"80/tcp": ("127.0.0.1", None)},
                )

            def stop_container(c: Any) -> None:
                c.stop(timeout=10)

            for i in range(count):
                containers.append(await loop.run_in_executor(pool, start, i))
                await asyncio.sleep(0.02)  # spread the events a little, like a rollout
            ids = {c.id for c in containers}
            await wait_until(lambda: ids <= observer.visible.keys(), 60, "every container visible in the API")
            await asyncio.gather(*(loop.run_in_executor(pool, stop_container, c) for c in containers))
            await wait_until(lambda: ids <= observer.draining.keys(), 30, "every container draining in the API")
            stop.set()
            await watcher
    finally:
        stop.set()
        clock.close()
        for c in containers:
            try:
                c.remove(force=True)
            except docker.errors.APIError:
                pass
        for c in client.containers.list(all=True, filters={"label": f"{BENCH_LABEL}={run_id}"}):
            c.remove(force=True)
        pool.shutdown(wait=False)
        client.close()

    def lat(kind: str, seen: dict[str, float]) -> list[float]:
        return [(seen[c.id] - clock.times[(c.id, kind)]) * 1000 for c in containers if (c.id, kind) in clock.times]

    return {"start": lat("start", observer.visible), "kill": lat("kill", observer.draining)}


# ------------------------------------------------------------ 2. synthetic
async def synthetic(endpoints: int, services: int, changes: int) -> dict[str, Any]:
    """Runs in its own process (see main): a whole Beacon fed by a synthetic source."""
    from beacon.app import App
    from beacon.config import Config, HostPort
    from beacon.registry.model import Source

    any_port = HostPort("127.0.0.1", 0)
    config = Config(
        api_listen=any_port, dns_listen=(any_port,), proxy_listen=any_port,
        dns_recursors=(), docker=False, node="bench", log_level="warning",
    )
    app = App(config)
    await app.start()
    try:
        rss_before, _ = rss_mb()
        catalog = app.catalog
        t0 = time.perf_counter()
        for i in range(endpoints):
            cid = f"{i:012x}"
            catalog.set_source(
                f"container:{cid}",
                [
                    Endpoint(
                        id=f"{cid}-80", service=f"svc-{i % services:04d}",
                        address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", port=8080,
                        source=Source("container", container_id=cid, container_name=f"c{i}"),
                        node="bench", tags=("bench",),
                    )
                ],
            )
        catalog.publish()
        fill = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # let consumers settle after the big first snapshot

        # With every consumer attached (API, DNS, proxy listeners run inside publish).
        with_listeners = await time_one_changes(catalog, endpoints, changes, yield_between=True)
        # The same, with no consumers attached: the catalog's own share.
        bare = Catalog()
        for key in catalog.sources("container:"):
            bare.set_source(key, catalog.source_endpoints(key).values())
        bare.publish()
        alone = await time_one_changes(bare, endpoints, changes, yield_between=False)
        del bare
        rss, peak = rss_mb()
        snap = catalog.snapshot
        return {
            "endpoints": len(snap.endpoints), "services": len(snap.services), "fill_s": fill,
            "publish_ms": with_listeners, "publish_bare_ms": alone,
            "rss_mb": rss, "peak_mb": peak, "rss_empty_mb": rss_before,
        }
    finally:
        await app.stop()


def _flipped(ep: Endpoint) -> Endpoint:
    return replace(ep, state=State.CRITICAL if ep.state is State.PASSING else State.PASSING)


async def time_one_changes(catalog: Catalog, endpoints: int, changes: int, *, yield_between: bool) -> list[float]:
    """Milliseconds to publish a snapshot after flipping one endpoint's state, `changes` times."""
    times: list[float] = []
    for n in range(changes):
        key = f"container:{(n * 7919) % endpoints:012x}"
        (ep,) = catalog.source_endpoints(key).values()
        before = catalog.snapshot.index
        t = time.perf_counter()
        catalog.set_source(key, [_flipped(ep)])
        catalog.publish()
        times.append((time.perf_counter() - t) * 1000)
        assert catalog.snapshot.index == before + 1, "every change must publish a snapshot"
        if yield_between:
            await asyncio.sleep(0)  # let the loop run between changes, like real traffic
    return times


# ------------------------------------------------------- 3. registrations
def _registration(i: int, service: str) -> Endpoint:
    from beacon.registry.model import Source

    return Endpoint(
        id=f"reg-{i}", service=service, address=f"10.200.{(i >> 8) & 255}.{i & 255}", port=9000,
        source=Source("manual"), node="bench", tags=("reg",),
    )


async def registrations(prefill: int, count: int, layout: str, with_app: bool, budget: float) -> dict[str, Any]:
    """`count` registrations, each published at once, into a catalog of `prefill` endpoints.

    layout "spread": each registration brings a new service; "one": all join one service.
    """
    from beacon.app import App
    from beacon.config import Config, HostPort
    from beacon.registry.model import Source

    app: App | None = None
    if with_app:
        any_port = HostPort("127.0.0.1", 0)
        app = App(Config(
            api_listen=any_port, dns_listen=(any_port,), proxy_listen=any_port,
            dns_recursors=(), docker=False, node="bench", log_level="warning",
        ))
        await app.start()
        catalog = app.catalog
    else:
        catalog = Catalog()
    try:
        for i in range(prefill):
            cid = f"{i:012x}"
            catalog.set_source(f"container:{cid}", [Endpoint(
                id=f"{cid}-80", service=f"svc-{i // 10:05d}",
                address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", port=8080,
                source=Source("container", container_id=cid, container_name=f"c{i}"), node="bench",
            )])
        catalog.publish()
        await asyncio.sleep(0.1)  # let consumers settle after the big first snapshot
        publish_ms: list[float] = []
        t0 = time.perf_counter()
        done = 0
        for i in range(count):
            service = f"reg-{i:05d}" if layout == "spread" else "svc-00000"
            catalog.set_source(f"manual:reg-{i}", [_registration(i, service)])
            t = time.perf_counter()
            catalog.publish()
            publish_ms.append((time.perf_counter() - t) * 1000)
            done += 1
            if with_app and i % 16 == 0:
                await asyncio.sleep(0)  # let the consumers' tasks run, like real traffic
            if time.perf_counter() - t0 > budget:
                break
        elapsed = time.perf_counter() - t0
        return {"done": done, "per_s": done / elapsed, "publish_ms": publish_ms}
    finally:
        if app is not None:
            await app.stop()


def run_registrations_child(prefill: int, count: int, layout: str, with_app: bool, budget: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.registry", "--registrations-child", "--endpoints", str(prefill),
         "--changes", str(count), "--layout", layout, "--scale-budget", str(budget),
         *(["--with-app"] if with_app else [])],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def scale_rows(sizes: list[int], budget: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for size in sizes:
        for with_app in (False, True):
            for layout in ("spread", "one"):
                what = "each a new service" if layout == "spread" else "all into one service"
                who = "whole Beacon listening" if with_app else "catalog alone"
                print(f"registrations: 10,000 at {size:,} endpoints, {what}, {who} ...", file=sys.stderr)
                r = run_registrations_child(size, 10_000, layout, with_app, budget)
                pub = r["publish_ms"]
                rows.append([
                    f"10,000 registrations at {size:,} endpoints, {what} ({who})", r["done"],
                    f"{r['per_s']:,.0f}/s", f"{median(pub):.3f} ms", f"{percentile(pub, 99):.3f} ms",
                ])
    return rows


def run_synthetic_child(endpoints: int, services: int, changes: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.registry", "--synthetic-child",
         "--endpoints", str(endpoints), "--services", str(services), "--changes", str(changes)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--skip-docker", action="store_true", help="only the synthetic part")
    parser.add_argument("--scale", default="10000,100000", help="catalog sizes for the registration rows")
    parser.add_argument("--scale-budget", type=float, default=20.0, help="seconds per registration run at most")
    parser.add_argument("--skip-scale", action="store_true", help="no registration rows")
    parser.add_argument("--only-scale", action="store_true", help="only the registration rows")
    parser.add_argument("--synthetic-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--registrations-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=("spread", "one"), default="spread", help=argparse.SUPPRESS)
    parser.add_argument("--with-app", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.synthetic_child:
        result = asyncio.run(synthetic(args.endpoints, args.services, args.changes))
        print(json.dumps(result))
        return
    if args.registrations_child:
        result = asyncio.run(
            registrations(args.endpoints, args.changes, args.layout, args.with_app, args.scale_budget)
        )
        print(json.dumps(result))
        return
    if args.only_scale:
        sizes = [int(x) for x in args.scale.split(",") if x.strip()]
        print()
        print_table(["measure", "n", "rate", "publish median", "publish p99"], scale_rows(sizes, args.scale_budget))
        return

    rows: list[list[object]] = []
    if not args.skip_docker:
        print(f"docker: {args.containers} containers -> beacon run -> REST API ...", file=sys.stderr)
        lat = asyncio.run(docker_latency(args.containers))
        for kind, label in (("start", "start event -> visible in API"), ("kill", "kill (SIGTERM) event -> draining in API")):
            values = lat[kind]
            if not values:
                rows.append([label, 0, "-", "-", "-", f"p99 <= {TARGET_LATENCY_MS:.0f} ms", "NO DATA"])
                continue
            p50, p99 = percentile(values, 50), percentile(values, 99)
            rows.append([
                label, len(values), f"{p50:.1f} ms", f"{p99:.1f} ms", f"{max(values):.1f} ms",
                f"p99 <= {TARGET_LATENCY_MS:.0f} ms", "ok" if p99 <= TARGET_LATENCY_MS else "MISS",
            ])

    print(f"synthetic: {args.endpoints} endpoints in {args.services} services ...", file=sys.stderr)
    syn = run_synthetic_child(args.endpoints, args.services, args.changes)
    pub, bare = syn["publish_ms"], syn["publish_bare_ms"]
    rows.append([
        "one change -> snapshot published (API+DNS+proxy listening)", len(pub),
        f"{median(pub):.2f} ms", f"{percentile(pub, 99):.2f} ms", f"{max(pub):.2f} ms",
        f"median <= {TARGET_PUBLISH_MS:.0f} ms", "ok" if median(pub) <= TARGET_PUBLISH_MS else "MISS",
    ])
    rows.append([
        "one change -> snapshot published (catalog alone)", len(bare),
        f"{median(bare):.2f} ms", f"{percentile(bare, 99):.2f} ms", f"{max(bare):.2f} ms", "", "",
    ])
    rows.append([
        f"process RSS with {syn['endpoints']} endpoints / {syn['services']} services", 1,
        f"{syn['rss_mb']:.0f} MB", "", f"peak {syn['peak_mb']:.0f} MB",
        f"<= {TARGET_RSS_MB:.0f} MB", "ok" if syn["rss_mb"] <= TARGET_RSS_MB else "MISS",
    ])
    print()
    print_table(["measure", "n", "p50/median", "p99", "max", "target", "verdict"], rows)
    if not args.skip_scale:
        sizes = [int(x) for x in args.scale.split(",") if x.strip()]
        print()
        print_table(["measure", "n", "rate", "publish median", "publish p99"], scale_rows(sizes, args.scale_budget))
    print(
        f"\n(empty Beacon RSS {syn['rss_empty_mb']:.0f} MB; filling {syn['endpoints']} endpoints took "
        f"{syn['fill_s']:.2f} s; machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
