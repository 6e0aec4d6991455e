"""--access-log: one escaped line per finished request, to a file or stdout,
written off the loop in batches; --log-format json for Beacon's own logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from beacon.config import ConfigError, build_config
from beacon.metrics import exposition
from beacon.proxy.accesslog import AccessLog, access_log_format, escape
from beacon.proxy.exchange import Exchange
from beacon.registry import Catalog
from tests.helpers import eventually, test_config
from tests.proxy.proxytest import backends, ep, free_port, proxy_server, put, raw_request

# nginx's combined format, then Beacon's key=value fields.
COMBINED = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" rid=(?P<rid>\S+) service=(?P<service>\S+) '
    r"endpoint=(?P<endpoint>\S+) upstream=(?P<upstream>\S+) duration_ms=(?P<ms>[\d.]+) retries=(?P<retries>\d+)$"
)
JSON_KEYS = {"time", "request_id", "client", "method", "path", "protocol", "status", "service", "endpoint",
             "upstream", "duration_ms", "bytes", "retries", "referer", "user_agent"}  # fmt: skip


def lines_of(path: Path) -> list[str]:
    return path.read_text("ascii").splitlines() if path.exists() else []


async def at_least(path: Path, count: int) -> list[str]:
    """The log's lines once it has `count` of them (the writer thread writes after the response)."""

    def probe() -> list[str] | None:
        lines = lines_of(path)
        return lines if len(lines) >= count else None

    return await eventually(probe)


def get(path: str, host: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


async def test_combined_lines_for_a_200_a_404_and_a_502_after_retries(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        put(cat, "m:dead", ep("dead1", free_port(), "dead"), ep("dead2", free_port(), "dead"))
        async with proxy_server(cat, access_log=str(log_file)) as proxy:
            assert proxy.address is not None
            ok = await raw_request(
                proxy.address,
                get("/hello?x=1", "web.localhost", "User-Agent: curl/8.5\r\nReferer: http://r.test/\r\n"),
            )
            assert ok.startswith(b"HTTP/1.1 200 ")
            missing = await raw_request(proxy.address, get("/", "nope.localhost"))
            assert missing.startswith(b"HTTP/1.1 404 ")
            bad = await raw_request(proxy.address, get("/x", "dead.localhost"))
            assert bad.startswith(b"HTTP/1.1 502 ")
            lines = await at_least(log_file, 3)
    assert len(lines) == 3, lines
    parsed = [COMBINED.match(line) for line in lines]
    assert all(parsed), lines
    first, second, third = (m.groupdict() for m in parsed if m)
    rid = re.search(rb"X-Request-Id: (\S+)", ok)
    assert rid is not None
    assert first == first | {
        "client": "127.0.0.1", "request": "GET /hello?x=1 HTTP/1.1", "status": "200", "referer": "http://r.test/",
        "agent": "curl/8.5", "rid": rid.group(1).decode(), "service": "web", "endpoint": "web1",
        "upstream": f"127.0.0.1:{web.port}", "retries": "0",
    }  # fmt: skip
    assert int(first["bytes"]) == len(ok)  # everything written to the client, head included
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", first["time"])
    assert second == second | {"status": "404", "service": "-", "endpoint": "-", "upstream": "-", "retries": "0",
                               "referer": "-", "agent": "-"}  # fmt: skip
    assert int(second["bytes"]) == len(missing)
    assert third["status"] == "502" and third["service"] == "dead"
    assert int(third["retries"]) >= 1 and third["endpoint"] in ("dead1", "dead2")


async def test_hostile_bytes_are_escaped_and_never_split_a_line(tmp_path: Path) -> None:
    assert escape(b'/a\nb\x1b[31m"\\\xff') == "/a\\x0ab\\x1b[31m\\x22\\x5c\\xff"
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log=str(log_file)) as proxy:
            assert proxy.address is not None
            sent = [
                # Reaches the backend: quote and backslash in the path, tab and obs-text in headers.
                get(
                    '/q"uote\\back', "web.localhost", 'User-Agent: evil\t\xff"agent\r\nX-Request-Id: id"1\r\n'
                ).replace(b"\xc3\xbf", b"\xff"),
                # Rejected by the parser (400), the raw bytes still in the request line.
                b"GET /a\nb HTTP/1.1\r\nHost: web.localhost\r\n\r\n",
                b"GET /esc\x1b[2J HTTP/1.1\r\nHost: web.localhost\r\n\r\n",
            ]
            answers = [await raw_request(proxy.address, data) for data in sent]
            assert answers[0].startswith(b"HTTP/1.1 200 ")
            assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers[1:]), answers
            lines = await at_least(log_file, 3)
    assert len(lines) == 3, lines  # no request made two lines
    for line in lines:
        assert all(0x20 <= ord(ch) < 0x7F for ch in line), line
    assert '"GET /q\\x22uote\\x5cback HTTP/1.1"' in lines[0]
    assert '"evil\\x09\\xff\\x22agent"' in lines[0] and "rid=id\\x221 " in lines[0]
    assert all(" 400 " in line for line in lines[1:])


