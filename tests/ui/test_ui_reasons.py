"""The reason Docker's view gives a running container that is not passing
(paused, restarting, HEALTHCHECK starting/unhealthy with its last output):
pure on inspect data, then on the real engine through the API."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from docker.models.containers import Container

from beacon.registry import State
from beacon.registry.labels import LabelOptions, container_endpoints
from tests.helpers import running_app


def inspect(state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "Id": "c" * 64, "Name": "/app", "RestartCount": extra.pop("restarts", 0),
        "State": {"Running": True, **state},
        "Config": {"Labels": {}, "ExposedPorts": {"80/tcp": {}}},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8081"}]}, "Networks": {}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("state", "extra", "expected_state", "reason"),
    [
        ({}, {}, State.PASSING, ""),
        ({"Paused": True}, {}, State.CRITICAL, "paused"),
        ({"Restarting": True, "ExitCode": 3}, {"restarts": 7}, State.CRITICAL, "restarting: exit code 3, restart count 7"),
        ({"Health": {"Status": "starting"}}, {}, State.CRITICAL, "HEALTHCHECK starting: no traffic before it passes"),
        ({"Health": {"Status": "unhealthy", "Log": [{"ExitCode": 0, "Output": "old"}, {"ExitCode": 1, "Output": "db down\n  retry\n"}]}},
         {}, State.CRITICAL, "HEALTHCHECK unhealthy (exit code 1): db down retry"),
        ({"Health": {"Status": "unhealthy", "Log": "not a list"}}, {}, State.CRITICAL, "HEALTHCHECK unhealthy (exit code None)"),
        ({"Health": {"Status": "unhealthy", "Log": [{"ExitCode": 1, "Output": "x" * 10_000}]}},
         {}, State.CRITICAL, "HEALTHCHECK unhealthy (exit code 1): " + "x" * 500),
        ({"Health": {"Status": "healthy"}}, {}, State.PASSING, ""),
    ],
)  # fmt: skip
def test_docker_state_reason(state: dict[str, Any], extra: dict[str, Any], expected_state: State, reason: str) -> None:
    (ep,) = container_endpoints(inspect(state, **extra), LabelOptions()).endpoints
    assert (ep.state, ep.reason) == (expected_state, reason)
    assert ep.to_json().get("reason", "") == reason


@pytest.mark.docker
async def test_paused_and_unhealthy_containers_show_the_reason_in_the_api(
    run_container: Callable[..., Container],
) -> None:
    async with running_app(explicit=True) as app, aiohttp.ClientSession() as session:
        labels = {"beacon.enable": "true", "beacon.service": "reasons"}
        paused = await asyncio.to_thread(run_container, labels=labels, ports={"80/tcp": ("127.0.0.1", None)})
        sick = await asyncio.to_thread(
            run_container, labels=labels, ports={"80/tcp": ("127.0.0.1", None)},
            healthcheck={"test": ["CMD-SHELL", "echo disk full >&2; exit 1"], "interval": 200_000_000, "retries": 1},
        )  # fmt: skip
        await asyncio.to_thread(paused.pause)

        async def reasons() -> dict[str, str] | None:
            async with session.get(f"http://{app.api.address}/v1/services/reasons") as resp:
                if resp.status != 200:
                    return None
                got = {e["source"]["container_id"]: e.get("reason", "") for e in (await resp.json())["endpoints"]}
            ready = got.get(paused.id) == "paused" and "unhealthy" in got.get(sick.id, "")
            return got if ready else None

        got = await eventually_async(reasons, timeout=20)
        assert got[sick.id] == "HEALTHCHECK unhealthy (exit code 1): disk full"
        await asyncio.to_thread(paused.unpause)


async def eventually_async(probe: Callable[[], Any], timeout: float) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


@pytest.mark.docker
async def test_a_crash_looping_container_stays_critical_with_exit_code_and_restart_count(
    run_container: Callable[..., Container],
) -> None:
    async with running_app(explicit=True) as app, aiohttp.ClientSession() as session:
        crashing = await asyncio.to_thread(
            run_container, labels={"beacon.enable": "true", "beacon.service": "crashy"},
            command=["sh", "-c", "sleep 0.5; exit 3"], restart_policy={"Name": "always"},
            ports={"80/tcp": ("127.0.0.1", None)},
        )  # fmt: skip
        url = f"http://{app.api.address}/v1/services/crashy"
        seen: list[tuple[str, str] | None] = []  # (state, reason) or None while absent

        async def restarting() -> dict[str, Any] | None:
            async with session.get(url) as resp:
                body = await resp.json() if resp.status == 200 else None
            eps = body["endpoints"] if body else []
            seen.append((eps[0]["state"], eps[0].get("reason", "")) if eps else None)
            ep = eps[0] if eps else None
            return ep if ep and ep.get("reason", "").startswith("restarting: exit code 3") else None

        ep = await eventually_async(restarting, timeout=20)
        assert ep["state"] == "critical" and re.search(r"restart count [1-9]", ep["reason"]), ep
        # While Docker restarts it, DNS has the name (no answers: NODATA) and the proxy 503s.
        dns_address = app.dns.addresses[0]
        reply = await dns.asyncquery.udp(
            dns.message.make_query("crashy.service.beacon", "A"), dns_address.host, port=dns_address.port, timeout=5
        )
        states_then = seen[-1]
        if states_then is not None and states_then[0] == "critical":
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer == [], reply
        # From its first appearance on, it never left the catalog.
        first = next(i for i, s in enumerate(seen) if s is not None)
        assert None not in seen[first:], seen
        await asyncio.to_thread(crashing.remove, force=True)

        async def gone() -> bool:
            async with session.get(url) as resp:
                return resp.status == 404

        await eventually_async(gone, timeout=10)
