"""What an operator's Prometheus scrapes from /metrics passes Prometheus's own
linter, `promtool check metrics` (Debian's prometheus package), after the
proxy, DNS and the API have all served something."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import aiohttp
import dns.asyncquery
import dns.message

from beacon import __version__
from beacon.registry import Endpoint, Source
from tests.helpers import running_app


async def test_metrics_pass_promtool_check() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (make test-deps installs Debian's prometheus)"
    async with running_app(docker=False) as app, aiohttp.ClientSession() as session:
        ep = Endpoint(id="m1", service="web", address="127.0.0.1", port=9, source=Source("manual"))
        app.catalog.set_source("manual:m1", [ep])
        app.catalog.publish()
        assert app.proxy.address is not None
        async with session.get(f"http://{app.proxy.address}/", headers={"Host": "web.localhost"}) as resp:
            assert resp.status in (502, 503)  # nothing listens on port 9
        async with session.get(f"http://{app.proxy.address}/", headers={"Host": "nowhere.localhost"}) as resp:
            assert resp.status == 404
        dns_address = app.dns.addresses[0]
        query = dns.message.make_query("web.service.beacon", "A")
        await dns.asyncquery.udp(query, dns_address.host, port=dns_address.port, timeout=5)
        async with session.get(f"http://{app.api.address}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert "beacon_proxy_requests_total" in text and "beacon_dns_" in text
    assert re.search(rf'^beacon_build_info\{{.*version="{re.escape(__version__)}".*\}} 1\.0$', text, re.M), text
    assert re.search(r"^beacon_docker_connected 0\.0$", text, re.M)  # --docker false
    result = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
