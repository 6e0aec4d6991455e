"""A flood on DNS must not stall Beacon's other faces (issue 10).

A whole Beacon runs on this test's event loop (`running_app`), with a
1,000-endpoint service and a local HTTP backend behind its proxy. Clients run
in threads, so the loop does nothing but Beacon: one thread floods DNS with
the case-busting queries (every one a new mix of letter case, A and SRV,
EDNS 4096: before the case-insensitive cache each was a miss costing ~100 ms
of loop time), another measures a proxied GET, `/healthz` and a DNS query
for a hot name, one after the other. Everything goes to loopback and is
bounded in count and time.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dns.message
import dns.query

from beacon.config import HostPort
from beacon.registry import Endpoint, Source
from tests.dns.dnstest import ep, put
from tests.helpers import running_app

FLOOD_PACKETS = 400  # at most; ~130 per second for 3 s
FLOOD_SECONDS = 3.0
P99_LIMIT = 0.050


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real backend
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        # One write: header and body apart would meet Nagle and delayed ACK (40 ms).
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def flood(dns_addr: HostPort, stop: threading.Event) -> int:
    """Case-busting queries for the big service, paced, until `stop` or the bound."""
    rng = random.Random(10)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        deadline = time.monotonic() + FLOOD_SECONDS
        while sent < FLOOD_PACKETS and time.monotonic() < deadline and not stop.is_set():
            name = "".join(c.upper() if rng.random() < 0.5 else c for c in "big.service.beacon")
            q = dns.message.make_query(name, "SRV" if sent % 2 else "A", use_edns=0, payload=4096)
            s.sendto(q.to_wire(), (dns_addr.host, dns_addr.port))
            sent += 1
            try:
                while True:
                    s.recv(65535)  # drain the TC replies
            except BlockingIOError:
                pass
            time.sleep(FLOOD_SECONDS / FLOOD_PACKETS)  # pacing of a sender, not a wait for a condition
    return sent


def measure(proxy: HostPort, api: HostPort, dns_addr: HostPort, stop: threading.Event) -> dict[str, list[float]]:
    """Latency of a proxied GET, /healthz and a hot DNS name, in turn, until `stop` (bounded)."""
    out: dict[str, list[float]] = {"proxy": [], "healthz": [], "dns": []}
    proxy_conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    api_conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
    hot = dns.message.make_query("site.service.beacon", "A")
    try:
        for _ in range(2000):
            if stop.is_set():
                break
            t = time.perf_counter()
            proxy_conn.request("GET", "/", headers={"Host": "site.localhost"})
            resp = proxy_conn.getresponse()
            assert resp.status == 200 and resp.read() == b"ok\n"
            out["proxy"].append(time.perf_counter() - t)
            t = time.perf_counter()
            api_conn.request("GET", "/healthz")
            resp = api_conn.getresponse()
            assert resp.status == 200
            resp.read()
            out["healthz"].append(time.perf_counter() - t)
            t = time.perf_counter()
            reply = dns.query.udp(hot, dns_addr.host, port=dns_addr.port, timeout=10)
            assert reply.answer
            out["dns"].append(time.perf_counter() - t)
    finally:
        proxy_conn.close()
        api_conn.close()
    return out


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_a_case_busting_dns_flood_does_not_stall_the_proxy_api_or_dns() -> None:
    with backend() as port:
        async with running_app(docker=False) as app:
            put(
                app.catalog, "manual:big",
                *[ep(f"b{i}", f"10.{i // 250}.{i % 250}.1", "big", port=8000 + i) for i in range(1000)],
            )  # fmt: skip
            put(app.catalog, "manual:site", Endpoint(id="site", service="site", address="127.0.0.1", port=port, source=Source("manual")))
            assert app.proxy.address is not None and app.api.address is not None
            dns_addr = app.dns.addresses[0]
            stop = threading.Event()
            baseline = await asyncio.to_thread(measure, app.proxy.address, app.api.address, dns_addr, _stop_after(0.5))
            flooding = asyncio.ensure_future(asyncio.to_thread(flood, dns_addr, stop))
            try:
                during = await asyncio.to_thread(
                    measure, app.proxy.address, app.api.address, dns_addr, _stop_after(FLOOD_SECONDS)
                )
            finally:
                stop.set()
                sent = await flooding
    assert sent >= FLOOD_PACKETS // 2, sent
    figures = {k: (round(p99(baseline[k]) * 1000, 1), round(p99(v) * 1000, 1), len(v)) for k, v in during.items()}
    print(f"\np99 ms (before flood, during flood, samples during): {figures}; flood packets {sent}")
    for face, samples in during.items():
        assert len(samples) >= 20, (face, figures)
        assert p99(samples) < P99_LIMIT, (face, figures)


def _stop_after(seconds: float) -> threading.Event:
    """An event that sets itself after `seconds` (a timer thread, bounded)."""
    event = threading.Event()
    timer = threading.Timer(seconds, event.set)
    timer.daemon = True
    timer.start()
    return event