async def test_json_lines_carry_every_field(tmp_path: Path) -> None:
    log_file = tmp_path / "access.json"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        put(cat, "m:dead", ep("dead1", free_port(), "dead"), ep("dead2", free_port(), "dead"))
        async with proxy_server(cat, access_log=str(log_file), access_log_format="json") as proxy:
            assert proxy.address is not None
            ok = await raw_request(
                proxy.address, get("/p\x1b".replace("\x1b", "%1B"), "web.localhost", "User-Agent: t\r\n")
            )
            await raw_request(proxy.address, get("/", "dead.localhost"))
            lines = await at_least(log_file, 2)
    first, second = (json.loads(line) for line in lines)
    assert set(first) == JSON_KEYS and set(second) == JSON_KEYS
    rid = re.search(rb"X-Request-Id: (\S+)", ok)
    assert rid is not None
    assert first | {"time": "", "duration_ms": 0} == {
        "time": "", "request_id": rid.group(1).decode(), "client": "127.0.0.1", "method": "GET", "path": "/p%1B",
        "protocol": "HTTP/1.1", "status": 200, "service": "web", "endpoint": "web1",
        "upstream": f"127.0.0.1:{web.port}", "duration_ms": 0, "bytes": len(ok), "retries": 0, "referer": None,
        "user_agent": "t",
    }  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] > 0
    assert second["status"] == 502 and second["retries"] >= 1 and second["endpoint"] in ("dead1", "dead2")


async def test_stdout_sink_and_the_log_is_off_by_default(capfd: pytest.CaptureFixture[str]) -> None:
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat) as proxy:
            assert proxy.core is not None and proxy.core.access_log is None
        async with proxy_server(cat, access_log="-") as proxy:
            assert proxy.address is not None
            await raw_request(proxy.address, get("/out", "web.localhost"))
            seen: list[str] = []

            def logged() -> list[str]:
                seen.extend(line for line in capfd.readouterr().out.splitlines() if "GET /out" in line)
                return seen

            await eventually(logged)
    assert COMBINED.match(seen[0]) and len(seen) == 1, seen


async def test_two_worker_processes_append_whole_lines_to_one_file(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(
            cat, access_log=str(log_file), proxy_workers=2, shutdown_timeout=3.0
        ) as proxy:
            assert proxy.address is not None
            answers = await asyncio.gather(*(raw_request(proxy.address, get(f"/n{i}", "web.localhost"))
                                             for i in range(60)))  # fmt: skip
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
            lines = await at_least(log_file, 60)
    assert len(lines) == 60
    assert all(COMBINED.match(line) for line in lines), lines
    assert sorted(int(re.search(r"GET /n(\d+) ", line).group(1)) for line in lines) == list(range(60))  # type: ignore[union-attr]


async def test_a_sink_that_cannot_keep_up_drops_and_counts_instead_of_blocking() -> None:
    read_end, write_end = os.pipe()  # stdout as a pipe nobody reads for now
    loop = asyncio.get_running_loop()
    alog = AccessLog("-", "combined", loop, stdout_fd=write_end, max_backlog=256 * 1024)
    alog.start()
    assert os.get_blocking(write_end)  # the log's own description is non-blocking, stdout's is not
    client: Any = SimpleNamespace(peer=b"127.0.0.1")
    ex = Exchange(client)
    ex.method, ex.url, ex.reqid, ex.status = b"GET", b"/" + b"x" * 200, b"r1", 200
    for _ in range(20):
        for _ in range(500):
            alog.record(ex, 200, 10)
        await asyncio.sleep(0)  # a loop turn: the batch is written (or kept)
    assert alog.dropped > 0 and alog.backlog > 0  # the loop never waited for the pipe
    os.set_blocking(read_end, False)
    chunks: list[bytes] = []

    def read() -> bool:
        try:
            while True:
                chunks.append(os.read(read_end, 1 << 20))
        except BlockingIOError:
            pass
        return alog.backlog == 0

    await eventually(read)  # once the reader drains the pipe, the rest follows
    alog.stop()
    read()
    os.close(read_end)
    os.close(write_end)
    written = b"".join(chunks)
    assert written.endswith(b"\n") and written.count(b"\n") == 20 * 500 - alog.dropped
    assert all(line.startswith(b"127.0.0.1 - - [") for line in written.splitlines())


def test_long_fields_are_cut_and_never_mid_escape() -> None:
    assert escape(b"a" * 2000) == "a" * 768 + "..."
    assert escape(b"\x01" * 300, 10) == "\\x01\\x01..."  # 12 would cut the third escape
    assert escape(b"ok", 10) == "ok"


def test_dropped_lines_are_a_metric() -> None:
    assert "beacon_proxy_access_log_dropped_total" in exposition()[0].decode()


def test_options_and_their_env_vars() -> None:
    config = build_config({}, {"BEACON_ACCESS_LOG": "/tmp/a.log", "BEACON_LOG_FORMAT": "json"})
    assert (config.access_log, config.log_format, access_log_format(config)) == ("/tmp/a.log", "json", "json")
    assert access_log_format(test_config(access_log="-")) == "combined"
    assert (
        access_log_format(test_config(access_log="-", log_format="json", access_log_format="common"))
        == "common"
    )
    with pytest.raises(ConfigError, match="--access-log-format"):
        build_config({"access_log_format": "xml"}, {})
    with pytest.raises(ConfigError, match="needs --access-log"):
        build_config({"access_log_format": "json"}, {})
    with pytest.raises(ConfigError, match="BEACON_LOG_FORMAT"):
        build_config({}, {"BEACON_LOG_FORMAT": "yaml"})


def test_log_format_json_writes_one_parseable_object_per_event() -> None:
    script = ("import logging; from beacon.logs import setup_logging; setup_logging('info', 'json'); "
              "log = logging.getLogger('beacon.registry'); log.info('added: endpoint %s', 'web1\\nforged'); "
              "log.debug('hidden: below the level')\n"
              "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('failed: a sum')")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(events) == 2, done.stderr
    added, failed = events
    assert added | {"time": ""} == {"time": "", "level": "info", "logger": "beacon.registry",
                                    "message": "added: endpoint web1\nforged"}  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", added["time"])
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]


