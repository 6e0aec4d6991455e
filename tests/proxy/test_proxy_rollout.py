"""Zero-error rollout on the real Docker engine: the whole Beacon, three busybox
backends published on 127.0.0.1, bounded GET load through the proxy while one
backend is stopped and another restarted. No 5xx, no connection error.

The busybox httpd exits at once on SIGTERM; Beacon drains the container on the
kill event (before `die`), and the refused connects of that short window are
retried on another endpoint (with 8 clients and retries off, in-flight requests
reset by the exiting container show up as 502s in most runs).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually, running_app

LOOPBACK_PORT = {"80/tcp": ("127.0.0.1", None)}


@pytest.mark.docker
async def test_stop_and_restart_under_load_without_errors(run_container: ContainerFactory) -> None:
    service = f"roll{RUN_ID}"
    containers = [run_container(labels={"beacon.service": service}, ports=LOOPBACK_PORT) for _ in range(3)]
    ids = {c.id[:12] for c in containers}
    host = {"Host": f"{service}.localhost"}
    async with running_app(proxy_attempts=3, proxy_connect_timeout=1.0) as app:

        def passing() -> bool:
            svc = app.catalog.snapshot.services.get(service)
            return svc is not None and len(svc.passing) == 3

        await eventually(passing, timeout=20)
        assert app.proxy.address is not None
        target = f"http://{app.proxy.address}/"
        statuses: Counter[int] = Counter()
        errors: list[str] = []
        served: Counter[str] = Counter()
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            for _ in range(5000):  # bounded in count, and in time by `stop`
                if stop.is_set():
                    return
                try:
                    async with session.get(target, headers=host, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        body = (await r.text()).strip()
                        statuses[r.status] += 1
                        if r.status == 200:
                            served[body] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(repr(exc))

        stopped, restarted, _ = containers
        async with aiohttp.ClientSession() as session:
            load = [asyncio.ensure_future(client(session)) for _ in range(8)]
            await asyncio.sleep(1.0)
            before = dict(served)
            await asyncio.to_thread(stopped.stop, timeout=10)
            await asyncio.to_thread(restarted.restart, timeout=10)
            restarted_at = time.monotonic()
            # keep the load on until the restarted backend serves again (bounded)
            await eventually(lambda: served[restarted.id[:12]] > before.get(restarted.id[:12], 0)
                             and time.monotonic() - restarted_at > 1.0, timeout=20)  # fmt: skip
            stop.set()
            await asyncio.gather(*load)

    assert set(before) == ids  # all three took traffic before the rollout
    assert errors == [], errors[:5]
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 100
