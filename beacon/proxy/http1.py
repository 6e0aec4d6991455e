"""Pure HTTP/1 byte helpers of the proxy: no sockets, no state, no clock.

Everything here takes and returns bytes so the data path never decodes a
header it only passes on; `tests/proxy/test_http1.py` is their table test.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"
SEP = b": "
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

REASONS = {
    200: b"OK", 308: b"Permanent Redirect", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip

# Request headers that need more than copying (one dict lookup per header).
(
    RQ_HOST, RQ_CONNECTION, RQ_DROP, RQ_TE, RQ_UPGRADE, RQ_EXPECT, RQ_CL,
    RQ_XFF, RQ_XFP, RQ_XFH, RQ_FORWARDED, RQ_REQID, RQ_COOKIE,
) = range(13)  # fmt: skip
REQUEST_HEADERS: dict[bytes, int] = {
    b"host": RQ_HOST,
    b"connection": RQ_CONNECTION,
    b"keep-alive": RQ_DROP,
    b"proxy-connection": RQ_DROP,
    b"te": RQ_DROP,
    b"trailer": RQ_DROP,
    b"transfer-encoding": RQ_TE,
    b"upgrade": RQ_UPGRADE,
    b"expect": RQ_EXPECT,
    b"content-length": RQ_CL,
    b"x-forwarded-for": RQ_XFF,
    b"x-forwarded-proto": RQ_XFP,
    b"x-forwarded-host": RQ_XFH,
    b"forwarded": RQ_FORWARDED,
    b"x-real-ip": RQ_FORWARDED,
    b"x-request-id": RQ_REQID,
    b"cookie": RQ_COOKIE,
}
# Connection tokens that name no extra hop-by-hop header.
PLAIN_CONNECTION_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
# A lowercase header block that may hold a hop-by-hop header besides Connection.
RARE_HOP = re.compile(rb"\n[ktup]")
# Response headers that are hop-by-hop (and Content-Length, which decides framing).
HOP_HEADER = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade|content-length)"
    rb":[ \t]*([^\r]*)",
    re.IGNORECASE,
)


class UpstreamProtocolError(Exception):
    """An upstream broke HTTP (answered what was not asked): its connection is dropped."""


class RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing with a client error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_status_lines: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_status_lines) < 512:  # reasons come from upstreams: bound the cache
            _status_lines[key] = line
    return line


RETRY_AFTER = b"Retry-After: 5\r\n"


def error_response(status: int, message: str, request_id: bytes, close: bool, head_only: bool = False,
                   extra: bytes = b"") -> bytes:
    """A complete proxy error response: one text/plain line, framed by Content-Length."""
    body = message.encode("utf-8", "replace") + b"\n"
    parts = [
        status_line(status, REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
        b"X-Request-Id: " + request_id + extra + CRLF,  # extra: b"\r\nName: value" lines (TLS hooks)
        # A 503 is "none healthy right now" (a container restarting, every
        # endpoint draining, the connection cap): say when to try again, so
        # clients retry instead of treating it as an answer (RFC 9110 §10.2.3).
        RETRY_AFTER if status == 503 else b"",
        b"Connection: close\r\n" if close else b"",
        CRLF,
        b"" if head_only else body,
    ]
    return b"".join(parts)


def printable(raw: bytes, limit: int = 100) -> str:
    return raw[:limit].decode("ascii", "replace")


def connection_named(value: bytes) -> set[bytes]:
    """The header names a Connection header value makes hop-by-hop (lowercase)."""
    return {t.strip().lower() for t in value.split(b",")} - PLAIN_CONNECTION_TOKENS


def drop_named(lines: list[bytes], named: set[bytes]) -> list[bytes]:
    """Drop the headers in `named` from request lines kept as (name, SEP, value, CRLF) runs."""
    return [x for i in range(0, len(lines), 4) if lines[i].lower() not in named for x in lines[i : i + 4]]


def filter_hop_headers(block: bytes) -> tuple[bytes, bool, bytes | None]:
    """Remove hop-by-hop headers (and those a Connection header names) from a
    raw header block (b"\\r\\nName: value" per header, Content-Length removed
    too); returns (block, chunked, upgrade value)."""
    chunked = False
    upgrade_value: bytes | None = None
    named: set[bytes] = set()
    keep: list[bytes] = []
    pos = 0
    for m in HOP_HEADER.finditer(block):
        lname = m.group(1).lower()
        value = m.group(2)
        if lname == b"content-length":
            continue
        if lname == b"transfer-encoding":
            chunked = value.rstrip().lower().endswith(b"chunked")
        elif lname == b"upgrade":
            upgrade_value = value
        elif lname == b"connection":
            named |= connection_named(value)
        keep.append(block[pos : m.start()])
        pos = m.end()
    keep.append(block[pos:])
    block = b"".join(keep)
    if named:
        lines = block.split(b"\r\n")
        block = b"\r\n".join(ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in named)
    return block, chunked, upgrade_value


_CONTENT_LENGTH_LINE = re.compile(rb"\r\ncontent-length:[^\r]*", re.IGNORECASE)


def drop_content_length(block: bytes) -> bytes:
    """A raw header block without its Content-Length header(s)."""
    return _CONTENT_LENGTH_LINE.sub(b"", block)


def filter_response_headers(block: bytes, low: bytes) -> tuple[bytes, bool, bytes | None]:
    """`filter_hop_headers` with a fast path: a block (and its lowercase copy)
    holding no hop-by-hop header but at most one plain Connection header, as
    nearly every upstream sends, costs a few C-level searches. Hop-by-hop
    names start with k, t, u or p besides "connection"; anything else takes
    the full path."""
    if RARE_HOP.search(low) is not None:
        return filter_hop_headers(block)
    i = low.find(b"\r\nconnection:")
    if i < 0:
        return block, False, None
    j = low.find(b"\r\n", i + 2)
    if j < 0:
        j = len(low)
    if low[i + 13 : j].strip() in PLAIN_CONNECTION_TOKENS and low.find(b"\r\nconnection:", j) < 0:
        return block[:i] + block[j:], False, None
    return filter_hop_headers(block)


def parse_absolute(url: bytes) -> tuple[bytes | None, bytes]:
    """Split an absolute-form target (http://host/path) into authority and path.

    Returns (None, url) for anything else."""
    lower = url[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return None, url
    rest = url[url.find(b"//") + 2 :]
    end = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    host, path = rest[:end], rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return host, path


# Percent-encoded unreserved characters (ALPHA, DIGIT, - . _ ~): RFC 3986
# §6.2.2.2 says they are equivalent to the character itself.
_UNRESERVED_ENCODED = re.compile(rb"%(3[0-9]|4[1-9a-fA-F]|5[0-9aA]|6[1-9a-fA-F]|7[0-9aA]|2[dDeE]|5[fF]|7[eE])")


def _decode(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def normalise_path(target: bytes) -> bytes:
    """The request target's path with percent-encoded unreserved characters
    decoded, empty segments merged (as nginx's `merge_slashes`) and dot
    segments removed (RFC 3986 §5.2.4); the query is left alone.

    An encoded slash (%2F) stays encoded and is not a segment separator, so
    `..%2F` is not a dot segment: routing sees the same segments as a backend
    that decodes %2F only after its own routing. Most targets take the fast
    path (no `%`, `/.` or `//` in the path) and come back unchanged.
    """
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    if b"%" not in path and b"/." not in path and b"//" not in path:
        return target
    if b"%" in path:
        path = _UNRESERVED_ENCODED.sub(_decode, path)
    segments = path.split(b"/")[1:]  # the path starts with "/"
    out: list[bytes] = []
    for seg in segments:
        if seg == b"..":
            if out:
                out.pop()
        elif seg and seg != b".":
            out.append(seg)
    trailing = bool(out) and segments[-1] in (b"", b".", b"..")
    return b"/" + b"/".join(out) + (b"/" if trailing else b"") + query
