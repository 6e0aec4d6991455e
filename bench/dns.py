"""`make bench-dns`: Beacon's DNS server against dnsmasq, same names, one run.

Both servers listen on loopback and serve the same records: N services with
three addresses each (`svc-<i>.service.beacon`). dnsperf (Debian) sends the
same query file to each, a few times, and the median queries/s and latency are
printed with the Beacon/dnsmasq ratio. A second pair of runs measures
forwarding: names outside Beacon's domain (`ext-<i>.bench.test`), which Beacon
forwards to a second dnsmasq and the reference dnsmasq answers itself.

Beacon runs in its own process on uvloop, as `beacon run` does. The addresses
in the records (198.18.0.0/15, the benchmarking range) are data only: nothing
ever connects to them.

    python -m bench.dns [--duration 10] [--repeats 3] [--services 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import ensure_debian_packages, median, print_table, stop_process

ROOT = Path(__file__).resolve().parent.parent


def service_address(i: int, j: int) -> str:
    k = i * 3 + j
    return f"198.18.{k // 250}.{k % 250 + 1}"


def ext_address(i: int) -> str:
    return f"198.19.{i // 250}.{i % 250 + 1}"


# ----------------------------------------------------------------- the server
def serve(services: int, upstream_port: int) -> None:
    """Child process: a DnsServer with a synthetic catalog, forwarding to dnsmasq."""
    import uvloop

    from beacon.config import Config, HostPort
    from beacon.dns import DnsServer
    from beacon.registry.catalog import Catalog
    from beacon.registry.model import Endpoint, Source

    async def main() -> None:
        catalog = Catalog()
        for i in range(services):
            catalog.set_source(
                f"manual:svc-{i}",
                [
                    Endpoint(
                        id=f"svc-{i}-{j}",
                        service=f"svc-{i}",
                        address=service_address(i, j),
                        port=8000 + j,
                        source=Source("manual"),
                    )
                    for j in range(3)
                ],
            )
        catalog.publish()
        config = Config(
            dns_listen=(HostPort("127.0.0.1", 0),),
            dns_recursors=(HostPort("127.0.0.1", upstream_port),),
            docker=False,
        )
        server = DnsServer(config, catalog, metrics_registry=None)
        await server.start()
        print(f"READY {server.addresses[0].port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# -------------------------------------------------------------------- helpers
def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (checked, then released)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_udp_dns(port: int, timeout: float = 10.0) -> None:
    """Wait until a DNS server answers on 127.0.0.1:port (bounded)."""
    query = bytes.fromhex("abcd01000001000000000000") + b"\x06beacon\x00\x00\x06\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            with contextlib.suppress(OSError):
                s.recvfrom(4096)
                return
    raise RuntimeError(f"no DNS server on 127.0.0.1:{port}")


@contextlib.contextmanager
def dnsmasq(port: int, records: list[tuple[str, str]]) -> Iterator[None]:
    args = [
        "dnsmasq", "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
        "--no-resolv", "--no-hosts", "--cache-size=1000", "--log-facility=/dev/null",
        *(f"--host-record={name},{addr}" for name, addr in records),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_udp_dns(port)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def beacon(services: int, upstream_port: int) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.dns", "--serve", "--services", str(services), "--upstream", str(upstream_port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"beacon did not start: {line!r}")
        port = int(line.split()[1])
        wait_udp_dns(port)
        yield port
    finally:
        stop_process(proc, timeout=10)


def dnsperf(port: int, query_file: Path, duration: float, clients: int) -> dict[str, float]:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(query_file), "-l", str(duration),
         "-c", str(clients), "-q", "200", "-t", "2"],
        capture_output=True, text=True, timeout=duration + 30, check=True,
    ).stdout  # fmt: skip

    def grab(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            raise RuntimeError(f"unexpected dnsperf output:\n{out}")
        return float(m.group(1))

    return {
        "qps": grab(r"Queries per second:\s+([\d.]+)"),
        "latency_ms": grab(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "lost_pct": grab(r"Queries lost:\s+\d+ \(([\d.]+)%\)"),
    }


# ----------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per target (median reported)")
    parser.add_argument("--services", type=int, default=50, help="services in the synthetic catalog")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf clients (sockets)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.services, args.upstream)
        return 0
    if not 1 <= args.services <= 2500 or args.duration <= 0 or args.duration > 120 or not 1 <= args.repeats <= 10:
        parser.error("--services 1..2500, --duration 0..120 s, --repeats 1..10")

    ensure_debian_packages({"dnsperf": "dnsperf", "dnsmasq": "dnsmasq-base"})
    records = [(f"svc-{i}.service.beacon", service_address(i, j)) for i in range(args.services) for j in range(3)]
    records += [(f"ext-{i}.bench.test", ext_address(i)) for i in range(args.services)]
    with tempfile.TemporaryDirectory() as tmp:
        hot = Path(tmp, "hot.txt")
        hot.write_text("".join(f"svc-{i}.service.beacon A\n" for i in range(args.services)))
        fwd = Path(tmp, "forwarded.txt")
        fwd.write_text("".join(f"ext-{i}.bench.test A\n" for i in range(args.services)))
        ref_port, up_port = free_port(), free_port()
        results: dict[str, list[dict[str, float]]] = {}
        with dnsmasq(ref_port, records), dnsmasq(up_port, records), beacon(args.services, up_port) as b_port:
            # Warm both (Beacon's cache fills on the first query of each name).
            for port in (ref_port, b_port):
                dnsperf(port, hot, 1, 1)
                dnsperf(port, fwd, 1, 1)
            for r in range(args.repeats):
                for name, port, qfile in (
                    ("dnsmasq hot names", ref_port, hot),
                    ("beacon hot names", b_port, hot),
                    ("dnsmasq forwarded names (answers itself)", ref_port, fwd),
                    ("beacon forwarded names (to dnsmasq)", b_port, fwd),
                ):
                    res = dnsperf(port, qfile, args.duration, args.clients)
                    results.setdefault(name, []).append(res)
                    print(f"run {r + 1}/{args.repeats} {name}: {res['qps']:,.0f} q/s", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return median(x[key] for x in results[name])

    rows = []
    for label, ref, ours, target in (
        ("hot service names", "dnsmasq hot names", "beacon hot names", 1.0),
        ("forwarded names", "dnsmasq forwarded names (answers itself)", "beacon forwarded names (to dnsmasq)", 0.25),
    ):
        for who, key in (("dnsmasq", ref), ("beacon", ours)):
            rows.append([label, who, med(key, "qps"), med(key, "latency_ms"), med(key, "lost_pct"), ""])
        ratio = med(ours, "qps") / med(ref, "qps")
        rows[-1][-1] = f"{ratio:.2f}x (target >= {target:.2f}x)"
    print(
        f"\nDNS, loopback, dnsperf -c {args.clients}, {args.duration:g} s x {args.repeats} (median), "
        f"{args.services} services, cpus={os.cpu_count()}"
    )
    print_table(["names", "server", "queries/s", "avg latency ms", "lost %", "beacon/dnsmasq"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
