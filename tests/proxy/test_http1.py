"""Table tests of the pure HTTP/1 byte helpers."""

from __future__ import annotations

import pytest

from beacon.proxy.http1 import (
    connection_named,
    drop_named,
    error_response,
    filter_hop_headers,
    filter_response_headers,
    normalise_path,
    parse_absolute,
    status_line,
)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b"", (b"", False, None)),
        (b"\r\nContent-Type: text/plain", (b"\r\nContent-Type: text/plain", False, None)),
        (b"\r\nConnection: keep-alive\r\nX-A: 1", (b"\r\nX-A: 1", False, None)),
        (b"\r\nX-A: 1\r\nconnection: close", (b"\r\nX-A: 1", False, None)),
        (b"\r\nConnection: close, X-Internal\r\nX-Internal: s\r\nX-Public: p", (b"\r\nX-Public: p", False, None)),
        (b"\r\nTransfer-Encoding: chunked\r\nX-A: 1", (b"\r\nX-A: 1", True, None)),
        (b"\r\nTransfer-Encoding: gzip, chunked", (b"", True, None)),
        (b"\r\nTransfer-Encoding: chunked, gzip", (b"", False, None)),
        (b"\r\nUpgrade: websocket\r\nConnection: Upgrade", (b"", False, b"websocket")),
        (b"\r\nKeep-Alive: timeout=5\r\nTrailer: X-T\r\nTE: trailers\r\nProxy-Connection: x\r\nX-A: 1",
         (b"\r\nX-A: 1", False, None)),
        (b"\r\nContent-Length: 5\r\nX-A: 1", (b"\r\nContent-Length: 5\r\nX-A: 1", False, None)),  # passed on
        (b"\r\nX-Upgraded: yes\r\nTeam: blue", (b"\r\nX-Upgraded: yes\r\nTeam: blue", False, None)),
        (b"\r\nConnection: keep-alive\r\nConnection: X-B\r\nX-B: 1", (b"", False, None)),
    ],
)
def test_response_hop_by_hop_headers_are_filtered(block: bytes, expected: tuple[bytes, bool, bytes | None]) -> None:
    assert filter_response_headers(block, block.lower()) == expected
    assert filter_hop_headers(block) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"/a?b", (None, b"/a?b")),
        (b"*", (None, b"*")),
        (b"http://web.localhost/abs?q=1", (b"web.localhost", b"/abs?q=1")),
        (b"HTTP://Web.Localhost:8080", (b"Web.Localhost:8080", b"/")),
        (b"https://a.example.com?x", (b"a.example.com", b"/?x")),
        (b"http://[::1]:80/p", (b"[::1]:80", b"/p")),
        (b"ftp://x/y", (None, b"ftp://x/y")),
    ],
)
def test_absolute_form_targets_split_into_authority_and_path(url: bytes, expected: tuple[bytes | None, bytes]) -> None:
    assert parse_absolute(url) == expected


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (b"keep-alive", set()),
        (b"close", set()),
        (b"Upgrade", set()),
        (b"keep-alive, X-Secret", {b"x-secret"}),
        (b" X-A ,x-b,, close", {b"x-a", b"x-b"}),
    ],
)
def test_connection_header_names_hop_by_hop_headers(value: bytes, named: set[bytes]) -> None:
    assert connection_named(value) == named


def test_drop_named_keeps_every_other_request_line() -> None:
    lines = [b"X-A", b": ", b"1", b"\r\n", b"X-Secret", b": ", b"2", b"\r\n", b"X-B", b": ", b"3", b"\r\n"]
    assert drop_named(lines, {b"x-secret"}) == [b"X-A", b": ", b"1", b"\r\n", b"X-B", b": ", b"3", b"\r\n"]


@pytest.mark.parametrize(
    ("status", "close", "head_only", "expected"),
    [
        (404, False, False, b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Length: 5\r\nX-Request-Id: r1\r\n\r\nnope\n"),
        (502, True, True, b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                          b"Content-Length: 5\r\nX-Request-Id: r1\r\nConnection: close\r\n\r\n"),
        (499, False, False, b"HTTP/1.1 499 Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Length: 5\r\nX-Request-Id: r1\r\n\r\nnope\n"),
    ],
)  # fmt: skip
def test_error_responses_are_complete_and_framed(status: int, close: bool, head_only: bool, expected: bytes) -> None:
    assert error_response(status, "nope", b"r1", close, head_only) == expected


def test_status_lines_are_cached_but_bounded() -> None:
    assert status_line(200, b"OK") == b"HTTP/1.1 200 OK\r\n"
    for i in range(600):  # reasons come from upstreams: any number of them
        assert status_line(200, b"R%d" % i) == b"HTTP/1.1 200 R%d\r\n" % i


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/", b"/"),
        (b"/api/users?x=/../y", b"/api/users?x=/../y"),  # the query is not a path
        (b"/api/../admin/", b"/admin/"),
        (b"/api/%2e%2e/admin/", b"/admin/"),
        (b"/api/%2E%2e/admin", b"/admin"),
        (b"/api//../admin/", b"/admin/"),  # empty segments merge first, as nginx's merge_slashes
        (b"/api/.%2e/admin/", b"/admin/"),
        (b"/a/./b/../c", b"/a/c"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/..", b"/"),
        (b"/../../etc/passwd", b"/etc/passwd"),
        (b"//x//y/", b"/x/y/"),
        (b"/%61pi/%7Euser", b"/api/~user"),  # percent-encoded unreserved characters are decoded
        (b"/a%2Fb/..%2F..%2Fadmin", b"/a%2Fb/..%2F..%2Fadmin"),  # an encoded slash is not a separator
        (b"/a%20b/%3F", b"/a%20b/%3F"),  # reserved and other encodings stay
        (b"/.hidden/x.txt", b"/.hidden/x.txt"),
        (b"/a/...", b"/a/..."),
    ],
)
def test_paths_are_normalised_before_routing(target: bytes, normal: bytes) -> None:
    assert normalise_path(target) == normal
