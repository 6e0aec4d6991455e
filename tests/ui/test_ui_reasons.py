"""The reason Docker's view gives a running container that is not passing
(paused, restarting, HEALTHCHECK starting/unhealthy with its last output):
pure on inspect data, then on the real engine through the API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
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
