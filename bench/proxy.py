"""`make bench-proxy`: Beacon's HTTP proxy against nginx, HAProxy and Caddy, one run.

Every proxy runs with one worker (nginx `worker_processes 1`, HAProxy
`nbthread 1`, Caddy `GOMAXPROCS=1`, Beacon `--proxy-workers 1` on uvloop) in
front of the same two loopback backends: one nginx serving a small static file
on two ports. wrk (Debian) loads each for `--duration` seconds, `--repeats`
times, targets interleaved so that machine noise spreads over all of them; the
median requests/s and p50/p99 latency are printed with the ratios to nginx
and Caddy. "direct" is wrk against a backend without any proxy.

Beacon runs as a user runs it: `beacon run --docker false` (registry, API,
DNS and proxy in one process, every proxy feature on: routing, balancing,
passive health, retries, X-Forwarded-*, X-Request-Id, metrics), and the two
backends are registered through its REST API (`PUT /v1/endpoints/{id}`).

Latency added at half of Beacon's peak rate: wrk2's `-R` is not in Debian, and
wrk's Lua `delay()` has millisecond timers, so every connection whose think
time ends in the same millisecond fires at once - bursts of ~20 requests at
20k req/s that measure the burst, not the proxy. h2load (Debian's
nghttp2-client) paces each connection evenly instead (`--rps`, open loop) and
logs every request's latency (`--log-file`); it loads direct, Beacon and
nginx at the same rate, and the p99 Beacon adds over direct is printed with
nginx's as a reference.

Backends that close keep-alive connections: Beacon and nginx-as-proxy again,
in front of backends at nginx `keepalive_requests` unlimited, 1000 (nginx's
default) and 100, all six interleaved in each repeat (so "vs unlimited"
compares runs of the same minutes), with the proxy process's CPU time per
request read from /proc - steadier than req/s on a shared machine, where a
proxy gets whatever share of a core the others leave it.
`--keepalive-only` runs just these rows.

    python -m bench.proxy [--duration 8] [--repeats 3] [--connections 64] [--only beacon,nginx,direct]
                          [--keepalive-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import ensure_debian_packages, median, percentile, print_table, stop_process

ROOT = Path(__file__).resolve().parent.parent
BODY = b"hello from the beacon benchmark backend\n" * 3  # ~120 bytes
PEERS = ("beacon", "nginx", "haproxy", "caddy", "direct")
UNLIMITED = 1_000_000
# Backends that close keep-alive connections: nginx's default and a low value.
KEEPALIVE_ROWS = (1000, 100)

REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (Beacon's proxy
    workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, what: str, log: Path | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout}s\n{tail}")


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_process(proc, timeout=10)
        if log:
            out.close()  # type: ignore[union-attr]


# ----------------------------------------------------------------- configs
def backend_conf(tmp: Path, ports: tuple[int, int], keepalive_requests: int = UNLIMITED, name: str = "backend") -> Path:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_bytes(BODY)
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests {keepalive_requests}; keepalive_timeout 120s;
  client_body_temp_path {tmp}/b-body; proxy_temp_path {tmp}/b-proxy; fastcgi_temp_path {tmp}/b-fcgi;
  uwsgi_temp_path {tmp}/b-uwsgi; scgi_temp_path {tmp}/b-scgi;
  server {{ listen 127.0.0.1:{ports[0]}; listen 127.0.0.1:{ports[1]}; root {www}; index index.html; }}
}}
""")
    return conf


def nginx_conf(tmp: Path, port: int, backends: tuple[int, int], extra: dict[int, tuple[int, int]]) -> Path:
    """nginx as the proxy on `port` in front of `backends`; `extra` maps more
    listen ports to other backend pairs (the keep-alive rows)."""
    servers = "".join(f"""
  upstream b{lport} {{ server 127.0.0.1:{pair[0]}; server 127.0.0.1:{pair[1]}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{lport};
    location / {{
      proxy_pass http://b{lport}; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}""" for lport, pair in extra.items())
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {tmp}/n-body; proxy_temp_path {tmp}/n-proxy; fastcgi_temp_path {tmp}/n-fcgi;
  uwsgi_temp_path {tmp}/n-uwsgi; scgi_temp_path {tmp}/n-scgi;
  upstream backends {{ server 127.0.0.1:{backends[0]}; server 127.0.0.1:{backends[1]}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}{servers}
}}
""")
    return conf


def haproxy_conf(tmp: Path, port: int, backends: tuple[int, int]) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 3s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
  server s1 127.0.0.1:{backends[0]}
  server s2 127.0.0.1:{backends[1]}
""")
    return conf


