"""Prometheus (Debian's package, a client we did not write) discovering real containers through
Beacon's `http_sd_configs` endpoint, keeping only services labelled `beacon.meta.metrics_port` with
CONSUL.md's relabelling example; a stopped container leaves its targets.

Prometheus's `consul_sd_configs` cannot be tested with Debian's build: Debian compiles Prometheus
without its Consul SD ("Disable Consul SD until its Debian package is back in shape", debian/changelog
2.33.5+ds1-4; Debian 12's 2.42 rejects the config key). The Consul side is covered by py-consul
(test_consul_pyconsul.py) and by test_consul_http.py replaying the exact requests Prometheus's
Consul SD sends (discovery/consul/consul.go).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually, running_app

pytestmark = pytest.mark.docker

LOOPBACK_PORT = {"80/tcp": ("127.0.0.1", None)}
# beacon/api/CONSUL.md's relabelling example, as documented.
KEEP_METRICS = """
    relabel_configs:
      - source_labels: [__meta_beacon_meta_metrics_port]
        regex: .+
        action: keep
      - source_labels: [__meta_beacon_metrics_address]
        target_label: __address__
      - source_labels: [__meta_beacon_meta_metrics_path]
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__meta_beacon_service]
        target_label: service
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def prometheus(config: str, workdir: Path) -> AsyncIterator[str]:
    """A Prometheus on a free loopback port; yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is not installed: run `make test-deps`"
    config_file, log_file = workdir / "prometheus.yml", workdir / "log"
    await asyncio.to_thread(workdir.mkdir)
    await asyncio.to_thread(config_file.write_text, config)
    port = free_port()
    with log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=subprocess.DEVNULL, stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                try:
                    async with http.get(f"{base}/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    assert proc.returncode is None, log_file.read_text()
                    return False

            deadline = time.monotonic() + 20
            while not await ready():
                assert time.monotonic() < deadline, "prometheus did not become ready"
                await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def active_targets(http: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/targets", params={"state": "active"}) as resp:
        data = await resp.json()
    return list(data["data"]["activeTargets"])


@pytest.fixture
def names() -> Iterator[str]:
    yield f"pt{RUN_ID}{uuid.uuid4().hex[:4]}"


async def test_prometheus_http_sd_discovers_labelled_containers(
    run_container: ContainerFactory, tmp_path: Path, names: str
) -> None:
    web, other = f"{names}-web", f"{names}-other"
    metrics = {"beacon.enable": "true", "beacon.service": web, "beacon.meta.metrics_port": "80",
               "beacon.meta.metrics_path": "/index.html", "beacon.tags": "prod"}
    first = run_container(labels=metrics, ports=LOOPBACK_PORT)
    second = run_container(labels=metrics, ports=LOOPBACK_PORT)
    run_container(labels={"beacon.enable": "true", "beacon.service": other}, ports=LOOPBACK_PORT)

    # Internal address mode: container IPs, so the metrics port (a container port) is reachable as is.
    async with running_app(explicit=True, address_mode="internal") as app:
        await eventually(lambda: len(getattr(app.catalog.snapshot.services.get(web), "endpoints", ())) == 2, 20)
        assert app.api.address is not None
        config = f"""
global: {{scrape_interval: 5s}}
scrape_configs:
  - job_name: beacon
    http_sd_configs:
      - url: http://{app.api.address}/v1/prometheus/targets
        refresh_interval: 1s
""" + KEEP_METRICS
        async with prometheus(config, tmp_path / "prometheus") as base, aiohttp.ClientSession() as http:
            snap = app.catalog.snapshot
            expected = {f"{e.address}:{e.port}" for e in snap.services[web].endpoints}
            found = await wait_targets(http, base, "__meta_beacon_service", web, 2)
            assert {t["discoveredLabels"]["__address__"] for t in found} == expected
            assert {t["discoveredLabels"]["__meta_beacon_container_name"] for t in found} == {first.name, second.name}
            for target in found:
                labels = target["discoveredLabels"]
                assert (labels["__meta_beacon_state"], labels["__meta_beacon_node"]) == ("passing", app.node)
                assert labels["__meta_beacon_tags"] == ",prod,"
                assert labels["__meta_beacon_meta_metrics_path"] == "/index.html"
                # After relabelling: the metrics port and path from the container's beacon.meta.* labels.
                assert target["labels"]["instance"] == f"{labels['__meta_beacon_address']}:80"
                assert target["labels"]["service"] == web
                assert target["scrapeUrl"] == f"http://{labels['__meta_beacon_address']}:80/index.html"
            # The service without metrics labels is discovered but dropped by the keep rule.
            assert not [t for t in await active_targets(http, base) if other in str(t["discoveredLabels"])]

            second.kill(signal="SIGTERM")  # draining at once, then gone: either way no longer passing
            found = await wait_targets(http, base, "__meta_beacon_service", web, 1)
            assert {t["discoveredLabels"]["__meta_beacon_container_name"] for t in found} == {first.name}


def ours(targets: list[dict[str, Any]], label: str, service: str) -> list[dict[str, Any]]:
    return [t for t in targets if t["discoveredLabels"].get(label) == service]


async def wait_targets(http: aiohttp.ClientSession, base: str, label: str, service: str, count: int,
                       timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = ours(await active_targets(http, base), label, service)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"{base}: expected {count} targets of {service}, got {found}"
        await asyncio.sleep(0.2)
