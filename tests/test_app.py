"""The composed app: components wired together through one catalog."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import aiohttp
import pytest

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


@pytest.mark.parametrize("when", ["serving", "first docker attempt"])
def test_sigterm_with_a_hung_docker_engine_exits_within_the_shutdown_timeout(tmp_path: Path, when: str) -> None:
    """An engine that accepts and never answers: every Docker call hangs in a thread.
    SIGTERM must still end the process within --shutdown-timeout, once serving
    and also during the first Docker attempt (start-up waits up to 10 s for it;
    the API listener, started after the watcher, is not open yet)."""
    sock_path = tmp_path / "hung.sock"
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(sock_path))
    engine.listen(64)  # accepted by the kernel, never read or answered
    api_port = _free_port()
    cmd = [
        sys.executable, "-m", "beacon", "run", "--docker-host", f"unix://{sock_path}",
        "--api-listen", f"127.0.0.1:{api_port}", "--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
        "--dns-recursors", "none", "--shutdown-timeout", "2s", "--log-level", "info",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        if when == "serving":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # serving (the Docker watcher keeps hanging in the background)
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", api_port), timeout=0.5):
                    break
                assert proc.poll() is None, _read_all(proc.stderr)
                time.sleep(0.1)
            else:
                raise AssertionError("beacon did not start listening")
        else:
            _wait_for_output(proc, "starting: docker watcher", timeout=30)
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", api_port), timeout=0.5):
                pass  # still starting: the API is not listening yet
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        took = time.monotonic() - started
        assert took < 2 + 1.5, f"exit took {took:.1f}s with --shutdown-timeout 2s ({when})"
        rest = _read_all(proc.stderr)
        assert proc.returncode == 0 and "Traceback" not in rest, rest
        assert "stopped: beacon" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        engine.close()


def _wait_for_output(proc: subprocess.Popen[bytes], text: str, timeout: float) -> str:
    """Read the process's stderr until `text` appears (bounded in time); what was read."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while text.encode() not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"no {text!r} in: {seen.decode(errors='replace')}"
            if sel.select(min(left, 0.5)):
                chunk = os.read(proc.stderr.fileno(), 65536)
                assert chunk, f"stderr closed before {text!r}: {seen.decode(errors='replace')}"
                seen += chunk
    return seen.decode(errors="replace")


def _read_all(stream: IO[bytes]) -> str:
    return stream.read().decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
