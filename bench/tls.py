"""`make bench-tls`: Beacon's TLS termination against nginx, same certificate, one run.

Both terminate TLS with the same ECDSA P-256 certificate (generated here, from a
throwaway CA) and proxy to the same two loopback nginx backends; one worker
each (nginx `worker_processes 1`, Beacon `--proxy-workers 1` on uvloop). Both
have session tickets and session caches off for the handshake run, and wrk
never resumes sessions, so every new connection is a full TLS 1.3 handshake.

1. keep-alive requests/s over TLS: wrk, 64 connections;
2. full TLS 1.3 handshakes/s: wrk with `Connection: close` (one request per
   connection, so requests/s = handshakes/s), 32 connections;
3. p99 latency added over going direct (plain HTTP to a backend) at half of
   Beacon's TLS keep-alive peak, evenly paced by h2load (`--h1`, TLS), for
   Beacon and nginx at the same rate.

Beacon serves the certificate as `default.crt` of `--tls-cert-dir`, so any SNI
(wrk sends the URL's host, here 127.0.0.1) gets it, as nginx's single server does.

    python -m bench.tls [--duration 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.common import ensure_debian_packages, median, print_table
from bench.proxy import (
    REPORT_LUA,
    Result,
    backend_conf,
    free_port,
    process,
    register_backends,
    run_h2load,
    run_wrk,
    wait_port,
)

HOST = "bench.localhost"


def write_certificate(tmp: Path) -> tuple[Path, Path]:
    """An ECDSA P-256 leaf (SAN bench.localhost, 127.0.0.1) signed by a throwaway CA."""
    import ipaddress

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    certs = tmp / "certs"
    certs.mkdir()
    crt, pem_key = certs / "default.crt", certs / "default.key"
    crt.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    pem_key.chmod(0o600)
    return crt, pem_key


def nginx_tls_conf(tmp: Path, port: int, backends: tuple[int, int], crt: Path, key: Path) -> Path:
    conf = tmp / "nginx-tls.conf"
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
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {crt}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off; ssl_session_cache off;
    location / {{
      proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto https;
    }}
  }}
}}
""")
    return conf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ensure_debian_packages({"wrk": "wrk", "nginx": "nginx", "h2load": "nghttp2-client"})
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="beacon-bench-tls-") as tmpdir:
        tmp = Path(tmpdir)
        report = tmp / "report.lua"
        report.write_text(REPORT_LUA)
        close_report = tmp / "close.lua"
        close_report.write_text('wrk.headers["Connection"] = "close"\n' + REPORT_LUA)
        crt, key = write_certificate(tmp)
        backends = (free_port(), free_port())
        nginx_port, beacon_port, beacon_tls, api_port, dns_port = (free_port() for _ in range(5))
        beacon_args = [
            sys.executable, "-m", "beacon", "run", "--docker", "false", "--proxy-workers", "1",
            "--proxy-listen", f"127.0.0.1:{beacon_port}", "--proxy-tls-listen", f"127.0.0.1:{beacon_tls}",
            "--tls-cert-dir", str(crt.parent), "--api-listen", f"127.0.0.1:{api_port}",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-recursors", "none", "--log-level", "warning",
        ]  # fmt: skip
        with (
            process([nginx, "-c", str(backend_conf(tmp, backends)), "-e", str(tmp / "backend-error.log")]),
            process([nginx, "-c", str(nginx_tls_conf(tmp, nginx_port, backends, crt, key)),
                     "-e", str(tmp / "nginx-error.log")]),
            process(beacon_args, log=tmp / "beacon.log"),
        ):  # fmt: skip
            for port, what, log in [(backends[0], "backend", tmp / "backend-error.log"),
                                    (nginx_port, "nginx", tmp / "nginx-error.log"),
                                    (beacon_tls, "beacon", tmp / "beacon.log"), (api_port, "beacon api", tmp / "beacon.log")]:  # fmt: skip
                wait_port(port, what, log)
            register_backends(api_port, backends)
            urls = {"beacon": f"https://127.0.0.1:{beacon_tls}/", "nginx": f"https://127.0.0.1:{nginx_port}/",
                    "direct": f"http://127.0.0.1:{backends[0]}/"}  # fmt: skip
            hosts: dict[str, str | None] = {"beacon": "bench.localhost", "nginx": None, "direct": None}
            for p in ("beacon", "nginx"):
                run_wrk(urls[p], hosts[p], 1.0, 16, report)  # warm-up (and the route is there)
            keep: dict[str, list[Result]] = {"beacon": [], "nginx": []}
            shakes: dict[str, list[Result]] = {"beacon": [], "nginx": []}
            for r in range(args.repeats):
                for p in keep:
                    res = run_wrk(urls[p], hosts[p], args.duration, 64, report)
                    keep[p].append(res)
                    print(f"  run {r + 1}: keep-alive {p:7s} {res.rps:9,.0f} req/s p99 {res.p99_ms:.2f} ms "
                          f"errors {res.errors}", file=sys.stderr)  # fmt: skip
                    res = run_wrk(urls[p], hosts[p], args.duration, 32, close_report)
                    shakes[p].append(res)
                    print(f"  run {r + 1}: handshake  {p:7s} {res.rps:9,.0f} /s    p99 {res.p99_ms:.2f} ms "
                          f"errors {res.errors}", file=sys.stderr)  # fmt: skip
            k = {p: median(x.rps for x in rs) for p, rs in keep.items()}
            h = {p: median(x.rps for x in rs) for p, rs in shakes.items()}
            print(f"\nTLS termination, one worker each, ECDSA P-256, median of {args.repeats} x {args.duration:g}s")
            print_table(["measure", "beacon", "nginx", "beacon / nginx", "target"], [
                ["keep-alive req/s over TLS (64 conns)", k["beacon"], k["nginx"], f"{k['beacon'] / k['nginx']:.2f}x", ">= 0.5x"],
                ["full TLS 1.3 handshakes/s (32 conns)", h["beacon"], h["nginx"], f"{h['beacon'] / h['nginx']:.2f}x", ">= 0.5x"],
            ])  # fmt: skip
            conns = 32
            rps_each = max(1, round(k["beacon"] / 2 / conns))
            paced: dict[str, list[Result]] = {"direct": [], "beacon": [], "nginx": []}
            for r in range(args.repeats):
                for p in paced:
                    res = run_h2load(urls[p], hosts[p], conns, rps_each, args.duration, tmp / f"h2load-{p}.log")
                    paced[p].append(res)
                    print(f"  paced run {r + 1}: {p:7s} {res.rps:9,.0f} req/s p99 {res.p99_ms:.3f} ms "
                          f"errors {res.errors}", file=sys.stderr)  # fmt: skip
            p99 = {p: median(x.p99_ms for x in rs) for p, rs in paced.items()}
            print(f"\nAt half of Beacon's TLS peak ({conns * rps_each:,} req/s, h2load {conns} connections, evenly paced)")
            print_table(["target", "p99 ms", "p99 added over direct ms", "errors"],
                        [[p, f"{p99[p]:.3f}", f"{p99[p] - p99['direct']:.3f}" if p != "direct" else "-",
                          sum(x.errors for x in rs)] for p, rs in paced.items()])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
