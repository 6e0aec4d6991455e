"""One grammar for the values Beacon reads: durations, booleans, DNS names, host:port.

Flags and `BEACON_*` variables (`config.py`), container labels (`labels.py`),
check specs (`checkspec.py`), manual registrations and the API's query
parameters all parse through these functions, so a value accepted in one
place is accepted everywhere (`500ms` is a duration for a check interval, a
flag and `beacon.dns.ttl` alike; the TTL then says it must be whole seconds).

Pure: no I/O, no configuration. Every parser raises ValueError with a message
meant for the user (the caller adds which flag, label or field it was).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DURATION = 365 * 86400.0  # a year: beyond it a value is a typo, not a setting

# ASCII digits only: `\d` would also take "٣٠" (Arabic-Indic digits), which float() reads as 30.
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# RFC 1035 label as Beacon uses it (RFC 1123 allows a leading digit): lowercase.
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOSTPORT = re.compile(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})")


# ---------------------------------------------------------------- durations
def parse_duration(text: str) -> float:
    """'30s', '250ms', '5m', '1h', '1.5s' or a bare number of seconds → seconds."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"expected a duration like 30s, 250ms or 5m, got {text!r}")
    value = float(m.group(1)) * _UNIT[m.group(2)]
    if value > MAX_DURATION:
        raise ValueError(f"duration {text!r} is longer than a year")
    return value


def parse_whole_seconds(text: str) -> int:
    """A duration that must come to whole seconds (a DNS TTL): '30s', '2m', '1000ms', '5'."""
    seconds = parse_duration(text)
    whole = round(seconds)
    if abs(seconds - whole) > 1e-9:
        raise ValueError(f"must be whole seconds, got {text.strip()!r} ({seconds:g} s)")
    return whole


# ----------------------------------------------------------------- booleans
def parse_bool(text: str) -> bool:
    """1/true/yes/on and 0/false/no/off, any case."""
    t = text.strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# ---------------------------------------------------------------- DNS names
def is_dns_label(text: str) -> bool:
    """One lowercase DNS label: 1-63 of a-z 0-9 '-', not starting or ending with '-'."""
    return DNS_LABEL.fullmatch(text) is not None


def is_dns_name(text: str, *, wildcard: bool = False) -> bool:
    """Lowercase labels joined by dots, at most 253 characters, no trailing dot.

    With `wildcard`, a leading '*' label is allowed when at least two labels follow it.
    """
    if not text or len(text) > 253:
        return False
    parts = text.split(".")
    if wildcard and parts[0] == "*" and len(parts) > 2:
        parts = parts[1:]
    return all(DNS_LABEL.fullmatch(p) for p in parts)


# ---------------------------------------------------------------- host:port
@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str) -> HostPort:
    """HOST:PORT or [V6]:PORT; port 0 means "any free port"."""
    m = _HOSTPORT.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return HostPort(host, port)


__all__ = [
    "DNS_LABEL",
    "FALSE_WORDS",
    "MAX_DURATION",
    "TRUE_WORDS",
    "HostPort",
    "is_dns_label",
    "is_dns_name",
    "parse_bool",
    "parse_duration",
    "parse_hostport",
    "parse_whole_seconds",
]
