"""The real `beacon` console script in a subprocess: client commands against a
real API (served in the test's own event loop), and `beacon run` itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import pytest

from beacon import __version__
from beacon.api import ApiServer
from beacon.registry import Catalog, Endpoint, Source, State
from beacon.registry.manual import ManualRegistry
from tests.helpers import running_app
from tests.helpers import test_config as make_config

BEACON = str(Path(sys.executable).with_name("beacon"))
# The child sees no BEACON_* from the developer's shell, only what a test sets.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("BEACON_")}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        BEACON, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**CLEAN_ENV, **(env or {})}
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def api_server(**overrides: Any) -> AsyncIterator[tuple[str, Catalog]]:
    config = make_config(docker=False, **overrides)
    catalog = Catalog()
    manual = ManualRegistry(config, catalog, node="test-node")
    server = ApiServer(config, catalog, manual=manual, docker=None, health=None)
    await manual.start()
    await server.start()
    try:
        yield f"http://{server.address}", catalog
    finally:
        await server.stop()
        await manual.stop()


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, Catalog]]:
    async with api_server() as served:
        _, catalog = served
        for cid, name, state in (("c1", "web-frontend", State.PASSING), ("c2", "web-frontend", State.DRAINING)):
            ep = Endpoint(
                f"{cid}:80", "web", "172.17.0.9", 80, Source("container", cid, name),
                state=state, tags=("blue",),
            )
            catalog.set_source(f"container:{cid}", [ep])
        catalog.publish()
        yield served


def columns(line: str) -> list[int]:
    """Start offsets of the cells of one table line."""
    return [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", line)]


async def test_version() -> None:
    code, out, _ = await cli("--version")
    assert code == 0 and out.strip() == f"beacon {__version__}"


async def test_services_table_and_json(api: tuple[str, Catalog]) -> None:
    url, _ = api
    code, out, err = await cli("services", "--api", url)
    assert code == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "PASSING", "TOTAL", "TAGS"]
    assert row.split() == ["web", "1", "2", "blue"]
    assert columns(header) == columns(row)  # aligned
    code, out, _ = await cli("services", "--api", url, "--json")
    assert code == 0
    assert [(s["name"], s["passing"], s["total"]) for s in json.loads(out)] == [("web", 1, 2)]


async def test_endpoints_table(api: tuple[str, Catalog]) -> None:
    url, _ = api
    code, out, err = await cli("endpoints", "web", "--api", url)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["ID", "ADDRESS", "PORT", "STATE", "WEIGHT", "TAGS", "SOURCE"]
    assert lines[1].split() == ["c1:80", "172.17.0.9", "80", "passing", "1", "blue", "container", "web-frontend"]
    assert lines[2].split()[3] == "draining"
    assert columns(lines[0]) == columns(lines[1])[:7]
    code, out, _ = await cli("endpoints", "web", "--api", url, "--json")
    assert [e["id"] for e in json.loads(out)["endpoints"]] == ["c1:80", "c2:80"]
    code, out, err = await cli("endpoints", "nope", "--api", url)
    assert code == 1 and out == ""
    assert err.strip() == "beacon: the API answered 404: no service named 'nope' (field name)"


async def test_register_heartbeat_deregister(api: tuple[str, Catalog]) -> None:
    url, catalog = api
    code, out, err = await cli(
        "register", "pg-1", "--service", "postgres", "--address", "10.0.0.5", "--port", "5432",
        "--tag", "primary", "--tag", "eu", "--meta", "version=16", "--weight", "3", "--ttl", "30s",
        env={"BEACON_API": url},
    )
    assert code == 0, err
    assert out.strip() == "registered: pg-1 service=postgres address=10.0.0.5 port=5432 state=critical"
    ep = catalog.snapshot.endpoints["pg-1"]
    assert (ep.tags, dict(ep.meta), ep.weight) == (("primary", "eu"), {"version": "16"}, 3)
    assert ep.check is not None and ep.check.ttl == 30.0

    code, out, err = await cli("heartbeat", "pg-1", "--output", "all good", env={"BEACON_API": url})
    assert code == 0, err
    assert out.strip() == "heartbeat: pg-1 state=passing"
    assert catalog.snapshot.endpoints["pg-1"].state is State.PASSING

    code, out, _ = await cli("deregister", "pg-1", "--api", url, "--json")
    assert code == 0 and json.loads(out) == {"id": "pg-1", "deregistered": True}
    assert "pg-1" not in catalog.snapshot.endpoints


async def test_api_errors_are_one_line(api: tuple[str, Catalog]) -> None:
    url, catalog = api
    before = catalog.snapshot
    code, out, err = await cli(
        "register", "x1", "--service", "db", "--address", "10.0.0.5", "--port", "0", "--api", url
    )
    assert code == 1 and out == ""
    assert err.strip() == "beacon: the API answered 422: port must be between 1 and 65535 (got 0) (field port)"
    assert len(err.strip().splitlines()) == 1
    code, _, err = await cli("deregister", "c1:80", "--api", url)
    assert code == 1 and "409" in err and "container" in err
    assert catalog.snapshot is before


async def test_token_from_flag_or_environment() -> None:
    async with api_server(api_token="s3cret") as (url, catalog):
        args = ("register", "x1", "--service", "db", "--address", "10.0.0.5", "--port", "5432", "--api", url)
        code, _, err = await cli(*args)
        assert code == 1 and "401" in err
        code, _, err = await cli(*args, "--token", "s3cret")
        assert code == 0, err
        code, _, err = await cli("deregister", "x1", "--api", url, env={"BEACON_API_TOKEN": "s3cret"})
        assert code == 0, err
        assert "x1" not in catalog.snapshot.endpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_api_is_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await cli("services", "--api", url)
    assert code == 1 and out == ""
    assert err.startswith(f"beacon: cannot reach the Beacon API at {url}:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = await cli("services", "--api", "ftp://example")
    assert code == 2 and "--api" in err


async def test_usage_errors_exit_2() -> None:
    code, _, err = await cli("register", "x1", "--service", "db", "--address", "10.0.0.5", "--port", "1",
                             "--meta", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = await cli("run", "--dns-listen", "nonsense")
    assert code == 2
    assert err.strip() == "beacon: --dns-listen: expected HOST:PORT, got 'nonsense'"
    code, _, err = await cli("run", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err
    code, _, err = await cli("run", env={"BEACON_API_LISTEN": "localhost"})
    assert code == 2 and "BEACON_API_LISTEN" in err
    # Numbers name the option and what was expected, not Python's int() message.
    code, _, err = await cli("run", env={"BEACON_DNS_TTL": "abc"})
    assert (code, err.strip()) == (2, "beacon: BEACON_DNS_TTL: expected seconds, got 'abc'")
    code, _, err = await cli("run", "--proxy-workers", "x")
    assert (code, err.strip()) == (2, "beacon: --proxy-workers: expected a whole number, got 'x'")


async def test_run_help_shows_defaults_units_and_choices() -> None:
    code, out, _ = await cli("run", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines
    assert "--lb {round_robin,least_conn,random}" in text
    assert "(default round_robin) [env BEACON_LB]" in text
    assert "--proxy-try-timeout DURATION" in text
    assert "(default 30s; a duration: 250ms, 30s, 5m, 1h) [env BEACON_PROXY_TRY_TIMEOUT]" in text
    assert "(default 127.0.0.1:8700) [env BEACON_API_LISTEN]" in text


# ---------------------------------------------------------------- beacon run
@pytest.fixture
def run_beacon(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"beacon-{len(procs)}.log"
        with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [BEACON, "run", "--api-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0",
                 "--proxy-listen", "127.0.0.1:0", "--dns-recursors", "none", *extra],
                stdout=subprocess.DEVNULL, stderr=stderr, env=CLEAN_ENV,
            )
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for_log(log: Path, pattern: str, timeout: float = 20.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not logged within {timeout}s:\n{log.read_text()}")


def http_get(url: str) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_run_logs_bound_ports_and_stops_on_sigterm(run_beacon: Any) -> None:
    proc, log = run_beacon("--docker", "false")
    api = wait_for_log(log, r"listening: api on 127\.0\.0\.1:(\d+)")
    wait_for_log(log, r"started: beacon")
    port = int(api.group(1))
    # Every listener logs the port it really bound, not the 0 it was given.
    dns = wait_for_log(log, r"listening: dns\b.* on 127\.0\.0\.1:(\d+)")
    proxy = wait_for_log(log, r"listening: proxy\b.* on 127\.0\.0\.1:(\d+)")
    assert all(int(m.group(1)) > 0 for m in (api, dns, proxy))
    assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok", "docker": "disabled"})
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10
    text = log.read_text()
    assert "stopped: beacon" in text and "Traceback" not in text


@pytest.mark.parametrize(("flag", "listener"), [("--api-listen", "API"), ("--proxy-listen", "proxy")])
def test_run_reports_a_taken_port_naming_its_listener(run_beacon: Any, flag: str, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, log = run_beacon("--docker", "false", flag, f"127.0.0.1:{port}")
        assert proc.wait(20) == 1
    text = log.read_text()
    assert "Traceback" not in text
    # The message names the listener and its address, not aiohttp's bind tuple.
    assert f"beacon: {listener} listener 127.0.0.1:{port}: address already in use" in text, text


@pytest.mark.docker
def test_run_with_docker_reports_the_connection(run_beacon: Any, docker_client: docker.DockerClient) -> None:
    proc, log = run_beacon()
    port = int(wait_for_log(log, r"listening: api on 127\.0\.0\.1:(\d+)").group(1))
    deadline = time.monotonic() + 20
    while http_get(f"http://127.0.0.1:{port}/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http_get(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok", "docker": "connected"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


# ------------------------------------------------------ beacon status / watch
async def test_status_shows_listeners_and_problems_first() -> None:
    async with running_app(docker=False) as app:
        url = f"http://{app.api.address}"
        app.manual.register(Endpoint(id="db1", service="db", address="10.0.0.5", port=5432, source=Source("manual")))
        # A TTL check never heartbeaten: critical, with the check's output as the reason.
        code, _, err = await cli("register", "cache1", "--service", "cache", "--address", "10.0.0.6",
                                 "--port", "6379", "--ttl", "30s", "--api", url)
        assert code == 0, err
        app.catalog.publish()  # what status reads is published, not pending
        code, out, err = await cli("status", "--api", url)
        assert code == 0, err
        lines = out.splitlines()
        assert f"api       {app.api.address}" in lines
        assert f"proxy     {app.proxy.address}" in lines
        assert any(line.startswith("dns       ") and str(app.dns.addresses[0]) in line for line in lines)
        assert "docker    disabled" in lines and "store     memory (connected)" in lines
        problems = lines.index("problems:")
        assert lines[problems + 1].split()[:3] == ["critical", "cache", "cache1"]
        table = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("SERVICE"))) + 1:]]
        assert table == [["cache", "0/1", "DOWN"], ["db", "1/1"]]  # the down service first
        code, out, _ = await cli("status", "--json", "--api", url)
        data = json.loads(out)
        assert data["status"]["listeners"]["api"] == str(app.api.address) and len(data["problems"]) == 1


async def test_watch_prints_each_change_and_stops_after_count() -> None:
    async with running_app(docker=False) as app:
        url = f"http://{app.api.address}"
        proc = await asyncio.create_subprocess_exec(
            BEACON, "watch", "--count", "2", "--api", url, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=CLEAN_ENV,
        )
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert re.fullmatch(rb"index \d+: 0 services\n", first), first
        app.manual.register(Endpoint(id="w1", service="web", address="10.0.0.7", port=80, source=Source("manual")))
        second = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert re.fullmatch(rb"index \d+: web 1/1 passing\n", second), second
        app.manual.deregister("w1")
        third = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert re.fullmatch(rb"index \d+: web removed\n", third), third
        assert await asyncio.wait_for(proc.wait(), 20) == 0