async def test_workers_write_stdout_lines_to_the_beacon_process_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log="-", proxy_workers=2, shutdown_timeout=3.0) as proxy:
            assert proxy.address is not None
            answers = await asyncio.gather(*(raw_request(proxy.address, get(f"/w{i}", "web.localhost"))
                                             for i in range(40)))  # fmt: skip
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
            seen: list[str] = []

            def logged() -> bool:
                seen.extend(line for line in capfd.readouterr().out.splitlines() if "GET /w" in line)
                return len(seen) >= 40

            await eventually(logged)
    assert len(seen) == 40 and all(COMBINED.match(line) for line in seen), seen


async def test_a_file_that_cannot_be_opened_fails_the_start_naming_it(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=f"^access log {tmp_path}/no/such.log: No such file or directory$"):
        async with proxy_server(Catalog(), access_log=str(tmp_path / "no" / "such.log")):
            pass


async def test_a_client_that_leaves_before_the_answer_is_logged_as_499(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log=str(log_file)) as proxy:
            assert proxy.address is not None
            _, writer = await asyncio.open_connection(proxy.address.host, proxy.address.port)
            writer.write(get("/slow?s=3", "web.localhost"))
            await writer.drain()
            core = proxy.core
            assert core is not None
            await eventually(lambda: core.balancer.in_flight().get("web"))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # a reset: the client is gone, not just done sending
            (line,) = await at_least(log_file, 1)
    m = COMBINED.match(line)
    assert m is not None and m["status"] == "499" and m["endpoint"] == "web1" and m["bytes"] == "0", line


# ------------------------------------ connections that never make a whole request
REFUSED = re.compile(
    r'^(?P<client>\S+) - - \[[^\]]+\] "-" 503 (?P<bytes>\d+) "-" "-" rid=- service=- endpoint=- upstream=- '
    r"duration_ms=0\.000 retries=0 refused=(?P<refused>\d+) clients=(?P<clients>\d+) cap=(?P<cap>\d+)$"
)


