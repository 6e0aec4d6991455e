"""The data path against real backends: routing, status mapping, headers, HTTP details."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import aiohttp
import pytest

from beacon.metrics import exposition
from beacon.registry import Catalog, State
from tests.proxy.proxytest import (
    backends,
    connect,
    ep,
    free_port,
    proxy_server,
    put,
    raw_backend,
    raw_request,
    read_response,
    stat,
    url,
)


async def get_json(session: aiohttp.ClientSession, target: str, host: str, **kw: Any) -> dict[str, Any]:
    async with session.get(target, headers={"Host": host, **kw.pop("headers", {})}, **kw) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def test_routes_by_service_name_label_host_wildcard_and_path_prefix() -> None:
    cat = Catalog()
    async with backends("web", "api", "shop", "files") as (web, api, shop, files), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port, "web"))
        put(cat, "m:api", ep("api1", api.port, "api", http_hosts=("api.example.com",)))
        put(cat, "m:shop", ep("shop1", shop.port, "shop", http_hosts=("*.shop.test",)))
        put(cat, "m:files", ep("files1", files.port, "files", http_hosts=("example.com",),
                               http_path_prefix="/files", http_strip_prefix=True))  # fmt: skip
        async with aiohttp.ClientSession() as s:
            assert (await get_json(s, url(proxy, "/a?b=1"), "web.localhost"))["backend"] == "web"
            assert (await get_json(s, url(proxy, "/a?b=1"), "web.localhost"))["path"] == "/a?b=1"
            assert (await get_json(s, url(proxy), "api.example.com"))["backend"] == "api"
            assert (await get_json(s, url(proxy), "eu.shop.test"))["backend"] == "shop"
            got = await get_json(s, url(proxy, "/files/report.pdf?v=2"), "example.com")
            assert got["backend"] == "files" and got["path"] == "/report.pdf?v=2"


async def test_status_mapping_404_unknown_host_503_no_healthy_endpoint() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port, "web", state=State.CRITICAL))
        put(cat, "m:drain", ep("d1", web.port, "drained", state=State.DRAINING))
        async with aiohttp.ClientSession() as s:
            async with s.get(url(proxy), headers={"Host": "nope.localhost"}) as r:
                assert r.status == 404 and "nope.localhost" in await r.text()
                assert r.headers["X-Request-Id"] and "Retry-After" not in r.headers
            for host, name in (("web.localhost", "web"), ("drained.localhost", "drained")):
                async with s.get(url(proxy), headers={"Host": host}) as r:
                    assert r.status == 503
                    assert f"service {name} has no healthy endpoint" in await r.text()
                    # Known but unhealthy: come back soon (not a 404 a client would cache).
                    assert r.headers["Retry-After"] == "5"
            put(cat, "m:web", ep("web1", web.port, "web"))  # passing again: routed at once
            assert (await get_json(s, url(proxy), "web.localhost"))["backend"] == "web"
        assert web.requests and all(r["backend"] == "web" for r in web.requests)


async def test_hop_by_hop_headers_removed_and_forwarding_headers_added() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        async with aiohttp.ClientSession() as s:
            got = await get_json(s, url(proxy), "web.localhost", headers={
                "Connection": "keep-alive, X-Secret", "X-Secret": "hop", "Keep-Alive": "timeout=5",
                "TE": "trailers", "Proxy-Connection": "keep-alive", "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6", "X-Request-Id": "trace-42",
                "X-Keep": "yes",
            })  # fmt: skip
    h = {k.lower(): v for k, v in got["headers"].items()}
    for gone in ("x-secret", "keep-alive", "te", "proxy-connection", "forwarded"):
        assert gone not in h, gone
    assert h["x-keep"] == "yes"
    assert h["x-forwarded-for"] == "127.0.0.1"  # the untrusted client's claim is replaced
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == "web.localhost"
    assert h["x-request-id"] == "trace-42"  # an incoming request id is kept
    assert h["host"] == "web.localhost"


async def test_trusted_proxies_x_forwarded_headers_are_extended() -> None:
    cat = Catalog()
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with backends("web") as (web,), proxy_server(cat, trusted_proxies=trusted) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        async with aiohttp.ClientSession() as s:
            got = await get_json(s, url(proxy), "web.localhost", headers={
                "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.example",
            })  # fmt: skip
            plain = await get_json(s, url(proxy), "web.localhost")
    h = {k.lower(): v for k, v in got["headers"].items()}
    assert h["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "https"
    assert h["x-forwarded-host"] == "shop.example"
    request_id = {k.lower(): v for k, v in plain["headers"].items()}["x-request-id"]
    assert len(request_id) > 8  # generated when the client sent none


async def test_response_hop_by_hop_headers_are_removed() -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Internal\r\n"
            b"X-Internal: secret\r\nKeep-Alive: timeout=5\r\nX-Public: yes\r\nTrailer: X-T\r\n\r\nok"
        )

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            reader, writer = await connect(proxy)
            writer.write(b"GET / HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
            status, headers, body = await read_response(reader)
            writer.close()
    finally:
        await backend.stop()
    assert (status, body) == (200, b"ok")
    assert headers["x-public"] == "yes"
    assert not {"x-internal", "keep-alive", "trailer", "connection"} & set(headers)


async def test_keep_alive_on_both_sides_reuses_one_upstream_connection_and_pipelines() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        reader, writer = await connect(proxy)
        req = b"GET /n HTTP/1.1\r\nHost: web.localhost\r\n\r\n"
        for _ in range(5):
            writer.write(req)
            status, _, body = await read_response(reader)
            assert status == 200 and b'"backend": "web"' in body
        writer.write(req.replace(b"/n", b"/p1") + req.replace(b"/n", b"/p2") + req.replace(b"/n", b"/p3"))
        paths = []
        for _ in range(3):
            status, _, body = await read_response(reader)
            paths.append(body.split(b'"path": "')[1].split(b'"')[0])
        writer.close()
    assert paths == [b"/p1", b"/p2", b"/p3"]  # pipelined requests answered in order
    assert len(web.connections) == 1  # eight requests, one pooled upstream connection


async def test_chunked_request_and_chunked_response() -> None:
    cat = Catalog()

    async def parts() -> Any:
        for i in range(20):
            yield b"%05d" % i * 100

    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        async with aiohttp.ClientSession() as s:
            async with s.post(url(proxy, "/up"), data=parts(), headers={"Host": "web.localhost"}) as r:
                got = await r.json()
            assert got["body_len"] == 20 * 500
            assert got["headers"].get("Transfer-Encoding") == "chunked"
            async with s.get(url(proxy, "/chunked"), headers={"Host": "web.localhost"}) as r:
                assert r.headers.get("Transfer-Encoding") == "chunked"
                assert await r.text() == "part0;part1;part2;part3;part4;"


async def test_head_has_no_body_and_the_connection_stays_usable() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        reader, writer = await connect(proxy)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        status, headers, _ = await read_response(reader, head_request=True)
        assert status == 200 and int(headers["content-length"]) > 0
        writer.write(b"GET /after HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        status, _, body = await read_response(reader)
        writer.close()
    assert status == 200 and b"/after" in body  # no stray body bytes in between


async def test_expect_100_continue() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_max_body_size=1000) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        reader, writer = await connect(proxy)
        writer.write(b"POST /e HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        status, _, body = await read_response(reader)
        assert status == 200 and b'"body_len": 5' in body
        # Too large: refused before the body is sent, and the connection closes.
        writer.write(b"POST /e HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        writer.close()
        # curl, an independent client, agrees.
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-H", "Host: web.localhost", "-H", "Expect: 100-continue", "--data-binary", "x" * 900,
            url(proxy, "/curl"), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
    assert b'"body_len": 900' in out


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS to a plain-HTTP port
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
        (b"TRACE / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n", 405),  # would echo the request back (XST)
        (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nExpect: magic\r\n\r\n", 417),
        (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: web.localhost\r\n\r\n", 431),
    ],
)
async def test_bad_requests_get_a_clear_4xx_and_never_reach_the_backend(request_bytes: bytes, status: int) -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        raw = await raw_request(proxy.address, request_bytes)
        assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:200]
        assert b"Content-Type: text/plain" in raw and b"Traceback" not in raw
        # and the proxy keeps serving
        again = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 200 ")
    assert len(web.requests) == 1


async def test_header_size_limit_is_configurable() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_max_header_size=2048) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        ok = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-A: " + b"a" * 1000
                               + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        big = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-A: " + b"a" * 3000
                                + b"\r\n\r\n")  # fmt: skip
    assert ok.startswith(b"HTTP/1.1 200 ") and big.startswith(b"HTTP/1.1 431 ")


async def test_body_size_limit_for_content_length_and_chunked() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat, proxy_max_body_size=1024) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        by_length = await raw_request(proxy.address, b"POST / HTTP/1.1\r\nHost: web.localhost\r\n"
                                      b"Content-Length: 2000\r\n\r\n" + b"a" * 2000)  # fmt: skip
        chunk = b"%x\r\n%s\r\n" % (600, b"b" * 600)
        chunked = await raw_request(proxy.address, b"POST / HTTP/1.1\r\nHost: web.localhost\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")  # fmt: skip
    assert by_length.startswith(b"HTTP/1.1 413 ")
    assert chunked.startswith(b"HTTP/1.1 413 ")
    assert all(r["body_len"] <= 1024 for r in web.requests)


async def test_http10_client_gets_a_close_delimited_response_from_a_chunked_upstream() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        raw = await raw_request(proxy.address, b"GET /chunked HTTP/1.0\r\nHost: web.localhost\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
    assert body == b"part0;part1;part2;part3;part4;"


async def test_close_delimited_upstream_response_is_rechunked_for_http11_clients() -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        transport.close()

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            reader, writer = await connect(proxy)
            for _ in range(2):  # the client connection survives the upstream's close
                writer.write(b"GET / HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                status, headers, body = await read_response(reader)
                assert (status, body, headers["transfer-encoding"]) == (200, b"until the end", "chunked")
            writer.close()
    finally:
        await backend.stop()


async def test_sticky_sessions_by_cookie() -> None:
    cat = Catalog()
    async with backends("a", "b", "c") as bs, proxy_server(cat) as proxy:
        put(cat, "m:web", *[ep(f"web-{b.name}", b.port, "web", lb="sticky") for b in bs])
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as first:  # an IP host
            async with first.get(url(proxy), headers={"Host": "web.localhost"}) as r:
                owner = (await r.json())["backend"]
                assert "beacon_web" in r.cookies
            seen = {(await get_json(first, url(proxy), "web.localhost"))["backend"] for _ in range(9)}
        assert seen == {owner}
        async with aiohttp.ClientSession() as other:  # no cookie: balanced as usual
            spread = {(await get_json(other, url(proxy), "web.localhost", headers={"Cookie": ""}))["backend"]
                      for _ in range(6)}  # fmt: skip
        assert len(spread) == 3


async def test_least_conn_sends_new_requests_to_the_idle_endpoint() -> None:
    cat = Catalog()
    async with backends("a", "b") as (a, b), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("wa", a.port, "web", lb="least_conn"), ep("wb", b.port, "web", lb="least_conn"))
        async with aiohttp.ClientSession() as s:
            slow = asyncio.ensure_future(s.get(url(proxy, "/slow?s=1"), headers={"Host": "web.localhost"}))
            await asyncio.sleep(0.3)
            quick = [(await get_json(s, url(proxy), "web.localhost"))["backend"] for _ in range(4)]
            resp = await slow
            busy = (await resp.text()).split()[-1]
            resp.release()
        assert busy not in quick  # every quick request went to the endpoint not busy


async def test_metrics_count_requests_retries_and_latency() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port, "metered"))
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                await get_json(s, url(proxy), "metered.localhost")
            async with s.get(url(proxy), headers={"Host": "unknown.localhost"}) as r:
                assert r.status == 404
        text = exposition()[0].decode()
    assert 'beacon_proxy_requests_total{code="200",method="GET",service="metered"} 3.0' in text
    assert 'beacon_proxy_requests_total{code="404",method="GET",service="unrouted"}' in text
    assert 'beacon_proxy_upstream_attempts_total{service="metered"} 3.0' in text
    assert 'beacon_proxy_request_duration_seconds_count{service="metered"} 3.0' in text
    assert 'beacon_proxy_open_connections{side="upstream"}' in text


async def test_metrics_of_a_service_that_left_the_catalog_are_dropped() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:gone", ep("g1", web.port, "gone"))
        put(cat, "m:kept", ep("k1", web.port, "kept"))
        assert proxy.address is not None
        for host in (b"gone.localhost", b"kept.localhost"):
            raw = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 ")
        assert stat(proxy, "gone", "attempts") == stat(proxy, "kept", "attempts") == 1
        # Services come and go with containers: their stats must not pile up.
        cat.remove_source("m:gone")
        cat.publish()
        assert all("gone" not in r["services"] for r in proxy.metrics_json())
        text = exposition()[0].decode()
    assert 'service="gone"' not in text
    assert 'beacon_proxy_requests_total{code="200",method="GET",service="kept"} 1.0' in text


async def test_the_app_wires_the_proxy_to_its_catalog() -> None:
    from tests.helpers import running_app

    async with backends("web") as (web,), running_app(docker=False) as app:
        put(app.catalog, "manual:x", ep("x", web.port, "wired"))
        assert app.proxy.address is not None
        raw = await raw_request(app.proxy.address, b"GET / HTTP/1.1\r\nHost: wired.localhost\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")


async def test_response_head_split_across_reads_and_interim_responses() -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        parts = [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nX-Pa", b"rt: two\r\nConte",
                 b"nt-Length: 5\r\nConnection: keep-alive\r\n", b"\r\nhel", b"lo"]  # fmt: skip
        for i, part in enumerate(parts):
            loop.call_later(0.02 * i, transport.write, part)

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            reader, writer = await connect(proxy)
            for _ in range(2):
                writer.write(b"GET / HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                status, headers, body = await read_response(reader)
                assert (status, body, headers["x-part"]) == (200, b"hello", "two")
                assert "connection" not in headers and "link" not in headers
            writer.close()
    finally:
        await backend.stop()
    assert len(backend.heads) == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the upstream closes: held, so a 502
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nshort",  # too large to hold: forwarded, cut off
    ],
)
async def test_a_broken_upstream_response_is_a_502(reply: bytes) -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(reply)
        transport.close()

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat, proxy_attempts=1) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            assert proxy.address is not None
            raw = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: raw.localhost\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    if b"100000" in reply:
        # The head was already forwarded: the client sees a cut-off body, never a fake success.
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"short")
    else:
        assert raw.startswith(b"HTTP/1.1 502 "), raw[:100]


@pytest.mark.parametrize("target", [b"/api/../admin/", b"/api/%2e%2e/admin/", b"/api//../admin/", b"/api/%2E%2E/admin/"])
async def test_dot_segments_cannot_escape_a_path_prefix_route(target: bytes) -> None:
    cat = Catalog()
    async with backends("api") as (api,), proxy_server(cat) as proxy:
        put(cat, "m:api", ep("api1", api.port, "api", http_hosts=("site.test",), http_path_prefix="/api"))
        assert proxy.address is not None
        raw = await raw_request(proxy.address, b"GET " + target + b" HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404 "), raw[:100]  # as nginx's location /api/
        ok = await raw_request(proxy.address, b"GET /api/./v1/../users HTTP/1.1\r\nHost: site.test\r\n"
                               b"Connection: close\r\n\r\n")  # fmt: skip
        assert ok.startswith(b"HTTP/1.1 200 ")
    assert [r["path"] for r in api.requests] == ["/api/users"]  # the normalised path is what is forwarded


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET http://web.localhost/abs HTTP/1.1\r\nHost: evil.example\r\n", "web.localhost"),  # RFC 9112 §3.2.2
        (b"GET http://web.localhost:8080/abs HTTP/1.1\r\n", "web.localhost:8080"),  # no Host: the authority
        (b"GET /abs HTTP/1.1\r\nHost: web.localhost\r\nConnection: keep-alive, Host\r\n", "web.localhost"),
    ],
)
async def test_the_upstream_gets_the_host_the_request_was_routed_by(head: bytes, host: str) -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:web", ep("web1", web.port))
        assert proxy.address is not None
        raw = await raw_request(proxy.address, head + b"Connection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
    headers = {k.lower(): v for k, v in web.requests[0]["headers"].items()}
    assert headers["host"] == host
    assert web.requests[0]["path"] == "/abs"


STRAY = b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\nContent-Length: 0\r\n\r\n"


async def test_bytes_sent_late_after_a_head_response_never_reach_another_client() -> None:
    # The upstream answers HEAD with the Content-Length a GET would have, then
    # sends that many bytes anyway - a whole response - 0.3 s later, while
    # another client's request may already be on that connection.
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        if head.startswith(b"HEAD "):
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(STRAY))
            loop.call_later(0.3, transport.write, STRAY)
        else:
            loop.call_later(0.5, transport.write, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            assert proxy.address is not None
            first = await raw_request(proxy.address, b"HEAD / HTTP/1.1\r\nHost: raw.localhost\r\nConnection: close\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200 ")
            other = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: raw.localhost\r\nConnection: close\r\n\r\n")
    finally:
        await backend.stop()
    assert b"attacker" not in other
    assert other.startswith(b"HTTP/1.1 200 ") and other.endswith(b"\r\n\r\nreal")


async def test_bytes_on_an_idle_pooled_connection_or_behind_a_204_are_never_forwarded() -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        if b" /idle " in head:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            loop.call_later(0.1, transport.write, STRAY)  # while the connection is idle in the pool
        elif b" /nocontent " in head:
            transport.write(b"HTTP/1.1 204 No Content\r\n\r\n" + STRAY)  # behind a 204, same read
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            reader, writer = await connect(proxy)
            for path in (b"/idle", b"/nocontent"):
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                status, _, _ = await read_response(reader)
                assert status in (200, 204)
                await asyncio.sleep(0.2)  # the stray bytes arrive in between (scenario time, not a wait for a condition)
                writer.write(b"GET /next HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                status, headers, body = await read_response(reader)
                assert (status, body) == (200, b"real") and "set-cookie" not in headers
            writer.close()
    finally:
        await backend.stop()


async def test_an_endpoint_that_is_not_http_never_gets_a_request() -> None:
    cat = Catalog()
    async with backends("web") as (web,), proxy_server(cat) as proxy:
        put(cat, "m:dns", ep("u1", web.port, "dns", protocol="udp"))
        put(cat, "m:web", ep("w1", web.port, "web"), ep("w2", free_port(), "web", protocol="udp", weight=100))
        assert proxy.address is not None
        raw = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: dns.localhost\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404 ")
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                await get_json(s, url(proxy), "web.localhost")
        assert stat(proxy, "web", "attempts") == 4
    assert len(web.requests) == 4


async def test_thousands_of_pipelined_requests_are_all_answered_without_a_spurious_431() -> None:
    def ok(head: bytes, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = await raw_backend(ok)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            assert proxy.address is not None
            n = 5000
            one = b"GET /p HTTP/1.1\r\nHost: raw.localhost\r\nX-Pad: %s\r\n\r\n" % (b"p" * 20)
            last = b"GET /p HTTP/1.1\r\nHost: raw.localhost\r\nConnection: close\r\n\r\n"
            raw = await raw_request(proxy.address, one * (n - 1) + last, timeout=30)
    finally:
        await backend.stop()
    assert raw.count(b"HTTP/1.1 431 ") == 0
    assert raw.count(b"HTTP/1.1 200 ") == n


async def test_204_and_304_responses_carry_only_the_framing_headers_they_may() -> None:
    def answer(head: bytes, transport: asyncio.Transport) -> None:
        if b" /204 " in head:
            transport.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n")
        elif b" /204te " in head:
            transport.write(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif b" /304 " in head:
            transport.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n')
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

    backend = await raw_backend(answer)
    cat = Catalog()
    try:
        async with proxy_server(cat) as proxy:
            put(cat, "m:raw", ep("r1", backend.port, "raw"))
            reader, writer = await connect(proxy)
            for path, status in ((b"/204", 204), (b"/204te", 204), (b"/304", 304)):
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                got, headers, _ = await read_response(reader)
                assert got == status
                if status == 204:  # RFC 9110 8.6 / RFC 9112 6.1: neither on a 204
                    assert "content-length" not in headers and "transfer-encoding" not in headers, headers
                else:  # a 304's Content-Length is the selected representation's: passed on as it is
                    assert headers["content-length"] == "1234" and headers["etag"] == '"v1"'
                writer.write(b"GET /after HTTP/1.1\r\nHost: raw.localhost\r\n\r\n")
                assert (await read_response(reader))[2] == b"next"  # framing held: the next answer is intact
            writer.close()
    finally:
        await backend.stop()
