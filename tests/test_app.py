"""The composed app: components wired together through one catalog."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from beacon.registry import Endpoint, Source
from tests.helpers import eventually, running_app


def _endpoint(eid: str, service: str, port: int, host: str) -> Endpoint:
    return Endpoint(
        id=eid, service=service, address="127.0.0.1", port=port,
        source=Source("container", container_id=eid, container_name=eid), http_hosts=(host,),
    )


async def test_api_shows_proxy_routes_and_conflicts() -> None:
    async with running_app(docker=False) as app:
        app.catalog.set_source("container:a", [_endpoint("a1", "shop", 9001, "shop.example.test")])
        app.catalog.set_source("container:b", [_endpoint("b1", "shop2", 9002, "shop.example.test")])
        await eventually(lambda: app.proxy.routes_json()["conflicts"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{app.api.address}/v1/routes") as resp:
                assert resp.status == 200
                body = await resp.json()
        (conflict,) = [c for c in body["conflicts"] if c["host"] == "shop.example.test"]
        assert conflict["path_prefix"] == "/"
        assert {conflict["winner"], *conflict["losers"]} == {"shop", "shop2"}
        assert {"shop.example.test", "shop.localhost", "shop2.localhost"} <= {r["host"] for r in body["routes"]}


def test_sigterm_with_a_hung_docker_engine_exits_within_the_shutdown_timeout(tmp_path: Path) -> None:
    """An engine that accepts and never answers: every Docker call hangs in a thread.
    SIGTERM must still end the process within --shutdown-timeout."""
    sock_path = tmp_path / "hung.sock"
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(sock_path))
    engine.listen(64)  # accepted by the kernel, never read or answered
    api_port = _free_port()
    cmd = [
        sys.executable, "-m", "beacon", "run", "--docker-host", f"unix://{sock_path}",
        "--api-listen", f"127.0.0.1:{api_port}", "--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
        "--dns-recursors", "none", "--shutdown-timeout", "2s", "--log-level", "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # serving (the Docker watcher keeps hanging in the background)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", api_port), timeout=0.5):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        else:
            raise AssertionError("beacon did not start listening")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        took = time.monotonic() - started
        assert took < 2 + 1.5, f"exit took {took:.1f}s with --shutdown-timeout 2s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
