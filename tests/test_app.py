"""The composed app: components wired together through one catalog."""

from __future__ import annotations

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
