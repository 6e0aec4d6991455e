"""The DNS answer cache: packed answers by query key, bounded in entries and bytes.

Pure data structures (no sockets, no clock): `DnsServer` owns one `ViewCaches` per view,
fills them on a miss and prunes them on each snapshot (see server.py for the hot path).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from beacon.dns.resolver import Answer, View, pack, rotation, truncated

MAX_CACHE_ENTRIES = 20000  # bound against random names; cleared (not evicted) when reached
MAX_CACHE_BYTES = 64 << 20  # and by size (packed answers over TCP reach 64 KB per rotation)
_ENTRY_OVERHEAD = 300  # bytes of key, entry object and index slot, roughly


class CachedAnswer:
    """A cached answer: its packed forms (minus the ID), handed out in turn.

    Rotations are packed one at a time as they are first handed out, so a
    miss packs exactly the one reply it sends (a big answer packs 16 times
    only over 16 queries, and never when it is sent truncated). Once every
    rotation is packed, `next` is a C-level cycle and the answer is dropped.
    """

    __slots__ = ("_answer", "_count", "_given", "_limit", "_packed", "hits", "next", "qtype", "rcode", "size")

    def __init__(self, answer: Answer | None, first: bytes, count: int, limit: int, qtype: int, rcode: int) -> None:
        self.hits = 0
        self.qtype = qtype
        self.rcode = rcode
        self._packed = [first]
        self._count = count
        self._given = 0
        self._limit = limit
        # What the cache accounts for: every rotation is as long as the first.
        self.size = len(first) * count + _ENTRY_OVERHEAD
        self._answer: Answer | None = None
        if count <= 1 or answer is None:
            self.next: Callable[[], bytes] = itertools.repeat(first).__next__
        else:
            self._answer = answer
            self.next = self._pack_next

    def _pack_next(self) -> bytes:
        i = self._given
        self._given = i + 1
        packed = self._packed
        answer = self._answer
        if i < len(packed) or answer is None:
            out = packed[i % len(packed)]
        else:
            out = pack(rotation(answer, i, self._count))[2:]
            if len(out) + 2 > self._limit:  # an order that compresses worse: send it truncated
                out = pack(truncated(answer))[2:]
            packed.append(out)
        if self._given >= self._count:
            self._answer = None
            self.next = itertools.cycle(packed).__next__  # the next turn is rotation 0 again
        return out


class Forward:
    """A cached decision: this query is not ours, send it upstream."""

    __slots__ = ("qend", "qtype")

    def __init__(self, qend: int, qtype: int) -> None:
        self.qend = qend
        self.qtype = qtype



class AnswerCache:
    """Packed answers by query key (minus the ID, name lowercased), bounded in
    entries and bytes, with the index of which service each one depends on."""

    __slots__ = ("bytes", "deps", "entries")

    def __init__(self) -> None:
        self.entries: dict[bytes, CachedAnswer] = {}
        # Keys by the one service their answer depends on; None: on anything.
        self.deps: dict[str | None, list[bytes]] = {}
        self.bytes = 0

    def full(self, entry: CachedAnswer) -> bool:
        return len(self.entries) >= MAX_CACHE_ENTRIES or self.bytes + entry.size > MAX_CACHE_BYTES

    def add(self, key: bytes, entry: CachedAnswer, service: str | None) -> None:
        self.entries[key] = entry
        self.bytes += entry.size
        keys = self.deps.get(service)
        if keys is None:
            self.deps[service] = [key]
        else:
            keys.append(key)

    def prune(self, changed: set[str], count: Callable[[int, int, int], None]) -> None:
        """Drop the entries of `changed` services and every unattributed one."""
        for name in (None, *changed):
            # Each cached key is listed under exactly one name (a key is
            # cached only on a miss, and the index is cleared with the cache).
            for key in self.deps.pop(name, ()):
                e = self.entries.pop(key, None)
                if e is not None:
                    self.bytes -= e.size
                    if e.hits:
                        count(e.qtype, e.rcode, e.hits)

    def fold(self, count: Callable[[int, int, int], None]) -> None:
        for e in self.entries.values():
            if e.hits:
                count(e.qtype, e.rcode, e.hits)
                e.hits = 0

    def clear(self) -> None:
        # In place: the UDP read loop holds a reference to `entries`.
        self.entries.clear()
        self.deps.clear()
        self.bytes = 0


class ViewCaches:
    """The UDP and TCP caches of one view: answers differ by what the querier can reach.

    So do forward decisions: the reverse name of a container's address on a
    network is answered to a querier on that network and forwarded for any
    other, like an unknown address (never shared across views).
    """

    __slots__ = ("fwd", "tcp", "udp", "view")

    def __init__(self, view: View) -> None:
        self.view = view
        self.udp = AnswerCache()
        self.tcp = AnswerCache()
        self.fwd: dict[bytes, Forward] = {}
