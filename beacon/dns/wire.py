"""Byte-level helpers for the paths that must not pay for a full parse.

Error replies for packets dnslib cannot parse, REFUSED / SERVFAIL for
forwarded queries, and finding where the question ends. Pure functions over
bytes: no sockets, no clock.
"""

from __future__ import annotations

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

HEADER_LEN = 12
# A real query is a header, one name of at most 255 bytes, type, class and an
# OPT record with a few options; anything this large is not a query.
MAX_QUERY_LEN = 4096

_QR = 0x80  # in the third byte
_TC = 0x02
_OPCODE_MASK = 0x78
_RD = 0x01
_RA = 0x80  # in the fourth byte


def is_response(data: bytes) -> bool:
    return len(data) >= 3 and bool(data[2] & _QR)


def header_reply(data: bytes, rcode: int) -> bytes | None:
    """A bare reply (no sections) to a query we could not parse.

    None when there is nothing to answer: shorter than a header (no ID to
    echo) or itself a response (answering it could start a loop between two
    servers).
    """
    if len(data) < HEADER_LEN or data[2] & _QR:
        return None
    flags = bytes((_QR | (data[2] & (_OPCODE_MASK | _RD)), rcode & 0x0F))
    return data[:2] + flags + b"\x00" * 8


def question_end(data: bytes) -> int | None:
    """Offset just past the first question (name, type, class), or None.

    Follows no compression pointer (a query's first name has nothing before
    it to point at); a pointer ends the name, as on the wire.
    """
    pos = HEADER_LEN
    end = len(data)
    if end < HEADER_LEN or data[4:6] == b"\x00\x00":
        return None
    total = 0
    while True:
        if pos >= end:
            return None
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 == 0xC0:
            pos += 2
            break
        if length & 0xC0:
            return None
        total += length + 1
        if total > 255:
            return None
        pos += 1 + length
    pos += 4
    return pos if pos <= end else None


def name_end(data: bytes) -> int | None:
    """Offset just past the first question's name when it is plain labels, else None.

    None also for a name with a compression pointer or an extended label
    type: only then is lowercasing the name's bytes exactly DNS's ASCII case
    folding (length bytes are below 64, so `bytes.lower` leaves them alone).
    """
    pos = HEADER_LEN
    end = len(data)
    while pos < end:
        length = data[pos]
        if length == 0:
            return pos + 1 if pos - HEADER_LEN < 255 else None
        if length & 0xC0:
            return None
        pos += 1 + length
    return None


def case_folded(data: bytes) -> tuple[bytes, int] | None:
    """(the query minus its ID with the first name lowercased, where that name ends).

    The cache key: queries that differ only in the case of their name
    (0x20-randomising resolvers, or an attacker busting the cache) share one
    entry. None when the name is not plain labels (the raw bytes are the key).
    """
    nend = name_end(data)
    if nend is None:
        return None
    name = data[HEADER_LEN:nend]
    low = name.lower()
    if low is name or low == name:
        return data[2:], nend
    return data[2:HEADER_LEN] + low + data[nend:], nend


def question_reply(data: bytes, qend: int, rcode: int, *, ra: bool) -> bytes:
    """A reply carrying the query's question and `rcode`, nothing else.

    Used for REFUSED (forwarding not allowed) and SERVFAIL (every upstream
    failed): cheap enough for the forwarding path, no parse.
    """
    flags = bytes(
        (_QR | (data[2] & (_OPCODE_MASK | _RD)), (_RA if ra else 0) | (data[3] & 0x10) | (rcode & 0x0F))
    )
    return data[:2] + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + data[HEADER_LEN:qend]


MIN_UDP_PAYLOAD = 512  # RFC 1035: what a client without EDNS accepts
MAX_UDP_PAYLOAD = 4096  # the most we send over UDP whatever the client claims
_T_OPT = 41
# Our OPT record in a truncated reply: root owner, type OPT, 4096, no flags.
_OPT_RR = b"\x00\x00\x29" + MAX_UDP_PAYLOAD.to_bytes(2, "big") + b"\x00\x00\x00\x00\x00\x00"


def udp_limit(data: bytes, qend: int) -> tuple[int, bool]:
    """(largest UDP reply the client of query `data` accepts, whether it sent EDNS).

    The OPT record is looked for where a query has it: the first record
    after the question when the query carries only additional records.
    Anything else counts as no EDNS: 512 bytes, the safe reading.
    """
    if data[6:10] != b"\x00\x00\x00\x00" or data[10:12] == b"\x00\x00":
        return MIN_UDP_PAYLOAD, False
    if len(data) < qend + 11 or data[qend] != 0 or int.from_bytes(data[qend + 1 : qend + 3], "big") != _T_OPT:
        return MIN_UDP_PAYLOAD, False
    size = int.from_bytes(data[qend + 3 : qend + 5], "big")
    return max(MIN_UDP_PAYLOAD, min(size, MAX_UDP_PAYLOAD)), True


def truncate_reply(reply: bytes, qend: int, *, edns: bool) -> bytes:
    """`reply` cut to its header and question with TC set (RFC 2181 section 9),
    plus our OPT when the client spoke EDNS: the client retries over TCP."""
    flags = bytes((reply[2] | _TC, reply[3]))
    counts = b"\x00\x01\x00\x00\x00\x00" + (b"\x00\x01" if edns else b"\x00\x00")
    return reply[:2] + flags + counts + reply[HEADER_LEN:qend] + (_OPT_RR if edns else b"")


def rcode_of(reply: bytes) -> int:
    return reply[3] & 0x0F if len(reply) >= 4 else SERVFAIL


def qtype_at(data: bytes, qend: int) -> int:
    return int.from_bytes(data[qend - 4 : qend - 2], "big")
