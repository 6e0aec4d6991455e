"""Consul's common query options, parsed as Consul's HTTP layer parses them (pure).

?dc, ?stale/?consistent, ?wait (a Go duration), ?index (a uint64), ?token; boolean flags such
as ?passing; and the jitter Consul adds to a blocking query's wait.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from multidict import MultiMapping

from beacon.api.consul.errors import ConsulError

DEFAULT_WAIT = 300.0  # Consul: 5 min when ?wait is absent or not above zero
MAX_WAIT = 600.0  # Consul: 10 min at most
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration, which Consul uses for ?wait: '10s', '5m', '120000ms', '1h30m', '-1s', '0'.

    Returns seconds; raises ValueError for anything Go would reject.
    """
    if len(text) > 64:
        raise ValueError("duration too long")
    body = text
    sign = 1.0
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    while pos < len(body):
        m = _GO_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


@dataclass(frozen=True, slots=True)
class QueryOptions:
    """Consul's common query parameters, parsed like Consul's HTTP layer does."""

    index: int | None = None  # ?index= (a blocking query when present and above 0)
    wait: float = DEFAULT_WAIT  # ?wait= clamped to (0, MAX_WAIT], jitter not included
    stale: bool = False
    token: str | None = None  # ?token=


def parse_query_options(query: MultiMapping[str], datacenter: str) -> QueryOptions:
    """?dc, ?stale/?consistent, ?wait, ?index (and ?token). Unknown parameters are ignored, as Consul does."""
    dc = query.get("dc", "")
    if dc and dc != datacenter:
        # Consul answers a query for a datacenter it cannot reach with a 500 and this text.
        raise ConsulError(500, "No path to datacenter")
    stale = "stale" in query
    if stale and "consistent" in query:
        raise ConsulError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    wait = DEFAULT_WAIT
    raw_wait = query.get("wait", "")
    if raw_wait:
        try:
            seconds = parse_go_duration(raw_wait)
        except ValueError:
            raise ConsulError(400, "Invalid wait time") from None
        # Consul: a wait at or below zero means the default; above the maximum, the maximum.
        wait = DEFAULT_WAIT if seconds <= 0 else min(seconds, MAX_WAIT)
    index: int | None = None
    raw_index = query.get("index", "")
    if raw_index:
        # Go's strconv.ParseUint(…, 10, 64): digits only, no sign, at most 2^64-1.
        if not re.fullmatch(r"\d{1,20}", raw_index) or int(raw_index) >= 2**64:
            raise ConsulError(400, "Invalid index")
        index = int(raw_index)
    return QueryOptions(index=index, wait=wait, stale=stale, token=query.get("token") or None)


def blocking_timeout(wait: float, rand: Callable[[], float] = random.random) -> float:
    """The wait plus up to wait/16 of jitter, so clients that started together do not return together."""
    return wait + rand() * wait / 16


def parse_flag(query: MultiMapping[str], name: str) -> bool:
    """A Consul boolean flag: `?passing`, `?passing=true`, `?passing=1` are on; `=false`/`=0` off."""
    if name not in query:
        return False
    value = query.get(name, "").strip().lower()
    if value in ("", "1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise ConsulError(400, f"Invalid value for ?{name}: {value[:40]!r}")

