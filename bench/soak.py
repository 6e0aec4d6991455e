"""`make soak`: container churn + proxy and DNS load + watchers, bounded in time.

A real `beacon run` (subprocess, loopback listeners, watching the real Docker
engine) is soaked for `--duration` seconds (default 300, at most 600):

- churn: a pool of busybox web containers (service `soak-web`, port published
  on 127.0.0.1) where one container is stopped (SIGTERM) and one started every
  `--churn-interval` seconds;
- proxy load: `--proxy-rate` GETs per second through Beacon's proxy to
  `soak-web` (Host `soak-web.localhost`), each with its own timeout;
- DNS load: `--dns-rate` A queries per second for `soak-web.service.beacon`
  over UDP (dnspython);
- watchers: `--watchers` SSE clients on `/v1/watch` that read everything,
  plus the same number of blocking queries re-armed as they return.

Every `--sample` seconds one row is printed: Beacon's RSS and open fds, the
p99 latency and error count of proxy and DNS requests in that interval, and
how many watchers are connected. At the end the first and last samples are
compared: nothing may grow without bound (printed, never asserted).
Traffic goes only to loopback and to containers this run created.

    python -m bench.soak [--duration 300] [--proxy-rate 100] [--dns-rate 100] [--watchers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import docker
import docker.errors
from docker.models.containers import Container

from bench.common import percentile, print_table
from bench.registry import beacon_process, ensure_image, free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "beacon-test/busybox:latest"
SOAK_LABEL = "beacon.bench.soak"
SERVICE = "soak-web"
MAX_DURATION = 600.0
WEB = "mkdir -p /www && hostname > /www/index.html && trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"


@dataclass
class Ports:
    api: int = field(default_factory=free_port)
    dns: int = field(default_factory=free_port)
    proxy: int = field(default_factory=free_port)


def process_usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open fds) of one process, read from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Interval:
    """What one sampling interval saw; reset after each printed row."""

    proxy_ms: list[float] = field(default_factory=list)
    proxy_errors: int = 0
    dns_ms: list[float] = field(default_factory=list)
    dns_errors: int = 0
    events: int = 0  # watch events received

    def reset(self) -> None:
        self.proxy_ms.clear()
        self.dns_ms.clear()
        self.proxy_errors = self.dns_errors = self.events = 0


class Soak:
    def __init__(self, args: argparse.Namespace, ports: Ports, pid: int, run_id: str) -> None:
        self.args, self.ports, self.pid, self.run_id = args, ports, pid, run_id
        self.api = f"http://127.0.0.1:{ports.api}"
        self.client = docker.from_env(timeout=60)
        self.pool: list[Container] = []
        self.now = Interval()
        self.watchers_connected = 0
        self.rows: list[list[object]] = []
        self.stop = asyncio.Event()

    # ------------------------------------------------------------- churn
    def _start_container(self) -> Container:
        return self.client.containers.run(
            IMAGE, ["sh", "-c", WEB], detach=True, name=f"soak-{self.run_id}-{uuid.uuid4().hex[:6]}",
            labels={SOAK_LABEL: self.run_id, "beacon.service": SERVICE},
            ports={"80/tcp": ("127.0.0.1", None)},
        )

    async def churn(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.args.pool):
            self.pool.append(await loop.run_in_executor(None, self._start_container))
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.churn_interval)
                return
            except TimeoutError:
                pass
            oldest = self.pool.pop(0)
            self.pool.append(await loop.run_in_executor(None, self._start_container))
            await loop.run_in_executor(None, lambda c=oldest: (c.stop(timeout=5), c.remove(force=True)))

    def remove_all(self) -> None:
        for c in self.client.containers.list(all=True, filters={"label": f"{SOAK_LABEL}={self.run_id}"}):
            try:
                c.remove(force=True)
            except docker.errors.APIError:
                pass
        self.client.close()

    # -------------------------------------------------------------- load
    async def paced(self, rate: float, one: object) -> None:
        """Call `one()` `rate` times a second (open loop, bounded by the run's end)."""
        assert callable(one)
        period = 1.0 / rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        while not self.stop.is_set():
            next_at += period
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def proxy_request(self, session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            async with session.get(
                f"http://127.0.0.1:{self.ports.proxy}/", headers={"Host": f"{SERVICE}.localhost"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                await resp.read()
                if resp.status >= 500:
                    self.now.proxy_errors += 1
                    return
        except (aiohttp.ClientError, TimeoutError):
            self.now.proxy_errors += 1
            return
        self.now.proxy_ms.append((time.perf_counter() - started) * 1000)

    async def dns_query(self) -> None:
        query = dns.message.make_query(f"{SERVICE}.service.beacon", "A")
        started = time.perf_counter()
        try:
            await dns.asyncquery.udp(query, "127.0.0.1", port=self.ports.dns, timeout=2)
        except (TimeoutError, dns.exception.DNSException, OSError):
            self.now.dns_errors += 1
            return
        self.now.dns_ms.append((time.perf_counter() - started) * 1000)

    # ---------------------------------------------------------- watchers
    async def sse_watcher(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            try:
                async with session.get(f"{self.api}/v1/watch", timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    self.watchers_connected += 1
                    try:
                        async for line in resp.content:
                            if line.startswith(b"data:"):
                                self.now.events += 1
                            if self.stop.is_set():
                                return
                    finally:
                        self.watchers_connected -= 1
            except aiohttp.ClientError:
                await asyncio.sleep(0.5)  # back off before reconnecting a dropped watcher

    async def blocking_watcher(self, session: aiohttp.ClientSession) -> None:
        index = 0
        while not self.stop.is_set():
            try:
                async with session.get(
                    f"{self.api}/v1/services/{SERVICE}?index={index}&wait=10s",
                    timeout=aiohttp.ClientTimeout(total=20),
                ) as resp:
                    await resp.read()
                    index = int(resp.headers.get("X-Beacon-Index", resp.headers.get("X-Consul-Index", "0")) or 0)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.sleep(0.5)

    # ----------------------------------------------------------- samples
    async def sampler(self, started: float) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.sample)
            except TimeoutError:
                pass
            rss, fds = process_usage(self.pid)
            cur = self.now
            self.rows.append([
                f"{time.monotonic() - started:.0f}", rss, fds,
                percentile(cur.proxy_ms, 99) if cur.proxy_ms else "-", len(cur.proxy_ms), cur.proxy_errors,
                percentile(cur.dns_ms, 99) if cur.dns_ms else "-", len(cur.dns_ms), cur.dns_errors,
                self.watchers_connected, cur.events,
            ])
            print("  " + "  ".join(str(c) if not isinstance(c, float) else f"{c:.1f}" for c in self.rows[-1]),
                  flush=True)
            cur.reset()

    async def run(self) -> None:
        await self.wait_ready()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as watch_session:
            churn = asyncio.create_task(self.churn())
            await self.wait_for_service(session)
            started = time.monotonic()
            tasks = [
                churn,
                asyncio.create_task(self.paced(self.args.proxy_rate, lambda: self.proxy_request(session))),
                asyncio.create_task(self.paced(self.args.dns_rate, self.dns_query)),
                asyncio.create_task(self.sampler(started)),
                *(asyncio.create_task(self.sse_watcher(watch_session)) for _ in range(self.args.watchers)),
                *(asyncio.create_task(self.blocking_watcher(watch_session)) for _ in range(self.args.watchers)),
            ]
            print("  t_s  rss_mb  fds  proxy_p99_ms  proxy_n  proxy_err  dns_p99_ms  dns_n  dns_err  watchers  events")
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.duration)
            except TimeoutError:
                pass
            self.stop.set()
            for t in tasks:
                if t is not churn:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.api}/healthz") as resp:
                        if resp.status < 500:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise SystemExit("beacon did not come up within 30 s")

    async def wait_for_service(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with session.get(f"{self.api}/v1/services/{SERVICE}?index=0&wait=1s") as resp:
                if resp.status == 200 and (await resp.json()).get("endpoints"):
                    return
            await asyncio.sleep(0.1)
        raise SystemExit(f"{SERVICE} never appeared in the catalog")

    def summary(self) -> None:
        if len(self.rows) < 2:
            print("too few samples for a summary")
            return
        first, last = self.rows[0], self.rows[-1]
        total_proxy = sum(int(r[4]) for r in self.rows)
        total_proxy_err = sum(int(r[5]) for r in self.rows)
        total_dns = sum(int(r[7]) for r in self.rows)
        total_dns_err = sum(int(r[8]) for r in self.rows)
        p99s = [float(r[3]) for r in self.rows if r[3] != "-"]
        dns_p99s = [float(r[6]) for r in self.rows if r[6] != "-"]
        print()
        print(f"soak: {self.args.duration:.0f} s, churn every {self.args.churn_interval:.1f} s over "
              f"{self.args.pool} containers, {self.args.watchers} SSE + {self.args.watchers} blocking watchers")
        print_table(
            ["measure", "first sample", "last sample", "worst sample", "growth"],
            [
                ["RSS MB", first[1], last[1], max(float(r[1]) for r in self.rows), f"{float(last[1]) - float(first[1]):+.1f}"],
                ["open fds", first[2], last[2], max(int(r[2]) for r in self.rows), f"{int(last[2]) - int(first[2]):+d}"],
                ["proxy p99 ms", first[3], last[3], max(p99s) if p99s else "-", ""],
                ["dns p99 ms", first[6], last[6], max(dns_p99s) if dns_p99s else "-", ""],
            ],
        )
        print(f"proxy: {total_proxy} ok, {total_proxy_err} errors; dns: {total_dns} ok, {total_dns_err} errors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--sample", type=float, default=15.0)
    parser.add_argument("--pool", type=int, default=4, help="web containers kept running")
    parser.add_argument("--churn-interval", type=float, default=5.0)
    parser.add_argument("--proxy-rate", type=float, default=100.0)
    parser.add_argument("--dns-rate", type=float, default=100.0)
    parser.add_argument("--watchers", type=int, default=50)
    args = parser.parse_args()
    args.duration = min(args.duration, MAX_DURATION)
    client = docker.from_env(timeout=60)
    ensure_image(client)
    client.close()
    run_id = uuid.uuid4().hex[:8]
    ports = Ports()
    with beacon_process(ports.api, ports.dns, ports.proxy) as proc:
        soak = Soak(args, ports, proc.pid, run_id)
        try:
            asyncio.run(soak.run())
        finally:
            soak.remove_all()
        soak.summary()


if __name__ == "__main__":
    main()