def caddy_conf(tmp: Path, port: int, backends: tuple[int, int]) -> Path:
    conf = tmp / "Caddyfile"
    conf.write_text(f"""
{{
  admin off
  auto_https off
}}
http://:{port} {{
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:{backends[0]} 127.0.0.1:{backends[1]}
}}
""")
    return conf


def register_backends(api_port: int, backends: tuple[int, int], service: str = "bench") -> None:
    for n, port in enumerate(backends, start=1):
        body = json.dumps({"service": service, "address": "127.0.0.1", "port": port}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/endpoints/{service}-{n}", data=body,
                                     method="PUT", headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()


def wait_routed(what: str, port: int, host: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.read() == BODY:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} on {port} never served the backend body (last: {last})")


# ------------------------------------------------------------------- wrk
def run_wrk(url: str, host: str | None, duration: float, connections: int, script: Path) -> Result:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(script)]
    if host:
        args += ["-H", f"Host: {host}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    return Result(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["errors"] + data["non2xx"],
        requests=data["requests"],
    )


def run_h2load(url: str, host: str | None, connections: int, rps_each: int, duration: float, log: Path) -> Result:
    """Open-loop load: each connection sends `rps_each` requests/s at an even pace."""
    log.unlink(missing_ok=True)
    total = int(connections * rps_each * duration)
    args = ["h2load", "--h1", "-c", str(connections), "--rps", str(rps_each), "-n", str(total),
            "--log-file", str(log)]  # fmt: skip
    if host:
        args += ["-H", f":authority: {host}"]  # h2load's Host header for HTTP/1.1
    subprocess.run([*args, url], capture_output=True, timeout=duration * 3 + 60, check=True)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    starts = [int(r[0]) for r in rows]
    latencies = [int(r[2]) / 1000 for r in rows if r[1] == "200"]
    span = (max(starts) - min(starts)) / 1e6 or 1.0
    return Result(
        rps=len(rows) / span,
        p50_ms=percentile(latencies, 50) if latencies else float("nan"),
        p99_ms=percentile(latencies, 99) if latencies else float("nan"),
        errors=len(rows) - len(latencies) + (total - len(rows)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--only", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--keepalive-only", action="store_true",
                        help="only the rows with backends that close keep-alive connections (beacon, nginx)")
    args = parser.parse_args()
    only = [p for p in args.only.split(",") if p]
    if bad := sorted(set(only) - set(PEERS)):
        parser.error(f"unknown target(s): {', '.join(bad)}")
    ensure_debian_packages({"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy", "caddy": "caddy",
                            "h2load": "nghttp2-client"})  # fmt: skip
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"

    with tempfile.TemporaryDirectory(prefix="beacon-bench-proxy-") as tmpdir:
        tmp = Path(tmpdir)
        report = tmp / "report.lua"
        report.write_text(REPORT_LUA)
        backends = (free_port(), free_port())
        ka_backends = {n: (free_port(), free_port()) for n in KEEPALIVE_ROWS}
        ka_nginx_ports = {n: free_port() for n in KEEPALIVE_ROWS}
        ports = {p: free_port() for p in PEERS}
        api_port, dns_port = free_port(), free_port()
        beacon_args = [
            sys.executable, "-m", "beacon", "run", "--docker", "false", "--proxy-workers", "1",
            "--proxy-listen", f"127.0.0.1:{ports['beacon']}", "--api-listen", f"127.0.0.1:{api_port}",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-recursors", "none", "--log-level", "warning",
        ]  # fmt: skip
        with (
            process([nginx, "-c", str(backend_conf(tmp, backends)), "-e", str(tmp / "backend-error.log")]),
            process([nginx, "-c", str(backend_conf(tmp, ka_backends[KEEPALIVE_ROWS[0]], KEEPALIVE_ROWS[0], "ka0")),
                     "-e", str(tmp / "ka0-error.log")]),
            process([nginx, "-c", str(backend_conf(tmp, ka_backends[KEEPALIVE_ROWS[1]], KEEPALIVE_ROWS[1], "ka1")),
                     "-e", str(tmp / "ka1-error.log")]),
            process([nginx, "-c", str(nginx_conf(tmp, ports["nginx"], backends,
                                                 {ka_nginx_ports[n]: ka_backends[n] for n in KEEPALIVE_ROWS})),
                     "-e", str(tmp / "nginx-error.log")]) as nginx_proxy,
            process([haproxy, "-f", str(haproxy_conf(tmp, ports["haproxy"], backends))], log=tmp / "haproxy.log"),
            process(["caddy", "run", "--config", str(caddy_conf(tmp, ports["caddy"], backends)), "--adapter", "caddyfile"],
                    env={"GOMAXPROCS": "1", "HOME": str(tmp), "XDG_DATA_HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp)},
                    log=tmp / "caddy.log"),
            process(beacon_args, log=tmp / "beacon.log") as beacon,
        ):  # fmt: skip
            for port, what, log in [
                (backends[0], "backend nginx", tmp / "backend-error.log"),
                (ports["nginx"], "nginx", tmp / "nginx-error.log"),
                (ports["haproxy"], "haproxy", tmp / "haproxy.log"),
                (ports["caddy"], "caddy", tmp / "caddy.log"),
                (ports["beacon"], "beacon", tmp / "beacon.log"),
                (api_port, "beacon api", tmp / "beacon.log"),
            ]:
                wait_port(port, what, log)
            register_backends(api_port, backends)
            for n in KEEPALIVE_ROWS:
                register_backends(api_port, ka_backends[n], f"bench{n}")
            urls = {p: f"http://127.0.0.1:{ports[p]}/" for p in PEERS}
            urls["direct"] = f"http://127.0.0.1:{backends[0]}/"
            hosts = {p: None for p in PEERS} | {"beacon": "bench.localhost"}
            for p in only:
                wait_routed(p, int(urls[p].rsplit(":", 1)[1].strip("/")), hosts[p] or "localhost")
            print(f"wrk: 1 thread, {args.connections} connections, {args.duration:g}s x {args.repeats} per target; "
                  f"backends: nginx (1 worker) on 127.0.0.1:{backends[0]},{backends[1]}", file=sys.stderr)  # fmt: skip
            pids = {"beacon": beacon.pid, "nginx": nginx_proxy.pid}
            where = {n: {"beacon": (urls["beacon"], f"bench{n}.localhost"),
                         "nginx": (f"http://127.0.0.1:{ka_nginx_ports[n]}/", None)}
                     for n in KEEPALIVE_ROWS}  # fmt: skip
            where = {UNLIMITED: {"beacon": (urls["beacon"], hosts["beacon"]), "nginx": (urls["nginx"], None)}, **where}
            if args.keepalive_only:
                keepalive_rows(args, [p for p in ("beacon", "nginx") if p in only] or ["beacon", "nginx"], report,
                               where, pids)  # fmt: skip
                return 0
            results: dict[str, list[Result]] = {p: [] for p in only}
            for p in only:  # warm-up: connections, pools, caches
                run_wrk(urls[p], hosts[p], 1.0, args.connections, report)
            for r in range(args.repeats):
                for p in only:
                    res = run_wrk(urls[p], hosts[p], args.duration, args.connections, report)
                    results[p].append(res)
                    print(f"  run {r + 1}: {p:8s} {res.rps:9,.0f} req/s  p50 {res.p50_ms:.3f} ms  "
                          f"p99 {res.p99_ms:.3f} ms  errors {res.errors}", file=sys.stderr)  # fmt: skip
            summary = {p: Result(median(x.rps for x in rs), median(x.p50_ms for x in rs),
                                 median(x.p99_ms for x in rs), sum(x.errors for x in rs))
                       for p, rs in results.items()}  # fmt: skip

            def ratio(p: str, ref: str) -> str:
                return f"{summary[p].rps / summary[ref].rps:.2f}x" if ref in summary else "-"

            print(f"\nHTTP proxy, one worker each, median of {args.repeats} x {args.duration:g}s "
                  f"({args.connections} connections, keep-alive, GET of {len(BODY)} bytes)")  # fmt: skip
            print_table(
                ["target", "req/s", "p50 ms", "p99 ms", "vs nginx", "vs caddy", "errors"],
                [[p, s.rps, f"{s.p50_ms:.3f}", f"{s.p99_ms:.3f}", ratio(p, "nginx"), ratio(p, "caddy"), s.errors]
                 for p, s in summary.items()],
            )  # fmt: skip

            if "beacon" in summary:
                half = summary["beacon"].rps / 2
                conns = 32
                rps_each = max(1, round(half / conns))
                # nginx runs at the same rate as a reference: what any extra hop costs here.
                at_half: dict[str, list[Result]] = {p: [] for p in ("direct", "beacon", "nginx") if p in summary}
                for r in range(args.repeats):
                    for p in at_half:
                        res = run_h2load(urls[p], hosts[p], conns, rps_each, args.duration, tmp / f"h2load-{p}.log")
                        at_half[p].append(res)
                        print(f"  paced run {r + 1}: {p:8s} {res.rps:9,.0f} req/s  p50 {res.p50_ms:.3f} ms  "
                              f"p99 {res.p99_ms:.3f} ms  errors {res.errors}", file=sys.stderr)  # fmt: skip
                rows = [[p, median(x.rps for x in rs), f"{median(x.p50_ms for x in rs):.3f}",
                         f"{median(x.p99_ms for x in rs):.3f}", sum(x.errors for x in rs)]
                        for p, rs in at_half.items()]  # fmt: skip
                print(f"\nLatency at half of Beacon's peak ({conns * rps_each:,} req/s: h2load, {conns} connections "
                      f"x {rps_each} req/s each, evenly paced, {args.duration:g}s x {args.repeats})")  # fmt: skip
                print_table(["target", "req/s", "p50 ms", "p99 ms", "errors"], rows)
                if "direct" in at_half:
                    direct_p99 = median(x.p99_ms for x in at_half["direct"])
                    added = median(x.p99_ms for x in at_half["beacon"]) - direct_p99
                    print(f"p99 added by Beacon over direct: {added:.3f} ms (target <= 1 ms)")
                    if "nginx" in at_half:
                        ref = median(x.p99_ms for x in at_half["nginx"]) - direct_p99
                        print(f"p99 added by nginx over direct at the same rate: {ref:.3f} ms")
            if {"beacon", "nginx"} & set(summary):
                keepalive_rows(args, [p for p in ("beacon", "nginx") if p in summary], report, where, pids)
    return 0


def keepalive_rows(args: argparse.Namespace, targets: list[str], report: Path,
                   where: dict[int, dict[str, tuple[str, str | None]]], pids: dict[str, int]) -> None:  # fmt: skip
    """The same load with backends that close their keep-alive connections
    after N requests (nginx `keepalive_requests`): each proxy must reconnect.
    Every (N, proxy) pair runs once per repeat, interleaved with the
    unlimited case, so that machine noise spreads over all of them."""
    for n, urls in where.items():
        for p in targets:
            wait_routed(f"{p} (keepalive_requests {n})", int(urls[p][0].rsplit(":", 1)[1].strip("/")),
                        urls[p][1] or "localhost")  # fmt: skip
            run_wrk(urls[p][0], urls[p][1], 1.0, args.connections, report)  # warm-up
    results: dict[tuple[int, str], list[Result]] = {(n, p): [] for n in where for p in targets}
    cpu: dict[tuple[int, str], list[float]] = {key: [] for key in results}
    for r in range(args.repeats):
        for n, urls in where.items():
            for p in targets:
                before = cpu_seconds(pids[p])
                res = run_wrk(urls[p][0], urls[p][1], args.duration, args.connections, report)
                per_request = (cpu_seconds(pids[p]) - before) / max(1, res.requests) * 1e6
                results[(n, p)].append(res)
                cpu[(n, p)].append(per_request)
                print(f"  keepalive_requests {n if n != UNLIMITED else 'unlimited'} run {r + 1}: {p:8s} "
                      f"{res.rps:9,.0f} req/s  p50 {res.p50_ms:.3f} ms  p99 {res.p99_ms:.3f} ms  "
                      f"cpu {per_request:.1f} us/req  errors {res.errors}", file=sys.stderr)  # fmt: skip
    rows = []
    for (n, p), rs in results.items():
        rps = median(x.rps for x in rs)
        nginx_rps = median(x.rps for x in results[(n, "nginx")]) if (n, "nginx") in results else None
        unlimited = median(x.rps for x in results[(UNLIMITED, p)])
        cpu_us = median(cpu[(n, p)])
        rows.append([f"{p} (backend keepalive_requests {n if n != UNLIMITED else 'unlimited'})", rps,
                     f"{median(x.p50_ms for x in rs):.3f}", f"{median(x.p99_ms for x in rs):.3f}",
                     f"{rps / nginx_rps:.2f}x" if nginx_rps else "-", f"{rps / unlimited:.2f}x",
                     f"{cpu_us:.1f}", f"{cpu_us / median(cpu[(UNLIMITED, p)]):.2f}x",
                     sum(x.errors for x in rs)])  # fmt: skip
    print(f"\nBackends closing keep-alive connections, median of {args.repeats} x {args.duration:g}s, "
          f"interleaved ('vs unlimited': the same proxy, backend keepalive_requests unlimited, same repeats; "
          f"cpu: the proxy process's user+system time per request)")  # fmt: skip
    print_table(["target", "req/s", "p50 ms", "p99 ms", "vs nginx", "vs unlimited", "cpu us/req", "cpu vs unl.",
                 "errors"], rows)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
