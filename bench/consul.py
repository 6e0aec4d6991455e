"""bench-consul: the Consul-compatible API under watchers and a big catalog.

A real `beacon run` (subprocess, loopback listeners, Docker off) is filled through its
REST API; the bench process is the client (aiohttp, loopback).

1. Parked blocking queries. `--watchers` (1,000) blocking queries on
   /v1/health/service/<svc>?index=N; Beacon's RSS before and after they are all parked
   (per parked query); then one registration changes the service and the time from
   sending that write to each watcher's answer is measured (client side, so the bench's
   own parsing of 1,000 answers is included). Repeated `--rounds` times.
2. Reads at scale. `--endpoints` (10,000) endpoints in `--services` (1,000) services;
   /v1/catalog/services and /v1/health/service/<svc> timed back to back (warm: the body
   is cached per snapshot) and right after a change (rendered anew).

Printed, not judged; targets: wake-up p99 <= 50 ms, /v1/catalog/services median <= 5 ms.

    python -m bench.consul [--watchers 1000] [--rounds 3] [--endpoints 10000] [--services 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from bench.common import median, percentile, print_table, stop_process

ROOT = Path(__file__).resolve().parent.parent
TARGET_WAKE_P99_MS = 50.0
TARGET_SERVICES_MS = 5.0
PARKED_METRIC = re.compile(r"^beacon_registry_api_consul_blocking_queries (\S+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def beacon_process(api_port: int) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [
        sys.executable, "-m", "beacon", "run", "--docker", "false",
        "--api-listen", f"127.0.0.1:{api_port}",
        "--dns-listen", f"127.0.0.1:{free_port()}",
        "--proxy-listen", f"127.0.0.1:{free_port()}",
        "--dns-recursors", "none", "--log-level", "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=15)


async def wait_ready(http: aiohttp.ClientSession, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "beacon exited"
        try:
            async with http.get("/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("beacon did not start")


async def register(http: aiohttp.ClientSession, eid: str, service: str, n: int) -> None:
    body = {"service": service, "address": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", "port": 8080,
            "tags": ["bench"]}
    async with http.put(f"/v1/endpoints/{eid}", json=body) as resp:
        assert resp.status in (200, 201), await resp.text()


async def parked(http: aiohttp.ClientSession) -> int:
    async with http.get("/metrics") as resp:
        m = PARKED_METRIC.search(await resp.text())
    return int(float(m.group(1))) if m else 0


async def watch(pool: aiohttp.ClientSession, index: str, answered: list[float]) -> None:
    async with pool.get("/v1/health/service/bench-watch", params={"index": index, "wait": "60s"}) as resp:
        await resp.read()
        answered.append(time.perf_counter())


async def bench_watchers(http: aiohttp.ClientSession, base: str, pid: int, watchers: int, rounds: int) -> None:
    await register(http, "watch-0", "bench-watch", 0)
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base, connector=connector) as pool:
        for r in range(rounds):
            async with http.get("/v1/health/service/bench-watch") as resp:
                index = resp.headers["X-Consul-Index"]
            rss_before = rss_mb(pid)
            answered: list[float] = []

            tasks = [asyncio.create_task(watch(pool, index, answered)) for _ in range(watchers)]
            deadline = time.monotonic() + 60
            while await parked(http) < watchers:
                assert time.monotonic() < deadline, "the watchers did not all park"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            rss_parked = rss_mb(pid)
            sent = time.perf_counter()
            await register(http, f"watch-{r + 1}", "bench-watch", r + 1)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            latencies = [(t - sent) * 1000 for t in answered]
            results.append((rss_before, rss_parked, latencies))
    print(f"\n{watchers} blocking queries parked on /v1/health/service/<svc>, one change wakes them all")
    print_table(
        ["round", "RSS before MB", "RSS parked MB", "KB per parked query", "wake p50 ms", "wake p99 ms", "max ms"],
        [
            (i + 1, before, after, (after - before) * 1024 / watchers, percentile(lat, 50), percentile(lat, 99),
             max(lat))
            for i, (before, after, lat) in enumerate(results)
        ],
    )
    p99s = [percentile(lat, 99) for _, _, lat in results]
    per_query = [(after - before) * 1024 / watchers for before, after, _ in results]
    print(f"median over rounds: wake p99 {median(p99s):.1f} ms (target <= {TARGET_WAKE_P99_MS:.0f} ms), "
          f"{median(per_query):.1f} KB RSS per parked query")


async def bench_reads(http: aiohttp.ClientSession, endpoints: int, services: int, samples: int) -> None:
    sem = asyncio.Semaphore(32)

    async def one(n: int) -> None:
        async with sem:
            await register(http, f"ep-{n}", f"svc-{n % services}", n)

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(endpoints)))
    print(f"\nfilled {endpoints} endpoints in {services} services in {time.monotonic() - started:.1f}s")

    async def timed(path: str) -> float:
        t = time.perf_counter()
        async with http.get(path) as resp:
            await resp.read()
            assert resp.status == 200
        return (time.perf_counter() - t) * 1000

    rows = []
    for path in ("/v1/catalog/services", "/v1/health/service/svc-7", "/v1/catalog/service/svc-7"):
        await timed(path)
        warm = [await timed(path) for _ in range(samples)]
        fresh = []
        for i in range(samples // 4):
            await register(http, f"ep-{i}", f"svc-{i % services}", i + 1)  # a change: the next read renders anew
            fresh.append(await timed(path))
        rows.append((path, median(warm), percentile(warm, 99), median(fresh), percentile(fresh, 99)))
    print(f"reads at {endpoints} endpoints (client side, loopback)")
    print_table(["path", "warm median ms", "warm p99 ms", "after a change median ms", "after a change p99 ms"], rows)
    print(f"target: /v1/catalog/services median <= {TARGET_SERVICES_MS:.0f} ms")


async def main_async(args: argparse.Namespace) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with beacon_process(port) as proc:
        async with aiohttp.ClientSession(base) as http:
            await wait_ready(http, proc)
            await bench_watchers(http, base, proc.pid, args.watchers, args.rounds)
            await bench_reads(http, args.endpoints, args.services, args.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--samples", type=int, default=200)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