async def test_header_timeouts_and_unparsable_requests_are_logged(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log=str(log_file), proxy_header_timeout=0.5) as proxy:
            assert proxy.address is not None
            # Slowloris: half a request line, then a whole line and one header: both cut with a 408.
            cut = await asyncio.gather(
                raw_request(proxy.address, b"GET /half"),
                raw_request(proxy.address, b"GET /lines HTTP/1.1\r\nHost: web.localhost\r\nX-A: 1"),
            )
            assert all(a.startswith(b"HTTP/1.1 408 ") for a in cut), cut
            # Not HTTP at all (a TLS ClientHello on the plain port), and a header over the limit.
            garbage = await raw_request(proxy.address, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32)
            big = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: "
                                    + b"a" * 70_000 + b"\r\n\r\n")  # fmt: skip
            assert garbage.startswith(b"HTTP/1.1 400 ") and big.startswith(b"HTTP/1.1 431 ")
            # A connection that sends nothing is closed at the timeout without a line (as nginx does).
            silent = await raw_request(proxy.address, b"")
            assert silent == b""
            ok = await raw_request(proxy.address, get("/after", "web.localhost"))
            assert ok.startswith(b"HTTP/1.1 200 ")
            lines = await at_least(log_file, 5)
    parsed = [COMBINED.match(line) for line in lines]
    assert all(parsed), lines
    fields = [m.groupdict() for m in parsed if m]
    assert len(fields) == 5 and fields[-1]["request"] == "GET /after HTTP/1.1", lines
    timeouts = sorted((f for f in fields if f["status"] == "408"), key=lambda f: f["request"])
    assert [f["request"] for f in timeouts] == ["GET /half HTTP/1.1", "GET /lines HTTP/1.1"], lines
    for f in timeouts:  # the client, and how long it held the connection
        assert f["client"] == "127.0.0.1" and f["service"] == "-" and float(f["ms"]) >= 400, f
    assert sorted(int(f["bytes"]) for f in timeouts) == sorted(len(a) for a in cut)
    assert {f["status"] for f in fields[:-1]} == {"408", "400", "431"}, lines
    for f in fields:
        rid = f["rid"]
        assert rid != "-" and any(rid.encode() in a for a in (*cut, garbage, big, ok)), f  # the X-Request-Id sent


async def test_refused_connections_are_summed_up_once_a_second_not_one_line_each(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log=str(log_file), proxy_max_connections=2) as proxy:
            assert proxy.address is not None
            busy = [await asyncio.open_connection(proxy.address.host, proxy.address.port) for _ in range(2)]
            for _, w in busy:
                w.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")  # a head in progress: not idle
            await eventually(lambda: proxy.core is not None and len(proxy.core.clients) == 2)
            # A flood of 300 connections over the cap (bounded: 50 at a time).
            answers: list[bytes] = []
            for _ in range(6):
                answers += await asyncio.gather(*(raw_request(proxy.address, b"") for _ in range(50)))
            assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers)

            def summed() -> list[re.Match[str]] | None:
                hits = [m for m in map(REFUSED.match, lines_of(log_file)) if m]
                return hits if sum(int(m["refused"]) for m in hits) >= 300 else None

            hits = await eventually(summed, timeout=5)
            for _, w in busy:
                w.close()
    assert sum(int(m["refused"]) for m in hits) == 300
    assert len(hits) <= 3, [m.group() for m in hits]  # a line a second, whatever the flood
    assert all(m["client"] == "127.0.0.1" and m["clients"] == "1" and m["cap"] == "2" for m in hits)
    assert sum(int(m["bytes"]) for m in hits) == sum(len(a) for a in answers)
    assert len(lines_of(log_file)) == len(hits)  # nothing else was logged for them


async def test_the_refusal_line_in_json_and_at_stop(tmp_path: Path) -> None:
    target = tmp_path / "access.json"
    log = AccessLog(str(target), "json", asyncio.get_running_loop(), wall=lambda: 1_780_000_000.25)
    log.start()
    for peer in (b"10.0.0.1", b"10.0.0.2", b"10.0.0.2"):
        log.refused(peer, 100, 7)
    log.stop()  # before the window ends: the refusals so far are written, not lost
    (line,) = lines_of(target)
    record = json.loads(line)
    assert set(record) == JSON_KEYS | {"refused", "clients", "cap"}
    assert record | {"time": ""} == record | {
        "time": "", "client": "10.0.0.2", "status": 503, "bytes": 300, "refused": 3, "clients": 2, "cap": 7,
        "method": None, "path": None, "request_id": None,
    }  # fmt: skip


async def test_a_worker_process_sums_up_its_refusals_too(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    cat = Catalog()
    async with backends("web") as (web,):
        put(cat, "m:web", ep("web1", web.port))
        async with proxy_server(cat, access_log=str(log_file), proxy_max_connections=2, proxy_isolated=True,
                                proxy_workers=1) as proxy:  # fmt: skip
            assert proxy.address is not None and len(proxy._workers) == 1  # the data path is in the worker
            busy = [await asyncio.open_connection(proxy.address.host, proxy.address.port) for _ in range(2)]
            for _, w in busy:
                w.write(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n")
            await eventually(lambda: sum(r["client_connections"] for r in proxy.metrics_json()) == 2)
            answers = await asyncio.gather(*(raw_request(proxy.address, b"") for _ in range(20)))
            assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers)

            def summed() -> int | None:
                n = sum(int(m["refused"]) for m in map(REFUSED.match, lines_of(log_file)) if m)
                return n if n >= 20 else None

            assert await eventually(summed, timeout=5) == 20
            for _, w in busy:
                w.close()
