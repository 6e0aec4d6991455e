"""The dashboard's routes on a real API listener: the shipped files, their
headers, nothing else under /ui/, and the history view."""

from __future__ import annotations

import aiohttp

from beacon.registry import Endpoint, Source
from tests.helpers import running_app


async def test_ui_serves_its_files_with_strict_headers_and_nothing_else() -> None:
    async with running_app(docker=False) as app, aiohttp.ClientSession() as session:
        base = f"http://{app.api.address}"
        async with session.get(f"{base}/ui", allow_redirects=False) as resp:
            assert resp.status == 308 and resp.headers["Location"] == "/ui/"
        async with session.get(f"{base}/ui/") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            html = await resp.text()
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
            assert f'"{name}"' in html
            async with session.get(f"{base}/ui/{name}") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith(kind)
                assert len(await resp.read()) > 100
        for path in ("/ui/..%2Fapi.py", "/ui/ui.py", "/ui/%2e%2e/%2e%2e/config.py", "/ui/app.js.bak"):
            async with session.get(base + path) as resp:
                assert resp.status == 404, path
                assert (await resp.json())["error"]
        async with session.post(f"{base}/ui/app.js") as resp:
            assert resp.status == 405


async def test_history_view_lists_changes_since_start_newest_first() -> None:
    async with running_app(docker=False) as app, aiohttp.ClientSession() as session:
        ep = Endpoint(id="m1", service="web", address="127.0.0.1", port=9, source=Source("manual"), node="n")
        app.catalog.set_source("manual:m1", [ep])
        app.catalog.publish()
        app.catalog.remove_source("manual:m1")
        app.catalog.publish()
        async with session.get(f"http://{app.api.address}/ui/history.json") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["index"] == app.catalog.snapshot.index
        assert [(t["endpoint"], t["before"], t["after"]) for t in body["transitions"]] == [
            ("m1", "passing", None),
            ("m1", None, "passing"),
        ]
